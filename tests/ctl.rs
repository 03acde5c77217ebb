//! `gpuwarden ctl` as an operator uses it: the real binary against a real
//! daemon with real containers. What is asserted is what a person or a
//! script reading the output would notice: rows, states, costs, reasons and
//! exit codes.

#![allow(clippy::unwrap_used)]

mod common;

use std::io::{BufRead as _, BufReader};
use std::process::{Command, Output, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use common::{BIN, Daemon};
use serde_json::Value;

/// Runs `gpuwarden ctl --socket <daemon's> ARGS...` to completion.
fn ctl(daemon: &Daemon, args: &[&str]) -> Output {
    Command::new(BIN)
        .arg("ctl")
        .arg("--socket")
        .arg(&daemon.socket)
        .args(args)
        .output()
        .unwrap()
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs ctl and expects success; returns stdout.
fn ok(daemon: &Daemon, args: &[&str]) -> String {
    let out = ctl(daemon, args);
    assert!(
        out.status.success(),
        "ctl {args:?} failed ({}):\n{}{}",
        out.status,
        stdout(&out),
        stderr(&out)
    );
    stdout(&out)
}

/// Runs ctl with `--json` (before the command: after a launch's IMAGE it
/// would be the container's argument) and parses its output.
fn json(daemon: &Daemon, args: &[&str]) -> Value {
    let mut args = args.to_vec();
    args.insert(0, "--json");
    let text = ok(daemon, &args);
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("ctl {args:?}: not JSON ({e}): {text}"))
}

/// Runs ctl and expects a refusal: a non-zero exit with the reason and the
/// agent's message on stderr.
fn refused(daemon: &Daemon, args: &[&str], reason: &str) -> String {
    let out = ctl(daemon, args);
    assert!(
        !out.status.success(),
        "ctl {args:?} succeeded: {}",
        stdout(&out)
    );
    assert_eq!(out.status.code(), Some(1), "{}", stderr(&out));
    let err = stderr(&out);
    assert!(
        err.contains(&format!("{reason}: ")),
        "ctl {args:?}: no `{reason}: message` in: {err}"
    );
    err
}

async fn started(fixture: &str) -> Daemon {
    let mut daemon = Daemon::start(fixture, "");
    // Waits (bounded) for the socket to answer.
    daemon.channel().await;
    daemon
}

/// Launches a sleeping container through ctl and returns its session.
fn launch(daemon: &Daemon, args: &[&str]) -> Value {
    let image = common::test_image();
    let mut all = vec!["launch"];
    all.extend_from_slice(args);
    all.extend_from_slice(&[image.as_str(), "sleep", "300"]);
    json(daemon, &all)
}

/// The cell of `row` in the column whose header is `header`: columns are
/// aligned when each row's cell starts at its header's offset (numbers are
/// right-aligned within the column).
fn cell_at<'a>(table: &'a str, header: &str, row: &'a str) -> &'a str {
    let first = table.lines().next().unwrap();
    // The header as a whole word: END is not the start of ENDED.
    let at = first
        .match_indices(header)
        .map(|(at, _)| at)
        .find(|&at| {
            let before = first[..at].chars().next_back();
            let after = first[at + header.len()..].chars().next();
            before.is_none_or(|c| c == ' ') && after.is_none_or(|c| c == ' ')
        })
        .unwrap_or_else(|| panic!("no {header} in {first}"));
    row.get(at..)
        .and_then(|rest| rest.trim_start().split("  ").next())
        .unwrap_or("")
        .trim()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn launch_list_stop_and_usage_of_sessions() {
    let daemon = started("sim-dgx-a100.toml").await;

    // A personal session on one GPU, and an org session on two MIG
    // instances with a chosen request id.
    let alice = launch(&daemon, &["--as", "u-alice", "--gpus", "1"]);
    assert_eq!(alice["state"], "running");
    assert_eq!(alice["scope"], "personal");
    assert_eq!(alice["owner"], "u-alice");
    assert_eq!(alice["device_uuids"].as_array().unwrap().len(), 1);
    let alice_id = alice["id"].as_str().unwrap().to_owned();
    let image = common::test_image();
    let table = ok(
        &daemon,
        &[
            "launch",
            "--as",
            "u-bob",
            "--org",
            "acme",
            "--mig",
            "1g.10gb",
            "--count",
            "2",
            "--request-id",
            "ctl-test-org-1",
            &image,
            "sleep",
            "300",
        ],
    );
    let row = table.lines().nth(1).unwrap();
    let bob_id = cell_at(&table, "SESSION", row).to_owned();
    assert!(bob_id.starts_with("s-"), "{table}");
    assert_eq!(cell_at(&table, "STATE", row), "running", "{table}");
    assert_eq!(cell_at(&table, "SCOPE", row), "org", "{table}");
    assert_eq!(cell_at(&table, "ACCOUNT", row), "acme", "{table}");
    assert_eq!(cell_at(&table, "OWNER", row), "u-bob", "{table}");

    // The same request id again is the same session, not a third container.
    let again = launch(
        &daemon,
        &[
            "--as",
            "u-bob",
            "--org",
            "acme",
            "--mig",
            "1g.10gb",
            "--count",
            "2",
            "--request-id",
            "ctl-test-org-1",
        ],
    );
    assert_eq!(again["id"], bob_id.as_str());

    // `-q` prints the id alone, for shells.
    let quiet = ok(
        &daemon,
        &[
            "launch", "-q", "--as", "u-alice", "--gpus", "1", &image, "sleep", "300",
        ],
    );
    let quiet_id = quiet.trim().to_owned();
    assert!(
        quiet_id.starts_with("s-") && !quiet_id.contains(' '),
        "{quiet}"
    );
    ok(&daemon, &["stop", &quiet_id, "--timeout", "1"]);

    // The table: aligned columns, one row per running session, a summary.
    let table = ok(&daemon, &["sessions"]);
    let lines: Vec<&str> = table.lines().collect();
    assert!(lines[0].starts_with("SESSION "), "{table}");
    assert_eq!(lines.len(), 4, "header, two sessions, summary: {table}");
    assert_eq!(lines[3], "2 sessions (2 running)");
    for row in &lines[1..3] {
        let id = cell_at(&table, "SESSION", row);
        assert!(id == alice_id || id == bob_id, "{table}");
        assert_eq!(cell_at(&table, "STATE", row), "running", "{table}");
        let started = cell_at(&table, "STARTED", row);
        assert!(
            humantime::parse_rfc3339(started).is_ok(),
            "STARTED is RFC 3339: {started}"
        );
        let cost = cell_at(&table, "COST", row);
        let decimals = cost.split('.').nth(1).unwrap_or("");
        assert_eq!(decimals.len(), 6, "credits with 6 decimals: {cost}");
        let gpu_seconds = cell_at(&table, "GPU-SECONDS", row);
        assert_eq!(gpu_seconds.split('.').nth(1).unwrap_or("").len(), 3);
    }

    // JSON for scripts.
    let sessions = json(&daemon, &["sessions"]);
    let sessions = sessions.as_array().unwrap();
    assert_eq!(sessions.len(), 2);
    let bob = sessions
        .iter()
        .find(|s| s["id"] == bob_id.as_str())
        .unwrap();
    assert_eq!(bob["billed_account_id"], "acme");
    assert_eq!(bob["request_id"], "ctl-test-org-1");
    assert_eq!(bob["device_uuids"].as_array().unwrap().len(), 2);
    assert_eq!(bob["image"], image.as_str());
    assert!(bob["cost_nano_credits"].is_i64());
    let acme = json(&daemon, &["sessions", "--account", "acme"]);
    assert_eq!(acme.as_array().unwrap().len(), 1);

    // A member cannot stop another user's personal session: the reason and
    // the agent's message, and a non-zero exit.
    let err = refused(
        &daemon,
        &["stop", &alice_id, "--as", "u-bob"],
        "ROLE_FORBIDDEN",
    );
    assert!(err.contains("only its owner"), "{err}");

    // The owner stops it.
    let stopped = json(
        &daemon,
        &["stop", &alice_id, "--as", "u-alice", "--timeout", "1"],
    );
    assert_eq!(stopped["state"], "ended");
    assert_eq!(stopped["end_reason"], "stopped");
    assert!(stopped["ended_at"].is_string());
    let running = json(&daemon, &["sessions"]);
    assert_eq!(running.as_array().unwrap().len(), 1);
    let all = json(&daemon, &["sessions", "--all"]);
    assert_eq!(all.as_array().unwrap().len(), 3);
    let table = ok(&daemon, &["sessions", "--all"]);
    assert!(table.ends_with("3 sessions (1 running)\n"), "{table}");
    // The same sessions a page of one at a time, in the same order; a
    // creation window after them holds none.
    let ids = |sessions: &Value| -> Vec<String> {
        sessions
            .as_array()
            .unwrap()
            .iter()
            .map(|s| s["id"].as_str().unwrap().to_owned())
            .collect()
    };
    let paged = json(&daemon, &["sessions", "--all", "--page-size", "1"]);
    assert_eq!(ids(&paged), ids(&all));
    let later = json(&daemon, &["sessions", "--all", "--from", "2999-01-01"]);
    assert!(ids(&later).is_empty(), "{later}");
    let earlier = json(&daemon, &["sessions", "--all", "--to", "2000-01-01"]);
    assert!(ids(&earlier).is_empty(), "{earlier}");
    let row = table.lines().find(|l| l.starts_with(&alice_id)).unwrap();
    assert_eq!(cell_at(&table, "END", row), "stopped", "{table}");

    // Usage: per account, scope, billing path and device class, with a
    // total and the paying balance.
    let usage = json(&daemon, &["usage", "u-alice"]);
    assert_eq!(usage["account_id"], "u-alice");
    assert_eq!(usage["billed_account_id"], "u-alice");
    let lines = usage["lines"].as_array().unwrap();
    assert!(!lines.is_empty(), "{usage}");
    assert!(
        usage["total"]["gpu_seconds"].as_f64().unwrap() > 0.0,
        "{usage}"
    );
    let spent = usage["total"]["cost_nano_credits"].as_i64().unwrap();
    assert!(spent > 0, "{usage}");
    assert_eq!(
        usage["balance_nano_credits"].as_i64().unwrap(),
        1_000_000 * 1_000_000_000 - spent,
        "the balance is the opening one less what was spent: {usage}"
    );
    let table = ok(&daemon, &["usage", "u-alice"]);
    assert!(table.starts_with("usage of u-alice from "), "{table}");
    assert!(table.contains("DEVICE CLASS"), "{table}");
    assert!(table.contains("NVIDIA A100-SXM4-80GB"), "{table}");
    assert!(table.lines().any(|l| l.starts_with("total ")), "{table}");
    assert!(
        table.contains("balance of u-alice: 99999"),
        "the balance line: {table}"
    );

    let empty = json(
        &daemon,
        &[
            "usage",
            "u-alice",
            "--from",
            "2000-01-01",
            "--to",
            "2000-01-02T00:00:00Z",
        ],
    );
    assert_eq!(empty["lines"].as_array().unwrap().len(), 0, "{empty}");
    assert_eq!(empty["from"], "2000-01-01T00:00:00.000Z");
    let table = ok(
        &daemon,
        &[
            "usage",
            "u-alice",
            "--from",
            "2000-01-01",
            "--to",
            "2000-01-02",
        ],
    );
    let total = table.lines().find(|l| l.starts_with("total")).unwrap();
    assert_eq!(
        total.split_whitespace().collect::<Vec<_>>(),
        ["total", "0.000", "0.000", "0.000000"],
        "no -0.000 in an empty period: {table}"
    );

    // A bad time is the command line's fault: clap's usage error, exit 2.
    let out = ctl(&daemon, &["usage", "u-alice", "--from", "last tuesday"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        stderr(&out).contains("2026-01-31T12:00:00Z"),
        "{}",
        stderr(&out)
    );

    // An unknown account is refused with its reason.
    refused(
        &daemon,
        &["launch", "--as", "u-nobody", "--gpus", "1", &image],
        "UNKNOWN_ACCOUNT",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_refuses_launches_until_undrain() {
    let daemon = started("sim-h100-pair.toml").await;
    let image = common::test_image();
    let running = launch(&daemon, &["--as", "u-alice", "--gpus", "1"]);

    let said = ok(&daemon, &["drain", "--reason", "driver upgrade"]);
    assert_eq!(
        said,
        "draining: new launches are refused with NODE_DRAINING; 1 session still running\n"
    );
    let inventory = json(&daemon, &["inventory"]);
    assert_eq!(inventory["draining"], true);

    let err = refused(
        &daemon,
        &["launch", "--as", "u-alice", "--gpus", "1", &image, "true"],
        "NODE_DRAINING",
    );
    assert!(err.contains("draining"), "{err}");
    // The running session goes on.
    let sessions = json(&daemon, &["sessions"]);
    assert_eq!(sessions[0]["id"], running["id"]);
    assert_eq!(sessions[0]["state"], "running");

    let undrained = json(&daemon, &["undrain"]);
    assert_eq!(undrained["draining"], false);
    assert_eq!(undrained["running_sessions"], 1);
    let second = launch(&daemon, &["--as", "u-alice", "--gpus", "1"]);
    assert_eq!(second["state"], "running");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_follow_launches_and_drains_as_json_lines() {
    let daemon = started("sim-h100-pair.toml").await;
    let mut child = Command::new(BIN)
        .arg("ctl")
        .arg("--socket")
        .arg(&daemon.socket)
        .args(["events", "--json"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (lines, received) = mpsc::channel::<(&'static str, String)>();
    let stdout = child.stdout.take().unwrap();
    let stderr = child.stderr.take().unwrap();
    let out_lines = lines.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let _ = out_lines.send(("out", line.unwrap()));
        }
    });
    std::thread::spawn(move || {
        for line in BufReader::new(stderr).lines() {
            let _ = lines.send(("err", line.unwrap()));
        }
    });
    let next = |what: &str| {
        received
            .recv_timeout(Duration::from_secs(20))
            .unwrap_or_else(|_| panic!("no {what} from `ctl events` within 20 s"))
    };

    // The watcher says on stderr when it follows; from then on nothing is
    // missed.
    let (stream, line) = next("start line");
    assert_eq!(stream, "err");
    assert!(line.contains("following events"), "{line}");

    let session = launch(&daemon, &["--as", "u-alice", "--gpus", "1"]);
    ok(&daemon, &["drain", "--reason", "ctl events test"]);
    let mut started = None;
    let mut drained = None;
    while started.is_none() || drained.is_none() {
        let (stream, line) = next("session_started and drain_changed lines");
        assert_eq!(stream, "out", "{line}");
        let event: Value = serde_json::from_str(&line)
            .unwrap_or_else(|e| panic!("not one JSON object a line ({e}): {line}"));
        assert!(event["sequence"].is_u64(), "{line}");
        assert!(event["at"].is_string(), "{line}");
        match event["kind"].as_str() {
            Some("session_started") if event["session"]["id"] == session["id"] => {
                started = Some(event)
            }
            Some("drain_changed") => drained = Some(event),
            _ => {}
        }
    }
    let started = started.unwrap();
    assert_eq!(started["session"]["owner"], "u-alice");
    assert_eq!(started["session"]["state"], "running");
    let drained = drained.unwrap();
    assert_eq!(drained["draining"], true);
    assert_eq!(drained["reason"], "ctl events test");

    child.kill().unwrap();
    child.wait().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn balance_top_ups_and_the_audit_trail() {
    let daemon = started("sim-h100-pair.toml").await;
    let image = common::test_image();

    let said = ok(
        &daemon,
        &[
            "balance",
            "u-bob",
            "--add",
            "12.5",
            "--reason",
            "invoice 42",
        ],
    );
    assert!(
        said.starts_with(
            "u-bob: 12.500000 credits added, balance 1000012.500000 credits (adjustment "
        ),
        "{said}"
    );
    let taken = json(
        &daemon,
        &[
            "balance",
            "u-bob",
            "--add",
            "-0.000001",
            "--reason",
            "correction",
        ],
    );
    assert_eq!(taken["added_nano_credits"], -1_000);
    assert_eq!(taken["balance_nano_credits"], 1_000_012_499_999_000_i64);
    refused(
        &daemon,
        &["balance", "u-nobody", "--add", "1", "--reason", "x"],
        "UNKNOWN_ACCOUNT",
    );
    let out = ctl(
        &daemon,
        &["balance", "u-bob", "--add", "lots", "--reason", "x"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));

    let session = launch(&daemon, &["--as", "u-bob", "--gpus", "1"]);
    let id = session["id"].as_str().unwrap();
    refused(
        &daemon,
        &[
            "launch", "--as", "u-bob", "--org", "nowhere", "--gpus", "1", &image,
        ],
        "UNKNOWN_ACCOUNT",
    );
    ok(&daemon, &["stop", id, "--as", "u-bob", "--timeout", "1"]);

    let audit = json(&daemon, &["audit", "--account", "u-bob"]);
    let entries = audit.as_array().unwrap();
    let actions: Vec<&str> = entries
        .iter()
        .map(|e| e["action"].as_str().unwrap())
        .collect();
    for action in ["adjust_balance", "launch", "stop"] {
        assert!(actions.contains(&action), "no {action} in {actions:?}");
    }
    let launch_entry = entries.iter().find(|e| e["action"] == "launch").unwrap();
    assert_eq!(launch_entry["actor"], "u-bob");
    assert_eq!(launch_entry["session_id"], id);
    let adjust = entries.iter().find(|e| {
        e["action"] == "adjust_balance" && e["detail"].as_str().unwrap().contains("invoice 42")
    });
    assert!(adjust.is_some(), "{audit}");

    let everything = json(&daemon, &["audit"]);
    assert!(
        everything
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"] == "refuse" && e["reason"] == "UNKNOWN_ACCOUNT"),
        "{everything}"
    );

    let table = ok(&daemon, &["audit", "--limit", "3"]);
    let lines: Vec<&str> = table.lines().collect();
    assert_eq!(lines.len(), 4, "a header and 3 entries: {table}");
    assert!(lines[0].starts_with("AT "), "{table}");
    // Newest first: the stop.
    assert_eq!(cell_at(&table, "ACTION", lines[1]), "stop", "{table}");
    assert_eq!(cell_at(&table, "SESSION", lines[1]), id, "{table}");
}
