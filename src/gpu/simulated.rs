//! A simulated host read from a TOML fixture (`fixtures/sim-*.toml`), for
//! machines without GPUs: demos, tests and CI.
//!
//! The fixture is read again on every call, so editing it (a MIG
//! repartition, a GPU removed) shows up at the next rescan like it would on
//! real hardware. A fixture that has become invalid fails the call; the
//! caller keeps what it had.
//!
//! Telemetry comes from optional per-GPU keys of the fixture:
//! `utilization_percent` (default 0; not allowed on a GPU in MIG mode, for
//! which NVML reports no utilisation), `memory_used_mib` (default 0),
//! `power_watts` (default 60, reported to the milliwatt as NVML does) and
//! `temperature_c` (default 35).
//!
//! Health events (a critical XID, a lost GPU) are raised at run time in the
//! file next to the fixture that [`events`] describes.

pub mod events;

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};

use serde::Deserialize;

use self::events::load_events;
use super::{
    BackendKind, DEFAULT_GPU_COMPUTE_SLICES, DeviceTelemetry, DeviceUuid, Gpu, GpuBackend,
    GpuError, GpuMemory, HealthEvent, HostInventory, MigInstance,
};
use crate::toml_file::{self, FileError};

/// A fixture file that cannot describe a host.
pub type FixtureError = FileError;

