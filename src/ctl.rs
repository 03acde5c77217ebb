//! `gpuwarden ctl`: talk to a running daemon over its Unix socket. Tables
//! for people (aligned columns, RFC 3339 times in UTC, credits with 6
//! decimals, GPU-seconds with 3), `--json` for scripts (exact nano-credits
//! beside the decimal amounts). A refusal prints its ErrorInfo reason and
//! message, and the command exits non-zero.

use std::io::Write as _;
use std::path::Path;
use std::time::SystemTime;

use clap::{ArgGroup, Args, Subcommand};
use serde_json::{Value, json};
use tonic::transport::Channel;

use crate::api::{client, status};
use crate::inventory::InventoryView;
use crate::metering::Credits;
use crate::proto;
use crate::proto::node_agent_client::NodeAgentClient;

#[derive(Debug, Subcommand)]
pub enum Command {
    /// The daemon's devices, their health and the sessions holding them.
    Inventory,
    /// Start a container with exactly the selected devices.
    Launch(Box<LaunchArgs>),
    /// Stop a session's container (SIGTERM, then SIGKILL after the timeout).
    Stop {
        /// The session id (`s-...`).
        #[arg(value_name = "SESSION")]
        session: String,
        #[command(flatten)]
        caller: AsArgs,
        /// Seconds between SIGTERM and SIGKILL (default: the agent's, 10).
        #[arg(long, value_name = "SECONDS")]
        timeout: Option<u32>,
    },
    /// Running sessions (with --all, ended ones too), oldest first.
    Sessions {
        /// Only sessions of this user or org.
        #[arg(long, value_name = "ID")]
        account: Option<String>,
        /// Include ended sessions.
        #[arg(long)]
        all: bool,
        /// Only sessions created at or after this instant (RFC 3339 in UTC, or a date).
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        from: Option<SystemTime>,
        /// Only sessions created before this instant.
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        to: Option<SystemTime>,
        /// Sessions asked for per call; every page is printed.
        #[arg(long, value_name = "N", default_value_t = 500)]
        page_size: u32,
        #[command(flatten)]
        caller: AsArgs,
    },
    /// GPU-seconds and cost of an account (an org with its sub-accounts),
    /// and the balance that pays for it.
    Usage {
        /// A user or org id.
        #[arg(value_name = "ACCOUNT")]
        account: String,
        /// Start of the period (RFC 3339 in UTC, or a date); default: the beginning.
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        from: Option<SystemTime>,
        /// End of the period (RFC 3339 in UTC, or a date); default: now.
        #[arg(long, value_name = "RFC3339", value_parser = parse_time)]
        to: Option<SystemTime>,
        #[command(flatten)]
        caller: AsArgs,
    },
    /// Follow events (sessions, refusals, balances, health, drain) until
    /// interrupted: one line each, JSON lines with --json.
    Events {
        /// Only events of this user or org.
        #[arg(long, value_name = "ID")]
        account: Option<String>,
        #[command(flatten)]
        caller: AsArgs,
    },
    /// Refuse new launches (NODE_DRAINING); running sessions go on.
    Drain {
        /// Why, for the audit trail and the drain event.
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Accept launches again after a drain.
    Undrain {
        /// Why, for the audit trail and the drain event.
        #[arg(long, value_name = "TEXT", default_value = "")]
        reason: String,
    },
    /// Top up (or correct, with a negative amount) an account's balance.
    Balance {
        /// A user or org id (an org at the top of its tree).
        #[arg(value_name = "ACCOUNT")]
        account: String,
        /// Credits to add, e.g. 100 or 0.5; negative to take away.
        #[arg(long, value_name = "CREDITS", allow_hyphen_values = true, value_parser = parse_credits)]
        add: i64,
        /// Why, for the audit trail.
        #[arg(long, value_name = "TEXT")]
        reason: String,
    },
    /// Who launched, stopped, adjusted, was refused, and why; newest first.
    Audit {
        /// Only entries about this account.
        #[arg(long, value_name = "ID")]
        account: Option<String>,
        /// How many entries at most.
        #[arg(long, default_value_t = 100)]
        limit: u32,
    },
}

/// Acting as a user or service account instead of the local operator: the
/// policy's role rules then apply.
#[derive(Debug, Args)]
pub struct AsArgs {
    /// Act as this user (the local operator otherwise, who sees everything).
    #[arg(long = "as", value_name = "SUBJECT")]
    subject: Option<String>,
    /// The subject is a service account.
    #[arg(long, requires = "subject")]
    service_account: bool,
}

impl AsArgs {
    fn principal(&self) -> Option<proto::Principal> {
        self.subject
            .as_ref()
            .map(|subject| principal(subject, self.service_account))
    }
}

#[derive(Debug, Args)]
#[command(group(ArgGroup::new("devices").required(true).args(["gpus", "mig", "device"])))]
pub struct LaunchArgs {
    /// Who launches: a user id, or a service account's with --service-account.
    #[arg(long = "as", value_name = "SUBJECT")]
    subject: String,
    /// The subject is a service account (needs --org).
    #[arg(long, requires = "org")]
    service_account: bool,
    /// An org session, billed to the org and counted in its pool; without
    /// it the session is personal.
    #[arg(long, value_name = "ORG")]
    org: Option<String>,
    /// This many full GPUs.
    #[arg(long, value_name = "N")]
    gpus: Option<u32>,
    /// Only GPUs whose name contains this (e.g. H100), with --gpus.
    // (`requires` would be met by the group: conflicts say it.)
    #[arg(long, value_name = "NAME", conflicts_with_all = ["mig", "device"])]
    model: Option<String>,
    /// MIG instances of this profile (e.g. 1g.10gb).
    #[arg(long, value_name = "PROFILE")]
    mig: Option<String>,
    /// How many MIG instances, with --mig [default: 1].
    #[arg(long, value_name = "N", conflicts_with_all = ["gpus", "device"])]
    count: Option<u32>,
    /// These devices (GPU or MIG UUIDs); repeat it or separate with commas.
    #[arg(long, value_name = "UUID", value_delimiter = ',')]
    device: Vec<String>,
    /// An environment variable of the container; repeatable.
    #[arg(short, long, value_name = "KEY=VALUE", value_parser = parse_env)]
    env: Vec<(String, String)>,
    /// A named volume of the account, mounted at TARGET; repeatable.
    #[arg(short, long, value_name = "NAME:TARGET[:ro]", value_parser = parse_volume)]
    volume: Vec<proto::VolumeMount>,
    /// The idempotency key: a retry with the same id returns the same
    /// session [default: a fresh UUID].
    #[arg(long, value_name = "ID")]
    request_id: Option<String>,
    /// Print only the session id.
    #[arg(short, long)]
    quiet: bool,
    /// The container image.
    #[arg(value_name = "IMAGE")]
    image: String,
    /// The command, replacing the image's.
    #[arg(
        value_name = "COMMAND",
        trailing_var_arg = true,
        allow_hyphen_values = true
    )]
    command: Vec<String>,
}

