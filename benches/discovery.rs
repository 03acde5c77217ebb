//! Full discovery of the simulated DGX A100 (8 GPUs, 11 MIG instances)
//! through the NVML backend loading the stand-in `libnvidia-ml.so`, and
//! through the simulated backend from the same fixture, interleaved in one
//! run. Prints p50/p90/max of each (target: NVML discovery p50 under 50 ms),
//! and the same for one health poll (`health_events`) and one telemetry read.
//!
//!     cargo bench --bench discovery             # 200 rounds
//!     ROUNDS=1000 cargo bench --bench discovery
//!
//! The stand-in is a dev-dependency, so cargo builds it for the bench; it
//! parses the fixture at every scan like the simulated backend does, so the
//! NVML figure is the backend's own cost plus a TOML read, not a driver's.

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::time::{Duration, Instant};

use common::standin::StandinHost;
use common::{ms, percentile};
use gpuwarden::gpu::GpuBackend;
use gpuwarden::gpu::nvml::NvmlBackend;

const TARGET: Duration = Duration::from_millis(50);

fn report(what: &str, mut samples: Vec<Duration>) -> Duration {
    samples.sort();
    let p50 = percentile(&samples, 0.5);
    println!(
        "{what:<38} p50 {:>8.3} ms   p90 {:>8.3} ms   max {:>8.3} ms",
        ms(p50),
        ms(percentile(&samples, 0.9)),
        ms(*samples.last().unwrap()),
    );
    p50
}

fn time<T>(samples: &mut Vec<Duration>, call: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let value = call();
    samples.push(start.elapsed());
    value
}

fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(200);
    let host = StandinHost::new("sim-dgx-a100.toml");
    let start = Instant::now();
    let nvml = NvmlBackend::open(Some(&host.library())).unwrap();
    let open = start.elapsed();
    let simulated = host.simulated();

    // The first rounds warm caches and the allocator; they are dropped.
    const WARMUP: usize = 5;
    let mut samples: [Vec<Duration>; 6] = Default::default();
    for _ in 0..WARMUP + rounds {
        let [
            nvml_scans,
            sim_scans,
            nvml_polls,
            sim_polls,
            nvml_reads,
            sim_reads,
        ] = &mut samples;
        let scan = time(nvml_scans, || nvml.discover().unwrap());
        assert_eq!(scan.assignable().len(), 17);
        time(sim_scans, || simulated.discover().unwrap());
        time(nvml_polls, || nvml.health_events().unwrap());
        time(sim_polls, || simulated.health_events().unwrap());
        time(nvml_reads, || nvml.telemetry().unwrap());
        time(sim_reads, || simulated.telemetry().unwrap());
    }
    let [
        nvml_scans,
        sim_scans,
        nvml_polls,
        sim_polls,
        nvml_reads,
        sim_reads,
    ] = samples.map(|mut taken| taken.split_off(WARMUP));

    println!(
        "sim-dgx-a100 (8 GPUs, 11 MIG instances, 17 assignable), {rounds} rounds; NVML open {:.3} ms",
        ms(open)
    );
    let p50 = report("discover, NVML via the stand-in", nvml_scans);
    report("discover, simulated", sim_scans);
    report("health_events, NVML via the stand-in", nvml_polls);
    report("health_events, simulated", sim_polls);
    report("telemetry, NVML via the stand-in", nvml_reads);
    report("telemetry, simulated", sim_reads);
    println!(
        "NVML discovery p50 {:.3} ms: {} the {} ms target",
        ms(p50),
        if p50 < TARGET { "under" } else { "OVER" },
        TARGET.as_millis()
    );
}
