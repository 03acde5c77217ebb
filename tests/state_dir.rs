//! A full and a read-only state directory (RELIABILITY.md): while the
//! ledger cannot be written, launches are refused with `LEDGER_UNAVAILABLE`
//! (no container runs unmetered) and the agent keeps serving; running
//! containers run on, and once the ledger can be written again their
//! sessions are measured from Docker's own timestamps, with no gap (a
//! container that exited meanwhile ends at its FinishedAt); SQLite's
//! integrity check finds nothing wrong.
//!
//! - full: the state directory is a small tmpfs, filled up with a file and
//!   then freed; the agent runs on throughout; then the agent is killed and
//!   started again on the full disk: it serves with launches refused
//!   (`LEDGER_UNAVAILABLE`, reads and inventory work) and, once space is
//!   freed, launches resume and the run is billed whole;
//! - read-only: the state directory is an ext4 file system on a loop
//!   device that an error turns read-only (`errors=remount-ro`, the kernel's
//!   `trigger_fs_error`), as a failing disk would; the operator's way out is
//!   to stop the agent, unmount, check and mount again, and start it.
//!
//! Both need root (mount); each skips, saying why, where the machine does
//! not allow what it needs.

#![allow(clippy::unwrap_used)]

mod common;
mod invariants;

use std::io::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use common::launch::{TRAPPED, gpus, launch_request, sh};
use common::operator::{get, stop, until_ended};
use common::{Daemon, docker, docker_time};
use gpuwarden::api::status::reason_of;
use gpuwarden::clock::UnixNanos;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use nix::sys::signal::Signal;
use tonic::transport::Channel;

const CHECKPOINTS: &str = "[metering]\ncheckpoint_seconds = 1\n";

/// Runs a command; its stdout, or what went wrong.
fn run(program: &str, args: &[&str]) -> Result<String, String> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(|e| format!("{program}: {e}"))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    } else {
        Err(format!(
            "{program} {args:?}: {}{}",
            String::from_utf8_lossy(&out.stderr).trim(),
            out.status
        ))
    }
}

/// A file system mounted over a daemon's state directory; lazily unmounted
/// when dropped (before the daemon's temporary folder goes).
struct Mounted {
    at: PathBuf,
}

impl Mounted {
    fn unmount(&self) -> Result<(), String> {
        run("umount", &[self.at.to_str().unwrap()]).map(drop)
    }
}

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = run("umount", &["-l", self.at.to_str().unwrap()]);
    }
}

/// Starts a daemon, then stops it and mounts what `mount` makes over its
/// state directory (the ledger it made hidden below), and starts it again
/// on a fresh ledger there. `None` (with why) when the machine won't.
async fn daemon_on(
    mount: impl FnOnce(&Path, &Path) -> Result<(), String>,
) -> Result<(Daemon, Mounted), String> {
    if !nix::unistd::Uid::effective().is_root() {
        return Err("mounting a state directory needs root".into());
    }
    let mut daemon = Daemon::start("sim-dgx-a100.toml", CHECKPOINTS);
    daemon.client().await;
    daemon.kill9().await;
    let state = daemon.dir.path().join("state");
    mount(&state, daemon.dir.path())?;
    let mounted = Mounted { at: state };
    daemon.restart();
    Ok((daemon, mounted))
}

async fn launch(
    client: &mut NodeAgentClient<Channel>,
    request_id: &str,
    script: &str,
) -> proto::Session {
    client
        .launch(launch_request(request_id, gpus(1), &sh(script)))
        .await
        .unwrap_or_else(|status| panic!("launch {request_id}: {status:?}"))
        .into_inner()
}

/// The launch is refused because the ledger cannot take it, and leaves no
/// container behind.
async fn refused_unmetered(daemon: &Daemon, client: &mut NodeAgentClient<Channel>, id: &str) {
    let before = containers_of(daemon);
    let status = client
        .launch(launch_request(id, gpus(1), &sh(TRAPPED)))
        .await
        .unwrap_err();
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("LEDGER_UNAVAILABLE"),
        "{status:?}"
    );
    assert_eq!(status.code(), tonic::Code::Unavailable);
    assert_eq!(
        containers_of(daemon),
        before,
        "a refused launch made a container"
    );
}

fn containers_of(daemon: &Daemon) -> usize {
    daemon.all_containers().lines().count()
}