/// Telemetry of a GPU whose fixture entry does not say.
pub const DEFAULT_UTILIZATION_PERCENT: u32 = 0;
pub const DEFAULT_MEMORY_USED_MIB: u64 = 0;
pub const DEFAULT_POWER_WATTS: f64 = 60.0;
pub const DEFAULT_TEMPERATURE_C: u32 = 35;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureFile {
    hostname: String,
    driver_version: String,
    cuda_version: String,
    #[serde(default)]
    gpus: Vec<FixtureGpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureGpu {
    index: u32,
    uuid: String,
    name: String,
    memory_mib: u64,
    pci_bus_id: String,
    mig_mode: bool,
    /// Compute slices of the whole GPU; 7 (A100, H100) when absent.
    compute_slices: Option<u32>,
    #[serde(default)]
    mig_instances: Vec<FixtureMig>,
    utilization_percent: Option<u32>,
    memory_used_mib: Option<u64>,
    power_watts: Option<f64>,
    temperature_c: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FixtureMig {
    uuid: String,
    profile: String,
    gpu_instance_id: u32,
    compute_instance_id: u32,
    compute_slices: u32,
    memory_mib: u64,
}

/// What a fixture describes: the inventory and each GPU's readings (in the
/// inventory's order).
#[derive(Debug)]
struct Host {
    inventory: HostInventory,
    telemetry: Vec<DeviceTelemetry>,
}

fn read_host(path: &Path) -> Result<Host, FixtureError> {
    let file: FixtureFile = toml_file::load(path)?;
    validate(path, file)
}

/// Reads and validates a fixture into the inventory it describes.
pub fn load_fixture(path: &Path) -> Result<HostInventory, FixtureError> {
    Ok(read_host(path)?.inventory)
}

/// Validates fixture `text` as if read from `path` (named in errors only):
/// what [`load_fixture`] does after reading the file.
pub fn parse_fixture(path: &Path, text: &str) -> Result<HostInventory, FixtureError> {
    let file: FixtureFile = toml_file::parse(path, text)?;
    Ok(validate(path, file)?.inventory)
}

fn validate(path: &Path, file: FixtureFile) -> Result<Host, FixtureError> {
    let bad = |key: String, reason: String| FileError::invalid(path, key, reason);
    for (key, value) in [
        ("hostname", &file.hostname),
        ("driver_version", &file.driver_version),
        ("cuda_version", &file.cuda_version),
    ] {
        if value.trim().is_empty() {
            return Err(bad(key.into(), "must not be empty".into()));
        }
    }

    let mut seen_uuids: HashMap<String, String> = HashMap::new();
    let mut seen_indexes = HashSet::new();
    let mut seen_pci = HashSet::new();
    let mut note_uuid = |key: &str, uuid: &str, prefix: &str| -> Result<(), FixtureError> {
        if !uuid.starts_with(prefix) || uuid.len() == prefix.len() {
            return Err(bad(
                key.into(),
                format!(
                    "`{uuid}` is not a device UUID: it must start with `{prefix}` as NVML reports it"
                ),
            ));
        }
        if let Some(first) = seen_uuids.insert(uuid.to_owned(), key.to_owned()) {
            return Err(bad(
                key.into(),
                format!("UUID `{uuid}` is already used by `{first}`; every device needs its own"),
            ));
        }
        Ok(())
    };

    let mut gpus = Vec::with_capacity(file.gpus.len());
    let mut telemetry = Vec::with_capacity(file.gpus.len());
    for (i, gpu) in file.gpus.iter().enumerate() {
        let at = format!("gpus[{i}]");
        note_uuid(&format!("{at}.uuid"), &gpu.uuid, "GPU-")?;
        if !seen_indexes.insert(gpu.index) {
            return Err(bad(
                format!("{at}.index"),
                format!("index {} appears twice", gpu.index),
            ));
        }
        if gpu.name.trim().is_empty() {
            return Err(bad(format!("{at}.name"), "must not be empty".into()));
        }
        if gpu.memory_mib == 0 {
            return Err(bad(
                format!("{at}.memory_mib"),
                "must be more than 0".into(),
            ));
        }
        if gpu.pci_bus_id.trim().is_empty() || !seen_pci.insert(gpu.pci_bus_id.as_str()) {
            return Err(bad(
                format!("{at}.pci_bus_id"),
                format!("`{}` is empty or used by another GPU", gpu.pci_bus_id),
            ));
        }
        let gpu_slices = gpu.compute_slices.unwrap_or(DEFAULT_GPU_COMPUTE_SLICES);
        if !(1..=DEFAULT_GPU_COMPUTE_SLICES).contains(&gpu_slices) {
            return Err(bad(
                format!("{at}.compute_slices"),
                format!("{gpu_slices} is out of range: a GPU has 1 to 7 compute slices"),
            ));
        }
        if !gpu.mig_mode && !gpu.mig_instances.is_empty() {
            return Err(bad(
                format!("{at}.mig_instances"),
                "the GPU has mig_mode = false, so it cannot have MIG instances".into(),
            ));
        }

        let mut slices_used = 0u32;
        let mut memory_used = 0u64;
        let mut instance_ids = HashSet::new();
        let mut mig_instances = Vec::with_capacity(gpu.mig_instances.len());
        for (j, mig) in gpu.mig_instances.iter().enumerate() {
            let at = format!("{at}.mig_instances[{j}]");
            note_uuid(&format!("{at}.uuid"), &mig.uuid, "MIG-")?;
            check_profile(&mig.profile, mig.compute_slices)
                .map_err(|reason| bad(format!("{at}.profile"), reason))?;
            if mig.compute_slices == 0 || mig.compute_slices > gpu_slices {
                return Err(bad(
                    format!("{at}.compute_slices"),
                    format!(
                        "{} is out of range: the GPU has {gpu_slices} compute slices",
                        mig.compute_slices
                    ),
                ));
            }
            slices_used += mig.compute_slices;
            if slices_used > gpu_slices {
                return Err(bad(
                    format!("{at}.compute_slices"),
                    format!(
                        "the GPU's MIG instances use {slices_used} compute slices, over its {gpu_slices}"
                    ),
                ));
            }
            memory_used += mig.memory_mib;
            if mig.memory_mib == 0 || memory_used > gpu.memory_mib {
                return Err(bad(
                    format!("{at}.memory_mib"),
                    format!(
                        "MIG instances use {memory_used} MiB, over the GPU's {} MiB (or this one has none)",
                        gpu.memory_mib
                    ),
                ));
            }
            if !instance_ids.insert((mig.gpu_instance_id, mig.compute_instance_id)) {
                return Err(bad(
                    format!("{at}.gpu_instance_id"),
                    format!(
                        "GPU instance {} / compute instance {} appears twice on this GPU",
                        mig.gpu_instance_id, mig.compute_instance_id
                    ),
                ));
            }
            mig_instances.push(MigInstance {
                uuid: DeviceUuid::new(&mig.uuid),
                profile: mig.profile.clone(),
                gpu_instance_id: mig.gpu_instance_id,
                compute_instance_id: mig.compute_instance_id,
                compute_slices: mig.compute_slices,
                memory_mib: mig.memory_mib,
            });
        }
        telemetry.push(gpu_telemetry(&at, gpu).map_err(|(key, reason)| bad(key, reason))?);
        gpus.push(Gpu {
            index: gpu.index,
            uuid: DeviceUuid::new(&gpu.uuid),
            name: gpu.name.clone(),
            memory_mib: gpu.memory_mib,
            pci_bus_id: gpu.pci_bus_id.clone(),
            mig_mode: gpu.mig_mode,
            compute_slices: gpu_slices,
            mig_instances,
        });
    }
    gpus.sort_by_key(|gpu| gpu.index);
    telemetry.sort_by_key(|reading| reading.index);
    Ok(Host {
        inventory: HostInventory {
            hostname: file.hostname,
            driver_version: file.driver_version,
            cuda_version: file.cuda_version,
            backend: BackendKind::Simulated,
            gpus,
            lost: Vec::new(),
        },
        telemetry,
    })
}

/// A GPU's readings from its fixture entry, checked, with the defaults;
/// `Err((key, reason))` for a bad key.
fn gpu_telemetry(at: &str, gpu: &FixtureGpu) -> Result<DeviceTelemetry, (String, String)> {
    if let Some(percent) = gpu.utilization_percent {
        if gpu.mig_mode {
            return Err((
                format!("{at}.utilization_percent"),
                "a GPU in MIG mode reports no utilisation (NVML answers NOT_SUPPORTED)".into(),
            ));
        }
        if percent > 100 {
            return Err((
                format!("{at}.utilization_percent"),
                format!("{percent} is over 100"),
            ));
        }
    }
    let used = gpu.memory_used_mib.unwrap_or(DEFAULT_MEMORY_USED_MIB);
    if used > gpu.memory_mib {
        return Err((
            format!("{at}.memory_used_mib"),
            format!("{used} MiB is more than the GPU's {} MiB", gpu.memory_mib),
        ));
    }
    let watts = gpu.power_watts.unwrap_or(DEFAULT_POWER_WATTS);
    if !(0.0..=100_000.0).contains(&watts) {
        return Err((
            format!("{at}.power_watts"),
            format!("{watts} is not a power draw in watts (0 to 100000)"),
        ));
    }
    let temperature = gpu.temperature_c.unwrap_or(DEFAULT_TEMPERATURE_C);
    if temperature > 200 {
        return Err((
            format!("{at}.temperature_c"),
            format!("{temperature} is not a GPU temperature in degrees Celsius"),
        ));
    }
    Ok(DeviceTelemetry {
        index: gpu.index,
        uuid: DeviceUuid::new(&gpu.uuid),
        utilization_percent: (!gpu.mig_mode).then(|| {
            gpu.utilization_percent
                .unwrap_or(DEFAULT_UTILIZATION_PERCENT)
        }),
        memory_used_mib: Some(used),
        memory_total_mib: Some(gpu.memory_mib),
        // Whole milliwatts, as NVML reports them.
        power_watts: Some(f64::from(power_milliwatts(watts)) / 1000.0),
        temperature_c: Some(temperature),
    })
}

/// `watts` to NVML's whole milliwatts.
fn power_milliwatts(watts: f64) -> u32 {
    // In range: validated to 0..=100_000 W.
    (watts * 1000.0).round() as u32
}

/// A MIG profile is `<g>g.<mem>gb`, or `<c>c.<g>g.<mem>gb` for a compute
/// instance smaller than its GPU instance; its compute part must agree with
/// `compute_slices`.
fn check_profile(profile: &str, compute_slices: u32) -> Result<(), String> {
    let malformed =
        || format!("`{profile}` is not a MIG profile such as `1g.10gb` or `1c.3g.40gb`");
    let parts: Vec<&str> = profile.split('.').collect();
    let number = |part: &str, suffix: &str| -> Option<u32> {
        part.strip_suffix(suffix)
            .filter(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|n| n.parse().ok())
    };
    let compute = match parts.as_slice() {
        [g, mem] => number(mem, "gb").and(number(g, "g")),
        [c, g, mem] => number(mem, "gb").and(number(g, "g")).and(number(c, "c")),
        _ => None,
    }
    .ok_or_else(malformed)?;
    if compute != compute_slices {
        return Err(format!(
            "`{profile}` has {compute} compute slices but compute_slices = {compute_slices}"
        ));
    }
    Ok(())
}

/// The simulated backend: a fixture file standing for a host.
#[derive(Debug)]
pub struct SimulatedHost {
    fixture: PathBuf,
    state: Mutex<SimulatedState>,
}

#[derive(Debug)]
struct SimulatedState {
    memory: GpuMemory,
    /// GPUs whose XIDs are delivered: those not lost at open, as an NVML
    /// event set registers them.
    registered: BTreeSet<DeviceUuid>,
    /// The highest XID `seq` already seen.
    last_seq: u64,
}

impl SimulatedHost {
    /// Checks the fixture and its events file now so a bad one is refused
    /// at start.
    pub fn open(fixture: &Path) -> Result<Self, FixtureError> {
        let host = read_host(fixture)?;
        let events = load_events(fixture, &host.inventory)?;
        let present: Vec<Gpu> = host
            .inventory
            .gpus
            .into_iter()
            .filter(|gpu| !events.lost.contains(&gpu.uuid))
            .collect();
        let mut memory = GpuMemory::default();
        memory.scanned(present.iter().map(|gpu| (gpu.index, gpu.uuid.clone())), []);
        Ok(Self {
            fixture: fixture.to_path_buf(),
            state: Mutex::new(SimulatedState {
                memory,
                registered: present.into_iter().map(|gpu| gpu.uuid).collect(),
                last_seq: events.last_seq(),
            }),
        })
    }

    fn state(&self) -> std::sync::MutexGuard<'_, SimulatedState> {
        // The state is a few plain values, whole even after a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

impl GpuBackend for SimulatedHost {
    fn kind(&self) -> BackendKind {
        BackendKind::Simulated
    }

    fn discover(&self) -> Result<HostInventory, GpuError> {
        let mut inventory = read_host(&self.fixture)?.inventory;
        let events = load_events(&self.fixture, &inventory)?;
        let (lost, present): (Vec<Gpu>, Vec<Gpu>) = std::mem::take(&mut inventory.gpus)
            .into_iter()
            .partition(|gpu| events.lost.contains(&gpu.uuid));
        inventory.lost = self.state().memory.scanned(
            present.iter().map(|gpu| (gpu.index, gpu.uuid.clone())),
            lost.iter().map(|gpu| gpu.index),
        );
        inventory.gpus = present;
        Ok(inventory)
    }

    fn telemetry(&self) -> Result<Vec<DeviceTelemetry>, GpuError> {
        let host = read_host(&self.fixture)?;
        let events = load_events(&self.fixture, &host.inventory)?;
        Ok(host
            .telemetry
            .into_iter()
            .filter(|reading| !events.lost.contains(&reading.uuid))
            .collect())
    }

    fn health_events(&self) -> Result<Vec<HealthEvent>, GpuError> {
        let host = read_host(&self.fixture)?;
        let events = load_events(&self.fixture, &host.inventory)?;
        let mut state = self.state();
        let mut raised: Vec<HealthEvent> = events
            .after(state.last_seq)
            .filter(|xid| state.registered.contains(&xid.device))
            .map(|xid| HealthEvent::Xid {
                device: xid.device.clone(),
                xid: xid.xid,
            })
            .collect();
        state.last_seq = state.last_seq.max(events.last_seq());
        raised.extend(
            state
                .memory
                .lost_events(|_, uuid| Ok(events.lost.contains(uuid)))?,
        );
        Ok(raised)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::LostGpu;

    const DGX: &str = include_str!("../../fixtures/sim-dgx-a100.toml");
    const H100_PAIR: &str = include_str!("../../fixtures/sim-h100-pair.toml");

    fn parse(text: &str) -> Result<HostInventory, FixtureError> {
        parse_fixture(Path::new("fixture.toml"), text)
    }

    fn refusal(text: &str) -> (String, String) {
        match parse(text) {
            Err(FileError::Invalid { problem, .. }) => (problem.key, problem.reason),
            other => panic!("expected the fixture to be refused, got {other:?}"),
        }
    }

    #[test]
    fn the_dgx_fixture_has_8_gpus_11_mig_instances_and_17_assignable_devices() {
        let inventory = parse(DGX).unwrap();
        assert_eq!(inventory.gpus.len(), 8);
        assert_eq!(inventory.mig_instance_count(), 11);
        assert_eq!(inventory.assignable().len(), 17);
        assert_eq!(inventory.hostname, "sim-dgx-a100");
        assert_eq!(inventory.driver_version, "550.54.15");
        let gpu1 = &inventory.gpus[1];
        assert_eq!(gpu1.mig_instances[0].profile, "3g.40gb");
        assert_eq!(gpu1.mig_instances[0].compute_slices, 3);
        assert_eq!(gpu1.compute_slices, 7);
    }

    #[test]
    fn the_h100_pair_has_two_full_gpus() {
        let inventory = parse(H100_PAIR).unwrap();
        let assignable = inventory.assignable();
        assert_eq!(assignable.len(), 2);
        assert!(
            assignable
                .iter()
                .all(|d| d.class == "NVIDIA H100 80GB HBM3")
        );
    }

    #[test]
    fn gpus_are_ordered_by_index_whatever_the_file_order() {
        let text = DGX.replacen("index = 0", "index = 9", 1);
        let inventory = parse(&text).unwrap();
        assert_eq!(inventory.gpus.last().unwrap().index, 9);
        assert_eq!(inventory.gpus[0].index, 1);
    }

    #[test]
    fn a_missing_field_is_named() {
        let text = H100_PAIR.replacen("memory_mib = 81559\n", "", 1);
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[0]");
        assert!(reason.contains("missing field `memory_mib`"), "{reason}");
    }

    #[test]
    fn an_unknown_key_is_refused() {
        let text = H100_PAIR.replacen("mig_mode = false", "mig_mode = false\nmig_mod = true", 1);
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[0].mig_mod");
        assert!(reason.contains("unknown field"), "{reason}");
    }

    #[test]
    fn duplicate_uuids_are_refused_naming_both_places() {
        let text = H100_PAIR.replace(
            "GPU-c273bec9-e03a-483e-a0c6-df38aac9f7eb",
            "GPU-9b12b00c-6d0c-490a-b0b2-879ea7657096",
        );
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[1].uuid");
        assert!(
            reason.contains("already used by `gpus[0].uuid`"),
            "{reason}"
        );
    }

    #[test]
    fn a_mig_uuid_reused_across_gpus_is_refused() {
        let text = DGX.replace(
            "MIG-9346009d-10be-482f-b6aa-079b9d66247a",
            "MIG-0d4b7102-166c-4d26-804d-35a10322fc1b",
        );
        let (key, _) = refusal(&text);
        assert_eq!(key, "gpus[1].mig_instances[0].uuid");
    }

    #[test]
    fn mig_slices_over_seven_are_refused() {
        // GPU 1 holds 3g + 2g + 1g + 1g = 7 slices; one more 1g is 8.
        let extra = "\n[[gpus.mig_instances]]\nuuid = \"MIG-00000000-0000-0000-0000-000000000001\"\n\
                     profile = \"1g.10gb\"\ngpu_instance_id = 5\ncompute_instance_id = 0\n\
                     compute_slices = 1\nmemory_mib = 1\n";
        let text = DGX.replacen(
            "memory_mib = 9728\n\n[[gpus]]\nindex = 2",
            &format!("memory_mib = 9728\n{extra}\n[[gpus]]\nindex = 2"),
            1,
        );
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[1].mig_instances[4].compute_slices");
        assert!(reason.contains("8 compute slices, over its 7"), "{reason}");
    }

    #[test]
    fn a_single_instance_over_seven_slices_is_refused() {
        let text = DGX.replacen(
            "profile = \"3g.40gb\"\ngpu_instance_id = 1\ncompute_instance_id = 0\ncompute_slices = 3",
            "profile = \"8g.40gb\"\ngpu_instance_id = 1\ncompute_instance_id = 0\ncompute_slices = 8",
            1,
        );
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[1].mig_instances[0].compute_slices");
        assert!(reason.contains("out of range"), "{reason}");
    }

    #[test]
    fn a_profile_disagreeing_with_its_slices_is_refused() {
        let text = DGX.replacen("compute_slices = 3", "compute_slices = 2", 1);
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[1].mig_instances[0].profile");
        assert!(reason.contains("3 compute slices"), "{reason}");
        let text = DGX.replacen("profile = \"3g.40gb\"", "profile = \"big\"", 1);
        assert_eq!(refusal(&text).0, "gpus[1].mig_instances[0].profile");
    }

    #[test]
    fn mig_instances_on_a_gpu_without_mig_mode_are_refused() {
        let text = DGX.replacen("mig_mode = true", "mig_mode = false", 1);
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[0].mig_instances");
        assert!(reason.contains("mig_mode = false"), "{reason}");
    }

    #[test]
    fn a_uuid_that_is_not_one_is_refused() {
        let text = H100_PAIR.replacen("GPU-9b12b00c", "9b12b00c", 1);
        let (key, reason) = refusal(&text);
        assert_eq!(key, "gpus[0].uuid");
        assert!(reason.contains("must start with `GPU-`"), "{reason}");
    }

    #[test]
    fn duplicate_indexes_and_bus_ids_are_refused() {
        let text = H100_PAIR.replacen("index = 1", "index = 0", 1);
        assert_eq!(refusal(&text).0, "gpus[1].index");
        let text = H100_PAIR.replacen("00000000:43:00.0", "00000000:1B:00.0", 1);
        assert_eq!(refusal(&text).0, "gpus[1].pci_bus_id");
    }

    #[test]
    fn profiles_parse_with_and_without_a_compute_part() {
        assert_eq!(check_profile("1g.10gb", 1), Ok(()));
        assert_eq!(check_profile("1c.3g.40gb", 1), Ok(()));
        assert!(check_profile("3g.40gb", 1).is_err());
        assert!(check_profile("g.10gb", 1).is_err());
        assert!(check_profile("1g.10", 1).is_err());
        assert!(check_profile("1g.10gb.x", 1).is_err());
    }

    #[test]
    fn the_host_rereads_its_fixture_on_every_scan() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(&path, H100_PAIR).unwrap();
        let host = SimulatedHost::open(&path).unwrap();
        assert_eq!(host.discover().unwrap().gpus.len(), 2);
        let one_gpu = H100_PAIR.split("\n[[gpus]]\nindex = 1").next().unwrap();
        std::fs::write(&path, one_gpu).unwrap();
        assert_eq!(host.discover().unwrap().gpus.len(), 1);
        std::fs::write(&path, "hostname = ").unwrap();
        assert!(matches!(host.discover(), Err(GpuError::Fixture(_))));
    }

    fn telemetry_of(text: &str) -> Vec<DeviceTelemetry> {
        let path = Path::new("fixture.toml");
        validate(path, toml_file::parse(path, text).unwrap())
            .unwrap()
            .telemetry
    }

    #[test]
    fn telemetry_defaults_are_plausible_and_a_mig_gpu_has_no_utilisation() {
        let readings = telemetry_of(DGX);
        assert_eq!(readings.len(), 8);
        let mig_gpu = &readings[0];
        assert_eq!(
            mig_gpu.uuid.as_str(),
            "GPU-b644960d-a808-45b0-b4e1-f6add005db2d"
        );
        assert_eq!(mig_gpu.utilization_percent, None);
        assert_eq!(mig_gpu.memory_used_mib, Some(0));
        assert_eq!(mig_gpu.memory_total_mib, Some(81920));
        assert_eq!(mig_gpu.power_watts, Some(60.0));
        assert_eq!(mig_gpu.temperature_c, Some(35));
        assert_eq!(readings[2].utilization_percent, Some(0));
        assert_eq!(readings[7].index, 7);
    }

    #[test]
    fn telemetry_keys_are_read_and_power_is_whole_milliwatts() {
        let text = H100_PAIR.replacen(
            "mig_mode = false",
            "mig_mode = false\nutilization_percent = 87\nmemory_used_mib = 40000\n\
             power_watts = 612.3456\ntemperature_c = 71",
            1,
        );
        let reading = &telemetry_of(&text)[0];
        assert_eq!(reading.utilization_percent, Some(87));
        assert_eq!(reading.memory_used_mib, Some(40000));
        assert_eq!(reading.power_watts, Some(612.346));
        assert_eq!(reading.temperature_c, Some(71));
    }

    #[test]
    fn bad_telemetry_keys_are_refused() {
        let text = DGX.replacen(
            "mig_mode = true",
            "mig_mode = true\nutilization_percent = 5",
            1,
        );
        assert_eq!(refusal(&text).0, "gpus[0].utilization_percent");
        let text = H100_PAIR.replacen(
            "mig_mode = false",
            "mig_mode = false\nutilization_percent = 101",
            1,
        );
        assert_eq!(refusal(&text).0, "gpus[0].utilization_percent");
        let text = H100_PAIR.replacen(
            "mig_mode = false",
            "mig_mode = false\nmemory_used_mib = 81560",
            1,
        );
        assert_eq!(refusal(&text).0, "gpus[0].memory_used_mib");
        let text = H100_PAIR.replacen(
            "mig_mode = false",
            "mig_mode = false\npower_watts = -1.0",
            1,
        );
        assert_eq!(refusal(&text).0, "gpus[0].power_watts");
        let text = H100_PAIR.replacen(
            "mig_mode = false",
            "mig_mode = false\ntemperature_c = 900",
            1,
        );
        assert_eq!(refusal(&text).0, "gpus[0].temperature_c");
    }

    const GPU0: &str = "GPU-9b12b00c-6d0c-490a-b0b2-879ea7657096";
    const GPU1: &str = "GPU-c273bec9-e03a-483e-a0c6-df38aac9f7eb";

    fn xid_entry(seq: u64, uuid: &str, xid: u64) -> String {
        format!("[[xid]]\nseq = {seq}\nuuid = \"{uuid}\"\nxid = {xid}\n")
    }

    #[test]
    fn xids_raised_at_run_time_are_delivered_once_in_seq_order() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        let events = dir.path().join("host.events.toml");
        std::fs::write(&path, H100_PAIR).unwrap();
        // Raised before the host opened: not delivered, like an event set
        // registered afterwards.
        std::fs::write(&events, xid_entry(1, GPU0, 48)).unwrap();
        let host = SimulatedHost::open(&path).unwrap();
        assert!(host.health_events().unwrap().is_empty());
        std::fs::write(
            &events,
            [
                xid_entry(1, GPU0, 48),
                xid_entry(3, GPU1, 13),
                xid_entry(2, GPU0, 79),
            ]
            .concat(),
        )
        .unwrap();
        assert_eq!(
            host.health_events().unwrap(),
            [
                HealthEvent::Xid {
                    device: DeviceUuid::new(GPU0),
                    xid: 79
                },
                HealthEvent::Xid {
                    device: DeviceUuid::new(GPU1),
                    xid: 13
                },
            ]
        );
        assert!(host.health_events().unwrap().is_empty());
    }

    #[test]
    fn a_lost_gpu_leaves_the_scan_and_the_telemetry_and_is_reported_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        let events = dir.path().join("host.events.toml");
        std::fs::write(&path, H100_PAIR).unwrap();
        let host = SimulatedHost::open(&path).unwrap();
        std::fs::write(&events, format!("lost = [\"{GPU1}\"]")).unwrap();

        let scan = host.discover().unwrap();
        assert_eq!(scan.gpus.len(), 1);
        assert_eq!(scan.assignable().len(), 1);
        assert_eq!(
            scan.lost,
            [LostGpu {
                index: 1,
                uuid: Some(DeviceUuid::new(GPU1))
            }]
        );
        let readings = host.telemetry().unwrap();
        assert_eq!(readings.len(), 1);
        assert_eq!(readings[0].uuid.as_str(), GPU0);
        let lost = HealthEvent::Lost {
            device: DeviceUuid::new(GPU1),
        };
        assert_eq!(host.health_events().unwrap(), std::slice::from_ref(&lost));
        assert!(host.health_events().unwrap().is_empty());

        // Back on the bus (after a reset), then lost again.
        std::fs::write(&events, "lost = []").unwrap();
        assert_eq!(host.discover().unwrap().gpus.len(), 2);
        assert!(host.health_events().unwrap().is_empty());
        std::fs::write(&events, format!("lost = [\"{GPU1}\"]")).unwrap();
        assert_eq!(host.health_events().unwrap(), [lost]);
    }

    #[test]
    fn a_gpu_lost_before_open_has_no_known_uuid_and_no_events() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(&path, H100_PAIR).unwrap();
        std::fs::write(
            dir.path().join("host.events.toml"),
            format!("lost = [\"{GPU0}\"]"),
        )
        .unwrap();
        let host = SimulatedHost::open(&path).unwrap();
        let scan = host.discover().unwrap();
        assert_eq!(
            scan.lost,
            [LostGpu {
                index: 0,
                uuid: None
            }]
        );
        assert!(host.health_events().unwrap().is_empty());
    }

    #[test]
    fn a_bad_events_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("host.toml");
        std::fs::write(&path, H100_PAIR).unwrap();
        std::fs::write(dir.path().join("host.events.toml"), "lost = [\"GPU-x\"]").unwrap();
        let err = SimulatedHost::open(&path).unwrap_err();
        assert_eq!(err.key(), Some("lost[0]"));
        assert!(err.to_string().contains("host.events.toml"), "{err}");
    }
}
