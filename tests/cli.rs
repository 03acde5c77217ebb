//! The command line as an operator meets it: `check-config`, `inventory`,
//! `run` refusing a bad config with its own exit code, and what `ctl`
//! decides before it reaches a daemon.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};

use common::{fixture, gpuwarden};

fn write_config(dir: &Path, body: &str) -> PathBuf {
    let path = dir.join("gpuwarden.toml");
    std::fs::write(&path, body).unwrap();
    path
}

fn simulated(dir: &Path) -> String {
    format!(
        "node_id = \"n1\"\nstate_dir = \"{}\"\n[gpu]\nbackend = \"simulated\"\nfixture = \"{}\"\n",
        dir.join("state").display(),
        fixture("sim-dgx-a100.toml").display()
    )
}

fn stderr(out: &std::process::Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[test]
fn check_config_accepts_a_good_config_and_says_what_it_found() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &simulated(dir.path()));
    let out = gpuwarden(&["check-config", "--config", config.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let stdout = String::from_utf8(out.stdout).unwrap();
    assert!(stdout.contains("OK"), "{stdout}");
    assert!(stdout.contains("8 GPUs, 17 assignable devices"), "{stdout}");
}

#[test]
fn check_config_exits_1_naming_an_unknown_key() {
    let dir = tempfile::tempdir().unwrap();
    let body = simulated(dir.path()) + "[metrics]\nlisten = \"127.0.0.1:9477\"\nport = 9\n";
    let config = write_config(dir.path(), &body);
    let out = gpuwarden(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("key `metrics.port`"), "{err}");
    assert!(err.contains("unknown field `port`"), "{err}");
    assert!(err.contains(config.to_str().unwrap()), "{err}");
}

#[test]
fn check_config_exits_1_naming_a_bad_value() {
    let dir = tempfile::tempdir().unwrap();
    let body = simulated(dir.path()) + "[docker]\ndevice_injection = \"magic\"\n";
    let config = write_config(dir.path(), &body);
    let out = gpuwarden(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("key `docker.device_injection`"), "{err}");
    assert!(
        err.contains("nvidia"),
        "the accepted values are listed: {err}"
    );
}

#[test]
fn check_config_reads_the_fixture_it_names() {
    let dir = tempfile::tempdir().unwrap();
    let bad_fixture = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(fixture("sim-h100-pair.toml")).unwrap();
    std::fs::write(
        &bad_fixture,
        text.replace("memory_mib = 81559", "memory_mib = 0"),
    )
    .unwrap();
    let body = format!(
        "node_id = \"n1\"\n[gpu]\nbackend = \"simulated\"\nfixture = \"{}\"\n",
        bad_fixture.display()
    );
    let config = write_config(dir.path(), &body);
    let out = gpuwarden(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("key `gpus[0].memory_mib`"), "{err}");
}

#[test]
fn run_with_a_bad_config_exits_64_so_systemd_stops_restarting() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(
        dir.path(),
        "node_id = \"n1\"\n[gpu]\nbackend = \"simulated\"\n",
    );
    let out = gpuwarden(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(
        stderr(&out).contains("key `gpu.fixture`"),
        "{}",
        stderr(&out)
    );

    let missing = dir.path().join("nope.toml");
    let out = gpuwarden(&["run", "--config", missing.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    assert!(stderr(&out).contains("cannot read"), "{}", stderr(&out));
}

#[test]
fn run_with_an_invalid_fixture_exits_64() {
    let dir = tempfile::tempdir().unwrap();
    let bad_fixture = dir.path().join("dup.toml");
    let text = std::fs::read_to_string(fixture("sim-h100-pair.toml")).unwrap();
    std::fs::write(
        &bad_fixture,
        text.replace("GPU-c273bec9", "GPU-9b12b00c")
            .replace("e03a-483e-a0c6-df38aac9f7eb", "6d0c-490a-b0b2-879ea7657096"),
    )
    .unwrap();
    let body = format!(
        "node_id = \"n1\"\nstate_dir = \"{0}/s\"\n[gpu]\nbackend = \"simulated\"\nfixture = \"{1}\"\n[api]\nunix_socket = \"{0}/a.sock\"\n",
        dir.path().display(),
        bad_fixture.display()
    );
    let config = write_config(dir.path(), &body);
    let out = gpuwarden(&["run", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let err = stderr(&out);
    assert!(err.contains("key `gpus[1].uuid`"), "{err}");
    assert!(err.contains("already used"), "{err}");
}

#[test]
fn inventory_of_a_simulated_host_shows_its_counts() {
    let path = fixture("sim-dgx-a100.toml");
    let out = gpuwarden(&["inventory", "--simulate", path.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stderr(&out));
    let table = String::from_utf8(out.stdout).unwrap();
    assert!(
        table.contains("8 GPUs, 11 MIG instances, 17 assignable devices"),
        "{table}"
    );

    let out = gpuwarden(&["inventory", "--simulate", path.to_str().unwrap(), "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["gpus"], 8);
    assert_eq!(json["mig_instances"], 11);
    assert_eq!(json["assignable"], 17);
    assert_eq!(json["devices"].as_array().unwrap().len(), 19);
}

#[test]
fn inventory_takes_the_backend_from_a_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = write_config(dir.path(), &simulated(dir.path()));
    let out = gpuwarden(&["inventory", "--config", config.to_str().unwrap(), "--json"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let json: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(json["node_id"], "n1");
    assert_eq!(json["assignable"], 17);
}

#[test]
fn inventory_without_nvidia_names_the_missing_library() {
    let dir = tempfile::tempdir().unwrap();
    let body = format!(
        "node_id = \"n1\"\n[gpu]\nnvml_library = \"{}/libnvidia-ml.so.1\"\n",
        dir.path().display()
    );
    let config = write_config(dir.path(), &body);
    let out = gpuwarden(&["inventory", "--config", config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("libnvidia-ml.so.1"), "{err}");
    assert!(err.contains("install the NVIDIA driver"), "{err}");
    assert!(!err.contains("panicked"), "{err}");
}

#[test]
fn inventory_of_a_bad_fixture_names_file_key_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let bad = dir.path().join("bad.toml");
    let text = std::fs::read_to_string(fixture("sim-dgx-a100.toml")).unwrap();
    std::fs::write(
        &bad,
        text.replacen("compute_slices = 3", "compute_slices = 9", 1),
    )
    .unwrap();
    let out = gpuwarden(&["inventory", "--simulate", bad.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("bad.toml"), "{err}");
    assert!(err.contains("gpus[1].mig_instances[0]"), "{err}");
}

#[test]
fn ctl_lists_its_commands() {
    let out = gpuwarden(&["ctl", "--help"]);
    assert!(out.status.success(), "{}", stderr(&out));
    let help = String::from_utf8(out.stdout).unwrap();
    for command in [
        "inventory",
        "launch",
        "stop",
        "sessions",
        "usage",
        "events",
        "drain",
        "undrain",
        "balance",
        "audit",
    ] {
        assert!(
            help.lines()
                .any(|l| l.trim_start().starts_with(&format!("{command} "))),
            "no `{command}` in:\n{help}"
        );
    }
}

#[test]
fn ctl_without_a_daemon_names_the_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("gpuwarden.sock");
    let out = gpuwarden(&["ctl", "--socket", socket.to_str().unwrap(), "sessions"]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("cannot reach gpuwarden at"), "{err}");
    assert!(err.contains(socket.to_str().unwrap()), "{err}");
}

#[test]
fn ctl_launch_needs_who_and_exactly_one_way_to_pick_devices() {
    let usage_error = |args: &[&str], expected: &str| {
        let mut all = vec!["ctl", "--socket", "/nonexistent/gpuwarden.sock", "launch"];
        all.extend_from_slice(args);
        let out = gpuwarden(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", stderr(&out));
        let err = stderr(&out);
        assert!(err.contains(expected), "{args:?}: no `{expected}` in {err}");
    };
    usage_error(&["--as", "u-alice", "img"], "--gpus");
    usage_error(&["--gpus", "1", "img"], "--as");
    usage_error(
        &["--as", "u-alice", "--gpus", "1", "--mig", "1g.10gb", "img"],
        "cannot be used with",
    );
    usage_error(
        &[
            "--as", "u-alice", "--device", "GPU-1", "--count", "2", "img",
        ],
        "cannot be used with",
    );
    usage_error(
        &[
            "--as", "u-alice", "--mig", "1g.10gb", "--model", "H100", "img",
        ],
        "cannot be used with",
    );
    usage_error(
        &["--as", "u-alice", "--gpus", "1", "--env", "NOEQUALS", "img"],
        "KEY=VALUE",
    );
    usage_error(
        &["--as", "u-alice", "--service-account", "--gpus", "1", "img"],
        "--org",
    );
}