fn principal(subject: &str, service_account: bool) -> proto::Principal {
    let kind = if service_account {
        proto::PrincipalKind::ServiceAccount
    } else {
        proto::PrincipalKind::User
    };
    proto::Principal {
        subject: subject.to_owned(),
        kind: kind.into(),
    }
}

/// Runs one `ctl` command against the daemon at `socket`.
pub async fn run(socket: &Path, json: bool, command: Command) -> anyhow::Result<()> {
    let mut agent = client::connect_unix(socket).await?;
    match command {
        Command::Inventory => {
            let inventory = agent
                .get_inventory(proto::GetInventoryRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            print_inventory(&InventoryView::try_from(inventory)?, json)
        }
        Command::Launch(args) => launch(&mut agent, *args, json).await,
        Command::Stop {
            session,
            caller,
            timeout,
        } => {
            let session = agent
                .stop(proto::StopRequest {
                    session_id: session,
                    principal: caller.principal(),
                    timeout_seconds: timeout.unwrap_or(0),
                })
                .await
                .map_err(refused)?
                .into_inner();
            print_sessions(std::slice::from_ref(&session), json, false)
        }
        Command::Sessions {
            account,
            all,
            from,
            to,
            page_size,
            caller,
        } => {
            let mut sessions = Vec::new();
            let mut page_token = String::new();
            loop {
                let page = agent
                    .list_sessions(proto::ListSessionsRequest {
                        principal: caller.principal(),
                        account_id: account.clone().unwrap_or_default(),
                        include_ended: all,
                        page_size,
                        page_token,
                        created_after: from.map(Into::into),
                        created_before: to.map(Into::into),
                    })
                    .await
                    .map_err(refused)?
                    .into_inner();
                sessions.extend(page.sessions);
                if page.next_page_token.is_empty() {
                    break;
                }
                page_token = page.next_page_token;
            }
            print_sessions(&sessions, json, true)
        }
        Command::Usage {
            account,
            from,
            to,
            caller,
        } => {
            let report = agent
                .get_usage(proto::GetUsageRequest {
                    principal: caller.principal(),
                    account_id: account,
                    from: from.map(Into::into),
                    to: to.map(Into::into),
                })
                .await
                .map_err(refused)?
                .into_inner();
            print_usage(&report, json)
        }
        Command::Events { account, caller } => events(&mut agent, account, &caller, json).await,
        Command::Drain { reason } => drain(&mut agent, true, reason, json).await,
        Command::Undrain { reason } => drain(&mut agent, false, reason, json).await,
        Command::Balance {
            account,
            add,
            reason,
        } => {
            let adjusted = agent
                .adjust_balance(proto::AdjustBalanceRequest {
                    account_id: account,
                    delta: Some(proto::Credits { nano_credits: add }),
                    reason,
                })
                .await
                .map_err(refused)?
                .into_inner();
            let balance = nanos(adjusted.balance.as_ref());
            if json {
                print_json(&json!({
                    "account_id": adjusted.account_id,
                    "adjustment_id": adjusted.adjustment_id,
                    "added": Credits(add).as_f64(),
                    "added_nano_credits": add,
                    "balance": Credits(balance).as_f64(),
                    "balance_nano_credits": balance,
                }))
            } else {
                write_stdout(&format!(
                    "{}: {} credits added, balance {} credits (adjustment {})\n",
                    adjusted.account_id,
                    format_credits(add),
                    format_credits(balance),
                    adjusted.adjustment_id
                ))
            }
        }
        Command::Audit { account, limit } => {
            let entries = agent
                .list_audit(proto::ListAuditRequest {
                    account_id: account.unwrap_or_default(),
                    since: None,
                    limit,
                })
                .await
                .map_err(refused)?
                .into_inner()
                .entries;
            print_audit(&entries, json)
        }
    }
}

async fn launch(
    agent: &mut NodeAgentClient<Channel>,
    args: LaunchArgs,
    json: bool,
) -> anyhow::Result<()> {
    let scope = if args.org.is_some() {
        proto::Scope::Org
    } else {
        proto::Scope::Personal
    };
    let devices = proto::DeviceSelector {
        gpu_count: args.gpus.unwrap_or(0),
        gpu_model: args.model.unwrap_or_default(),
        mig_count: if args.mig.is_some() {
            args.count.unwrap_or(1)
        } else {
            0
        },
        mig_profile: args.mig.unwrap_or_default(),
        device_uuids: args.device,
    };
    let session = agent
        .launch(proto::LaunchRequest {
            request_id: args
                .request_id
                .unwrap_or_else(|| uuid::Uuid::new_v4().to_string()),
            principal: Some(principal(&args.subject, args.service_account)),
            scope: scope.into(),
            org_id: args.org.unwrap_or_default(),
            devices: Some(devices),
            container: Some(proto::ContainerSpec {
                image: args.image,
                command: args.command,
                env: args.env.into_iter().collect(),
                volumes: args.volume,
                ..Default::default()
            }),
        })
        .await
        .map_err(refused)?
        .into_inner();
    if args.quiet && !json {
        return write_stdout(&format!("{}\n", session.id));
    }
    print_sessions(std::slice::from_ref(&session), json, false)
}

async fn drain(
    agent: &mut NodeAgentClient<Channel>,
    drain: bool,
    reason: String,
    json: bool,
) -> anyhow::Result<()> {
    let answer = agent
        .set_drain(proto::SetDrainRequest { drain, reason })
        .await
        .map_err(refused)?
        .into_inner();
    if json {
        return print_json(&json!({
            "draining": answer.draining,
            "running_sessions": answer.running_sessions,
        }));
    }
    let sessions = plural(answer.running_sessions as usize, "session", "sessions");
    write_stdout(&if answer.draining {
        format!("draining: new launches are refused with NODE_DRAINING; {sessions} still running\n")
    } else {
        format!("not draining: launches are accepted; {sessions} running\n")
    })
}

async fn events(
    agent: &mut NodeAgentClient<Channel>,
    account: Option<String>,
    caller: &AsArgs,
    json: bool,
) -> anyhow::Result<()> {
    let mut stream = agent
        .watch_events(proto::WatchEventsRequest {
            principal: caller.principal(),
            account_id: account.unwrap_or_default(),
        })
        .await
        .map_err(refused)?
        .into_inner();
    // The agent has subscribed once its answer arrived: from here on no
    // event is missed. Said on stderr so stdout stays one event a line.
    eprintln!("following events; interrupt (Ctrl-C) to stop");
    loop {
        let event = match stream.message().await {
            Ok(Some(event)) => event,
            Ok(None) => anyhow::bail!("the agent ended the event stream (is it stopping?)"),
            Err(status) => return Err(refused(status)),
        };
        let line = if json {
            let mut line = serde_json::to_string(&event_json(&event))?;
            line.push('\n');
            line
        } else {
            event_line(&event)
        };
        match write_raw(&line) {
            Ok(()) => {}
            // The reader went away (`| head`): done.
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(e.into()),
        }
    }
}

/// A status from the agent, as the user should read it: the reason first.
pub fn refused(status: tonic::Status) -> anyhow::Error {
    let reason = status::reason_of(&status).unwrap_or_else(|| format!("{:?}", status.code()));
    anyhow::anyhow!("{reason}: {}", status.message())
}

// ---- Sessions ----

/// A proto enum's name without its prefix, lower case: `running`.
fn enum_name(name: Option<&'static str>, prefix: &str, raw: i32) -> String {
    match name {
        Some(name) => name
            .strip_prefix(prefix)
            .unwrap_or(name)
            .to_ascii_lowercase(),
        None => raw.to_string(),
    }
}

fn state_name(session: &proto::Session) -> String {
    let name = proto::SessionState::try_from(session.state)
        .ok()
        .map(|s| s.as_str_name());
    enum_name(name, "SESSION_STATE_", session.state)
}

fn scope_name(scope: i32) -> String {
    let name = proto::Scope::try_from(scope).ok().map(|s| s.as_str_name());
    enum_name(name, "SCOPE_", scope)
}

fn billing_name(path: i32) -> String {
    let name = proto::BillingPath::try_from(path)
        .ok()
        .map(|s| s.as_str_name());
    enum_name(name, "BILLING_PATH_", path)
}

fn principal_kind_name(kind: i32) -> String {
    let name = proto::PrincipalKind::try_from(kind)
        .ok()
        .map(|s| s.as_str_name());
    enum_name(name, "PRINCIPAL_KIND_", kind)
}

/// The end reason, empty while the session runs.
fn end_reason_name(reason: i32) -> String {
    match proto::EndReason::try_from(reason) {
        Ok(proto::EndReason::Unspecified) => String::new(),
        Ok(reason) => enum_name(Some(reason.as_str_name()), "END_REASON_", 0),
        Err(_) => reason.to_string(),
    }
}

fn session_json(session: &proto::Session) -> Value {
    let cost = nanos(session.cost.as_ref());
    json!({
        "id": session.id,
        "request_id": session.request_id,
        "node_id": session.node_id,
        "state": state_name(session),
        "scope": scope_name(session.scope),
        "account_id": session.account_id,
        "billed_account_id": session.billed_account_id,
        "owner": session.owner,
        "owner_kind": principal_kind_name(session.owner_kind),
        "image": session.image,
        "container_id": session.container_id,
        "device_uuids": session.device_uuids,
        "started_at": rfc3339_millis(session.started_at),
        "ended_at": rfc3339_millis(session.ended_at),
        "end_reason": non_empty(end_reason_name(session.end_reason)),
        "end_detail": non_empty(session.end_detail.clone()),
        "device_seconds": session.device_seconds,
        "gpu_seconds": session.gpu_seconds,
        "billing_path": billing_name(session.billing_path),
        "cost": Credits(cost).as_f64(),
        "cost_nano_credits": cost,
    })
}

fn print_sessions(sessions: &[proto::Session], json: bool, summary: bool) -> anyhow::Result<()> {
    if json {
        let rows: Vec<Value> = sessions.iter().map(session_json).collect();
        return if summary {
            print_json(&Value::Array(rows))
        } else {
            // One session (launch, stop): the object itself.
            print_json(rows.first().unwrap_or(&Value::Null))
        };
    }
    let mut table = Table::new(&[
        ("SESSION", Align::Left),
        ("STATE", Align::Left),
        ("SCOPE", Align::Left),
        ("ACCOUNT", Align::Left),
        ("OWNER", Align::Left),
        ("STARTED", Align::Left),
        ("ENDED", Align::Left),
        ("END", Align::Left),
        ("GPU-SECONDS", Align::Right),
        ("COST", Align::Right),
        ("IMAGE", Align::Left),
        ("DEVICES", Align::Left),
    ]);
    for session in sessions {
        table.row(vec![
            session.id.clone(),
            state_name(session),
            scope_name(session.scope),
            session.account_id.clone(),
            session.owner.clone(),
            dash(rfc3339_seconds(session.started_at)),
            dash(rfc3339_seconds(session.ended_at)),
            dash(non_empty(end_reason_name(session.end_reason))),
            format!("{:.3}", session.gpu_seconds),
            format_credits(nanos(session.cost.as_ref())),
            session.image.clone(),
            session.device_uuids.join(","),
        ]);
    }
    let mut text = table.render();
    if summary {
        let running = sessions
            .iter()
            .filter(|s| s.state() != proto::SessionState::Ended)
            .count();
        text.push_str(&format!(
            "{} ({running} running)\n",
            plural(sessions.len(), "session", "sessions")
        ));
    }
    write_stdout(&text)
}

// ---- Usage ----

fn print_usage(report: &proto::UsageReport, json: bool) -> anyhow::Result<()> {
    let total_cost: i64 = report
        .lines
        .iter()
        .map(|l| nanos(l.cost.as_ref()))
        .fold(0, i64::saturating_add);
    // Folded from 0.0: an empty f64 sum is -0.0, which prints as "-0.000".
    let total_device = report
        .lines
        .iter()
        .fold(0.0, |sum, l| sum + l.device_seconds);
    let total_gpu = report.lines.iter().fold(0.0, |sum, l| sum + l.gpu_seconds);
    let balance = nanos(report.balance.as_ref());
    if json {
        let lines: Vec<Value> = report
            .lines
            .iter()
            .map(|line| {
                let cost = nanos(line.cost.as_ref());
                json!({
                    "account_id": line.account_id,
                    "scope": scope_name(line.scope),
                    "billing_path": billing_name(line.billing_path),
                    "device_class": line.device_class,
                    "device_seconds": line.device_seconds,
                    "gpu_seconds": line.gpu_seconds,
                    "cost": Credits(cost).as_f64(),
                    "cost_nano_credits": cost,
                })
            })
            .collect();
        return print_json(&json!({
            "account_id": report.account_id,
            "from": rfc3339_millis(report.from),
            "to": rfc3339_millis(report.to),
            "lines": lines,
            "total": {
                "device_seconds": total_device,
                "gpu_seconds": total_gpu,
                "cost": Credits(total_cost).as_f64(),
                "cost_nano_credits": total_cost,
            },
            "billed_account_id": report.billed_account_id,
            "balance": Credits(balance).as_f64(),
            "balance_nano_credits": balance,
        }));
    }
    let mut text = format!(
        "usage of {} from {} to {}\n",
        report.account_id,
        dash(rfc3339_seconds(report.from)),
        dash(rfc3339_seconds(report.to))
    );
    let mut table = Table::new(&[
        ("ACCOUNT", Align::Left),
        ("SCOPE", Align::Left),
        ("BILLING", Align::Left),
        ("DEVICE CLASS", Align::Left),
        ("DEVICE-SECONDS", Align::Right),
        ("GPU-SECONDS", Align::Right),
        ("COST", Align::Right),
    ]);
    for line in &report.lines {
        table.row(vec![
            line.account_id.clone(),
            scope_name(line.scope),
            billing_name(line.billing_path),
            line.device_class.clone(),
            format!("{:.3}", line.device_seconds),
            format!("{:.3}", line.gpu_seconds),
            format_credits(nanos(line.cost.as_ref())),
        ]);
    }
    table.row(vec![
        "total".into(),
        String::new(),
        String::new(),
        String::new(),
        format!("{total_device:.3}"),
        format!("{total_gpu:.3}"),
        format_credits(total_cost),
    ]);
    text.push_str(&table.render());
    text.push_str(&format!(
        "balance of {}: {} credits\n",
        report.billed_account_id,
        format_credits(balance)
    ));
    write_stdout(&text)
}

// ---- Events ----

fn event_kind_name(kind: Option<&proto::event::Kind>) -> &'static str {
    use proto::event::Kind;
    match kind {
        Some(Kind::SessionStarted(_)) => "session_started",
        Some(Kind::SessionEnded(_)) => "session_ended",
        Some(Kind::LaunchRefused(_)) => "launch_refused",
        Some(Kind::DeviceHealthChanged(_)) => "device_health_changed",
        Some(Kind::BalanceLow(_)) => "balance_low",
        Some(Kind::BalanceExhausted(_)) => "balance_exhausted",
        Some(Kind::DrainChanged(_)) => "drain_changed",
        Some(Kind::SessionStopScheduled(_)) => "session_stop_scheduled",
        Some(Kind::InventoryChanged(_)) => "inventory_changed",
        None => "unknown",
    }
}

