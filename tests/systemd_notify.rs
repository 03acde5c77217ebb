//! The daemon under systemd, as systemd sees it: the notify datagrams a real
//! daemon sends to a real `NOTIFY_SOCKET` (READY only once the API answers,
//! STATUS, WATCHDOG pings, RELOADING ... READY on SIGHUP, STOPPING on
//! SIGTERM), and the unit file as `systemd-analyze verify` reads it.

#![allow(clippy::unwrap_used)]

mod common;

use std::os::linux::net::SocketAddrExt as _;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use common::launch::{SLEEP, gpus, launch_request};
use common::{BIN, Daemon};
use gpuwarden::api::client;
use gpuwarden::proto;
use nix::sys::signal::Signal;
use tokio::net::UnixDatagram;

/// The messages a service manager received, read with bounded waits.
struct Manager {
    socket: UnixDatagram,
    seen: Vec<String>,
}

impl Manager {
    fn bind(path: &Path) -> Self {
        Self {
            socket: UnixDatagram::bind(path).unwrap(),
            seen: Vec::new(),
        }
    }

    /// The next message that has the line `line` (e.g. `READY=1`), within
    /// `timeout`; the messages before it are kept in `seen`.
    async fn until(&mut self, line: &str, timeout: Duration) -> String {
        let deadline = Instant::now() + timeout;
        let mut buffer = vec![0u8; 4096];
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let received = tokio::time::timeout(left, self.socket.recv(&mut buffer)).await;
            let Ok(received) = received else {
                panic!(
                    "no `{line}` within {timeout:?}; received so far: {:#?}",
                    self.seen
                );
            };
            let n = received.unwrap();
            let message = String::from_utf8(buffer[..n].to_vec()).unwrap();
            assert!(
                message.ends_with('\n') && message.lines().all(|l| l.contains('=')),
                "not KEY=VALUE lines: {message:?}"
            );
            self.seen.push(message.clone());
            if message.lines().any(|l| l == line) {
                return message;
            }
        }
    }
}

