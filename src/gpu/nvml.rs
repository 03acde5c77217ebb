//! The production backend: the NVIDIA Management Library through
//! `nvml-wrapper`. Every call here blocks; async code reaches it through
//! [`super::blocking`].
//!
//! Health: at open, an NVML event set is registered for critical-XID events
//! on every GPU that supports them; [`GpuBackend::health_events`] drains it
//! without waiting, then asks each GPU it knows whether it is still on the
//! bus (NVML_ERROR_GPU_IS_LOST on its handle or UUID means lost).

use std::collections::HashMap;
use std::ffi::OsStr;
use std::path::Path;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nvml_wrapper::bitmasks::event::EventTypes;
use nvml_wrapper::device::Device;
use nvml_wrapper::enum_wrappers::device::TemperatureSensor;
use nvml_wrapper::enums::event::XidError;
use nvml_wrapper::error::NvmlError;
use nvml_wrapper::{EventSet, Nvml};

use super::{
    BackendKind, DEFAULT_GPU_COMPUTE_SLICES, DeviceTelemetry, DeviceUuid, Gpu, GpuBackend,
    GpuError, GpuMemory, HealthEvent, HostInventory, MigInstance,
};

/// Where the driver installs NVML: the versioned name exists wherever the
/// driver does, the bare name only with development packages.
const DEFAULT_LIBRARIES: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// `NVML_DEVICE_MIG_ENABLE` in `nvml.h`.
const MIG_ENABLED: u32 = 1;

/// The XID NVML reports when it does not know which (`999` in `nvml.h`'s
/// event data; `XidError::Unknown` in nvml-wrapper).
const UNKNOWN_XID: u64 = 999;

/// The most events one [`GpuBackend::health_events`] call takes from the
/// event set; the rest wait for the next call.
const MAX_EVENTS_PER_CALL: usize = 1024;

const MIB: u64 = 1024 * 1024;

#[derive(Debug)]
pub struct NvmlBackend {
    /// Leaked on purpose: nvml-wrapper's event set borrows the `Nvml` it came
    /// from, and the backend lives as long as the process. (nvml-wrapper never
    /// unloads the library either.)
    nvml: &'static Nvml,
    state: Mutex<NvmlState>,
}

#[derive(Debug)]
struct NvmlState {
    memory: GpuMemory,
    /// `None` where the GPUs or the platform have no XID events.
    xids: Option<XidEvents>,
}

#[derive(Debug)]
struct XidEvents {
    set: EventSet<'static>,
    /// The GPU behind each registered handle, so an event names its GPU
    /// even when the GPU no longer answers.
    gpus: HashMap<usize, DeviceUuid>,
}

fn nvml_error(call: &'static str, device: Option<String>) -> impl FnOnce(NvmlError) -> GpuError {
    move |source| GpuError::Nvml {
        call,
        device,
        source,
    }
}

/// The GPU at `index` with its UUID; `None` when it has fallen off the bus
/// (NVML answers GPU_IS_LOST for its handle or its UUID).
fn probe(nvml: &Nvml, index: u32) -> Result<Option<(DeviceUuid, Device<'_>)>, GpuError> {
    let at = |call| nvml_error(call, Some(format!("index {index}")));
    let device = match nvml.device_by_index(index) {
        Ok(device) => device,
        Err(NvmlError::GpuLost) => return Ok(None),
        Err(e) => return Err(at("nvmlDeviceGetHandleByIndex_v2")(e)),
    };
    match device.uuid() {
        Ok(uuid) => Ok(Some((DeviceUuid::new(uuid), device))),
        Err(NvmlError::GpuLost) => Ok(None),
        Err(e) => Err(at("nvmlDeviceGetUUID")(e)),
    }
}

fn is_lost(err: &GpuError) -> bool {
    matches!(
        err,
        GpuError::Nvml {
            source: NvmlError::GpuLost,
            ..
        }
    )
}