fn health_name(health: Option<&proto::HealthStatus>) -> (String, String) {
    let Some(health) = health else {
        return ("unknown".into(), String::new());
    };
    let name = proto::DeviceHealth::try_from(health.state)
        .ok()
        .map(|h| h.as_str_name());
    (
        enum_name(name, "DEVICE_HEALTH_", health.state),
        health.reason.clone(),
    )
}

fn event_json(event: &proto::Event) -> Value {
    use proto::event::Kind;
    let mut value = json!({
        "sequence": event.sequence,
        "at": rfc3339_millis(event.at),
        "kind": event_kind_name(event.kind.as_ref()),
    });
    let fields = match &event.kind {
        Some(Kind::SessionStarted(e) | Kind::SessionEnded(e)) => {
            json!({ "session": e.session.as_ref().map(session_json) })
        }
        Some(Kind::LaunchRefused(e)) => json!({
            "request_id": e.request_id,
            "principal": e.principal.as_ref().map(|p| json!({
                "subject": p.subject,
                "kind": principal_kind_name(p.kind),
            })),
            "account_id": e.account_id,
            "reason": e.reason,
            "message": e.message,
        }),
        Some(Kind::DeviceHealthChanged(e)) => {
            let (health, reason) = health_name(e.health.as_ref());
            json!({ "device_uuid": e.device_uuid, "health": health, "reason": non_empty(reason) })
        }
        Some(Kind::BalanceLow(e) | Kind::BalanceExhausted(e)) => {
            let balance = nanos(e.balance.as_ref());
            json!({
                "account_id": e.account_id,
                "balance": Credits(balance).as_f64(),
                "balance_nano_credits": balance,
                "session_ids": e.session_ids,
                "stop_at": rfc3339_millis(e.stop_at),
            })
        }
        Some(Kind::DrainChanged(e)) => json!({ "draining": e.draining, "reason": e.reason }),
        Some(Kind::SessionStopScheduled(e)) => json!({
            "session_id": e.session_id,
            "reason": end_reason_name(e.reason),
            "stop_at": rfc3339_millis(e.stop_at),
        }),
        Some(Kind::InventoryChanged(e)) => json!({
            "added_uuids": e.added_uuids,
            "removed_uuids": e.removed_uuids,
        }),
        None => json!({}),
    };
    if let (Some(value), Value::Object(fields)) = (value.as_object_mut(), fields) {
        value.extend(fields);
    }
    value
}

