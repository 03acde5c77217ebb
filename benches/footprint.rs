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

use std::time::{Duration, Instant};

use common::tls::free_port;
use common::{Daemon, TICKS_PER_SECOND, cpu_ticks, rss_kib, scrape};

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
