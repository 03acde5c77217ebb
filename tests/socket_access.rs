//! The Unix socket admits root, the agent's own user and members of
//! `api.unix_socket_group`: another user is refused. Runs `gpuwarden ctl`
//! as other users through `setpriv`, so it needs root (the test command
//! runs as root).
#![allow(clippy::unwrap_used)]

mod common;

use std::os::unix::fs::{MetadataExt as _, PermissionsExt as _};
use std::path::Path;
use std::process::Command;

use common::{BIN, Daemon};

/// Runs `ctl inventory` as `uid`:`gid` with no supplementary groups.
fn ctl_inventory_as(uid: u32, gid: u32, socket: &Path) -> std::process::Output {
    Command::new("setpriv")
        .args([
            &format!("--reuid={uid}"),
            &format!("--regid={gid}"),
            "--clear-groups",
            BIN,
            "ctl",
            "--socket",
            socket.to_str().unwrap(),
            "inventory",
        ])
        .output()
        .unwrap()
}

#[tokio::test]
async fn only_root_and_the_socket_group_reach_the_unix_socket() {
    if !nix::unistd::geteuid().is_root() {
        eprintln!("skipped: switching users needs root (the test command runs as root)");
        return;
    }
    let mut daemon = Daemon::start("sim-h100-pair.toml", "unix_socket_group = \"nogroup\"\n");
    daemon.channel().await;
    // Let other users walk to the socket; its own mode decides the rest.
    for dir in [daemon.dir.path(), daemon.socket.parent().unwrap()] {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let socket = std::fs::metadata(&daemon.socket).unwrap();
    assert_eq!(socket.mode() & 0o777, 0o660);
    assert_eq!(socket.gid(), 65534, "the socket belongs to nogroup");

    let member = ctl_inventory_as(65534, 65534, &daemon.socket);
    assert!(
        member.status.success(),
        "{}",
        String::from_utf8_lossy(&member.stderr)
    );
    assert!(String::from_utf8_lossy(&member.stdout).contains("2 GPUs"));

    let stranger = ctl_inventory_as(65534, 1, &daemon.socket);
    assert!(!stranger.status.success());
    let stderr = String::from_utf8_lossy(&stranger.stderr);
    assert!(stderr.contains("cannot reach gpuwarden"), "{stderr}");
}

#[test]
fn an_unknown_socket_group_is_a_config_error_naming_the_key() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("gpuwarden.toml");
    std::fs::write(
        &config,
        "[gpu]\nbackend = \"simulated\"\nfixture = \"x.toml\"\n[api]\nunix_socket_group = \"no-such-group-here\"\n",
    )
    .unwrap();
    let out = common::gpuwarden(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("api.unix_socket_group"), "{stderr}");
    assert!(stderr.contains("no-such-group-here"), "{stderr}");
}