/// One event for people: time, kind, then what it is about.
fn event_line(event: &proto::Event) -> String {
    use proto::event::Kind;
    let detail = match &event.kind {
        Some(Kind::SessionStarted(e) | Kind::SessionEnded(e)) => match &e.session {
            Some(s) => {
                let mut text = format!(
                    "{} {} account={} owner={} image={} devices={}",
                    s.id,
                    state_name(s),
                    s.account_id,
                    s.owner,
                    s.image,
                    s.device_uuids.join(",")
                );
                let end = end_reason_name(s.end_reason);
                if !end.is_empty() {
                    text.push_str(&format!(
                        " end={end} gpu_seconds={:.3} cost={}",
                        s.gpu_seconds,
                        format_credits(nanos(s.cost.as_ref()))
                    ));
                }
                text
            }
            None => String::new(),
        },
        Some(Kind::LaunchRefused(e)) => format!(
            "{} by {} account={} request={}: {}",
            e.reason,
            e.principal.as_ref().map_or("-", |p| p.subject.as_str()),
            e.account_id,
            e.request_id,
            e.message
        ),
        Some(Kind::DeviceHealthChanged(e)) => {
            let (health, reason) = health_name(e.health.as_ref());
            if reason.is_empty() {
                format!("{} {health}", e.device_uuid)
            } else {
                format!("{} {health}: {reason}", e.device_uuid)
            }
        }
        Some(Kind::BalanceLow(e) | Kind::BalanceExhausted(e)) => {
            let mut text = format!(
                "{} balance={}",
                e.account_id,
                format_credits(nanos(e.balance.as_ref()))
            );
            if !e.session_ids.is_empty() {
                text.push_str(&format!(" sessions={}", e.session_ids.join(",")));
            }
            if let Some(at) = rfc3339_seconds(e.stop_at) {
                text.push_str(&format!(" stop_at={at}"));
            }
            text
        }
        Some(Kind::DrainChanged(e)) => {
            let mut text = format!("draining={}", e.draining);
            if !e.reason.is_empty() {
                text.push_str(&format!(" reason={}", e.reason));
            }
            text
        }
        Some(Kind::SessionStopScheduled(e)) => format!(
            "{} reason={} stop_at={}",
            e.session_id,
            end_reason_name(e.reason),
            dash(rfc3339_seconds(e.stop_at))
        ),
        Some(Kind::InventoryChanged(e)) => format!(
            "added={} removed={}",
            dash(non_empty(e.added_uuids.join(","))),
            dash(non_empty(e.removed_uuids.join(",")))
        ),
        None => String::new(),
    };
    format!(
        "{}  {:<22}  {detail}\n",
        dash(rfc3339_millis(event.at)),
        event_kind_name(event.kind.as_ref())
    )
}

