//! The `gpuwarden` command: the daemon, its config check, a one-shot
//! inventory, and `ctl` to talk to a running daemon.

use std::collections::HashSet;
use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use gpuwarden::api::{client, status};
use gpuwarden::config::{Config, DEFAULT_UNIX_SOCKET, GpuSource, Mode};
use gpuwarden::gpu::{self, DeviceUuid};
use gpuwarden::inventory::InventoryView;
use gpuwarden::logging::{self, LogFormat};
use gpuwarden::policy::Policy;
use gpuwarden::proto;

/// Exit code of a config that cannot be used (EX_USAGE): systemd's unit
/// lists it in RestartPreventExitStatus, since restarting will not fix it.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "gpuwarden",
    version,
    about = "GPU host agent: discovers GPUs and MIG instances, launches containers with exactly their devices, meters GPU-seconds."
)]
struct Cli {
    /// Log format on stderr (level: GPUWARDEN_LOG, e.g. `debug`).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and what it names; exit 1 naming the bad key.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Discover and print the host's devices without starting the daemon.
    Inventory {
        /// Take the GPU backend from this config file.
        #[arg(long, value_name = "FILE", conflicts_with = "simulate")]
        config: Option<PathBuf>,
        /// Read a simulated host from this fixture instead of NVML.
        #[arg(long, value_name = "FIXTURE")]
        simulate: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Talk to a running daemon over its Unix socket.
    Ctl {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_UNIX_SOCKET)]
        socket: PathBuf,
        /// Print JSON for scripts instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: CtlCommand,
    },
}

#[derive(Debug, Subcommand)]
enum CtlCommand {
    /// The daemon's devices, their health and the sessions holding them.
    Inventory,
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

/// A failure and the exit code it deserves.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

fn bad_config(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: EXIT_BAD_CONFIG,
        error: error.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("error: {}", gpuwarden::error::chain(error.as_ref()));
            ExitCode::from(code)
        }
    }
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config).map_err(bad_config)?;
            gpuwarden::daemon::run(config).await.map_err(|error| {
                if error.is_config_problem() {
                    bad_config(error)
                } else {
                    error.into()
                }
            })
        }
        Command::CheckConfig { config } => check_config(&config)
            .await
            .map_err(|error| Failure { code: 1, error }),
        Command::Inventory {
            config,
            simulate,
            json,
        } => inventory(config.as_deref(), simulate, json).await,
        Command::Ctl {
            socket,
            json,
            command,
        } => ctl(&socket, json, command).await,
    }
}

/// Validates the config and opens what it names the way `run` would,
/// without binding sockets or touching containers.
async fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // The simulated host's devices check the policy's reservations; NVML's
    // are only known to the daemon.
    let (gpus, host_devices) = match &config.gpu.source {
        GpuSource::Simulated { fixture } => {
            let scan = gpu::simulated::load_fixture(fixture)?;
            let devices: HashSet<DeviceUuid> =
                scan.assignable().into_iter().map(|d| d.uuid).collect();
            (
                format!(
                    "simulated host {} ({} GPUs, {} assignable devices)",
                    fixture.display(),
                    scan.gpus.len(),
                    devices.len()
                ),
                Some(devices),
            )
        }
        GpuSource::Nvml { .. } => ("NVML (checked when the daemon starts)".to_owned(), None),
    };
    if let Some(tcp) = &config.api.tcp {
        gpuwarden::api::server::check_tls(&tcp.tls).await?;
    }
    let mode = match &config.mode {
        Mode::Standalone {
            policy_file: Some(policy),
        } => {
            let loaded = Policy::load(policy, host_devices.as_ref())?;
            let mut line = format!(
                "standalone, policy {} ({} accounts)",
                policy.display(),
                loaded.policy.accounts().count()
            );
            for warning in loaded.warnings {
                line.push_str(&format!("\n  warning: {warning}"));
            }
            line
        }
        Mode::Standalone { policy_file: None } => {
            "standalone, no policy file: every launch is refused (UNKNOWN_ACCOUNT)".to_owned()
        }
        Mode::ControlPlane(cp) => format!("control plane {}", cp.endpoint),
    };
    write_stdout(&format!(
        "{}: OK\n  node {}\n  GPUs: {gpus}\n  mode: {mode}\n",
        path.display(),
        config.node_id
    ))
}

