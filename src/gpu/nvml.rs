//! The production backend: the NVIDIA Management Library through
//! `nvml-wrapper`. Every call here blocks; async code reaches it through
//! [`super::blocking`].

use std::ffi::OsStr;
use std::path::Path;

use nvml_wrapper::Nvml;
use nvml_wrapper::device::Device;
use nvml_wrapper::error::NvmlError;

use super::{
    BackendKind, DEFAULT_GPU_COMPUTE_SLICES, DeviceUuid, Gpu, GpuBackend, GpuError, HostInventory,
    MigInstance,
};

/// Where the driver installs NVML: the versioned name exists wherever the
/// driver does, the bare name only with development packages.
const DEFAULT_LIBRARIES: &[&str] = &["libnvidia-ml.so.1", "libnvidia-ml.so"];

/// `NVML_DEVICE_MIG_ENABLE` in `nvml.h`.
const MIG_ENABLED: u32 = 1;

const MIB: u64 = 1024 * 1024;

#[derive(Debug)]
pub struct NvmlBackend {
    nvml: Nvml,
}

impl NvmlBackend {
    /// Loads and initialises NVML from `library`, or from the driver's usual
    /// names when `None`.
    pub fn open(library: Option<&Path>) -> Result<Self, GpuError> {
        let candidates: Vec<&OsStr> = match library {
            Some(path) => vec![path.as_os_str()],
            None => DEFAULT_LIBRARIES.iter().map(OsStr::new).collect(),
        };
        let mut load_failures = Vec::new();
        for candidate in &candidates {
            match Nvml::builder().lib_path(candidate).init() {
                Ok(nvml) => return Ok(Self { nvml }),
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

    fn scan_gpu(&self, index: u32) -> Result<Gpu, GpuError> {
        let at = |call: &'static str| {
            move |source| GpuError::Nvml {
                call,
                device: Some(format!("index {index}")),
                source,
            }
        };
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
            let at = |call: &'static str| {
                move |source| GpuError::Nvml {
                    call,
                    device: Some(format!("index {parent_index}, MIG slot {slot}")),
                    source,
                }
            };
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
        let call = |call: &'static str| {
            move |source| GpuError::Nvml {
                call,
                device: None,
                source,
            }
        };
        let driver_version = self
            .nvml
            .sys_driver_version()
            .map_err(call("nvmlSystemGetDriverVersion"))?;
        let cuda = self
            .nvml
            .sys_cuda_driver_version()
            .map_err(call("nvmlSystemGetCudaDriverVersion_v2"))?;
        let count = self
            .nvml
            .device_count()
            .map_err(call("nvmlDeviceGetCount_v2"))?;
        let gpus = (0..count)
            .map(|index| self.scan_gpu(index))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(HostInventory {
            hostname: hostname(),
            driver_version,
            cuda_version: cuda_version(cuda),
            backend: BackendKind::Nvml,
            gpus,
        })
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
