//! A stand-in `libnvidia-ml.so`: the NVML functions gpuwarden's NVML backend
//! calls (through nvml-wrapper), answered from a gpuwarden host fixture
//! (`fixtures/sim-*.toml`) instead of a driver. It lets the NVML path be
//! tested, and compared with the simulated backend, on machines without a
//! GPU.
//!
//! The fixture is named by `$GPUWARDEN_STANDIN_FIXTURE`, or by a file
//! `<library file>.fixture` next to the loaded library holding its path (for
//! a process that loads several copies, each with its own fixture: copies,
//! not symlinks, since the dynamic loader shares one instance per file). It
//! is read at `nvmlInit` and again at every `nvmlDeviceGetCount_v2` (the
//! start of a scan); the runtime events file next to it
//! (`<fixture stem>.events.toml`, see gpuwarden's `gpu::simulated::events`)
//! is read at every count, handle lookup and event-set call. A GPU listed as
//! lost answers NVML_ERROR_GPU_IS_LOST to everything about it and its MIG
//! devices; an XID raised there is delivered by `nvmlEventSetWait_v2` to the
//! event sets created before it and registered for critical XIDs.
//!
//! GPUs are enumerated in the fixture's index order as 0..n. Readings the
//! fixture leaves out take the simulated backend's defaults (0 %
//! utilisation, 0 MiB used, 60 W, 35 °C); utilisation of a GPU in MIG mode
//! and GPU-wide readings of a MIG device answer NVML_ERROR_NOT_SUPPORTED, as
//! the driver does.
//!
//! Types and constants are nvml-wrapper-sys's bindings, generated from
//! NVIDIA's `nvml.h`; the `const` at the end fails to compile if an export's
//! signature differs from the header's.
//!
//! Not exported: everything else in NVML. nvml-wrapper looks every symbol up
//! when it loads the library but keeps a missing one as an error that only a
//! call to it returns (`NvmlError::FailedToLoadSymbol`), so a stand-in only
//! needs what is called.

#![allow(non_snake_case)]

mod fixture;
mod host;

use std::ffi::{CStr, c_char, c_int, c_uint, c_ulonglong};
use std::time::{Duration, Instant};

use nvml_wrapper_sys::bindings::{
    NVML_DEVICE_MIG_DISABLE, NVML_DEVICE_MIG_ENABLE, NVML_INIT_FLAG_NO_ATTACH,
    NVML_INIT_FLAG_NO_GPUS, nvmlDevice_t, nvmlDeviceAttributes_t, nvmlEventData_t, nvmlEventSet_t,
    nvmlEventTypeXidCriticalError, nvmlMemory_t, nvmlMemory_v2_t, nvmlPciInfo_t,
    nvmlReturn_enum_NVML_ERROR_ARGUMENT_VERSION_MISMATCH as ARGUMENT_VERSION_MISMATCH,
    nvmlReturn_enum_NVML_ERROR_INSUFFICIENT_SIZE as INSUFFICIENT_SIZE,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_NOT_FOUND as NOT_FOUND,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED as NOT_SUPPORTED,
    nvmlReturn_enum_NVML_ERROR_TIMEOUT as TIMEOUT, nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN,
    nvmlReturn_enum_NVML_SUCCESS as SUCCESS, nvmlReturn_t,
    nvmlTemperatureSensors_enum_NVML_TEMPERATURE_GPU as TEMPERATURE_GPU, nvmlTemperatureSensors_t,
    nvmlUtilization_t,
};

use crate::fixture::{
    DEFAULT_MEMORY_USED_MIB, DEFAULT_TEMPERATURE_C, DEFAULT_UTILIZATION_PERCENT, Gpu,
};
use crate::host::{Answer, SUPPORTED_EVENTS, Target, device_handle};

const MIB: u64 = 1024 * 1024;

/// `NVML_STRUCT_VERSION(Memory, 2)`: the size of the struct, version in the
/// top byte.
const MEMORY_V2_VERSION: c_uint = (size_of::<nvmlMemory_v2_t>() as c_uint) | (2 << 24);

/// In `nvmlEventData_t`, "not attributable to a GPU/compute instance".
const NO_INSTANCE: c_uint = 0xffff_ffff;