/// A reading the device may not support: NOT_SUPPORTED is `None`.
fn supported<T>(reading: Result<T, NvmlError>) -> Result<Option<T>, NvmlError> {
    match reading {
        Ok(value) => Ok(Some(value)),
        Err(NvmlError::NotSupported) => Ok(None),
        Err(e) => Err(e),
    }
}

/// The raw handle of `device`, as a number to recognise it by.
#[allow(unsafe_code)]
fn handle_key(device: &Device<'_>) -> usize {
    // SAFETY: `handle` only copies the raw pointer out of the wrapper; it is
    // used as a number and never dereferenced nor turned back into a Device.
    unsafe { device.handle() }.addr()
}

impl NvmlBackend {
    /// Loads and initialises NVML from `library`, or from the driver's usual
    /// names when `None`, and registers for critical-XID events.
    pub fn open(library: Option<&Path>) -> Result<Self, GpuError> {
        let candidates: Vec<&OsStr> = match library {
            Some(path) => vec![path.as_os_str()],
            None => DEFAULT_LIBRARIES.iter().map(OsStr::new).collect(),
        };
        let mut load_failures = Vec::new();
        for candidate in &candidates {
            match Nvml::builder().lib_path(candidate).init() {
                Ok(nvml) => return Self::start(Box::leak(Box::new(nvml))),
                // libloading's message already names the file.
                Err(NvmlError::LibloadingError(e)) => load_failures.push(e.to_string()),
                Err(NvmlError::FailedToLoadSymbol(e)) => {
                    load_failures.push(format!(
                        "{}: not an NVML library ({e})",
                        candidate.to_string_lossy()
                    ));
                }
                Err(source) => {
                    return Err(GpuError::Nvml {
                        call: "nvmlInit_v2",
                        device: None,
                        source,
                    });
                }
            }
        }
        Err(GpuError::LibraryMissing {
            library: candidates
                .iter()
                .map(|c| c.to_string_lossy())
                .collect::<Vec<_>>()
                .join(" or "),
            detail: load_failures.join("; "),
        })
    }

    /// Learns the GPUs present (GPUs already lost are skipped: NVML cannot
    /// say which they are) and registers them for XID events.
    fn start(nvml: &'static Nvml) -> Result<Self, GpuError> {
        let count = nvml
            .device_count()
            .map_err(nvml_error("nvmlDeviceGetCount_v2", None))?;
        let mut present = Vec::new();
        for index in 0..count {
            if let Some((uuid, device)) = probe(nvml, index)? {
                present.push((index, uuid, device));
            }
        }
        let xids = match register_xid_events(nvml, &present) {
            Ok(xids) => Some(xids),
            Err(e) => {
                tracing::warn!(
                    error = %e,
                    "cannot register for NVML critical-XID events: XIDs will not mark devices \
                     unhealthy, lost GPUs still will"
                );
                None
            }
        };
        let mut memory = GpuMemory::default();
        memory.scanned(
            present.into_iter().map(|(index, uuid, _)| (index, uuid)),
            [],
        );
        Ok(Self {
            nvml,
            state: Mutex::new(NvmlState { memory, xids }),
        })
    }

    fn state(&self) -> MutexGuard<'_, NvmlState> {
        // Plain values and an event set handle: whole even after a panic.
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether the GPU at `index` has fallen off the bus.
    fn gpu_is_lost(&self, index: u32) -> Result<bool, GpuError> {
        Ok(probe(self.nvml, index)?.is_none())
    }

    fn read_gpu(&self, index: u32) -> Result<DeviceTelemetry, GpuError> {
        let at = |call| nvml_error(call, Some(format!("index {index}")));
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(at("nvmlDeviceGetHandleByIndex_v2"))?;
        let uuid = device.uuid().map_err(at("nvmlDeviceGetUUID"))?;
        let utilization =
            supported(device.utilization_rates()).map_err(at("nvmlDeviceGetUtilizationRates"))?;
        let memory = supported(device.memory_info()).map_err(at("nvmlDeviceGetMemoryInfo_v2"))?;
        let power_mw = supported(device.power_usage()).map_err(at("nvmlDeviceGetPowerUsage"))?;
        let temperature = supported(device.temperature(TemperatureSensor::Gpu))
            .map_err(at("nvmlDeviceGetTemperature"))?;
        Ok(DeviceTelemetry {
            index,
            uuid: DeviceUuid::new(uuid),
            utilization_percent: utilization.map(|u| u.gpu),
            memory_used_mib: memory.as_ref().map(|m| m.used / MIB),
            memory_total_mib: memory.as_ref().map(|m| m.total / MIB),
            power_watts: power_mw.map(|mw| f64::from(mw) / 1000.0),
            temperature_c: temperature,
        })
    }

