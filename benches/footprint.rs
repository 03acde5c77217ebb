//! Footprint of an idle agent: the daemon on the simulated DGX A100 with
//! metrics enabled and scraped every 15 s (as Prometheus would), no
//! sessions. Prints its resident memory and CPU share over the window
//! (targets: RSS at most 20 MiB, under 0.5% of one core).
//!
//!     cargo bench --bench footprint              # 60 s window
//!     WINDOW_SECONDS=300 cargo bench --bench footprint

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::io::{Read as _, Write as _};
use std::time::{Duration, Instant};

use common::Daemon;
use common::tls::free_port;

/// Clock ticks per second of /proc/<pid>/stat's CPU times (USER_HZ).
const TICKS_PER_SECOND: f64 = 100.0;

fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix("VmRSS:"))
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap()
}

/// User + system CPU ticks of `pid` so far.
fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

fn scrape(port: u16) -> usize {
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/openmetrics-text\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    response.len()
}

#[tokio::main]
async fn main() {
    let window = Duration::from_secs(
        std::env::var("WINDOW_SECONDS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(60),
    );
    let port = free_port();
    let mut daemon = Daemon::start(
        "sim-dgx-a100.toml",
        &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
    );
    daemon.channel().await;
    let pid = daemon.pid();
    // Settle: first scans, first scrape.
    scrape(port);
    tokio::time::sleep(Duration::from_secs(2)).await;

    let ticks_before = cpu_ticks(pid);
    let started = Instant::now();
    let mut peak_kib = rss_kib(pid);
    let mut scrapes = 0;
    let mut bytes = 0;
    while started.elapsed() < window {
        bytes = scrape(port);
        scrapes += 1;
        peak_kib = peak_kib.max(rss_kib(pid));
        let left = window.saturating_sub(started.elapsed());
        tokio::time::sleep(left.min(Duration::from_secs(15))).await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let cpu_seconds = (cpu_ticks(pid) - ticks_before) as f64 / TICKS_PER_SECOND;
    let rss_now = rss_kib(pid);
    println!(
        "idle agent on sim-dgx-a100 over {elapsed:.0} s, metrics scraped every 15 s ({scrapes} scrapes, {bytes} bytes each)"
    );
    println!(
        "  RSS now {:.1} MiB, peak {:.1} MiB (target <= 20 MiB)",
        rss_now as f64 / 1024.0,
        peak_kib as f64 / 1024.0
    );
    println!(
        "  CPU {cpu_seconds:.2} s = {:.3}% of one core (target < 0.5%)",
        cpu_seconds / elapsed * 100.0
    );
}