fn status(answer: Answer<()>) -> nvmlReturn_t {
    match answer {
        Ok(()) => SUCCESS,
        Err(code) => code,
    }
}

/// Writes `value` where the caller asked.
///
/// # Safety
/// `out` is null or valid for a write of a `T`.
unsafe fn put<T>(out: *mut T, value: T) -> Answer<()> {
    if out.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    // SAFETY: not null, and valid for a write of a T by the caller's contract.
    unsafe { out.write(value) };
    Ok(())
}

/// Copies `value` and its terminating NUL into the caller's buffer, or
/// answers INSUFFICIENT_SIZE as NVML does when it does not fit.
///
/// # Safety
/// `out` is null or valid for writes of `length` bytes.
unsafe fn put_str(out: *mut c_char, length: c_uint, value: &str) -> Answer<()> {
    if out.is_null() {
        return Err(INVALID_ARGUMENT);
    }
    let bytes = value.as_bytes();
    if bytes.len() >= length as usize {
        return Err(INSUFFICIENT_SIZE);
    }
    // SAFETY: `out` holds `length` bytes and `bytes.len() + 1 <= length`;
    // a Rust string and a caller's buffer cannot overlap.
    unsafe {
        std::ptr::copy_nonoverlapping(bytes.as_ptr().cast::<c_char>(), out, bytes.len());
        out.add(bytes.len()).write(0);
    }
    Ok(())
}

/// `value` as a fixed C char array, NUL-padded; INVALID_ARGUMENT if it does
/// not fit with its NUL.
fn c_array<const N: usize>(value: &str) -> Answer<[c_char; N]> {
    let mut array = [0; N];
    if value.len() >= N {
        return Err(INVALID_ARGUMENT);
    }
    for (slot, byte) in array.iter_mut().zip(value.bytes()) {
        *slot = byte as c_char;
    }
    Ok(array)
}

fn count_u32(count: usize) -> Answer<c_uint> {
    c_uint::try_from(count).map_err(|_| UNKNOWN)
}

/// `12.4` as NVML encodes it: 12040.
fn encoded_cuda_version(version: &str) -> Answer<c_int> {
    let (major, minor) = version.split_once('.').unwrap_or((version, "0"));
    let major: c_int = major.parse().map_err(|_| UNKNOWN)?;
    let minor: c_int = minor.parse().map_err(|_| UNKNOWN)?;
    Ok(major * 1000 + minor * 10)
}

// Initialisation and errors.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit_v2() -> nvmlReturn_t {
    status(host::init())
}

/// The pre-v2 name, kept by NVML for old callers.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInit() -> nvmlReturn_t {
    status(host::init())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlInitWithFlags(flags: c_uint) -> nvmlReturn_t {
    if flags & !(NVML_INIT_FLAG_NO_GPUS | NVML_INIT_FLAG_NO_ATTACH) != 0 {
        return INVALID_ARGUMENT;
    }
    status(host::init())
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlShutdown() -> nvmlReturn_t {
    status(host::shutdown())
}

/// NVML's own wording for each code.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlErrorString(result: nvmlReturn_t) -> *const c_char {
    let text: &'static CStr = match result {
        0 => c"Success",
        1 => c"Uninitialized",
        2 => c"Invalid Argument",
        3 => c"Not Supported",
        4 => c"Insufficient Permissions",
        5 => c"Already Initialized",
        6 => c"Not Found",
        7 => c"Insufficient Size",
        8 => c"Insufficient External Power",
        9 => c"Driver Not Loaded",
        10 => c"Timeout",
        11 => c"Interrupt request issue",
        12 => c"NVML Shared Library Not Found",
        13 => c"Function Not Found",
        14 => c"Corrupted infoROM",
        15 => c"GPU is lost",
        16 => c"GPU requires restart",
        17 => c"The operating system has blocked the request.",
        18 => c"RM has detected an NVML/RM version mismatch.",
        19 => c"In use by another client",
        20 => c"Insufficient Memory",
        21 => c"No data",
        22 => c"The requested vgpu operation is not available on target device, because ECC is enabled",
        23 => c"Insufficient resources",
        24 => c"Unsupported clock frequency",
        25 => c"Argument version mismatch",
        26 => c"Deprecated",
        27 => c"Not Ready",
        28 => c"GPU not found",
        29 => c"Invalid state",
        _ => c"Unknown Error",
    };
    text.as_ptr()
}

