//! Enforcement on the real binary with real containers: pooled session
//! limits under concurrent launches, a balance running out stopping a
//! running container, role rules, reservations, the audit trail and policy
//! reloads.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::launch::{SLEEP, exact, gpus, launch_as, sh, stop_request, user};
use common::operator::open_sessions;
use common::{Daemon, docker, gpuwarden, wait_for_session};
use gpuwarden::api::status::reason_of;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use nix::sys::signal::Signal;

const GPU7: &str = "GPU-6a5da790-0728-45bf-9407-3e280f594b6d";

/// A launch of one device (`device_uuids` empty: any full GPU).
fn launch(
    request_id: &str,
    subject: &str,
    org: Option<&str>,
    device_uuids: &[&str],
) -> proto::LaunchRequest {
    let devices = if device_uuids.is_empty() {
        gpus(1)
    } else {
        exact(device_uuids)
    };
    launch_as(request_id, subject, org, devices, SLEEP)
}

/// Writes `text` as a file in `dir` and returns its path.
fn write(dir: &Path, name: &str, text: &str) -> PathBuf {
    let path = dir.join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// A simulated host of `count` full GPUs, so device supply never limits.
fn many_gpus(dir: &Path, count: usize) -> PathBuf {
    let mut text = String::from(
        "hostname = \"sim-many\"\ndriver_version = \"580.159.04\"\ncuda_version = \"13.0\"\n",
    );
    for index in 0..count {
        text.push_str(&format!(
            "[[gpus]]\nindex = {index}\nuuid = \"GPU-00000000-0000-0000-0000-{index:012}\"\n\
             name = \"NVIDIA H100 80GB HBM3\"\nmemory_mib = 81559\n\
             pci_bus_id = \"00000000:{index:02X}:00.0\"\nmig_mode = false\n"
        ));
    }
    write(dir, "sim-many.toml", &text)
}

fn policy_section(path: &Path) -> String {
    format!("[policy]\nfile = \"{}\"\n", path.display())
}

#[tokio::test]
async fn thirty_simultaneous_launches_against_a_pool_of_ten_start_exactly_ten() {
    let files = tempfile::tempdir().unwrap();
    let fixture = many_gpus(files.path(), 32);
    let policy = write(
        files.path(),
        "policy.toml",
        r#"
[[users]]
id = "u-alice"
plan = "pro"
[[users]]
id = "u-bob"
plan = "pro"
[[orgs]]
id = "lab"
plan = "team"
balance = 1000.0
members = [{ user = "u-alice", role = "owner" }, { user = "u-bob", role = "member" }]
"#,
    );
    let mut daemon = Daemon::start(fixture.to_str().unwrap(), &policy_section(&policy));
    let channel = daemon.channel().await;
    let launches = (0..30).map(|i| {
        let mut client = NodeAgentClient::new(channel.clone());
        // The pool is the org's, whichever member launches.
        let subject = if i % 2 == 0 { "u-alice" } else { "u-bob" };
        async move {
            client
                .launch(launch(&format!("pool-{i}"), subject, Some("lab"), &[]))
                .await
        }
    });
    let results = futures_util::future::join_all(launches).await;
    let started = results.iter().filter(|r| r.is_ok()).count();
    let refused: Vec<String> = results
        .iter()
        .filter_map(|r| r.as_ref().err())
        .map(|status| reason_of(status).unwrap_or_default())
        .collect();
    assert_eq!(started, 10, "refusals: {refused:?}");
    assert!(
        refused.iter().all(|r| r == "SESSION_LIMIT_REACHED"),
        "{refused:?}"
    );
    let mut client = NodeAgentClient::new(channel);
    assert_eq!(open_sessions(&mut client).await.len(), 10);
    let running = daemon.running_containers();
    assert_eq!(running.lines().count(), 10);

    // A slot frees when a session ends.
    let first = results.iter().find_map(|r| r.as_ref().ok()).unwrap();
    client
        .stop(stop_request(&first.get_ref().id, user("u-alice")))
        .await
        .unwrap();
    client
        .launch(launch("pool-after-stop", "u-bob", Some("lab"), &[]))
        .await
        .unwrap();
    let refusal = client
        .launch(launch("pool-full-again", "u-bob", Some("lab"), &[]))
        .await
        .unwrap_err();
    assert_eq!(
        reason_of(&refusal).as_deref(),
        Some("SESSION_LIMIT_REACHED")
    );
}

#[tokio::test]
async fn a_running_container_is_stopped_when_its_balance_runs_out() {
    let files = tempfile::tempdir().unwrap();
    // 0.3 credits at 0.1 a second: about three seconds of one GPU.
    let policy = write(
        files.path(),
        "policy.toml",
        r#"
[rates]
default = 0.1
[enforcement]
min_balance_seconds = 1
grace_seconds = 1
[[users]]
id = "u-dave"
plan = "free"
balance = 0.3
"#,
    );
    let mut daemon = Daemon::start(
        "sim-h100-pair.toml",
        &format!(
            "[metering]\ncheckpoint_seconds = 1\n{}",
            policy_section(&policy)
        ),
    );
    let mut client = daemon.client().await;
    let mut events = client
        .watch_events(proto::WatchEventsRequest {
            principal: user("u-dave"),
            account_id: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    // A workload that exits on SIGTERM, as well-behaved ones do.
    let request = launch_as(
        "dave-1",
        "u-dave",
        None,
        gpus(1),
        &sh("trap 'exit 0' TERM; sleep 300 & wait"),
    );
    let session = client.launch(request).await.unwrap().into_inner();

    let ended = wait_for_session(&mut client, &session.id, |s| {
        s.state == proto::SessionState::Ended as i32
    })
    .await;
    assert_eq!(ended.end_reason, proto::EndReason::BalanceExhausted as i32);
    assert_eq!(
        docker(&["inspect", "-f", "{{.State.Running}}", &session.container_id]),
        "false"
    );

    // Announced before the stop, then the stop itself.
    use proto::event::Kind;
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(20);
    while !seen.iter().any(|k| matches!(k, Kind::SessionEnded(_))) {
        assert!(Instant::now() < deadline, "events so far: {seen:?}");
        let event = tokio::time::timeout(Duration::from_secs(20), events.message())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        seen.push(event.kind.unwrap());
    }
    let position = |wanted: fn(&Kind) -> bool| seen.iter().position(wanted);
    let started = position(|k| matches!(k, Kind::SessionStarted(_))).unwrap();
    let exhausted = position(|k| matches!(k, Kind::BalanceExhausted(_))).unwrap();
    let scheduled = position(|k| matches!(k, Kind::SessionStopScheduled(_))).unwrap();
    let stopped = position(|k| matches!(k, Kind::SessionEnded(_))).unwrap();
    assert!(started < exhausted && exhausted < stopped, "{seen:?}");
    assert!(scheduled < stopped, "{seen:?}");
    let Kind::BalanceExhausted(notice) = &seen[exhausted] else {
        unreachable!()
    };
    assert_eq!(notice.session_ids, vec![session.id.clone()]);
    assert!(notice.stop_at.is_some());

    // Billed to its end and debited: the balance went below zero.
    let usage = client
        .get_usage(proto::GetUsageRequest {
            principal: user("u-dave"),
            account_id: "u-dave".into(),
            from: None,
            to: None,
        })
        .await
        .unwrap()
        .into_inner();
    let cost: i64 = usage
        .lines
        .iter()
        .map(|l| l.cost.unwrap().nano_credits)
        .sum();
    assert_eq!(cost, ended.cost.unwrap().nano_credits);
    assert_eq!(
        usage.balance.unwrap().nano_credits,
        300_000_000 - cost,
        "{usage:?}"
    );
    assert!(usage.balance.unwrap().nano_credits <= 0);

    // With nothing left, the next launch is refused before any container.
    let refusal = client
        .launch(launch("dave-2", "u-dave", None, &[]))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&refusal).as_deref(), Some("BALANCE_EXHAUSTED"));
}

/// Runs `gpuwarden ctl audit --json` against the daemon.
fn audit(daemon: &Daemon) -> Vec<serde_json::Value> {
    let out = gpuwarden(&[
        "ctl",
        "--socket",
        daemon.socket.to_str().unwrap(),
        "audit",
        "--json",
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

#[tokio::test]
async fn roles_reservations_and_balances_of_the_example_policy_are_enforced_and_audited() {
    let mut daemon = Daemon::start(
        "sim-dgx-a100.toml",
        &policy_section(&common::fixture("policy-example.toml")),
    );
    let mut client = daemon.client().await;
    let reason = |result: Result<tonic::Response<proto::Session>, tonic::Status>| {
        reason_of(&result.unwrap_err()).unwrap_or_default()
    };

    // Who may launch where.
    assert_eq!(
        reason(
            client
                .launch(launch("bob-tiny", "u-bob", Some("tiny"), &[]))
                .await
        ),
        "NOT_A_MEMBER"
    );
    assert_eq!(
        reason(client.launch(launch("eve", "u-eve", None, &[])).await),
        "UNKNOWN_ACCOUNT"
    );
    assert_eq!(
        reason(
            client
                .launch(launch("carol-own", "u-carol", None, &[]))
                .await
        ),
        "BALANCE_EXHAUSTED"
    );
    // GPU 7 is acme's, in a window that covers today: not for Bob's own
    // session, but for acme's sub-account, billed to the reservation.
    assert_eq!(
        reason(
            client
                .launch(launch("bob-gpu7", "u-bob", None, &[GPU7]))
                .await
        ),
        "DEVICE_RESERVED"
    );
    let reserved = client
        .launch(launch("v1", "u-bob", Some("acme-vision"), &[GPU7]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reserved.billing_path,
        proto::BillingPath::Reservation as i32
    );
    assert_eq!(reserved.billed_account_id, "acme");
    let alices = client
        .launch(launch("alice-acme", "u-alice", Some("acme"), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alices.billing_path, proto::BillingPath::Balance as i32);
    let bobs = client
        .launch(launch("bob-own", "u-bob", None, &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reason(client.launch(launch("bob-own-2", "u-bob", None, &[])).await),
        "SESSION_LIMIT_REACHED"
    );
    // The sub-account's own pool of 2 fills before its parent's 25.
    let second = client
        .launch(launch("v2", "u-bob", Some("acme-vision"), &[]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        reason(
            client
                .launch(launch("v3", "u-bob", Some("acme-vision"), &[]))
                .await
        ),
        "SESSION_LIMIT_REACHED"
    );

    // Who may stop what.
    let status = client
        .stop(stop_request(&alices.id, user("u-bob")))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("ROLE_FORBIDDEN"));
    let status = client
        .stop(stop_request(&bobs.id, user("u-carol")))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("ROLE_FORBIDDEN"));
    // Carol administers acme, so acme's sessions and its sub-account's.
    let stopped = client
        .stop(stop_request(&alices.id, user("u-carol")))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(stopped.state, proto::SessionState::Ended as i32);
    client
        .stop(stop_request(&second.id, user("u-carol")))
        .await
        .unwrap();
    // Bob lists his own sessions only when looking at acme.
    let listed = client
        .list_sessions(proto::ListSessionsRequest {
            principal: user("u-bob"),
            account_id: "acme".into(),
            include_ended: true,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .sessions;
    assert!(listed.iter().all(|s| s.owner == "u-bob"), "{listed:?}");
    assert!(listed.iter().any(|s| s.id == reserved.id), "{listed:?}");

    // A top-up by the operator lets carol launch.
    let adjusted = client
        .adjust_balance(proto::AdjustBalanceRequest {
            account_id: "u-carol".into(),
            delta: Some(proto::Credits {
                nano_credits: 10_000_000_000,
            }),
            reason: "ticket 7".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(adjusted.balance.unwrap().nano_credits, 10_000_000_000);
    client
        .launch(launch("carol-own-2", "u-carol", None, &[]))
        .await
        .unwrap();

    // The audit trail has each of these, with who and why.
    let entries = audit(&daemon);
    let has = |action: &str, actor: &str, reason: &str| {
        entries
            .iter()
            .any(|e| e["action"] == action && e["actor"] == actor && e["reason"] == reason)
    };
    assert!(has("launch", "u-alice", ""), "{entries:#?}");
    assert!(has("refuse", "u-bob", "NOT_A_MEMBER"), "{entries:#?}");
    assert!(has("refuse", "u-eve", "UNKNOWN_ACCOUNT"), "{entries:#?}");
    assert!(
        has("refuse", "u-carol", "BALANCE_EXHAUSTED"),
        "{entries:#?}"
    );
    assert!(has("refuse", "u-bob", "DEVICE_RESERVED"), "{entries:#?}");
    assert!(
        has("refuse", "u-bob", "SESSION_LIMIT_REACHED"),
        "{entries:#?}"
    );
    assert!(has("stop", "u-carol", "STOPPED"), "{entries:#?}");
    assert!(has("adjust_balance", "operator", ""), "{entries:#?}");
}

#[tokio::test]
async fn sighup_reloads_a_good_policy_and_keeps_the_old_one_when_the_new_is_bad() {
    let files = tempfile::tempdir().unwrap();
    let one_session = r#"
[[users]]
id = "u-alice"
plan = "pro"
max_sessions = 1
balance = 100.0
"#;
    let policy = write(files.path(), "policy.toml", one_session);
    let mut daemon = Daemon::start("sim-h100-pair.toml", &policy_section(&policy));
    let mut client = daemon.client().await;
    client
        .launch(launch("a1", "u-alice", None, &[]))
        .await
        .unwrap();

    let wait_for_audit = |action: &'static str, count: usize| {
        let daemon = &daemon;
        async move {
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                let entries = audit(daemon);
                if entries.iter().filter(|e| e["action"] == action).count() >= count {
                    return entries;
                }
                assert!(Instant::now() < deadline, "no {action} in {entries:#?}");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    };

    // A key the format does not have: refused, the old policy stays.
    write(
        files.path(),
        "policy.toml",
        &format!("{one_session}max_sessions_typo = 3\n"),
    );
    daemon.signal(Signal::SIGHUP);
    let entries = wait_for_audit("policy_reload_refused", 1).await;
    let refused = entries
        .iter()
        .find(|e| e["action"] == "policy_reload_refused")
        .unwrap();
    assert!(
        refused["detail"]
            .as_str()
            .unwrap()
            .contains("max_sessions_typo"),
        "{refused}"
    );
    let status = client
        .launch(launch("a2", "u-alice", None, &[]))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("SESSION_LIMIT_REACHED"));

    write(
        files.path(),
        "policy.toml",
        &one_session.replace("max_sessions = 1", "max_sessions = 2"),
    );
    daemon.signal(Signal::SIGHUP);
    wait_for_audit("policy_reload", 1).await;
    client
        .launch(launch("a3", "u-alice", None, &[]))
        .await
        .unwrap();
}

#[tokio::test]
async fn a_bad_policy_at_start_exits_64_naming_file_key_and_reason() {
    let files = tempfile::tempdir().unwrap();
    let policy = write(
        files.path(),
        "policy.toml",
        r#"
[[users]]
id = "u-alice"
plan = "pro"
[[orgs]]
id = "acme"
plan = "team"
members = [{ user = "u-nobody", role = "member" }]
"#,
    );
    let mut daemon = Daemon::start("sim-h100-pair.toml", &policy_section(&policy));
    let status = daemon.wait(Duration::from_secs(20)).await;
    assert_eq!(status.code(), Some(64));

    let out = gpuwarden(&["check-config", "--config", daemon.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("policy.toml"), "{stderr}");
    assert!(stderr.contains("orgs[0].members[0]"), "{stderr}");
    assert!(stderr.contains("u-nobody"), "{stderr}");
}