async fn until_exited(container: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    while docker(&["inspect", "-f", "{{.State.Running}}", container]) == "true" {
        assert!(Instant::now() < deadline, "{container} never exited");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Stops what runs, stops the daemon, checks its ledger.
async fn finish(daemon: &mut Daemon, running: &[&str]) -> invariants::Report {
    let mut client = daemon.client().await;
    for id in running {
        stop(&mut client, id).await;
    }
    daemon.signal(Signal::SIGTERM);
    daemon.wait(Duration::from_secs(20)).await;
    invariants::check(
        &daemon.dir.path().join("state/ledger.db"),
        &[&daemon.node_id],
    )
}

/// After the ledger came back: the session that exited meanwhile ended
/// at Docker's FinishedAt, the one still running is RUNNING and metered
/// from its StartedAt through the outage, and launches work again.
async fn recovered(
    client: &mut NodeAgentClient<Channel>,
    exited: &proto::Session,
    running: &proto::Session,
    outage: Duration,
    tag: &str,
) -> proto::Session {
    let ended = until_ended(client, &exited.id, Duration::from_secs(30)).await;
    assert_eq!(ended.end_reason(), proto::EndReason::Exited, "{ended:?}");
    assert_eq!(
        ended.ended_at.map(|t| UnixNanos::from_timestamp(&t)),
        Some(docker_time(&exited.container_id, "FinishedAt")),
        "ended at Docker's FinishedAt"
    );
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let session = get(client, &running.id).await;
        assert_eq!(session.state(), proto::SessionState::Running, "{session:?}");
        if session.device_seconds > outage.as_secs_f64() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not metered through the outage ({outage:?}): {session:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let again = launch(client, &format!("{tag}-after"), TRAPPED).await;
    assert_eq!(again.state(), proto::SessionState::Running);
    again
}

/// Writes until the file system is full; returns the filler's size.
fn fill(path: &Path) -> u64 {
    let mut file = std::fs::File::create(path).unwrap();
    let chunk = vec![0u8; 64 * 1024];
    let mut written = 0u64;
    loop {
        match file.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(nix::libc::ENOSPC) => break,
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    // The last partial page too.
    while let Ok(n) = file.write(&chunk[..512]) {
        if n == 0 {
            break;
        }
        written += n as u64;
    }
    let _ = file.sync_all();
    written
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_state_directory_refuses_launches_and_loses_no_second() {
    let mounted = daemon_on(|state, _| {
        run(
            "mount",
            &[
                "-t",
                "tmpfs",
                "-o",
                "size=8m",
                "tmpfs",
                state.to_str().unwrap(),
            ],
        )
        .map(drop)
    })
    .await;
    let (daemon, mounted) = match mounted {
        Ok(both) => both,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let mut daemon = daemon;
    let mut client = daemon.client().await;
    let long = launch(&mut client, "full-long", TRAPPED).await;
    let short = launch(&mut client, "full-short", "sleep 3").await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    let filler = mounted.at.parent().unwrap().join("state/filler");
    let full_at = Instant::now();
    let filled = fill(&filler);
    refused_unmetered(&daemon, &mut client, "full-refused-1").await;
    // The agent serves what it can: reads.
    assert_eq!(
        get(&mut client, &long.id).await.state(),
        proto::SessionState::Running
    );
    // The short one exits while nothing can be written; checkpoints fail.
    until_exited(&short.container_id).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    refused_unmetered(&daemon, &mut client, "full-refused-2").await;
    std::fs::remove_file(&filler).unwrap();
    let outage = full_at.elapsed();

    let after = recovered(&mut client, &short, &long, outage, "full").await;

    // The agent crashes and is started again (by systemd) while the disk
    // is full: it cannot reconcile, so it serves with launches refused
    // (reads work, the running session is known), retries, and once space
    // is freed launches resume; the running session is billed through all
    // of it.
    daemon.kill9().await;
    fill(&filler);
    daemon.restart();
    let mut client = daemon.client().await;
    let status = client
        .launch(launch_request("full-restarted", gpus(1), &sh(TRAPPED)))
        .await
        .unwrap_err();
    assert_eq!(
        reason_of(&status).as_deref(),
        Some("LEDGER_UNAVAILABLE"),
        "{status:?}"
    );
    assert!(
        status
            .message()
            .contains("not yet brought its ledger in line"),
        "{}",
        status.message()
    );
    assert_eq!(
        get(&mut client, &long.id).await.state(),
        proto::SessionState::Running
    );
    let inventory = client
        .get_inventory(proto::GetInventoryRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(
        inventory.devices.iter().any(|d| d.session_id == long.id),
        "the running session's device is not shown busy: {inventory:?}"
    );
    std::fs::remove_file(&filler).unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    let resumed = loop {
        match client
            .launch(launch_request("full-resumed", gpus(1), &sh(TRAPPED)))
            .await
        {
            Ok(session) => break session.into_inner(),
            Err(status) => {
                assert_eq!(
                    reason_of(&status).as_deref(),
                    Some("LEDGER_UNAVAILABLE"),
                    "{status:?}"
                );
                assert!(
                    Instant::now() < deadline,
                    "launches never resumed: {status:?}"
                );
                tokio::time::sleep(Duration::from_millis(250)).await;
            }
        }
    };
    assert_eq!(
        get(&mut client, &long.id).await.state(),
        proto::SessionState::Running
    );
    let report = finish(&mut daemon, &[&long.id, &after.id, &resumed.id]).await;
    // Unmounted before the daemon's folder goes.
    drop(mounted);
    drop(daemon);
    eprintln!(
        "full state directory: {filled} bytes filled, {:.1} s full; {report}",
        outage.as_secs_f64()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_state_directory_gone_read_only_refuses_launches_and_loses_no_second() {
    let mut image = PathBuf::new();
    let mounted = daemon_on(|state, dir| {
        image = dir.join("state.ext4");
        let image = image.to_str().unwrap();
        run("truncate", &["-s", "64M", image])?;
        run("mkfs.ext4", &["-q", "-F", image])?;
        run(
            "mount",
            &[
                "-o",
                "loop,errors=remount-ro",
                image,
                state.to_str().unwrap(),
            ],
        )
        .map(drop)
    })
    .await;
    let (mut daemon, mounted) = match mounted {
        Ok(both) => both,
        Err(why) => {
            eprintln!("SKIPPED: {why}");
            return;
        }
    };
    let state = mounted.at.to_str().unwrap().to_owned();
    let device = run("findmnt", &["-n", "-o", "SOURCE", &state]).unwrap();
    let trigger = PathBuf::from("/sys/fs/ext4")
        .join(Path::new(&device).file_name().unwrap())
        .join("trigger_fs_error");
    if !trigger.exists() {
        eprintln!(
            "SKIPPED: the kernel has no {} to make the file system fail",
            trigger.display()
        );
        return;
    }
    let mut client = daemon.client().await;
    let long = launch(&mut client, "ro-long", TRAPPED).await;
    let short = launch(&mut client, "ro-short", "sleep 3").await;
    tokio::time::sleep(Duration::from_millis(1_200)).await;

    // The disk fails: ext4 turns the file system read-only under the agent.
    let failed_at = Instant::now();
    std::fs::write(&trigger, "gpuwarden state_dir test").unwrap();
    let options = run("findmnt", &["-n", "-o", "OPTIONS", &state]).unwrap();
    assert!(
        options.split(',').any(|o| o == "ro" || o == "emergency_ro")
            || std::fs::write(mounted.at.join("probe"), "x").is_err(),
        "the file system is still writable: {options}"
    );
    refused_unmetered(&daemon, &mut client, "ro-refused-1").await;
    assert_eq!(
        get(&mut client, &long.id).await.state(),
        proto::SessionState::Running
    );
    until_exited(&short.container_id).await;
    tokio::time::sleep(Duration::from_millis(1_500)).await;
    refused_unmetered(&daemon, &mut client, "ro-refused-2").await;

    // The agent crashes and is started again on the read-only file system:
    // it serves, refusing launches, and knows what runs.
    daemon.kill9().await;
    daemon.restart();
    let mut client = daemon.client().await;
    refused_unmetered(&daemon, &mut client, "ro-refused-3").await;
    assert_eq!(
        get(&mut client, &long.id).await.state(),
        proto::SessionState::Running
    );

    // The operator's way out: stop the agent (containers run on), unmount,
    // check, mount again, start the agent.
    daemon.signal(Signal::SIGTERM);
    daemon.wait(Duration::from_secs(30)).await;
    mounted.unmount().unwrap();
    let image = image.to_str().unwrap();
    if let Err(e2fsck) = run("e2fsck", &["-f", "-y", image]) {
        // 1: errors fixed. Anything else is reported, not fatal: the
        // integrity check below has the last word on the ledger.
        eprintln!("e2fsck: {e2fsck}");
    }
    run("mount", &["-o", "loop", image, &state]).unwrap();
    daemon.restart();
    let mut client = daemon.client().await;
    let outage = failed_at.elapsed();
    let after = recovered(&mut client, &short, &long, outage, "ro").await;
    let report = finish(&mut daemon, &[&long.id, &after.id]).await;
    // Unmounted before the daemon's folder goes.
    drop(mounted);
    drop(daemon);
    eprintln!(
        "read-only state directory: {:.1} s read-only; {report}",
        outage.as_secs_f64()
    );
}