// The system.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetDriverVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let driver = host::with(|state| Ok(state.host.driver_version.clone()));
    // SAFETY: nvml.h: `version` holds `length` bytes.
    status(driver.and_then(|driver| unsafe { put_str(version, length, &driver) }))
}

/// `<CUDA major>.<driver version>`, e.g. `12.550.54.15`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetNVMLVersion(
    version: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let nvml = host::with(|state| {
        let cuda = encoded_cuda_version(&state.host.cuda_version)?;
        Ok(format!("{}.{}", cuda / 1000, state.host.driver_version))
    });
    // SAFETY: nvml.h: `version` holds `length` bytes.
    status(nvml.and_then(|nvml| unsafe { put_str(version, length, &nvml) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion(cuda_version: *mut c_int) -> nvmlReturn_t {
    let cuda = host::with(|state| encoded_cuda_version(&state.host.cuda_version));
    // SAFETY: nvml.h: `cudaDriverVersion` points to an int.
    status(cuda.and_then(|cuda| unsafe { put(cuda_version, cuda) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlSystemGetCudaDriverVersion_v2(
    cuda_version: *mut c_int,
) -> nvmlReturn_t {
    // SAFETY: same contract.
    unsafe { nvmlSystemGetCudaDriverVersion(cuda_version) }
}

// Finding devices.

/// The number of GPUs; the fixture and events are read again here, at the
/// start of every scan.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount_v2(device_count: *mut c_uint) -> nvmlReturn_t {
    let count = host::with(|state| {
        state.reload_host()?;
        state.refresh_events()?;
        count_u32(state.host.gpus.len())
    });
    // SAFETY: nvml.h: `deviceCount` points to an unsigned int.
    status(count.and_then(|count| unsafe { put(device_count, count) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetCount(device_count: *mut c_uint) -> nvmlReturn_t {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetCount_v2(device_count) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex_v2(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let handle = host::with(|state| {
        state.refresh_events()?;
        let position = index as usize;
        state.gpu_at(position)?;
        Ok(device_handle(position, None))
    });
    // SAFETY: nvml.h: `device` points to a handle.
    status(handle.and_then(|handle| unsafe { put(device, handle) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByIndex(
    index: c_uint,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    // SAFETY: same contract.
    unsafe { nvmlDeviceGetHandleByIndex_v2(index, device) }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetHandleByUUID(
    uuid: *const c_char,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    if uuid.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: nvml.h: `uuid` is a NUL-terminated string.
    let uuid = unsafe { CStr::from_ptr(uuid) };
    let handle = host::with(|state| {
        state.refresh_events()?;
        let uuid = uuid.to_str().map_err(|_| INVALID_ARGUMENT)?;
        state.find_uuid(uuid).unwrap_or(Err(NOT_FOUND))
    });
    // SAFETY: nvml.h: `device` points to a handle.
    status(handle.and_then(|handle| unsafe { put(device, handle) }))
}

/// A device's property, through the handle.
fn property<T>(device: nvmlDevice_t, read: impl FnOnce(Target<'_>) -> Answer<T>) -> Answer<T> {
    host::with(|state| read(state.device(device)?))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetIndex(
    device: nvmlDevice_t,
    index: *mut c_uint,
) -> nvmlReturn_t {
    let position = property(device, |target| count_u32(target.full_gpu()?.0));
    // SAFETY: nvml.h: `index` points to an unsigned int.
    status(position.and_then(|position| unsafe { put(index, position) }))
}

// Identity.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUUID(
    device: nvmlDevice_t,
    uuid: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let value = property(device, |target| {
        Ok(match target {
            Target::Gpu { gpu, .. } => gpu.uuid.clone(),
            Target::Mig { mig, .. } => mig.uuid.clone(),
        })
    });
    // SAFETY: nvml.h: `uuid` holds `length` bytes.
    status(value.and_then(|value| unsafe { put_str(uuid, length, &value) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetName(
    device: nvmlDevice_t,
    name: *mut c_char,
    length: c_uint,
) -> nvmlReturn_t {
    let value = property(device, |target| {
        Ok(match target {
            Target::Gpu { gpu, .. } => gpu.name.clone(),
            Target::Mig { gpu, mig, .. } => format!("{} MIG {}", gpu.name, mig.profile),
        })
    });
    // SAFETY: nvml.h: `name` holds `length` bytes.
    status(value.and_then(|value| unsafe { put_str(name, length, &value) }))
}

/// PCI device id (device << 16 | vendor) and subsystem id of well-known
/// boards; anything else is an unnamed NVIDIA device.
fn pci_ids(name: &str) -> (c_uint, c_uint) {
    const NVIDIA: c_uint = 0x10de;
    let (device, subsystem) = if name.contains("A100-SXM4-80GB") {
        (0x20b2, 0x1463)
    } else if name.contains("A100-SXM4-40GB") {
        (0x20b0, 0x134f)
    } else if name.contains("H100 80GB HBM3") {
        (0x2330, 0x16c1)
    } else if name.contains("H200") {
        (0x2335, 0x18be)
    } else {
        (0, 0)
    };
    ((device << 16) | NVIDIA, (subsystem << 16) | NVIDIA)
}

/// `domain:bus:device.function`, hexadecimal, as the fixture writes it.
fn parse_bus_id(bus_id: &str) -> Answer<(c_uint, c_uint, c_uint, c_uint)> {
    let hex = |part: &str| c_uint::from_str_radix(part, 16).map_err(|_| UNKNOWN);
    let mut parts = bus_id.split(':');
    let (Some(domain), Some(bus), Some(rest), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Err(UNKNOWN);
    };
    let (device, function) = rest.split_once('.').ok_or(UNKNOWN)?;
    Ok((hex(domain)?, hex(bus)?, hex(device)?, hex(function)?))
}

fn pci_info(gpu: &Gpu) -> Answer<nvmlPciInfo_t> {
    let (domain, bus, device, function) = parse_bus_id(&gpu.pci_bus_id)?;
    let (pci_device_id, pci_sub_system_id) = pci_ids(&gpu.name);
    Ok(nvmlPciInfo_t {
        busIdLegacy: c_array(&format!(
            "{:04X}:{bus:02X}:{device:02X}.{function:X}",
            domain & 0xffff
        ))?,
        domain,
        bus,
        device,
        pciDeviceId: pci_device_id,
        pciSubSystemId: pci_sub_system_id,
        busId: c_array(&gpu.pci_bus_id)?,
    })
}

/// `nvmlDeviceGetPciInfo_v3`'s layout is nvml.h's `nvmlPciInfo_t`; a MIG
/// device answers its GPU's.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPciInfo_v3(
    device: nvmlDevice_t,
    pci: *mut nvmlPciInfo_t,
) -> nvmlReturn_t {
    let info = property(device, |target| pci_info(target.gpu()));
    // SAFETY: nvml.h: `pci` points to an nvmlPciInfo_t.
    status(info.and_then(|info| unsafe { put(pci, info) }))
}

// Memory.

/// (total, used) in bytes.
fn memory_bytes(target: Target<'_>) -> (u64, u64) {
    match target {
        Target::Gpu { gpu, .. } => (
            gpu.memory_mib * MIB,
            gpu.memory_used_mib.unwrap_or(DEFAULT_MEMORY_USED_MIB) * MIB,
        ),
        Target::Mig { mig, .. } => (mig.memory_mib * MIB, 0),
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_t,
) -> nvmlReturn_t {
    let info = property(device, |target| {
        let (total, used) = memory_bytes(target);
        Ok(nvmlMemory_t {
            total,
            free: total.saturating_sub(used),
            used,
        })
    });
    // SAFETY: nvml.h: `memory` points to an nvmlMemory_t.
    status(info.and_then(|info| unsafe { put(memory, info) }))
}

/// The versioned call: `memory->version` must be `nvmlMemory_v2`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMemoryInfo_v2(
    device: nvmlDevice_t,
    memory: *mut nvmlMemory_v2_t,
) -> nvmlReturn_t {
    if memory.is_null() {
        return INVALID_ARGUMENT;
    }
    // SAFETY: not null; nvml.h: `memory` points to an nvmlMemory_v2_t whose
    // version the caller set.
    let version = unsafe { (*memory).version };
    let info = property(device, |target| {
        if version != MEMORY_V2_VERSION {
            return Err(ARGUMENT_VERSION_MISMATCH);
        }
        let (total, used) = memory_bytes(target);
        Ok(nvmlMemory_v2_t {
            version,
            total,
            reserved: 0,
            free: total.saturating_sub(used),
            used,
        })
    });
    // SAFETY: as above.
    status(info.and_then(|info| unsafe { put(memory, info) }))
}

// MIG.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigMode(
    device: nvmlDevice_t,
    current_mode: *mut c_uint,
    pending_mode: *mut c_uint,
) -> nvmlReturn_t {
    let mode = property(device, |target| {
        let (_, gpu) = target.full_gpu()?;
        Ok(if gpu.mig_mode {
            NVML_DEVICE_MIG_ENABLE
        } else {
            NVML_DEVICE_MIG_DISABLE
        })
    });
    status(mode.and_then(|mode| {
        // SAFETY: nvml.h: both point to an unsigned int; no pending change.
        unsafe { put(current_mode, mode).and_then(|()| put(pending_mode, mode)) }
    }))
}

/// A GPU in MIG mode holds at most its compute slices of MIG devices; one
/// out of MIG mode none.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMaxMigDeviceCount(
    device: nvmlDevice_t,
    count: *mut c_uint,
) -> nvmlReturn_t {
    let max = property(device, |target| {
        let (_, gpu) = target.full_gpu().map_err(|_| INVALID_ARGUMENT)?;
        Ok(gpu.max_mig_devices())
    });
    // SAFETY: nvml.h: `count` points to an unsigned int.
    status(max.and_then(|max| unsafe { put(count, max) }))
}

/// Slots `0..n` hold the fixture's MIG instances in order; the rest up to
/// the maximum are free (NOT_FOUND); beyond it INVALID_ARGUMENT.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetMigDeviceHandleByIndex(
    device: nvmlDevice_t,
    index: c_uint,
    mig_device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let handle = property(device, |target| {
        let (position, gpu) = target.full_gpu().map_err(|_| INVALID_ARGUMENT)?;
        if index >= gpu.max_mig_devices() {
            return Err(INVALID_ARGUMENT);
        }
        let slot = index as usize;
        if slot >= gpu.mig_instances.len() {
            return Err(NOT_FOUND);
        }
        Ok(device_handle(position, Some(slot)))
    });
    // SAFETY: nvml.h: `migDevice` points to a handle.
    status(handle.and_then(|handle| unsafe { put(mig_device, handle) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceIsMigDeviceHandle(
    device: nvmlDevice_t,
    is_mig_device: *mut c_uint,
) -> nvmlReturn_t {
    let is_mig = property(device, |target| Ok(matches!(target, Target::Mig { .. })));
    // SAFETY: nvml.h: `isMigDevice` points to an unsigned int.
    status(is_mig.and_then(|is_mig| unsafe { put(is_mig_device, c_uint::from(is_mig)) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetDeviceHandleFromMigDeviceHandle(
    mig_device: nvmlDevice_t,
    device: *mut nvmlDevice_t,
) -> nvmlReturn_t {
    let parent = property(mig_device, |target| match target {
        Target::Mig { position, .. } => Ok(device_handle(position, None)),
        Target::Gpu { .. } => Err(INVALID_ARGUMENT),
    });
    // SAFETY: nvml.h: `device` points to a handle.
    status(parent.and_then(|parent| unsafe { put(device, parent) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetGpuInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    let value = property(device, |target| match target {
        Target::Mig { mig, .. } => Ok(mig.gpu_instance_id),
        Target::Gpu { .. } => Err(NOT_SUPPORTED),
    });
    // SAFETY: nvml.h: `id` points to an unsigned int.
    status(value.and_then(|value| unsafe { put(id, value) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetComputeInstanceId(
    device: nvmlDevice_t,
    id: *mut c_uint,
) -> nvmlReturn_t {
    let value = property(device, |target| match target {
        Target::Mig { mig, .. } => Ok(mig.compute_instance_id),
        Target::Gpu { .. } => Err(NOT_SUPPORTED),
    });
    // SAFETY: nvml.h: `id` points to an unsigned int.
    status(value.and_then(|value| unsafe { put(id, value) }))
}

/// A MIG device's slices and memory (what gpuwarden names its profile
/// from); a full GPU's whole.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetAttributes_v2(
    device: nvmlDevice_t,
    attributes: *mut nvmlDeviceAttributes_t,
) -> nvmlReturn_t {
    let value = property(device, |target| {
        let (gpu_slices, compute_slices, memory_mib) = match target {
            Target::Gpu { gpu, .. } => (gpu.compute_slices(), gpu.compute_slices(), gpu.memory_mib),
            Target::Mig { mig, .. } => (mig.gpu_slices(), mig.compute_slices, mig.memory_mib),
        };
        Ok(nvmlDeviceAttributes_t {
            // 14 SMs a slice, as on an A100 (98 in a 7g instance).
            multiprocessorCount: compute_slices * 14,
            sharedCopyEngineCount: gpu_slices,
            sharedDecoderCount: gpu_slices.div_ceil(2),
            sharedEncoderCount: 0,
            sharedJpegCount: c_uint::from(gpu_slices >= 7),
            sharedOfaCount: c_uint::from(gpu_slices >= 7),
            gpuInstanceSliceCount: gpu_slices,
            computeInstanceSliceCount: compute_slices,
            memorySizeMB: memory_mib,
        })
    });
    // SAFETY: nvml.h: `attributes` points to an nvmlDeviceAttributes_t.
    status(value.and_then(|value| unsafe { put(attributes, value) }))
}

// Telemetry.

/// NOT_SUPPORTED for a GPU in MIG mode and for MIG devices, as the driver.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetUtilizationRates(
    device: nvmlDevice_t,
    utilization: *mut nvmlUtilization_t,
) -> nvmlReturn_t {
    let value = property(device, |target| {
        let (_, gpu) = target.full_gpu()?;
        if gpu.mig_mode {
            return Err(NOT_SUPPORTED);
        }
        let percent = gpu
            .utilization_percent
            .unwrap_or(DEFAULT_UTILIZATION_PERCENT);
        Ok(nvmlUtilization_t {
            gpu: percent,
            memory: percent / 2,
        })
    });
    // SAFETY: nvml.h: `utilization` points to an nvmlUtilization_t.
    status(value.and_then(|value| unsafe { put(utilization, value) }))
}

/// Milliwatts.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetPowerUsage(
    device: nvmlDevice_t,
    power: *mut c_uint,
) -> nvmlReturn_t {
    let value = property(device, |target| Ok(target.full_gpu()?.1.power_milliwatts()));
    // SAFETY: nvml.h: `power` points to an unsigned int.
    status(value.and_then(|value| unsafe { put(power, value) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetTemperature(
    device: nvmlDevice_t,
    sensor_type: nvmlTemperatureSensors_t,
    temp: *mut c_uint,
) -> nvmlReturn_t {
    let value = property(device, |target| {
        let (_, gpu) = target.full_gpu()?;
        if sensor_type != TEMPERATURE_GPU {
            return Err(INVALID_ARGUMENT);
        }
        Ok(gpu.temperature_c.unwrap_or(DEFAULT_TEMPERATURE_C))
    });
    // SAFETY: nvml.h: `temp` points to an unsigned int.
    status(value.and_then(|value| unsafe { put(temp, value) }))
}

// Events.

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceGetSupportedEventTypes(
    device: nvmlDevice_t,
    event_types: *mut c_ulonglong,
) -> nvmlReturn_t {
    let value = property(device, |target| target.full_gpu().map(|_| SUPPORTED_EVENTS));
    // SAFETY: nvml.h: `eventTypes` points to an unsigned long long.
    status(value.and_then(|value| unsafe { put(event_types, value) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetCreate(set: *mut nvmlEventSet_t) -> nvmlReturn_t {
    if set.is_null() {
        return INVALID_ARGUMENT;
    }
    let handle = host::with(|state| state.create_event_set());
    // SAFETY: not null; nvml.h: `set` points to an event set handle.
    status(handle.and_then(|handle| unsafe { put(set, handle) }))
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlDeviceRegisterEvents(
    device: nvmlDevice_t,
    event_types: c_ulonglong,
    set: nvmlEventSet_t,
) -> nvmlReturn_t {
    status(host::with(|state| state.register(device, event_types, set)))
}

/// Delivers the next critical XID raised for a GPU registered in `set`,
/// waiting up to `timeoutms` for one (polling the events file), then
/// NVML_ERROR_TIMEOUT.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetWait_v2(
    set: nvmlEventSet_t,
    data: *mut nvmlEventData_t,
    timeoutms: c_uint,
) -> nvmlReturn_t {
    const POLL: Duration = Duration::from_millis(10);
    let deadline = Instant::now() + Duration::from_millis(timeoutms.into());
    loop {
        match host::with(|state| state.next_event(set)) {
            Ok(Some(event)) => {
                let event = nvmlEventData_t {
                    device: device_handle(event.gpu, None),
                    eventType: c_ulonglong::from(nvmlEventTypeXidCriticalError),
                    eventData: event.xid,
                    gpuInstanceId: NO_INSTANCE,
                    computeInstanceId: NO_INSTANCE,
                };
                // SAFETY: nvml.h: `data` points to an nvmlEventData_t.
                return status(unsafe { put(data, event) });
            }
            Ok(None) => {
                let now = Instant::now();
                if now >= deadline {
                    return TIMEOUT;
                }
                std::thread::sleep(POLL.min(deadline - now));
            }
            Err(code) => return code,
        }
    }
}

#[unsafe(no_mangle)]
pub unsafe extern "C" fn nvmlEventSetFree(set: nvmlEventSet_t) -> nvmlReturn_t {
    status(host::with(|state| state.free_event_set(set)))
}

/// Every export above (bar the legacy names, which nvml-wrapper-sys only
/// declares behind a feature) has exactly the type nvml-wrapper-sys gives
/// the function it loads, generated from nvml.h: this does not compile
/// otherwise.
const _: fn(&mut nvml_wrapper_sys::bindings::NvmlLib) = |lib| {
    lib.nvmlInit_v2 = Ok(nvmlInit_v2);
    lib.nvmlInitWithFlags = Ok(nvmlInitWithFlags);
    lib.nvmlShutdown = Ok(nvmlShutdown);
    lib.nvmlErrorString = Ok(nvmlErrorString);
    lib.nvmlSystemGetDriverVersion = Ok(nvmlSystemGetDriverVersion);
    lib.nvmlSystemGetNVMLVersion = Ok(nvmlSystemGetNVMLVersion);
    lib.nvmlSystemGetCudaDriverVersion = Ok(nvmlSystemGetCudaDriverVersion);
    lib.nvmlSystemGetCudaDriverVersion_v2 = Ok(nvmlSystemGetCudaDriverVersion_v2);
    lib.nvmlDeviceGetCount_v2 = Ok(nvmlDeviceGetCount_v2);
    lib.nvmlDeviceGetHandleByIndex_v2 = Ok(nvmlDeviceGetHandleByIndex_v2);
    lib.nvmlDeviceGetHandleByUUID = Ok(nvmlDeviceGetHandleByUUID);
    lib.nvmlDeviceGetIndex = Ok(nvmlDeviceGetIndex);
    lib.nvmlDeviceGetUUID = Ok(nvmlDeviceGetUUID);
    lib.nvmlDeviceGetName = Ok(nvmlDeviceGetName);
    lib.nvmlDeviceGetPciInfo_v3 = Ok(nvmlDeviceGetPciInfo_v3);
    lib.nvmlDeviceGetMemoryInfo = Ok(nvmlDeviceGetMemoryInfo);
    lib.nvmlDeviceGetMemoryInfo_v2 = Ok(nvmlDeviceGetMemoryInfo_v2);
    lib.nvmlDeviceGetMigMode = Ok(nvmlDeviceGetMigMode);
    lib.nvmlDeviceGetMaxMigDeviceCount = Ok(nvmlDeviceGetMaxMigDeviceCount);
    lib.nvmlDeviceGetMigDeviceHandleByIndex = Ok(nvmlDeviceGetMigDeviceHandleByIndex);
    lib.nvmlDeviceIsMigDeviceHandle = Ok(nvmlDeviceIsMigDeviceHandle);
    lib.nvmlDeviceGetDeviceHandleFromMigDeviceHandle =
        Ok(nvmlDeviceGetDeviceHandleFromMigDeviceHandle);
    lib.nvmlDeviceGetGpuInstanceId = Ok(nvmlDeviceGetGpuInstanceId);
    lib.nvmlDeviceGetComputeInstanceId = Ok(nvmlDeviceGetComputeInstanceId);
    lib.nvmlDeviceGetAttributes_v2 = Ok(nvmlDeviceGetAttributes_v2);
    lib.nvmlDeviceGetUtilizationRates = Ok(nvmlDeviceGetUtilizationRates);
    lib.nvmlDeviceGetPowerUsage = Ok(nvmlDeviceGetPowerUsage);
    lib.nvmlDeviceGetTemperature = Ok(nvmlDeviceGetTemperature);
    lib.nvmlDeviceGetSupportedEventTypes = Ok(nvmlDeviceGetSupportedEventTypes);
    lib.nvmlDeviceRegisterEvents = Ok(nvmlDeviceRegisterEvents);
    lib.nvmlEventSetCreate = Ok(nvmlEventSetCreate);
    lib.nvmlEventSetWait_v2 = Ok(nvmlEventSetWait_v2);
    lib.nvmlEventSetFree = Ok(nvmlEventSetFree);
};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strings_that_do_not_fit_answer_insufficient_size() {
        let mut buffer = [1 as c_char; 8];
        // SAFETY: the buffer holds 8 bytes.
        let fits = unsafe { put_str(buffer.as_mut_ptr(), 8, "550.54.") };
        assert_eq!(fits, Ok(()));
        assert_eq!(buffer[7], 0);
        // SAFETY: as above.
        let too_long = unsafe { put_str(buffer.as_mut_ptr(), 8, "550.54.15") };
        assert_eq!(too_long, Err(INSUFFICIENT_SIZE));
        // SAFETY: null is refused before any write.
        let null = unsafe { put_str(std::ptr::null_mut(), 8, "x") };
        assert_eq!(null, Err(INVALID_ARGUMENT));
    }

    #[test]
    fn cuda_versions_encode_as_nvml_does() {
        assert_eq!(encoded_cuda_version("12.4"), Ok(12040));
        assert_eq!(encoded_cuda_version("13.0"), Ok(13000));
        assert_eq!(encoded_cuda_version("11"), Ok(11000));
        assert_eq!(encoded_cuda_version("x"), Err(UNKNOWN));
    }

    #[test]
    fn bus_ids_parse_into_the_v3_struct() {
        let gpu: Gpu = toml::from_str(
            "index = 0\nuuid = \"GPU-1\"\nname = \"NVIDIA A100-SXM4-80GB\"\nmemory_mib = 1\n\
             pci_bus_id = \"00000000:B7:00.0\"\nmig_mode = false",
        )
        .unwrap();
        let info = pci_info(&gpu).unwrap();
        assert_eq!((info.domain, info.bus, info.device), (0, 0xb7, 0));
        assert_eq!(info.pciDeviceId, 0x20b2_10de);
        // SAFETY: c_array NUL-terminates.
        let legacy = unsafe { CStr::from_ptr(info.busIdLegacy.as_ptr()) };
        assert_eq!(legacy.to_str().unwrap(), "0000:B7:00.0");
        // SAFETY: as above.
        let bus_id = unsafe { CStr::from_ptr(info.busId.as_ptr()) };
        assert_eq!(bus_id.to_str().unwrap(), "00000000:B7:00.0");
    }

    #[test]
    fn the_memory_struct_version_is_nvml_h_s() {
        // NVML_STRUCT_VERSION(Memory, 2) on 64-bit: 40 bytes, version 2.
        assert_eq!(MEMORY_V2_VERSION, 0x0200_0028);
    }
}