// ---- Audit ----

fn print_audit(entries: &[proto::AuditEntry], json: bool) -> anyhow::Result<()> {
    if json {
        let rows: Vec<Value> = entries
            .iter()
            .map(|entry| {
                json!({
                    "id": entry.id,
                    "at": rfc3339_millis(entry.at).unwrap_or_default(),
                    "action": entry.action,
                    "actor": entry.actor,
                    "account_id": entry.account_id,
                    "session_id": entry.session_id,
                    "reason": entry.reason,
                    "detail": entry.detail,
                })
            })
            .collect();
        return print_json(&Value::Array(rows));
    }
    let mut table = Table::new(&[
        ("AT", Align::Left),
        ("ACTION", Align::Left),
        ("ACTOR", Align::Left),
        ("ACCOUNT", Align::Left),
        ("SESSION", Align::Left),
        ("REASON", Align::Left),
        ("DETAIL", Align::Left),
    ]);
    for entry in entries {
        table.row(vec![
            dash(rfc3339_millis(entry.at)),
            entry.action.clone(),
            entry.actor.clone(),
            dash(non_empty(entry.account_id.clone())),
            dash(non_empty(entry.session_id.clone())),
            dash(non_empty(entry.reason.clone())),
            entry.detail.clone(),
        ]);
    }
    write_stdout(&table.render())
}

