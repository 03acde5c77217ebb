//! The state behind the exports: the fixture as last read, the runtime
//! events, and the event sets. Everything here is safe Rust answering
//! `Result<_, nvmlReturn_t>` with NVML's own return codes; `lib.rs` moves
//! the answers through the C pointers.

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::ptr;
use std::sync::{Mutex, MutexGuard, PoisonError};

use nvml_wrapper_sys::bindings::{
    nvmlDevice_t, nvmlEventSet_t, nvmlEventTypeClock, nvmlEventTypeDoubleBitEccError,
    nvmlEventTypePState, nvmlEventTypeSingleBitEccError, nvmlEventTypeXidCriticalError,
    nvmlReturn_enum_NVML_ERROR_DRIVER_NOT_LOADED as DRIVER_NOT_LOADED,
    nvmlReturn_enum_NVML_ERROR_GPU_IS_LOST as GPU_IS_LOST,
    nvmlReturn_enum_NVML_ERROR_INVALID_ARGUMENT as INVALID_ARGUMENT,
    nvmlReturn_enum_NVML_ERROR_NOT_SUPPORTED as NOT_SUPPORTED,
    nvmlReturn_enum_NVML_ERROR_UNINITIALIZED as UNINITIALIZED,
    nvmlReturn_enum_NVML_ERROR_UNKNOWN as UNKNOWN, nvmlReturn_t,
};

use crate::fixture::{self, Events, Gpu, Host, Mig};

pub type Answer<T> = Result<T, nvmlReturn_t>;

/// The event types a stand-in GPU accepts registrations for; only critical
/// XIDs ever fire.
pub const SUPPORTED_EVENTS: u64 = (nvmlEventTypeSingleBitEccError
    | nvmlEventTypeDoubleBitEccError
    | nvmlEventTypePState
    | nvmlEventTypeXidCriticalError
    | nvmlEventTypeClock) as u64;

/// Handles are numbers dressed as pointers, never dereferenced by anyone:
/// a tag in bits 16-31, then the GPU's position + 1 (bits 8-15) and the MIG
/// slot + 1 (bits 0-7, 0 for the GPU itself). They stay valid when the
/// fixture is read again.
const DEVICE_TAG: usize = 0x4e56_0000;
const EVENT_SET_TAG: usize = 0x4e45_0000;
const TAG_MASK: usize = !0xffff;

pub fn device_handle(gpu: usize, mig: Option<usize>) -> nvmlDevice_t {
    let mig = mig.map_or(0, |slot| slot + 1);
    ptr::without_provenance_mut(DEVICE_TAG | ((gpu + 1) << 8) | mig)
}

fn decode_device(handle: nvmlDevice_t) -> Answer<(usize, Option<usize>)> {
    let value = handle.addr();
    let (gpu, mig) = ((value >> 8) & 0xff, value & 0xff);
    if value & TAG_MASK != DEVICE_TAG || gpu == 0 {
        return Err(INVALID_ARGUMENT);
    }
    Ok((gpu - 1, mig.checked_sub(1)))
}

fn event_set_handle(id: usize) -> nvmlEventSet_t {
    ptr::without_provenance_mut(EVENT_SET_TAG | id)
}

fn decode_event_set(handle: nvmlEventSet_t) -> Answer<usize> {
    let value = handle.addr();
    if value & TAG_MASK != EVENT_SET_TAG {
        return Err(INVALID_ARGUMENT);
    }
    Ok(value & 0xffff)
}

/// What a handle names.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    Gpu {
        position: usize,
        gpu: &'a Gpu,
    },
    Mig {
        position: usize,
        gpu: &'a Gpu,
        mig: &'a Mig,
    },
}

