//! `/metrics` as monitoring sees it: `promtool check metrics` accepts it,
//! and a real Prometheus server scrapes the agent and answers a query for a
//! gpuwarden series through its HTTP API.
#![allow(clippy::unwrap_used)]

mod common;

use std::io::{Read as _, Write as _};
use std::net::TcpStream;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use common::Daemon;
use common::launch::{SLEEP, gpus, launch_request};
use common::tls::free_port;
use gpuwarden::proto;

/// A plain HTTP/1.1 GET; returns the status code and the body.
fn http_get(port: u16, path: &str) -> std::io::Result<(u16, String)> {
    http_get_accepting(port, path, "*/*")
}

fn http_get_accepting(port: u16, path: &str, accept: &str) -> std::io::Result<(u16, String)> {
    let mut stream = TcpStream::connect(("127.0.0.1", port))?;
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: {accept}\r\nConnection: close\r\n\r\n"
    )?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let status = response
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .unwrap_or(0);
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let chunked = head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked");
    Ok((
        status,
        if chunked {
            dechunk(body)
        } else {
            body.to_owned()
        },
    ))
}

/// Undoes chunked transfer encoding (hyper chunks a body of unknown length).
fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, after)) = rest.split_once("\r\n") {
        let Ok(size) = usize::from_str_radix(size.trim(), 16) else {
            return body.to_owned();
        };
        if size == 0 {
            break;
        }
        out.push_str(&after[..size]);
        rest = &after[size + 2..];
    }
    out
}

async fn daemon_with_a_session() -> (Daemon, u16) {
    let port = free_port();
    let mut daemon = Daemon::start(
        "sim-dgx-a100.toml",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n[metering]\ncheckpoint_seconds = 1\n"),
    );
    let mut client = daemon.client().await;
    client
        .launch(launch_request(
            "metered",
            proto::DeviceSelector {
                mig_profile: "1g.10gb".into(),
                mig_count: 1,
                ..Default::default()
            },
            SLEEP,
        ))
        .await
        .unwrap();
    (daemon, port)
}

/// A Launch too large to be read is still a refused launch to monitoring;
/// an unreadable request to another method is not a launch.
#[tokio::test]
async fn a_launch_that_cannot_be_read_counts_as_refused() {
    let port = free_port();
    let mut daemon = Daemon::start(
        "sim-h100-pair.toml",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    let mut client = daemon.client().await;
    let huge = "x".repeat(4 * 1024 * 1024 + 1);
    let mut request = launch_request("too-large", gpus(1), SLEEP);
    request
        .container
        .as_mut()
        .unwrap()
        .env
        .insert("BIG".into(), huge.clone());
    let status = client.launch(request).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let status = client
        .get_session(proto::GetSessionRequest {
            session_id: huge,
            principal: None,
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument, "{status:?}");
    let (_, text) = http_get(port, "/metrics").unwrap();
    assert!(
        text.contains(
            "gpuwarden_launches_total{result=\"refused\",reason=\"INVALID_REQUEST\"} 1\n"
        ),
        "{text}"
    );
    assert!(
        text.contains("gpuwarden_launch_duration_seconds_count 1\n"),
        "{text}"
    );
}

#[tokio::test]
async fn the_exposition_passes_promtool_and_shows_devices_sessions_and_usage() {
    let (_daemon, port) = daemon_with_a_session().await;
    // Wait for a checkpoint so usage counters have a value.
    let deadline = Instant::now() + Duration::from_secs(20);
    let text = loop {
        let (status, body) = http_get(port, "/metrics").unwrap();
        assert_eq!(status, 200);
        let text = body;
        if text.contains("gpuwarden_gpu_seconds_total{") {
            break text;
        }
        assert!(Instant::now() < deadline, "no usage series in:\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    for series in [
        "gpuwarden_devices{class=\"NVIDIA A100-SXM4-80GB MIG 1g.10gb\",state=\"busy\"} 1",
        "gpuwarden_sessions{account=\"u-alice\",scope=\"personal\"} 1",
        "gpuwarden_launches_total{result=\"started\",reason=\"\"} 1",
        "gpuwarden_gpu_temperature_celsius{uuid=",
        "gpuwarden_ledger_write_duration_seconds_bucket",
        "gpuwarden_launch_duration_seconds_count 1",
        "gpuwarden_usage_outbox_records ",
    ] {
        assert!(text.contains(series), "missing {series} in:\n{text}");
    }
    // What Prometheus asks for: OpenMetrics.
    let (_, openmetrics) = http_get_accepting(
        port,
        "/metrics",
        "application/openmetrics-text; version=1.0.0",
    )
    .unwrap();
    assert!(
        openmetrics.ends_with("# EOF\n"),
        "OpenMetrics ends with # EOF"
    );
    assert!(openmetrics.contains("# TYPE gpuwarden_launches counter"));

    let mut promtool = Command::new("promtool")
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool is installed by the test command (package prometheus)");
    promtool
        .stdin
        .take()
        .unwrap()
        .write_all(text.as_bytes())
        .unwrap();
    let out = promtool.wait_with_output().unwrap();
    assert!(
        out.status.success() && out.stdout.is_empty() && out.stderr.is_empty(),
        "promtool: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );

    let (status, _) = http_get(port, "/other").unwrap();
    assert_eq!(status, 404);
}

/// Kills the Prometheus server when the test ends, however it ends.
struct Reaper(std::process::Child);

impl Drop for Reaper {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn a_real_prometheus_scrapes_the_agent_and_answers_for_its_series() {
    let (_daemon, port) = daemon_with_a_session().await;
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("prometheus.yml");
    std::fs::write(
        &config,
        format!(
            "global:\n  scrape_interval: 1s\nscrape_configs:\n  - job_name: gpuwarden\n    static_configs:\n      - targets: ['127.0.0.1:{port}']\n"
        ),
    )
    .unwrap();
    let web = free_port();
    let _prometheus = Reaper(
        Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{web}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("prometheus is installed by the test command"),
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok((200, body)) = http_get(web, "/api/v1/query?query=gpuwarden_sessions") {
            let body: serde_json::Value = serde_json::from_str(&body).unwrap();
            let results = body["data"]["result"]
                .as_array()
                .cloned()
                .unwrap_or_default();
            if let Some(series) = results.first() {
                assert_eq!(series["metric"]["account"], "u-alice");
                assert_eq!(series["metric"]["job"], "gpuwarden");
                assert_eq!(series["value"][1], "1");
                break;
            }
        }
        assert!(
            Instant::now() < deadline,
            "Prometheus never had gpuwarden_sessions"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}
