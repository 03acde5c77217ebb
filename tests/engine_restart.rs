//! The Docker engine stopped and started under running sessions, without
//! and with live-restore (RELIABILITY.md). Without live-restore the
//! engine's shutdown stops the containers: their sessions end at Docker's
//! FinishedAt once the engine is back. With live-restore they keep running
//! and their sessions stay RUNNING, metered through the outage; one that
//! exited while the engine was down ends at the FinishedAt Docker restores.
//! Both times the agent stays up, refuses launches while the engine is away
//! (`CONTAINER_ENGINE_UNAVAILABLE`), carries out once the engine is back a
//! stop that could not reach it, re-subscribes to the engine's events
//! (a second agent with hourly checkpoints sees a container exit within
//! seconds, which only the event stream can tell it), and the accounting
//! invariants of `tests/invariants` hold.
//!
//! The test stops the one engine every test uses: it is alone in its test
//! binary (cargo runs test binaries one after another), needs root, and
//! puts the engine back exactly as it found it (same command line,
//! environment, folder and log) when it ends, whatever happens, through a
//! guard that restores it on drop. It skips, saying why, when it is not
//! root or cannot tell how the engine was started.

#![allow(clippy::unwrap_used)]

mod common;
mod invariants;

use std::ffi::OsString;
use std::fs::OpenOptions;
use std::os::unix::ffi::OsStringExt as _;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::launch::{TRAPPED, gpus, launch_request, sh, stop_request};
use common::operator::{get, open_sessions, stop, until_ended};
use common::{Daemon, docker, docker_time};
use gpuwarden::api::status::reason_of;
use gpuwarden::clock::UnixNanos;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

const LIVE_RESTORE: &str = "--live-restore";
/// How long the engine may take to stop or to answer after a start.
const ENGINE_TIMEOUT: Duration = Duration::from_secs(90);

/// How the running engine was started, read from /proc.
#[derive(Debug, Clone, PartialEq)]
struct EngineCommand {
    args: Vec<String>,
    cwd: PathBuf,
    env: Vec<(OsString, OsString)>,
    /// Where its stdout went (a file), appended to by the restarts.
    log: PathBuf,
}

impl EngineCommand {
    fn without_live_restore(&self) -> Self {
        let mut command = self.clone();
        command
            .args
            .retain(|arg| arg != LIVE_RESTORE && !arg.starts_with("--live-restore="));
        command
    }

    fn with_live_restore(&self) -> Self {
        let mut command = self.without_live_restore();
        command.args.push(LIVE_RESTORE.into());
        command
    }
}

/// Live dockerd processes (zombies left out).
fn dockerd_pids() -> Vec<i32> {
    let mut pids = Vec::new();
    for entry in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        // pid (comm) state ...
        let (Some(open), Some(close)) = (stat.find('('), stat.rfind(')')) else {
            continue;
        };
        let comm = &stat[open + 1..close];
        let state = stat[close + 1..].trim_start().chars().next();
        if comm == "dockerd" && state != Some('Z') {
            pids.push(pid);
        }
    }
    pids
}

/// How the one running engine was started, or why that cannot be told.
fn running_engine() -> Result<(i32, EngineCommand), String> {
    let pids = dockerd_pids();
    let [pid] = pids[..] else {
        return Err(format!(
            "expected one dockerd process, found {}",
            pids.len()
        ));
    };
    let read = |what: &str| {
        std::fs::read(format!("/proc/{pid}/{what}"))
            .map_err(|e| format!("cannot read /proc/{pid}/{what}: {e}"))
    };
    let args: Vec<String> = read("cmdline")?
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect();
    let env = read("environ")?
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .filter_map(|pair| {
            let at = pair.iter().position(|b| *b == b'=')?;
            Some((
                OsString::from_vec(pair[..at].to_vec()),
                OsString::from_vec(pair[at + 1..].to_vec()),
            ))
        })
        .collect();
    let cwd = std::fs::read_link(format!("/proc/{pid}/cwd")).map_err(|e| e.to_string())?;
    let log = std::fs::read_link(format!("/proc/{pid}/fd/1"))
        .ok()
        .filter(|path| path.is_file())
        .unwrap_or_else(|| PathBuf::from("/tmp/gpuwarden-test-dockerd.log"));
    let cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
    if cgroup.contains("docker.service") {
        return Err(
            "dockerd runs under systemd (docker.service): restart it with systemctl, not from a test"
                .into(),
        );
    }
    let config_file = args
        .iter()
        .position(|a| a == "--config-file")
        .and_then(|i| args.get(i + 1).cloned())
        .or_else(|| {
            args.iter()
                .find_map(|a| a.strip_prefix("--config-file=").map(str::to_owned))
        })
        .unwrap_or_else(|| "/etc/docker/daemon.json".into());
    if std::fs::read_to_string(&config_file).is_ok_and(|text| text.contains("live-restore")) {
        return Err(format!(
            "{config_file} sets live-restore: the flag would conflict with it"
        ));
    }
    Ok((
        pid,
        EngineCommand {
            args,
            cwd,
            env,
            log,
        },
    ))
}