fn status_of(message: &str) -> Option<&str> {
    message.lines().find_map(|l| l.strip_prefix("STATUS="))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daemon_tells_systemd_ready_status_watchdog_reloading_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify");
    let mut manager = Manager::bind(&notify);
    let mut daemon = Daemon::start_with_env(
        "sim-dgx-a100.toml",
        "",
        &[
            ("NOTIFY_SOCKET", notify.to_str().unwrap()),
            ("WATCHDOG_USEC", "2000000"),
        ],
    );

    // READY=1 comes once the API serves: the very first call succeeds, with
    // no retry.
    let ready = manager.until("READY=1", Duration::from_secs(30)).await;
    assert_eq!(manager.seen.len(), 1, "READY=1 is the first message");
    let mut agent = client::connect_unix(&daemon.socket)
        .await
        .expect("the socket answers when READY=1 arrives");
    let inventory = agent
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .expect("GetInventory answers when READY=1 arrives")
        .into_inner();
    assert_eq!(inventory.node_id, daemon.node_id);
    assert_eq!(
        status_of(&ready),
        Some("serving 17 devices (0 busy), 0 sessions"),
        "{ready:?}"
    );

    // WATCHDOG=1 every WATCHDOG_USEC/2 (1 s here), again and again.
    let first = Instant::now();
    manager.until("WATCHDOG=1", Duration::from_secs(5)).await;
    manager.until("WATCHDOG=1", Duration::from_secs(5)).await;
    manager.until("WATCHDOG=1", Duration::from_secs(5)).await;
    assert!(
        first.elapsed() >= Duration::from_millis(1500),
        "pings are spaced by the interval, not a burst: {:?}",
        first.elapsed()
    );

    // STATUS= follows the sessions.
    let session = agent
        .launch(launch_request(
            &format!("notify-{}", uuid::Uuid::new_v4()),
            gpus(1),
            SLEEP,
        ))
        .await
        .unwrap()
        .into_inner();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let message = manager.until("WATCHDOG=1", Duration::from_secs(5)).await;
        let statuses: Vec<&str> = manager.seen.iter().filter_map(|m| status_of(m)).collect();
        if statuses.contains(&"serving 17 devices (1 busy), 1 session") {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no STATUS= with the session {}; last: {message:?}, all: {:#?}",
            session.id,
            manager.seen
        );
    }

    // SIGHUP: RELOADING=1 (with MONOTONIC_USEC=) and then READY=1.
    manager.seen.clear();
    daemon.signal(Signal::SIGHUP);
    let reloading = manager.until("RELOADING=1", Duration::from_secs(10)).await;
    let usec: u64 = reloading
        .lines()
        .find_map(|l| l.strip_prefix("MONOTONIC_USEC="))
        .unwrap_or_else(|| panic!("no MONOTONIC_USEC in {reloading:?}"))
        .parse()
        .unwrap();
    assert!(usec > 0);
    let ready = manager.until("READY=1", Duration::from_secs(10)).await;
    assert_eq!(
        status_of(&ready),
        Some("serving 17 devices (1 busy), 1 session")
    );

    // SIGTERM: STOPPING=1, then a clean exit that leaves the container.
    daemon.signal(Signal::SIGTERM);
    let stopping = manager.until("STOPPING=1", Duration::from_secs(10)).await;
    assert!(
        status_of(&stopping).is_some_and(|s| s.starts_with("stopping")),
        "{stopping:?}"
    );
    drop(agent);
    let status = daemon.wait(Duration::from_secs(20)).await;
    assert!(status.success(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_abstract_notify_socket_works_too() {
    let name = format!("gpuwarden-notify-test-{}", uuid::Uuid::new_v4().simple());
    let address = std::os::unix::net::SocketAddr::from_abstract_name(name.as_bytes()).unwrap();
    let socket = std::os::unix::net::UnixDatagram::bind_addr(&address).unwrap();
    socket.set_nonblocking(true).unwrap();
    let mut manager = Manager {
        socket: UnixDatagram::from_std(socket).unwrap(),
        seen: Vec::new(),
    };
    let mut daemon = Daemon::start_with_env(
        "sim-h100-pair.toml",
        "",
        &[("NOTIFY_SOCKET", &format!("@{name}"))],
    );
    manager.until("READY=1", Duration::from_secs(30)).await;
    daemon.signal(Signal::SIGTERM);
    manager.until("STOPPING=1", Duration::from_secs(10)).await;
    assert!(daemon.wait(Duration::from_secs(20)).await.success());
    assert!(
        !manager.seen.iter().any(|m| m.contains("WATCHDOG=1")),
        "no watchdog was asked for: {:#?}",
        manager.seen
    );
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|out| String::from_utf8_lossy(&out.stdout).trim() == "0")
}

#[test]
fn the_unit_file_passes_systemd_analyze_verify() {
    let unit_path = Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd/gpuwarden.service");
    let unit = std::fs::read_to_string(&unit_path).unwrap();
    for line in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "ExecReload=/bin/kill -HUP $MAINPID",
        "Restart=on-failure",
        "StateDirectory=gpuwarden",
        "RuntimeDirectory=gpuwarden",
        "After=docker.service network-online.target",
        "Wants=docker.service network-online.target",
    ] {
        assert!(
            unit.lines().any(|l| l.trim() == line),
            "the unit lacks `{line}`"
        );
    }

    let analyze = Command::new("systemd-analyze").arg("--version").output();
    if analyze.is_err() {
        assert!(
            !is_root(),
            "systemd-analyze is missing though this is root: scripts/test.sh installs it (package systemd)"
        );
        eprintln!(
            "SKIPPED the_unit_file_passes_systemd_analyze_verify: systemd-analyze is not installed \
             and this is not root; install the `systemd` package (scripts/test.sh does as root)"
        );
        return;
    }

    // verify wants ExecStart's binary to exist: a copy of the unit that runs
    // the binary under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("gpuwarden.service");
    std::fs::write(&copy, unit.replace("/usr/bin/gpuwarden", BIN)).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&copy)
        .env("SYSTEMD_LOG_COLOR", "0")
        .output()
        .unwrap();
    let output = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Parse problems are warnings with exit status 0: any line about our
    // unit is a finding. Lines about other units of this host are not ours.
    let ours: Vec<&str> = output
        .lines()
        .filter(|l| l.contains("gpuwarden.service"))
        .collect();
    assert!(
        out.status.success() && ours.is_empty(),
        "systemd-analyze verify {}: {}\n{output}",
        copy.display(),
        out.status
    );
}
