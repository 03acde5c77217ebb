//! The NVML backend against the stand-in `libnvidia-ml.so` (`nvml-standin/`)
//! answers exactly what the simulated backend answers from the same fixture:
//! the inventory, the telemetry, and XIDs and lost GPUs raised at run time.
//!
//! `cargo test` builds the stand-in because it is a dev-dependency; it lands
//! in `target/<profile>/deps/` next to this test's executable. Each test
//! loads its own copy from a temporary folder, with a `<library>.fixture`
//! file naming that folder's copy of the fixture: the dynamic loader keeps
//! one instance per file, so copies keep the tests apart.

#![allow(clippy::unwrap_used)]

mod common;

use std::path::Path;

use common::standin::StandinHost;
use gpuwarden::gpu::nvml::NvmlBackend;
use gpuwarden::gpu::simulated::SimulatedHost;
use gpuwarden::gpu::{
    BackendKind, DeviceUuid, GpuBackend, GpuError, HealthEvent, HostInventory, LostGpu,
};
use nvml_wrapper::error::NvmlError;

const DGX: &str = "sim-dgx-a100.toml";
const H100_PAIR: &str = "sim-h100-pair.toml";
const FIXTURES: [&str; 2] = [DGX, H100_PAIR];

/// GPU 0 of sim-dgx-a100, in MIG mode.
const DGX_GPU0: &str = "GPU-b644960d-a808-45b0-b4e1-f6add005db2d";
const DGX_GPU2: &str = "GPU-faba74c6-7dc9-4bfd-ab4e-85cb4d26fa32";
const DGX_GPU3: &str = "GPU-1088c26b-51c8-423d-a0f1-df76cdf8be11";

/// What NVML cannot know the same way: the host name (NVML has none; the
/// NVML backend reads the kernel's) and which backend answered.
fn comparable(mut inventory: HostInventory) -> HostInventory {
    inventory.hostname = String::new();
    inventory.backend = BackendKind::Simulated;
    inventory
}

fn xid(seq: u64, uuid: &str, xid: u64) -> String {
    format!("[[xid]]\nseq = {seq}\nuuid = \"{uuid}\"\nxid = {xid}\n")
}

fn assert_same_discovery(nvml: &NvmlBackend, simulated: &SimulatedHost) -> HostInventory {
    let through_nvml = nvml.discover().unwrap();
    let simulated = simulated.discover().unwrap();
    assert_eq!(through_nvml.backend, BackendKind::Nvml);
    assert_eq!(through_nvml.assignable(), simulated.assignable());
    assert_eq!(comparable(through_nvml), comparable(simulated.clone()));
    simulated
}

#[test]
fn discovery_through_the_standin_equals_the_simulated_host() {
    for fixture in FIXTURES {
        let host = StandinHost::new(fixture);
        let scan = assert_same_discovery(&host.nvml(), &host.simulated());
        assert!(scan.lost.is_empty(), "{fixture}");
        if fixture == DGX {
            assert_eq!(scan.gpus.len(), 8);
            assert_eq!(scan.mig_instance_count(), 11);
            assert_eq!(scan.assignable().len(), 17);
            assert_eq!(
                (scan.driver_version.as_str(), scan.cuda_version.as_str()),
                ("550.54.15", "12.4")
            );
        } else {
            assert_eq!(scan.assignable().len(), 2);
            assert_eq!(scan.cuda_version, "13.0");
        }
    }
}

#[test]
fn a_repartition_shows_in_both_at_the_next_scan() {
    let host = StandinHost::new(DGX);
    let (nvml, simulated) = (host.nvml(), host.simulated());
    assert_same_discovery(&nvml, &simulated);
    // GPU 1's 2g.20gb instance is destroyed.
    let text = std::fs::read_to_string(host.fixture()).unwrap();
    let start = text.find("uuid = \"MIG-25ec5a9c").unwrap();
    let entry_start = text[..start].rfind("[[gpus.mig_instances]]").unwrap();
    let entry_end = start + text[start..].find("[[gpus.mig_instances]]").unwrap();
    host.write_fixture(&format!("{}{}", &text[..entry_start], &text[entry_end..]));
    let scan = assert_same_discovery(&nvml, &simulated);
    assert_eq!(scan.mig_instance_count(), 10);
}

#[test]
fn telemetry_through_the_standin_equals_the_simulated_host() {
    for fixture in FIXTURES {
        let host = StandinHost::new(fixture);
        let through_nvml = host.nvml().telemetry().unwrap();
        assert_eq!(
            through_nvml,
            host.simulated().telemetry().unwrap(),
            "{fixture}"
        );
        assert!(through_nvml.iter().all(|r| r.power_watts == Some(60.0)));
        if fixture == DGX {
            // MIG mode: NVML answers NOT_SUPPORTED, which is no reading.
            assert_eq!(through_nvml[0].utilization_percent, None);
            assert_eq!(through_nvml[2].utilization_percent, Some(0));
        }
    }
}

#[test]
fn telemetry_keys_of_the_fixture_come_through_nvml_units() {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/sim-h100-pair.toml"),
    )
    .unwrap()
    .replacen(
        "mig_mode = false",
        "mig_mode = false\nutilization_percent = 93\nmemory_used_mib = 70123\n\
         power_watts = 687.5\ntemperature_c = 74",
        1,
    );
    let host = StandinHost::with_text(&text);
    let through_nvml = host.nvml().telemetry().unwrap();
    assert_eq!(through_nvml, host.simulated().telemetry().unwrap());
    let busy = &through_nvml[0];
    assert_eq!(busy.utilization_percent, Some(93));
    assert_eq!(busy.memory_used_mib, Some(70123));
    assert_eq!(busy.memory_total_mib, Some(81559));
    assert_eq!(busy.power_watts, Some(687.5));
    assert_eq!(busy.temperature_c, Some(74));
}

