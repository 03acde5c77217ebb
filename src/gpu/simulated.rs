//! A simulated host read from a TOML fixture (`fixtures/sim-*.toml`), for
//! machines without GPUs: demos, tests and CI.
//!
//! The fixture is read again on every scan, so editing it (a MIG
//! repartition, a GPU removed) shows up at the next rescan like it would on
//! real hardware. A fixture that has become invalid fails the scan; the
//! caller keeps what it had.

use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::{
    BackendKind, DEFAULT_GPU_COMPUTE_SLICES, DeviceUuid, Gpu, GpuBackend, GpuError, HostInventory,
    MigInstance,
};
use crate::toml_file::{self, FileError};

/// A fixture file that cannot describe a host.
pub type FixtureError = FileError;

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

/// Reads and validates a fixture into the inventory it describes.
pub fn load_fixture(path: &Path) -> Result<HostInventory, FixtureError> {
    let file: FixtureFile = toml_file::load(path)?;
    validate(path, file)
}

fn validate(path: &Path, file: FixtureFile) -> Result<HostInventory, FixtureError> {
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
    Ok(HostInventory {
        hostname: file.hostname,
        driver_version: file.driver_version,
        cuda_version: file.cuda_version,
        backend: BackendKind::Simulated,
        gpus,
    })
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
}

impl SimulatedHost {
    /// Checks the fixture now so a bad one is refused at start.
    pub fn open(fixture: &Path) -> Result<Self, FixtureError> {
        load_fixture(fixture)?;
        Ok(Self {
            fixture: fixture.to_path_buf(),
        })
    }
}

impl GpuBackend for SimulatedHost {
    fn kind(&self) -> BackendKind {
        BackendKind::Simulated
    }

    fn discover(&self) -> Result<HostInventory, GpuError> {
        Ok(load_fixture(&self.fixture)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const DGX: &str = include_str!("../../fixtures/sim-dgx-a100.toml");
    const H100_PAIR: &str = include_str!("../../fixtures/sim-h100-pair.toml");

    fn parse(text: &str) -> Result<HostInventory, FixtureError> {
        let path = Path::new("fixture.toml");
        validate(path, toml_file::parse(path, text)?)
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
}