    fn scan_gpu(&self, index: u32) -> Result<Gpu, GpuError> {
        let at = |call| nvml_error(call, Some(format!("index {index}")));
        let device = self
            .nvml
            .device_by_index(index)
            .map_err(at("nvmlDeviceGetHandleByIndex_v2"))?;
        let uuid = device.uuid().map_err(at("nvmlDeviceGetUUID"))?;
        let name = device.name().map_err(at("nvmlDeviceGetName"))?;
        let memory = device
            .memory_info()
            .map_err(at("nvmlDeviceGetMemoryInfo"))?;
        let pci = device.pci_info().map_err(at("nvmlDeviceGetPciInfo_v3"))?;
        let mig_mode = match device.mig_mode() {
            Ok(mode) => mode.current == MIG_ENABLED,
            // GPUs before Ampere have no MIG.
            Err(NvmlError::NotSupported) => false,
            Err(e) => return Err(at("nvmlDeviceGetMigMode")(e)),
        };
        let (compute_slices, mig_instances) = if mig_mode {
            // The most MIG devices a GPU can hold is its number of compute slices.
            let max = device
                .mig_device_count()
                .map_err(at("nvmlDeviceGetMaxMigDeviceCount"))?;
            (max, self.scan_mig_instances(&device, index, max)?)
        } else {
            (DEFAULT_GPU_COMPUTE_SLICES, Vec::new())
        };
        Ok(Gpu {
            index,
            uuid: DeviceUuid::new(uuid),
            name,
            memory_mib: memory.total / MIB,
            pci_bus_id: pci.bus_id,
            mig_mode,
            compute_slices,
            mig_instances,
        })
    }

    fn scan_mig_instances(
        &self,
        parent: &Device<'_>,
        parent_index: u32,
        max: u32,
    ) -> Result<Vec<MigInstance>, GpuError> {
        let mut instances = Vec::new();
        for slot in 0..max {
            let at =
                |call| nvml_error(call, Some(format!("index {parent_index}, MIG slot {slot}")));
            let mig = match parent.mig_device_by_index(slot) {
                Ok(mig) => mig,
                // Slots are sparse: an unused one answers NOT_FOUND.
                Err(NvmlError::NotFound) => continue,
                Err(e) => return Err(at("nvmlDeviceGetMigDeviceHandleByIndex")(e)),
            };
            let uuid = mig.uuid().map_err(at("nvmlDeviceGetUUID"))?;
            let attributes = mig.attributes().map_err(at("nvmlDeviceGetAttributes_v2"))?;
            let (gpu_instance_id, compute_instance_id) = self
                .mig_instance_ids(&mig)
                .map_err(at("nvmlDeviceGetGpuInstanceId"))?;
            instances.push(MigInstance {
                uuid: DeviceUuid::new(uuid),
                profile: mig_profile(
                    attributes.compute_instance_slice_count,
                    attributes.gpu_instance_slice_count,
                    attributes.memory_size_mb,
                ),
                gpu_instance_id,
                compute_instance_id,
                compute_slices: attributes.compute_instance_slice_count,
                memory_mib: attributes.memory_size_mb,
            });
        }
        Ok(instances)
    }