#[test]
fn an_xid_raised_at_run_time_reaches_both_backends_alike() {
    let host = StandinHost::new(DGX);
    // Raised before either opened: neither delivers it.
    host.raise(&xid(1, DGX_GPU2, 48));
    let (nvml, simulated) = (host.nvml(), host.simulated());
    assert!(nvml.health_events().unwrap().is_empty());
    assert!(simulated.health_events().unwrap().is_empty());

    host.raise(
        &[
            xid(1, DGX_GPU2, 48),
            xid(3, DGX_GPU0, 13),
            xid(2, DGX_GPU2, 79),
        ]
        .concat(),
    );
    let expected = [
        HealthEvent::Xid {
            device: DeviceUuid::new(DGX_GPU2),
            xid: 79,
        },
        HealthEvent::Xid {
            device: DeviceUuid::new(DGX_GPU0),
            xid: 13,
        },
    ];
    assert_eq!(nvml.health_events().unwrap(), expected);
    assert_eq!(simulated.health_events().unwrap(), expected);
    // Delivered once.
    assert!(nvml.health_events().unwrap().is_empty());
    assert!(simulated.health_events().unwrap().is_empty());
}

#[test]
fn a_gpu_lost_at_run_time_reaches_both_backends_alike() {
    let host = StandinHost::new(DGX);
    let (nvml, simulated) = (host.nvml(), host.simulated());
    assert_same_discovery(&nvml, &simulated);

    // GPU 3 logs XID 79 and falls off the bus.
    host.raise(&format!(
        "lost = [\"{DGX_GPU3}\"]\n{}",
        xid(1, DGX_GPU3, 79)
    ));
    let expected = [
        HealthEvent::Xid {
            device: DeviceUuid::new(DGX_GPU3),
            xid: 79,
        },
        HealthEvent::Lost {
            device: DeviceUuid::new(DGX_GPU3),
        },
    ];
    assert_eq!(nvml.health_events().unwrap(), expected);
    assert_eq!(simulated.health_events().unwrap(), expected);
    assert!(nvml.health_events().unwrap().is_empty());
    assert!(simulated.health_events().unwrap().is_empty());

    // The scan goes on without it and names it.
    let scan = assert_same_discovery(&nvml, &simulated);
    assert_eq!(scan.gpus.len(), 7);
    assert_eq!(scan.assignable().len(), 16);
    assert_eq!(
        scan.lost,
        [LostGpu {
            index: 3,
            uuid: Some(DeviceUuid::new(DGX_GPU3))
        }]
    );
    let readings = nvml.telemetry().unwrap();
    assert_eq!(readings, simulated.telemetry().unwrap());
    assert_eq!(readings.len(), 7);
    assert!(readings.iter().all(|r| r.uuid.as_str() != DGX_GPU3));
}

#[test]
fn a_gpu_lost_before_start_is_nameless_in_both() {
    let host = StandinHost::new(DGX);
    host.raise(&format!("lost = [\"{DGX_GPU0}\"]"));
    let (nvml, simulated) = (host.nvml(), host.simulated());
    let scan = assert_same_discovery(&nvml, &simulated);
    assert_eq!(
        scan.lost,
        [LostGpu {
            index: 0,
            uuid: None
        }]
    );
    // GPU 0's seven MIG instances are gone with it.
    assert_eq!(scan.assignable().len(), 10);
    assert!(nvml.health_events().unwrap().is_empty());
    assert!(simulated.health_events().unwrap().is_empty());
}

#[test]
fn a_missing_library_is_named_with_the_way_out() {
    let missing = Path::new("/nonexistent/gpuwarden/libnvidia-ml.so.1");
    let err = NvmlBackend::open(Some(missing)).unwrap_err();
    let message = err.to_string();
    assert!(matches!(err, GpuError::LibraryMissing { .. }), "{message}");
    assert!(
        message.contains(&missing.display().to_string()),
        "{message}"
    );
    assert!(message.contains("backend = \"simulated\""), "{message}");
}

#[test]
fn a_library_that_is_not_nvml_is_refused_as_such() {
    // The C library this process already runs on: loadable, but no NVML.
    let maps = std::fs::read_to_string("/proc/self/maps").unwrap();
    let libc = maps
        .lines()
        .filter_map(|line| line.split_whitespace().nth(5))
        .find(|path| path.contains("/libc.so"))
        .expect("libc in /proc/self/maps");
    let message = NvmlBackend::open(Some(Path::new(libc)))
        .unwrap_err()
        .to_string();
    assert!(message.contains("not an NVML library"), "{message}");
    assert!(message.contains(libc), "{message}");
}

#[test]
fn a_standin_without_a_fixture_fails_to_initialise() {
    if std::env::var_os("GPUWARDEN_STANDIN_FIXTURE").is_some() {
        return; // the environment names one for every copy
    }
    let host = StandinHost::new(H100_PAIR);
    std::fs::remove_file(host.fixture_pointer()).unwrap();
    match NvmlBackend::open(Some(&host.library())) {
        Err(GpuError::Nvml {
            call: "nvmlInit_v2",
            source: NvmlError::DriverNotLoaded,
            ..
        }) => {}
        other => panic!("expected nvmlInit_v2 to fail: {other:?}"),
    }
}
