//! GPU discovery: what GPUs and MIG instances this host has, and which of
//! them sessions may be given.
//!
//! Two backends answer the same small [`GpuBackend`] interface: [`nvml`]
//! (production, through the NVIDIA Management Library) and [`simulated`]
//! (a host described by a TOML fixture, for machines without GPUs). Backends
//! are blocking; the async side reaches them only through [`blocking`].

pub mod nvml;
pub mod simulated;

use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::GpuSource;

/// A GPU or MIG device UUID as NVML reports it (`GPU-…`, `MIG-…`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(transparent)]
pub struct DeviceUuid(String);

impl DeviceUuid {
    pub fn new(uuid: impl Into<String>) -> Self {
        Self(uuid.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for DeviceUuid {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(&self.0)
    }
}

/// Which backend produced an inventory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    Nvml,
    Simulated,
}

impl BackendKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Nvml => "nvml",
            Self::Simulated => "simulated",
        }
    }
}

/// Compute slices of a whole GPU when the backend cannot tell (A100, H100).
pub const DEFAULT_GPU_COMPUTE_SLICES: u32 = 7;

/// What one scan of the host found.
#[derive(Debug, Clone, PartialEq)]
pub struct HostInventory {
    pub hostname: String,
    pub driver_version: String,
    pub cuda_version: String,
    pub backend: BackendKind,
    /// In index order.
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Gpu {
    pub index: u32,
    pub uuid: DeviceUuid,
    pub name: String,
    pub memory_mib: u64,
    pub pci_bus_id: String,
    pub mig_mode: bool,
    /// Compute slices of the whole GPU (7 on an A100 or H100, 4 on an A30):
    /// the denominator of a MIG instance's GPU-second weight.
    pub compute_slices: u32,
    /// Empty unless `mig_mode`.
    pub mig_instances: Vec<MigInstance>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct MigInstance {
    pub uuid: DeviceUuid,
    /// e.g. `1g.10gb`.
    pub profile: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub compute_slices: u32,
    pub memory_mib: u64,
}

/// A device a session may hold: a full GPU with MIG off, or a MIG instance.
/// Carries what allocation and metering need to know about it.
#[derive(Debug, Clone, PartialEq)]
pub struct AssignableDevice {
    pub uuid: DeviceUuid,
    /// The rate key of the policy: the GPU name, or `<GPU name> MIG <profile>`.
    pub class: String,
    /// The GPU's marketing name (the parent's, for MIG).
    pub model: String,
    /// `Some(profile)` for a MIG instance.
    pub mig_profile: Option<String>,
    pub parent: Option<DeviceUuid>,
    pub weight: GpuWeight,
}

/// The share of a whole GPU a device represents: GPU-seconds are
/// device-seconds times this. Kept as a fraction so 1/7 stays exact.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GpuWeight {
    pub slices: u32,
    pub of: u32,
}

impl GpuWeight {
    pub const FULL: Self = Self { slices: 1, of: 1 };

    pub fn as_f64(self) -> f64 {
        f64::from(self.slices) / f64::from(self.of)
    }
}

/// The rate key of a MIG instance, as the policy file's `[rates]` spells it.
pub fn mig_device_class(gpu_name: &str, profile: &str) -> String {
    format!("{gpu_name} MIG {profile}")
}

impl HostInventory {
    pub fn mig_instance_count(&self) -> usize {
        self.gpus.iter().map(|gpu| gpu.mig_instances.len()).sum()
    }

    /// Every device sessions may be given, per DESIGN.md: full GPUs whose MIG
    /// mode is off and MIG instances of GPUs whose MIG mode is on, never the
    /// parent of MIG instances.
    pub fn assignable(&self) -> Vec<AssignableDevice> {
        let mut devices = Vec::new();
        for gpu in &self.gpus {
            if gpu.mig_mode {
                devices.extend(gpu.mig_instances.iter().map(|mig| AssignableDevice {
                    uuid: mig.uuid.clone(),
                    class: mig_device_class(&gpu.name, &mig.profile),
                    model: gpu.name.clone(),
                    mig_profile: Some(mig.profile.clone()),
                    parent: Some(gpu.uuid.clone()),
                    weight: GpuWeight {
                        slices: mig.compute_slices,
                        of: gpu.compute_slices,
                    },
                }));
            } else {
                devices.push(AssignableDevice {
                    uuid: gpu.uuid.clone(),
                    class: gpu.name.clone(),
                    model: gpu.name.clone(),
                    mig_profile: None,
                    parent: None,
                    weight: GpuWeight::FULL,
                });
            }
        }
        devices
    }
}

/// Why the GPUs could not be discovered.
#[derive(Debug, thiserror::Error)]
pub enum GpuError {
    /// The NVIDIA library could not be loaded at all.
    #[error(
        "the NVIDIA Management Library ({library}) could not be loaded: {detail}; install the NVIDIA driver, \
         or set [gpu] backend = \"simulated\" with a fixture on a host without GPUs"
    )]
    LibraryMissing { library: String, detail: String },
    /// NVML answered a call with an error.
    #[error("NVML call {call} failed{}: {source}", device.as_ref().map(|d| format!(" for GPU {d}")).unwrap_or_default())]
    Nvml {
        call: &'static str,
        device: Option<String>,
        #[source]
        source: ::nvml_wrapper::error::NvmlError,
    },
    #[error(transparent)]
    Fixture(#[from] simulated::FixtureError),
    /// The blocking discovery task died (a panic inside the backend).
    #[error("GPU discovery task failed: {0}")]
    TaskFailed(String),
}