impl<'a> Target<'a> {
    pub fn gpu(&self) -> &'a Gpu {
        match *self {
            Self::Gpu { gpu, .. } | Self::Mig { gpu, .. } => gpu,
        }
    }

    /// The full GPU, or NOT_SUPPORTED for a MIG device: what most GPU-wide
    /// readings answer for a MIG handle.
    pub fn full_gpu(&self) -> Answer<(usize, &'a Gpu)> {
        match *self {
            Self::Gpu { position, gpu } => Ok((position, gpu)),
            Self::Mig { .. } => Err(NOT_SUPPORTED),
        }
    }
}

/// One delivered critical XID.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct XidEvent {
    pub gpu: usize,
    pub xid: u64,
}

#[derive(Debug, Default)]
struct EventSet {
    /// Event types registered, by GPU position.
    registered: HashMap<usize, u64>,
    /// XIDs after this `seq` are new to the set.
    last_seq: u64,
    pending: VecDeque<XidEvent>,
}

#[derive(Debug)]
pub struct State {
    inits: u32,
    fixture: PathBuf,
    pub host: Host,
    events: Events,
    sets: HashMap<usize, EventSet>,
    next_set: usize,
}

static STATE: Mutex<Option<State>> = Mutex::new(None);

fn lock() -> MutexGuard<'static, Option<State>> {
    // A panic aborts at the C boundary, so a poisoned lock cannot be seen;
    // the state would be whole anyway.
    STATE.lock().unwrap_or_else(PoisonError::into_inner)
}

fn complain(problem: &str) {
    eprintln!("nvml-standin: {problem}");
}

/// `nvmlInit*`: reads the fixture on the first call, counts the others.
pub fn init() -> Answer<()> {
    let mut state = lock();
    if let Some(state) = state.as_mut() {
        state.inits += 1;
        return Ok(());
    }
    let loaded = fixture::fixture_path().and_then(|fixture| {
        let host = fixture::load_host(&fixture)?;
        let events = fixture::load_events(&fixture)?;
        Ok(State {
            inits: 1,
            fixture,
            host,
            events,
            sets: HashMap::new(),
            next_set: 1,
        })
    });
    match loaded {
        Ok(loaded) => {
            *state = Some(loaded);
            Ok(())
        }
        Err(problem) => {
            complain(&problem);
            Err(DRIVER_NOT_LOADED)
        }
    }
}

/// `nvmlShutdown`: the last one forgets everything.
pub fn shutdown() -> Answer<()> {
    let mut guard = lock();
    let state = guard.as_mut().ok_or(UNINITIALIZED)?;
    state.inits -= 1;
    if state.inits == 0 {
        *guard = None;
    }
    Ok(())
}

/// Runs `call` on the state; UNINITIALIZED before `nvmlInit`.
pub fn with<T>(call: impl FnOnce(&mut State) -> Answer<T>) -> Answer<T> {
    call(lock().as_mut().ok_or(UNINITIALIZED)?)
}

impl State {
    /// Reads the fixture again, as at the start of a scan.
    pub fn reload_host(&mut self) -> Answer<()> {
        self.host = fixture::load_host(&self.fixture).map_err(|problem| {
            complain(&problem);
            UNKNOWN
        })?;
        Ok(())
    }

    /// Reads the events file again and queues new XIDs in the event sets.
    pub fn refresh_events(&mut self) -> Answer<()> {
        self.events = fixture::load_events(&self.fixture).map_err(|problem| {
            complain(&problem);
            UNKNOWN
        })?;
        let last_seq = self.events.last_seq();
        for set in self.sets.values_mut() {
            for xid in self.events.xids.iter().filter(|x| x.seq > set.last_seq) {
                let Some(gpu) = self.host.gpus.iter().position(|g| g.uuid == xid.uuid) else {
                    continue;
                };
                let types = set.registered.get(&gpu).copied().unwrap_or(0);
                if types & u64::from(nvmlEventTypeXidCriticalError) != 0 {
                    set.pending.push_back(XidEvent { gpu, xid: xid.xid });
                }
            }
            set.last_seq = set.last_seq.max(last_seq);
        }
        Ok(())
    }

    fn is_lost(&self, gpu: &Gpu) -> bool {
        self.events.lost.contains(&gpu.uuid)
    }