    /// GPU and compute instance ids of a MIG device handle, which
    /// nvml-wrapper does not wrap.
    #[allow(unsafe_code)]
    fn mig_instance_ids(&self, mig: &Device<'_>) -> Result<(u32, u32), NvmlError> {
        use nvml_wrapper::error::{nvml_sym, nvml_try};
        let lib = self.nvml.lib();
        let gpu_instance = nvml_sym(lib.nvmlDeviceGetGpuInstanceId.as_ref())?;
        let compute_instance = nvml_sym(lib.nvmlDeviceGetComputeInstanceId.as_ref())?;
        let (mut gpu_instance_id, mut compute_instance_id) = (0, 0);
        // SAFETY: `mig` is a live handle from this `Nvml`, which outlives the
        // call; both functions write one unsigned int through a pointer to a
        // local, as declared in nvml.h.
        unsafe {
            nvml_try(gpu_instance(mig.handle(), &mut gpu_instance_id))?;
            nvml_try(compute_instance(mig.handle(), &mut compute_instance_id))?;
        }
        Ok((gpu_instance_id, compute_instance_id))
    }
}

/// NVIDIA's profile name from a MIG device's attributes: `<g>g.<GB>gb`, or
/// `<c>c.<g>g.<GB>gb` when the compute instance is smaller than its GPU
/// instance. Memory is rounded up to whole GB, as `nvidia-smi` names them
/// (9728 MiB is `10gb`).
fn mig_profile(compute_slices: u32, gpu_slices: u32, memory_mib: u64) -> String {
    let gb = memory_mib.div_ceil(1024);
    if compute_slices == gpu_slices {
        format!("{gpu_slices}g.{gb}gb")
    } else {
        format!("{compute_slices}c.{gpu_slices}g.{gb}gb")
    }
}

/// CUDA driver version as NVML encodes it (`12040`) to `12.4`.
fn cuda_version(encoded: i32) -> String {
    format!("{}.{}", encoded / 1000, (encoded % 1000) / 10)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|name| name.trim().to_owned())
        .unwrap_or_default()
}

impl GpuBackend for NvmlBackend {
    fn kind(&self) -> BackendKind {
        BackendKind::Nvml
    }

    fn discover(&self) -> Result<HostInventory, GpuError> {
        let driver_version = self
            .nvml
            .sys_driver_version()
            .map_err(nvml_error("nvmlSystemGetDriverVersion", None))?;
        let cuda = self
            .nvml
            .sys_cuda_driver_version()
            .map_err(nvml_error("nvmlSystemGetCudaDriverVersion_v2", None))?;
        let count = self
            .nvml
            .device_count()
            .map_err(nvml_error("nvmlDeviceGetCount_v2", None))?;
        let mut gpus = Vec::with_capacity(count as usize);
        let mut lost_indexes = Vec::new();
        for index in 0..count {
            match self.scan_gpu(index) {
                Ok(gpu) => gpus.push(gpu),
                // Fallen off the bus: the others are still worth having.
                Err(e) if is_lost(&e) => lost_indexes.push(index),
                Err(e) => return Err(e),
            }
        }
        let lost = self.state().memory.scanned(
            gpus.iter().map(|gpu| (gpu.index, gpu.uuid.clone())),
            lost_indexes,
        );
        Ok(HostInventory {
            hostname: hostname(),
            driver_version,
            cuda_version: cuda_version(cuda),
            backend: BackendKind::Nvml,
            gpus,
            lost,
        })
    }

    fn telemetry(&self) -> Result<Vec<DeviceTelemetry>, GpuError> {
        let count = self
            .nvml
            .device_count()
            .map_err(nvml_error("nvmlDeviceGetCount_v2", None))?;
        let mut readings = Vec::with_capacity(count as usize);
        for index in 0..count {
            match self.read_gpu(index) {
                Ok(reading) => readings.push(reading),
                // Reported by health_events, not here.
                Err(e) if is_lost(&e) => {}
                Err(e) => return Err(e),
            }
        }
        Ok(readings)
    }

    fn health_events(&self) -> Result<Vec<HealthEvent>, GpuError> {
        let mut guard = self.state();
        let state = &mut *guard;
        let mut events = Vec::new();
        if let Some(xids) = &state.xids {
            events.extend(xids.drain()?);
        }
        events.extend(
            state
                .memory
                .lost_events(|index, _| self.gpu_is_lost(index))?,
        );
        Ok(events)
    }
}