async fn inventory(
    config: Option<&Path>,
    simulate: Option<PathBuf>,
    json: bool,
) -> Result<(), Failure> {
    let (node_id, source) = match (config, simulate) {
        (Some(path), _) => {
            let config = Config::load(path).map_err(bad_config)?;
            (config.node_id, config.gpu.source)
        }
        (None, Some(fixture)) => (String::new(), GpuSource::Simulated { fixture }),
        (None, None) => (String::new(), GpuSource::Nvml { library: None }),
    };
    let backend = gpu::open(&source)?;
    let scan = gpu::blocking(&backend, |backend| backend.discover()).await?;
    let node_id = if node_id.is_empty() {
        scan.hostname.clone()
    } else {
        node_id
    };
    print_inventory(
        &InventoryView::from_scan(&node_id, &scan, SystemTime::now()),
        json,
    )
}

async fn ctl(socket: &Path, json: bool, command: CtlCommand) -> Result<(), Failure> {
    let mut agent = client::connect_unix(socket).await?;
    match command {
        CtlCommand::Inventory => {
            let inventory = agent
                .get_inventory(proto::GetInventoryRequest {})
                .await
                .map_err(refused)?
                .into_inner();
            print_inventory(&InventoryView::try_from(inventory)?, json)
        }
        CtlCommand::Audit { account, limit } => {
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

fn print_audit(entries: &[proto::AuditEntry], json: bool) -> Result<(), Failure> {
    let when = |entry: &proto::AuditEntry| {
        entry
            .at
            .and_then(|t| SystemTime::try_from(t).ok())
            .map(|t| humantime::format_rfc3339_millis(t).to_string())
            .unwrap_or_default()
    };
    let text = if json {
        let rows: Vec<serde_json::Value> = entries
            .iter()
            .map(|entry| {
                serde_json::json!({
                    "id": entry.id,
                    "at": when(entry),
                    "action": entry.action,
                    "actor": entry.actor,
                    "account_id": entry.account_id,
                    "session_id": entry.session_id,
                    "reason": entry.reason,
                    "detail": entry.detail,
                })
            })
            .collect();
        let mut text = serde_json::to_string_pretty(&rows)?;
        text.push('\n');
        text
    } else {
        let mut text = format!(
            "{:<24}  {:<14}  {:<12}  {:<12}  {:<36}  {:<22}  {}\n",
            "AT", "ACTION", "ACTOR", "ACCOUNT", "SESSION", "REASON", "DETAIL"
        );
        for entry in entries {
            text.push_str(&format!(
                "{:<24}  {:<14}  {:<12}  {:<12}  {:<36}  {:<22}  {}\n",
                when(entry),
                entry.action,
                entry.actor,
                entry.account_id,
                entry.session_id,
                entry.reason,
                entry.detail
            ));
        }
        text
    };
    Ok(write_stdout(&text)?)
}

/// A status from the agent, as the user should read it: the reason first.
fn refused(status: tonic::Status) -> Failure {
    let reason = status::reason_of(&status).unwrap_or_else(|| format!("{:?}", status.code()));
    anyhow::anyhow!("{reason}: {}", status.message()).into()
}

fn print_inventory(view: &InventoryView, json: bool) -> Result<(), Failure> {
    let text = if json {
        let mut text = serde_json::to_string_pretty(view)?;
        text.push('\n');
        text
    } else {
        view.render_table()
    };
    Ok(write_stdout(&text)?)
}

fn write_stdout(text: &str) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|()| out.flush()) {
        // A reader that went away (`| head`) is not an error.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}