// ---- Output ----

/// The inventory as a table, or JSON.
pub fn print_inventory(view: &InventoryView, json: bool) -> anyhow::Result<()> {
    let text = if json {
        let mut text = serde_json::to_string_pretty(view)?;
        text.push('\n');
        text
    } else {
        view.render_table()
    };
    write_stdout(&text)
}

fn print_json(value: &Value) -> anyhow::Result<()> {
    let mut text = serde_json::to_string_pretty(value)?;
    text.push('\n');
    write_stdout(&text)
}

/// Writes to stdout; a reader that went away (`| head`) is not an error.
pub fn write_stdout(text: &str) -> anyhow::Result<()> {
    match write_raw(text) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn write_raw(text: &str) -> std::io::Result<()> {
    let mut out = std::io::stdout().lock();
    out.write_all(text.as_bytes())?;
    out.flush()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Align {
    Left,
    Right,
}

/// Columns as wide as their widest cell, two spaces apart; numbers are
/// right-aligned under headers that start where their column starts.
#[derive(Debug)]
struct Table {
    columns: Vec<(&'static str, Align)>,
    rows: Vec<Vec<String>>,
}

impl Table {
    fn new(columns: &[(&'static str, Align)]) -> Self {
        Self {
            columns: columns.to_vec(),
            rows: Vec::new(),
        }
    }

    fn row(&mut self, cells: Vec<String>) {
        self.rows.push(cells);
    }

    fn render(&self) -> String {
        let header: Vec<String> = self.columns.iter().map(|(h, _)| (*h).to_owned()).collect();
        let mut widths: Vec<usize> = header.iter().map(|h| h.chars().count()).collect();
        for row in &self.rows {
            for (width, cell) in widths.iter_mut().zip(row) {
                *width = (*width).max(cell.chars().count());
            }
        }
        let mut text = String::new();
        for (n, row) in std::iter::once(&header).chain(&self.rows).enumerate() {
            let mut line = String::new();
            for (i, ((cell, width), (_, align))) in
                row.iter().zip(&widths).zip(&self.columns).enumerate()
            {
                if i > 0 {
                    line.push_str("  ");
                }
                let pad = width.saturating_sub(cell.chars().count());
                // Headers start where their column starts.
                if *align == Align::Right && n > 0 {
                    line.extend(std::iter::repeat_n(' ', pad));
                    line.push_str(cell);
                } else {
                    line.push_str(cell);
                    line.extend(std::iter::repeat_n(' ', pad));
                }
            }
            text.push_str(line.trim_end());
            text.push('\n');
        }
        text
    }
}

fn plural(n: usize, one: &str, many: &str) -> String {
    format!("{n} {}", if n == 1 { one } else { many })
}

fn non_empty(text: String) -> Option<String> {
    (!text.is_empty()).then_some(text)
}

fn dash(text: Option<String>) -> String {
    text.unwrap_or_else(|| "-".to_owned())
}

fn system_time(at: Option<prost_types::Timestamp>) -> Option<SystemTime> {
    at.and_then(|t| SystemTime::try_from(t).ok())
}

fn rfc3339_seconds(at: Option<prost_types::Timestamp>) -> Option<String> {
    system_time(at).map(|t| humantime::format_rfc3339_seconds(t).to_string())
}

fn rfc3339_millis(at: Option<prost_types::Timestamp>) -> Option<String> {
    system_time(at).map(|t| humantime::format_rfc3339_millis(t).to_string())
}

// ---- Credits and arguments ----

fn nanos(credits: Option<&proto::Credits>) -> i64 {
    credits.map_or(0, |c| c.nano_credits)
}

/// Nano-credits as credits with 6 decimals, rounded half away from zero,
/// in integers (no float rounding on large balances).
pub fn format_credits(nano_credits: i64) -> String {
    let micro = nano_credits.unsigned_abs().saturating_add(500) / 1_000;
    let sign = if nano_credits < 0 && micro > 0 {
        "-"
    } else {
        ""
    };
    format!("{sign}{}.{:06}", micro / 1_000_000, micro % 1_000_000)
}

/// A decimal amount of credits (`100`, `0.5`, `-2.25`) to nano-credits,
/// exactly.
pub fn parse_credits(text: &str) -> Result<i64, String> {
    let problem = || format!("`{text}` is not an amount of credits: write e.g. 100, 0.5 or -2.25");
    let (negative, digits) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.strip_prefix('+').unwrap_or(text)),
    };
    let (whole, fraction) = digits.split_once('.').unwrap_or((digits, ""));
    if (whole.is_empty() && fraction.is_empty())
        || !whole
            .chars()
            .chain(fraction.chars())
            .all(|c| c.is_ascii_digit())
    {
        return Err(problem());
    }
    if fraction.len() > 9 {
        return Err(format!(
            "`{text}` has more than 9 decimals: credits are counted in billionths"
        ));
    }
    let whole: i64 = if whole.is_empty() {
        0
    } else {
        whole.parse().map_err(|_| problem())?
    };
    let fraction: i64 = format!("{fraction:0<9}").parse().map_err(|_| problem())?;
    let amount = whole
        .checked_mul(Credits::NANOS_PER_CREDIT)
        .and_then(|n| n.checked_add(fraction))
        .ok_or_else(|| format!("`{text}` is too large"))?;
    Ok(if negative { -amount } else { amount })
}

/// An RFC 3339 time in UTC (`2026-01-31T12:00:00Z`, fractions allowed) or
/// a date (`2026-01-31`, midnight UTC).
pub fn parse_time(text: &str) -> Result<SystemTime, String> {
    let full = if text.len() == 10 {
        format!("{text}T00:00:00Z")
    } else {
        text.to_owned()
    };
    humantime::parse_rfc3339(&full).map_err(|e| {
        format!("`{text}`: {e}; write a UTC time such as 2026-01-31T12:00:00Z, or a date")
    })
}

fn parse_env(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        _ => Err(format!("`{text}` is not KEY=VALUE")),
    }
}

fn parse_volume(text: &str) -> Result<proto::VolumeMount, String> {
    let problem = || format!("`{text}` is not NAME:TARGET or NAME:TARGET:ro");
    let mut parts = text.splitn(3, ':');
    let name = parts.next().filter(|n| !n.is_empty()).ok_or_else(problem)?;
    let target = parts.next().filter(|t| !t.is_empty()).ok_or_else(problem)?;
    let read_only = match parts.next() {
        None | Some("rw") => false,
        Some("ro") => true,
        Some(_) => return Err(problem()),
    };
    Ok(proto::VolumeMount {
        name: name.to_owned(),
        target: target.to_owned(),
        read_only,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn credits_print_with_six_decimals_rounded_exactly() {
        assert_eq!(format_credits(0), "0.000000");
        assert_eq!(format_credits(1_000_000_000), "1.000000");
        assert_eq!(format_credits(1_234_567_499), "1.234567");
        assert_eq!(format_credits(1_234_567_500), "1.234568");
        assert_eq!(format_credits(-2_500_000_000), "-2.500000");
        assert_eq!(format_credits(-400), "0.000000");
        assert_eq!(format_credits(999_999_999_999_999_999), "1000000000.000000");
        assert_eq!(format_credits(i64::MIN), "-9223372036.854776");
    }

    #[test]
    fn credits_parse_exactly() {
        assert_eq!(parse_credits("100"), Ok(100_000_000_000));
        assert_eq!(parse_credits("0.5"), Ok(500_000_000));
        assert_eq!(parse_credits(".5"), Ok(500_000_000));
        assert_eq!(parse_credits("+1.000000001"), Ok(1_000_000_001));
        assert_eq!(parse_credits("-2.25"), Ok(-2_250_000_000));
        assert!(parse_credits("").is_err());
        assert!(parse_credits("-").is_err());
        assert!(parse_credits("1e3").is_err());
        assert!(parse_credits("1.0000000001").is_err());
        assert!(parse_credits("99999999999").is_err());
    }

    #[test]
    fn times_are_utc_rfc3339_or_dates() {
        let day = SystemTime::UNIX_EPOCH + Duration::from_secs(1_769_817_600);
        assert_eq!(parse_time("2026-01-31"), Ok(day));
        assert_eq!(parse_time("2026-01-31T00:00:00Z"), Ok(day));
        assert_eq!(
            parse_time("2026-01-31T00:00:01.5Z"),
            Ok(day + Duration::from_millis(1500))
        );
        assert!(parse_time("yesterday").is_err());
    }

    #[test]
    fn env_and_volumes_parse() {
        assert_eq!(parse_env("A=b=c"), Ok(("A".into(), "b=c".into())));
        assert!(parse_env("A").is_err());
        assert!(parse_env("=x").is_err());
        let volume = parse_volume("data:/data:ro").unwrap();
        assert_eq!(
            (
                volume.name.as_str(),
                volume.target.as_str(),
                volume.read_only
            ),
            ("data", "/data", true)
        );
        assert!(!parse_volume("data:/data").unwrap().read_only);
        assert!(parse_volume("data").is_err());
        assert!(parse_volume("data:/data:rx").is_err());
    }

    #[test]
    fn tables_align_columns_and_right_align_numbers() {
        let mut table = Table::new(&[("NAME", Align::Left), ("COST", Align::Right)]);
        table.row(vec!["a".into(), "1.000000".into()]);
        table.row(vec!["longer".into(), "10.500000".into()]);
        assert_eq!(
            table.render(),
            "NAME    COST\na        1.000000\nlonger  10.500000\n"
        );
    }

    #[test]
    fn events_have_a_kind_and_their_fields_in_json() {
        let event = proto::Event {
            sequence: 7,
            at: Some(prost_types::Timestamp {
                seconds: 1_769_817_600,
                nanos: 0,
            }),
            kind: Some(proto::event::Kind::DrainChanged(proto::DrainChanged {
                draining: true,
                reason: "maintenance".into(),
            })),
        };
        let value = event_json(&event);
        assert_eq!(value["kind"], "drain_changed");
        assert_eq!(value["sequence"], 7);
        assert_eq!(value["at"], "2026-01-31T00:00:00.000Z");
        assert_eq!(value["draining"], true);
        assert_eq!(value["reason"], "maintenance");
        assert_eq!(
            event_line(&event),
            "2026-01-31T00:00:00.000Z  drain_changed           draining=true reason=maintenance\n"
        );
    }
}