    /// The GPU at `position`, GPU_IS_LOST when it has fallen off the bus.
    pub fn gpu_at(&self, position: usize) -> Answer<&Gpu> {
        let gpu = self.host.gpus.get(position).ok_or(INVALID_ARGUMENT)?;
        if self.is_lost(gpu) {
            return Err(GPU_IS_LOST);
        }
        Ok(gpu)
    }

    /// What `handle` names; GPU_IS_LOST for a lost GPU and its MIG devices.
    pub fn device(&self, handle: nvmlDevice_t) -> Answer<Target<'_>> {
        let (position, slot) = decode_device(handle)?;
        let gpu = self.gpu_at(position)?;
        Ok(match slot {
            None => Target::Gpu { position, gpu },
            Some(slot) => Target::Mig {
                position,
                gpu,
                mig: gpu.mig_instances.get(slot).ok_or(INVALID_ARGUMENT)?,
            },
        })
    }

    /// The handle of the GPU or MIG device with this UUID.
    pub fn find_uuid(&self, uuid: &str) -> Option<Answer<nvmlDevice_t>> {
        self.host
            .gpus
            .iter()
            .enumerate()
            .find_map(|(position, gpu)| {
                let found = if gpu.uuid == uuid {
                    Some(None)
                } else {
                    gpu.mig_instances
                        .iter()
                        .position(|mig| mig.uuid == uuid)
                        .map(Some)
                };
                found.map(|slot| {
                    if self.is_lost(gpu) {
                        Err(GPU_IS_LOST)
                    } else {
                        Ok(device_handle(position, slot))
                    }
                })
            })
    }

    pub fn create_event_set(&mut self) -> Answer<nvmlEventSet_t> {
        self.refresh_events()?;
        let id = self.next_set;
        if id > 0xffff {
            return Err(UNKNOWN);
        }
        self.next_set += 1;
        self.sets.insert(
            id,
            EventSet {
                last_seq: self.events.last_seq(),
                ..EventSet::default()
            },
        );
        Ok(event_set_handle(id))
    }

    pub fn register(
        &mut self,
        device: nvmlDevice_t,
        types: u64,
        set: nvmlEventSet_t,
    ) -> Answer<()> {
        let id = decode_event_set(set)?;
        let (position, _) = self.device(device)?.full_gpu()?;
        if types & !SUPPORTED_EVENTS != 0 {
            return Err(NOT_SUPPORTED);
        }
        let set = self.sets.get_mut(&id).ok_or(INVALID_ARGUMENT)?;
        *set.registered.entry(position).or_default() |= types;
        Ok(())
    }

    /// The next pending event of `set`, if any.
    pub fn next_event(&mut self, set: nvmlEventSet_t) -> Answer<Option<XidEvent>> {
        let id = decode_event_set(set)?;
        if !self.sets.contains_key(&id) {
            return Err(INVALID_ARGUMENT);
        }
        self.refresh_events()?;
        Ok(self
            .sets
            .get_mut(&id)
            .and_then(|set| set.pending.pop_front()))
    }

    pub fn free_event_set(&mut self, set: nvmlEventSet_t) -> Answer<()> {
        let id = decode_event_set(set)?;
        self.sets.remove(&id).map(drop).ok_or(INVALID_ARGUMENT)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn handles_round_trip_and_strangers_are_refused() {
        for (gpu, mig) in [(0, None), (7, Some(6)), (254, Some(253))] {
            assert_eq!(decode_device(device_handle(gpu, mig)), Ok((gpu, mig)));
        }
        assert_eq!(decode_device(ptr::null_mut()), Err(INVALID_ARGUMENT));
        assert_eq!(
            decode_device(event_set_handle(1).cast()),
            Err(INVALID_ARGUMENT)
        );
        assert_eq!(decode_event_set(event_set_handle(3)), Ok(3));
        assert_eq!(
            decode_event_set(device_handle(0, None).cast()),
            Err(INVALID_ARGUMENT)
        );
    }
}