/// An event set with every GPU of `gpus` that supports critical-XID events.
fn register_xid_events(
    nvml: &'static Nvml,
    gpus: &[(u32, DeviceUuid, Device<'static>)],
) -> Result<XidEvents, GpuError> {
    let mut set = nvml
        .create_event_set()
        .map_err(nvml_error("nvmlEventSetCreate", None))?;
    let mut registered = HashMap::new();
    for (index, uuid, device) in gpus {
        let at = || Some(format!("index {index}"));
        // Registering a type the GPU lacks would free the whole set.
        match device.supported_event_types() {
            Ok(types) if types.contains(EventTypes::CRITICAL_XID_ERROR) => {}
            Ok(_) | Err(NvmlError::NotSupported) => {
                tracing::warn!(gpu = %uuid, "GPU reports no critical-XID events");
                continue;
            }
            Err(NvmlError::GpuLost) => continue,
            Err(e) => return Err(nvml_error("nvmlDeviceGetSupportedEventTypes", at())(e)),
        }
        set = device
            .register_events(EventTypes::CRITICAL_XID_ERROR, set)
            .map_err(|e| nvml_error("nvmlDeviceRegisterEvents", at())(e.error))?;
        registered.insert(handle_key(device), uuid.clone());
    }
    Ok(XidEvents {
        set,
        gpus: registered,
    })
}

impl XidEvents {
    /// The critical-XID events waiting in the set, without waiting for more.
    fn drain(&self) -> Result<Vec<HealthEvent>, GpuError> {
        let mut events = Vec::new();
        for _ in 0..MAX_EVENTS_PER_CALL {
            let event = match self.set.wait(0) {
                Ok(event) => event,
                Err(NvmlError::Timeout) => break,
                // A GPU fell off the bus; the lost-GPU poll says which.
                Err(NvmlError::GpuLost) => break,
                Err(source) => return Err(nvml_error("nvmlEventSetWait_v2", None)(source)),
            };
            if !event.event_type.contains(EventTypes::CRITICAL_XID_ERROR) {
                continue;
            }
            let device = match self.gpus.get(&handle_key(&event.device)) {
                Some(uuid) => uuid.clone(),
                None => match event.device.uuid() {
                    Ok(uuid) => DeviceUuid::new(uuid),
                    Err(e) => {
                        tracing::warn!(error = %e, "critical XID on a GPU that cannot be named");
                        continue;
                    }
                },
            };
            let xid = match event.event_data {
                Some(XidError::Value(xid)) => xid,
                Some(XidError::Unknown) | None => UNKNOWN_XID,
            };
            events.push(HealthEvent::Xid { device, xid });
        }
        Ok(events)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn profiles_are_named_as_nvidia_names_them() {
        assert_eq!(mig_profile(1, 1, 9728), "1g.10gb");
        assert_eq!(mig_profile(2, 2, 19968), "2g.20gb");
        assert_eq!(mig_profile(3, 3, 40192), "3g.40gb");
        assert_eq!(mig_profile(1, 3, 40192), "1c.3g.40gb");
        assert_eq!(mig_profile(7, 7, 81920), "7g.80gb");
    }

    #[test]
    fn cuda_versions_decode() {
        assert_eq!(cuda_version(12040), "12.4");
        assert_eq!(cuda_version(13000), "13.0");
        assert_eq!(cuda_version(11080), "11.8");
    }

    #[test]
    fn a_host_without_the_library_gets_an_error_naming_it() {
        let err = NvmlBackend::open(Some(Path::new("/nonexistent/libnvidia-ml.so.1"))).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, GpuError::LibraryMissing { .. }), "{message}");
        assert!(
            message.contains("/nonexistent/libnvidia-ml.so.1"),
            "{message}"
        );
        assert!(message.contains("backend = \"simulated\""), "{message}");
    }
}