/// One host's GPUs, however they are reached. Calls may block (NVML does);
/// async code goes through [`blocking`].
pub trait GpuBackend: Send + Sync + fmt::Debug + 'static {
    fn kind(&self) -> BackendKind;

    /// A full scan of GPUs and MIG instances.
    fn discover(&self) -> Result<HostInventory, GpuError>;
}

/// Opens the backend the config names. NVML is loaded and initialised here;
/// a simulated host's fixture is read and checked.
pub fn open(source: &GpuSource) -> Result<Arc<dyn GpuBackend>, GpuError> {
    Ok(match source {
        GpuSource::Nvml { library } => Arc::new(nvml::NvmlBackend::open(library.as_deref())?),
        GpuSource::Simulated { fixture } => Arc::new(simulated::SimulatedHost::open(fixture)?),
    })
}

/// The one place blocking backend calls leave the async runtime: runs `call`
/// on tokio's blocking pool.
pub async fn blocking<T, F>(backend: &Arc<dyn GpuBackend>, call: F) -> Result<T, GpuError>
where
    T: Send + 'static,
    F: FnOnce(&dyn GpuBackend) -> Result<T, GpuError> + Send + 'static,
{
    let backend = Arc::clone(backend);
    tokio::task::spawn_blocking(move || call(backend.as_ref()))
        .await
        .map_err(|join| GpuError::TaskFailed(join.to_string()))?
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: u32, mig: Vec<MigInstance>) -> Gpu {
        Gpu {
            index,
            uuid: DeviceUuid::new(format!("GPU-{index}")),
            name: "NVIDIA A100-SXM4-80GB".into(),
            memory_mib: 81920,
            pci_bus_id: format!("00000000:0{index}:00.0"),
            mig_mode: !mig.is_empty(),
            compute_slices: 7,
            mig_instances: mig,
        }
    }

    fn mig(uuid: &str, profile: &str, slices: u32) -> MigInstance {
        MigInstance {
            uuid: DeviceUuid::new(uuid),
            profile: profile.into(),
            gpu_instance_id: 1,
            compute_instance_id: 0,
            compute_slices: slices,
            memory_mib: 9728,
        }
    }

    #[test]
    fn assignable_takes_full_gpus_without_mig_and_mig_instances_never_their_parent() {
        let inventory = HostInventory {
            hostname: "h".into(),
            driver_version: "1".into(),
            cuda_version: "1".into(),
            backend: BackendKind::Simulated,
            gpus: vec![
                gpu(
                    0,
                    vec![mig("MIG-a", "1g.10gb", 1), mig("MIG-b", "3g.40gb", 3)],
                ),
                gpu(1, vec![]),
            ],
        };
        let assignable = inventory.assignable();
        let uuids: Vec<&str> = assignable.iter().map(|d| d.uuid.as_str()).collect();
        assert_eq!(uuids, ["MIG-a", "MIG-b", "GPU-1"]);
        assert_eq!(assignable[0].class, "NVIDIA A100-SXM4-80GB MIG 1g.10gb");
        assert_eq!(assignable[0].parent, Some(DeviceUuid::new("GPU-0")));
        assert_eq!(assignable[1].weight, GpuWeight { slices: 3, of: 7 });
        assert_eq!(assignable[2].class, "NVIDIA A100-SXM4-80GB");
        assert_eq!(assignable[2].weight.as_f64(), 1.0);
    }

    #[test]
    fn a_gpu_in_mig_mode_with_no_instances_offers_nothing() {
        let mut empty_mig = gpu(0, vec![]);
        empty_mig.mig_mode = true;
        let inventory = HostInventory {
            hostname: "h".into(),
            driver_version: "1".into(),
            cuda_version: "1".into(),
            backend: BackendKind::Simulated,
            gpus: vec![empty_mig],
        };
        assert!(inventory.assignable().is_empty());
    }

    #[test]
    fn one_g_instance_of_an_a100_weighs_one_seventh() {
        let weight = GpuWeight { slices: 1, of: 7 };
        assert!((weight.as_f64() - 1.0 / 7.0).abs() < 1e-15);
    }
}
