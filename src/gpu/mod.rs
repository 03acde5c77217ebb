//! GPU discovery: what GPUs and MIG instances this host has, and which of
//! them sessions may be given.
//!
//! Two backends answer the same small [`GpuBackend`] interface: [`nvml`]
//! (production, through the NVIDIA Management Library) and [`simulated`]
//! (a host described by a TOML fixture, for machines without GPUs). Backends
//! are blocking; the async side reaches them only through [`blocking`].
//!
//! Besides the inventory ([`GpuBackend::discover`]) a backend reports each
//! GPU's telemetry ([`GpuBackend::telemetry`]) and what happened to the GPUs'
//! health since it was last asked ([`GpuBackend::health_events`]); [`health`]
//! turns those events into each device's health.

pub mod health;
pub mod nvml;
pub mod simulated;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::config::GpuSource;

pub use health::{
    DeviceHealth, DeviceHealthTracker, HealthCause, HealthChange, HealthEvent, is_application_xid,
};

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
    /// In index order. A lost GPU is not here but in `lost`.
    pub gpus: Vec<Gpu>,
    /// GPUs that answered NVML_ERROR_GPU_IS_LOST during the scan (fallen off
    /// the bus): the scan goes on without them, as `nvidia-smi` does, and
    /// they offer no device.
    pub lost: Vec<LostGpu>,
}

/// A GPU the scan found lost. NVML cannot say anything about a lost GPU, not
/// even its UUID, so the UUID is what the backend saw at that index in an
/// earlier scan (or at open), if it saw one.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostGpu {
    pub index: u32,
    pub uuid: Option<DeviceUuid>,
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

/// One full GPU's readings at the time of the call. A reading the GPU does
/// not support (NVML_ERROR_NOT_SUPPORTED, e.g. utilisation of a GPU in MIG
/// mode) is `None`.
#[derive(Debug, Clone, PartialEq)]
pub struct DeviceTelemetry {
    pub index: u32,
    pub uuid: DeviceUuid,
    /// Percent of the last sample period a kernel was running (0-100).
    pub utilization_percent: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub memory_total_mib: Option<u64>,
    /// Board power draw; NVML reports milliwatts.
    pub power_watts: Option<f64>,
    /// GPU die temperature in degrees Celsius.
    pub temperature_c: Option<u32>,
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
    /// The UUIDs of [`HostInventory::assignable`]'s devices.
    pub fn assignable_uuids<C: FromIterator<DeviceUuid>>(&self) -> C {
        self.assignable().into_iter().map(|d| d.uuid).collect()
    }

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

    /// A full scan of GPUs and MIG instances. GPUs found lost are listed in
    /// [`HostInventory::lost`] and the scan goes on.
    fn discover(&self) -> Result<HostInventory, GpuError>;

    /// Readings of every full GPU that is not lost, in index order.
    fn telemetry(&self) -> Result<Vec<DeviceTelemetry>, GpuError>;

    /// What happened since the previous call (or since the backend was
    /// opened): critical-XID events in the order they arrived, then each GPU
    /// newly found lost, in index order. A GPU is reported lost once, and
    /// again only if it came back in between. Never blocks waiting for
    /// events.
    fn health_events(&self) -> Result<Vec<HealthEvent>, GpuError>;
}

/// What a backend remembers between calls so that both backends report lost
/// GPUs alike: the UUID it last saw at each index, and which GPUs it has
/// already reported lost.
#[derive(Debug, Default)]
struct GpuMemory {
    known: BTreeMap<u32, DeviceUuid>,
    reported_lost: BTreeSet<DeviceUuid>,
}

impl GpuMemory {
    /// Remembers what a scan found: the UUIDs of the GPUs it saw (by
    /// index), the ones remembered for the lost indexes; forgets indexes the
    /// host no longer has. Returns the lost GPUs, each with the UUID last
    /// seen at its index (a lost GPU cannot tell its own).
    fn scanned(
        &mut self,
        present: impl IntoIterator<Item = (u32, DeviceUuid)>,
        lost_indexes: impl IntoIterator<Item = u32>,
    ) -> Vec<LostGpu> {
        let mut known: BTreeMap<u32, DeviceUuid> = present.into_iter().collect();
        let lost: Vec<LostGpu> = lost_indexes
            .into_iter()
            .map(|index| LostGpu {
                index,
                uuid: self.known.get(&index).cloned(),
            })
            .collect();
        for gpu in &lost {
            if let Some(uuid) = &gpu.uuid {
                known.insert(gpu.index, uuid.clone());
            }
        }
        self.known = known;
        lost
    }

    /// `Lost` events for the known GPUs `is_lost` says are lost now and were
    /// not reported yet; a GPU found again may be reported again later.
    fn lost_events(
        &mut self,
        mut is_lost: impl FnMut(u32, &DeviceUuid) -> Result<bool, GpuError>,
    ) -> Result<Vec<HealthEvent>, GpuError> {
        let mut events = Vec::new();
        for (index, uuid) in &self.known {
            if is_lost(*index, uuid)? {
                if self.reported_lost.insert(uuid.clone()) {
                    events.push(HealthEvent::Lost {
                        device: uuid.clone(),
                    });
                }
            } else {
                self.reported_lost.remove(uuid);
            }
        }
        Ok(events)
    }
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
            lost: Vec::new(),
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
            lost: Vec::new(),
            gpus: vec![empty_mig],
        };
        assert!(inventory.assignable().is_empty());
    }

    #[test]
    fn lost_gpus_are_reported_once_per_loss_and_keep_their_last_uuid() {
        let mut memory = GpuMemory::default();
        let seen = |indexes: &[u32]| {
            indexes
                .iter()
                .map(|&index| (index, DeviceUuid::new(format!("GPU-{index}"))))
                .collect::<Vec<_>>()
        };
        memory.scanned(seen(&[0, 1]), []);
        let lost_one = |index: u32, _: &DeviceUuid| Ok(index == 1);
        let events = memory.lost_events(lost_one).unwrap();
        assert_eq!(
            events,
            [HealthEvent::Lost {
                device: DeviceUuid::new("GPU-1")
            }]
        );
        assert!(memory.lost_events(lost_one).unwrap().is_empty());
        // A scan that finds it lost keeps its UUID; an unknown index has none.
        let lost = memory.scanned(seen(&[0]), [1, 5]);
        assert_eq!(lost[0].uuid, Some(DeviceUuid::new("GPU-1")));
        assert_eq!(lost[1].uuid, None);
        // Back, then lost again: reported again.
        assert!(memory.lost_events(|_, _| Ok(false)).unwrap().is_empty());
        assert_eq!(memory.lost_events(lost_one).unwrap().len(), 1);
        // An index the host no longer has is forgotten.
        memory.scanned(seen(&[0]), []);
        assert_eq!(memory.known.len(), 1);
    }

    #[test]
    fn one_g_instance_of_an_a100_weighs_one_seventh() {
        let weight = GpuWeight { slices: 1, of: 7 };
        assert!((weight.as_f64() - 1.0 / 7.0).abs() < 1e-15);
    }
}