fn engine_up() -> bool {
    Command::new("docker")
        .args(["version", "--format", "{{.Server.Version}}"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|status| status.success())
}

fn live_restore_enabled() -> bool {
    docker(&["info", "--format", "{{.LiveRestoreEnabled}}"]) == "true"
}

/// SIGTERM to the engine, as `systemctl stop docker` would; returns once
/// no dockerd is left.
fn stop_engine() -> Result<(), String> {
    for pid in dockerd_pids() {
        let _ = kill(Pid::from_raw(pid), Signal::SIGTERM);
    }
    let deadline = Instant::now() + ENGINE_TIMEOUT;
    while !dockerd_pids().is_empty() {
        if Instant::now() > deadline {
            return Err(format!("dockerd did not stop within {ENGINE_TIMEOUT:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Starts the engine as `command` says, in its own session (as the test
/// command does with setsid), and waits until it answers.
fn start_engine(command: &EngineCommand) -> Result<(), String> {
    let log = OpenOptions::new()
        .create(true)
        .append(true)
        .open(&command.log)
        .map_err(|e| format!("cannot open {}: {e}", command.log.display()))?;
    let log2 = log.try_clone().map_err(|e| e.to_string())?;
    let (program, args) = command
        .args
        .split_first()
        .ok_or("an empty dockerd command line")?;
    let has_setsid = Command::new("setsid")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    let mut spawn = if has_setsid {
        let mut c = Command::new("setsid");
        c.arg(program).args(args);
        c
    } else {
        let mut c = Command::new(program);
        c.args(args);
        std::os::unix::process::CommandExt::process_group(&mut c, 0);
        c
    };
    spawn
        .current_dir(&command.cwd)
        .env_clear()
        .envs(command.env.iter().map(|(k, v)| (k, v)))
        .stdin(Stdio::null())
        .stdout(Stdio::from(log))
        .stderr(Stdio::from(log2))
        .spawn()
        .map_err(|e| format!("cannot start {:?}: {e}", command.args))?;
    let deadline = Instant::now() + ENGINE_TIMEOUT;
    while !engine_up() {
        if Instant::now() > deadline {
            return Err(format!(
                "dockerd {:?} did not answer within {ENGINE_TIMEOUT:?}; see {}",
                command.args,
                command.log.display()
            ));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Ok(())
}

fn restart_engine(command: &EngineCommand) -> Duration {
    let began = Instant::now();
    stop_engine().unwrap();
    start_engine(command).unwrap();
    began.elapsed()
}

/// Puts the engine back as it was found when dropped, whatever happened.
struct EngineGuard {
    original: EngineCommand,
}

impl EngineGuard {
    fn restore(&self) -> Result<(), String> {
        let current = running_engine().ok().map(|(_, command)| command.args);
        if current.as_ref() == Some(&self.original.args) && engine_up() {
            return Ok(());
        }
        stop_engine()?;
        start_engine(&self.original)
    }
}

impl Drop for EngineGuard {
    fn drop(&mut self) {
        if let Err(error) = self.restore() {
            eprintln!(
                "COULD NOT RESTORE the Docker engine {:?}: {error}",
                self.original.args
            );
        }
    }
}

async fn launch(
    client: &mut NodeAgentClient<Channel>,
    request_id: &str,
    count: u32,
    script: &str,
) -> proto::Session {
    let session = client
        .launch(launch_request(request_id, gpus(count), &sh(script)))
        .await
        .unwrap_or_else(|status| panic!("launch {request_id}: {status:?}"))
        .into_inner();
    assert_eq!(session.state(), proto::SessionState::Running, "{session:?}");
    session
}

fn docker_running(container: &str) -> bool {
    docker(&["inspect", "-f", "{{.State.Running}}", container]) == "true"
}

fn now() -> UnixNanos {
    UnixNanos::from_system_time(std::time::SystemTime::now())
}

/// A launch while the engine is away is refused, and says why.
async fn refused_while_away(client: &mut NodeAgentClient<Channel>, request_id: &str) {
    let status = client
        .launch(launch_request(request_id, gpus(1), &sh(TRAPPED)))
        .await
        .unwrap_err();
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("CONTAINER_ENGINE_UNAVAILABLE"),
        "{status:?}"
    );
}

/// Proves the agent follows the engine's events again: a container that
/// exits by itself must end its session within seconds. The agent has
/// hourly checkpoints, so only the event stream (or the reconcile that
/// follows each re-subscription) can tell it; the first probe waits out the
/// re-subscription, the second can only be seen through events. Returns
/// how long after Docker's FinishedAt the second was seen ended.
async fn events_followed(client: &mut NodeAgentClient<Channel>, tag: &str) -> Duration {
    let first = launch(client, &format!("{tag}-probe-1"), 1, "sleep 1").await;
    until_ended(client, &first.id, Duration::from_secs(60)).await;
    let second = launch(client, &format!("{tag}-probe-2"), 1, "sleep 1").await;
    let ended = until_ended(client, &second.id, Duration::from_secs(10)).await;
    let seen = now();
    assert_eq!(ended.end_reason(), proto::EndReason::Exited, "{ended:?}");
    let finished = docker_time(&second.container_id, "FinishedAt");
    Duration::from_nanos(u64::try_from(seen.0 - finished.0).unwrap_or(0))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_follows_the_engine_through_restarts_with_and_without_live_restore() {
    if !nix::unistd::Uid::effective().is_root() {
        eprintln!("SKIPPED: restarting the Docker engine needs root");
        return;
    }
    if !engine_up() {
        eprintln!("SKIPPED: no Docker engine answers");
        return;
    }
    let original = match running_engine() {
        Ok((_, command)) => command,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    eprintln!(
        "engine: {:?} in {} (log {})",
        original.args,
        original.cwd.display(),
        original.log.display()
    );
    let guard = EngineGuard {
        original: original.clone(),
    };
    let began = Instant::now();
    let without = original.without_live_restore();
    let with = original.with_live_restore();
    if original != without {
        restart_engine(&without);
    }
    assert!(!live_restore_enabled());

    // Agent A meters with 1 s checkpoints; agent B checkpoints hourly, so
    // what it learns between checkpoints comes from the event stream.
    let mut a = Daemon::start("sim-dgx-a100.toml", "[metering]\ncheckpoint_seconds = 1\n");
    let mut b = Daemon::start(
        "sim-dgx-a100.toml",
        "[metering]\ncheckpoint_seconds = 3600\n",
    );
    let mut ca = a.client().await;
    let mut cb = b.client().await;

    // 1. Without live-restore: the engine's shutdown stops the containers.
    let a1 = launch(&mut ca, "a1", 1, TRAPPED).await;
    let a2 = launch(&mut ca, "a2", 2, TRAPPED).await;
    let b1 = launch(&mut cb, "b1", 1, TRAPPED).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let down = Instant::now();
    stop_engine().unwrap();
    refused_while_away(&mut ca, "a-away").await;
    refused_while_away(&mut cb, "b-away").await;
    start_engine(&without).unwrap();
    let outage_without = down.elapsed();
    for (on_b, session) in [(false, &a1), (false, &a2), (true, &b1)] {
        let client = if on_b { &mut cb } else { &mut ca };
        let ended = until_ended(client, &session.id, Duration::from_secs(60)).await;
        assert_eq!(ended.end_reason(), proto::EndReason::Exited, "{ended:?}");
        assert_eq!(
            ended.ended_at.map(|t| UnixNanos::from_timestamp(&t)),
            Some(docker_time(&session.container_id, "FinishedAt")),
            "ended at Docker's FinishedAt"
        );
    }
    let lag_without = events_followed(&mut cb, "b-after-restart").await;

    // 2. With live-restore: the containers outlive the engine.
    restart_engine(&with);
    assert!(live_restore_enabled());
    let l1 = launch(&mut ca, "l1", 1, TRAPPED).await;
    let l2 = launch(&mut ca, "l2", 2, TRAPPED).await;
    // Exits while the engine is away.
    let e1_launched = Instant::now();
    let e1 = launch(&mut ca, "e1", 1, "sleep 5").await;
    let bl1 = launch(&mut cb, "bl1", 1, TRAPPED).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let down = Instant::now();
    let down_at = now();
    stop_engine().unwrap();
    refused_while_away(&mut ca, "l-away").await;
    // A stop asked for while the engine is away cannot be carried out now:
    // the caller hears why, and the agent carries it out once it is back.
    let status = ca.stop(stop_request(&l2.id, None)).await.unwrap_err();
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("CONTAINER_ENGINE_UNAVAILABLE"),
        "{status:?}"
    );
    // e1 exits meanwhile.
    let e1_gone = Duration::from_secs(7).saturating_sub(e1_launched.elapsed());
    tokio::time::sleep(e1_gone.max(Duration::from_secs(1))).await;
    let up_at = now();
    start_engine(&with).unwrap();
    let outage_with = down.elapsed();
    for session in [&l1, &bl1] {
        assert!(
            docker_running(&session.container_id),
            "live-restore kept {} running",
            session.id
        );
    }
    let l2_ended = until_ended(&mut ca, &l2.id, Duration::from_secs(30)).await;
    assert_eq!(
        l2_ended.end_reason(),
        proto::EndReason::Stopped,
        "{l2_ended:?}"
    );
    assert_eq!(
        l2_ended.ended_at.map(|t| UnixNanos::from_timestamp(&t)),
        Some(docker_time(&l2.container_id, "FinishedAt"))
    );
    let e1_ended = until_ended(&mut ca, &e1.id, Duration::from_secs(60)).await;
    assert_eq!(e1_ended.end_reason(), proto::EndReason::Exited);
    let e1_finished = docker_time(&e1.container_id, "FinishedAt");
    assert_eq!(
        e1_ended.ended_at.map(|t| UnixNanos::from_timestamp(&t)),
        Some(e1_finished)
    );
    assert!(
        down_at < e1_finished && e1_finished < up_at,
        "e1 finished at {e1_finished}, not while the engine was away ({down_at}..{up_at})"
    );
    let lag_with = events_followed(&mut cb, "b-after-live-restore").await;
    // Metered through the outage: A's checkpoints cover it.
    let started = Instant::now();
    loop {
        let session = get(&mut ca, &l1.id).await;
        assert_eq!(session.state(), proto::SessionState::Running, "{session:?}");
        let since_start =
            (now().0 - UnixNanos::from_timestamp(&session.started_at.unwrap()).0) as f64 / 1e9;
        if session.device_seconds > outage_with.as_secs_f64()
            && session.device_seconds > since_start - 3.0
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "l1 is not metered through the outage: {session:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let bl1_now = get(&mut cb, &bl1.id).await;
    assert_eq!(bl1_now.state(), proto::SessionState::Running, "{bl1_now:?}");
    let stopped = stop(&mut ca, &l1.id).await;
    assert_eq!(stopped.end_reason(), proto::EndReason::Stopped);
    stop(&mut cb, &bl1.id).await;
    for daemon in [&mut a, &mut b] {
        let mut client = daemon.client().await;
        let open = open_sessions(&mut client).await;
        assert!(open.is_empty(), "{open:?}");
        daemon.signal(Signal::SIGTERM);
        daemon.wait(Duration::from_secs(20)).await;
    }
    let report_a = invariants::check(&a.dir.path().join("state/ledger.db"), &[&a.node_id]);
    let report_b = invariants::check(&b.dir.path().join("state/ledger.db"), &[&b.node_id]);
    drop((a, b));

    // 3. The engine as it was found.
    guard.restore().unwrap();
    let (_, now_running) = running_engine().unwrap();
    assert_eq!(now_running.args, original.args);
    eprintln!(
        "engine restarts in {:.1} s: outage without live-restore {:.1} s, with {:.1} s; \
         events followed again {} ms / {} ms after a container's exit; agent A: {report_a}; agent B: {report_b}",
        began.elapsed().as_secs_f64(),
        outage_without.as_secs_f64(),
        outage_with.as_secs_f64(),
        lag_without.as_millis(),
        lag_with.as_millis(),
    );
}
