//! Runtime events of a simulated host: the optional file next to the
//! fixture, `<fixture stem>.events.toml` (`host.events.toml` for
//! `host.toml`), read again at every call like the fixture itself.
//!
//! ```toml
//! # GPUs that have fallen off the bus, by UUID: every NVML call about them
//! # answers NVML_ERROR_GPU_IS_LOST until they leave this list.
//! lost = ["GPU-5587f95c-b8d9-4d6e-957d-32652276684a"]
//!
//! # Critical-XID events, each delivered once to each backend that was open
//! # before it was written, in `seq` order.
//! [[xid]]
//! seq = 1
//! uuid = "GPU-faba74c6-7dc9-4bfd-ab4e-85cb4d26fa32"
//! xid = 79
//! ```
//!
//! Appending an `[[xid]]` with a `seq` above every earlier one raises an XID;
//! adding a UUID to `lost` loses a GPU. A backend (the simulated one, or the
//! NVML one through the stand-in library `nvml-standin`, which reads the
//! same file) delivers the XIDs whose `seq` is above the highest it saw when
//! it opened, as an NVML event set only sees events after it is registered.

use std::collections::{BTreeSet, HashSet};
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::FixtureError;
use crate::gpu::{DeviceUuid, HostInventory};
use crate::toml_file::{self, FileError};

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsFile {
    #[serde(default)]
    lost: Vec<String>,
    #[serde(default)]
    xid: Vec<XidEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct XidEntry {
    seq: u64,
    uuid: String,
    xid: u64,
}

/// One critical XID raised in the events file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SimulatedXid {
    pub seq: u64,
    pub device: DeviceUuid,
    pub xid: u64,
}

/// What the events file says now.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RuntimeEvents {
    pub lost: BTreeSet<DeviceUuid>,
    /// In `seq` order.
    pub xids: Vec<SimulatedXid>,
}

impl RuntimeEvents {
    /// The highest `seq` in the file, 0 when it has none.
    pub fn last_seq(&self) -> u64 {
        self.xids.last().map_or(0, |xid| xid.seq)
    }

    /// The XIDs after `seq`, in order.
    pub fn after(&self, seq: u64) -> impl Iterator<Item = &SimulatedXid> {
        self.xids.iter().filter(move |xid| xid.seq > seq)
    }
}

/// Where the events of the host described by `fixture` are raised.
pub fn events_path(fixture: &Path) -> PathBuf {
    fixture.with_extension("events.toml")
}

/// Reads the events file of `fixture`, if there is one, checking it against
/// the host the fixture describes. No file means no events.
pub fn load_events(fixture: &Path, host: &HostInventory) -> Result<RuntimeEvents, FixtureError> {
    let path = events_path(fixture);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(RuntimeEvents::default()),
        Err(source) => return Err(FileError::Read { path, source }),
    };
    let file: EventsFile = toml_file::parse(&path, &text)?;
    validate(&path, file, host)
}

fn validate(
    path: &Path,
    file: EventsFile,
    host: &HostInventory,
) -> Result<RuntimeEvents, FixtureError> {
    let gpus: HashSet<&str> = host.gpus.iter().map(|gpu| gpu.uuid.as_str()).collect();
    let check_gpu = |key: String, uuid: &str| {
        if gpus.contains(uuid) {
            Ok(DeviceUuid::new(uuid))
        } else {
            Err(FileError::invalid(
                path,
                key,
                format!(
                    "`{uuid}` is not a GPU of the fixture; events name full GPUs (an XID of a \
                     MIG instance is raised on its GPU)"
                ),
            ))
        }
    };
    let mut lost = BTreeSet::new();
    for (i, uuid) in file.lost.iter().enumerate() {
        lost.insert(check_gpu(format!("lost[{i}]"), uuid)?);
    }
    let mut seqs = HashSet::new();
    let mut xids = Vec::with_capacity(file.xid.len());
    for (i, entry) in file.xid.iter().enumerate() {
        if entry.seq == 0 || !seqs.insert(entry.seq) {
            return Err(FileError::invalid(
                path,
                format!("xid[{i}].seq"),
                format!(
                    "seq {} is 0 or used twice: each XID needs its own seq, above 0",
                    entry.seq
                ),
            ));
        }
        xids.push(SimulatedXid {
            seq: entry.seq,
            device: check_gpu(format!("xid[{i}].uuid"), &entry.uuid)?,
            xid: entry.xid,
        });
    }
    xids.sort_by_key(|xid| xid.seq);
    Ok(RuntimeEvents { lost, xids })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::simulated::load_fixture;

    const H100_PAIR: &str = "fixtures/sim-h100-pair.toml";
    const GPU0: &str = "GPU-9b12b00c-6d0c-490a-b0b2-879ea7657096";
    const GPU1: &str = "GPU-c273bec9-e03a-483e-a0c6-df38aac9f7eb";

    fn host() -> HostInventory {
        load_fixture(Path::new(H100_PAIR)).unwrap()
    }

    fn parse(text: &str) -> Result<RuntimeEvents, FixtureError> {
        let path = Path::new("host.events.toml");
        validate(path, toml_file::parse(path, text)?, &host())
    }

    #[test]
    fn the_events_file_sits_next_to_the_fixture() {
        assert_eq!(
            events_path(Path::new("/a/sim-dgx-a100.toml")),
            Path::new("/a/sim-dgx-a100.events.toml")
        );
        assert_eq!(
            events_path(Path::new("host")),
            Path::new("host.events.toml")
        );
    }

    #[test]
    fn no_file_means_no_events() {
        let events = load_events(Path::new(H100_PAIR), &host()).unwrap();
        assert_eq!(events, RuntimeEvents::default());
        assert_eq!(events.last_seq(), 0);
    }

    #[test]
    fn xids_come_in_seq_order_whatever_the_file_order() {
        let events = parse(&format!(
            "lost = [\"{GPU1}\"]\n\
             [[xid]]\nseq = 5\nuuid = \"{GPU0}\"\nxid = 79\n\
             [[xid]]\nseq = 2\nuuid = \"{GPU1}\"\nxid = 13\n"
        ))
        .unwrap();
        assert_eq!(events.lost, BTreeSet::from([DeviceUuid::new(GPU1)]));
        let seqs: Vec<u64> = events.xids.iter().map(|x| x.seq).collect();
        assert_eq!(seqs, [2, 5]);
        assert_eq!(events.last_seq(), 5);
        assert_eq!(events.after(2).count(), 1);
        assert_eq!(events.after(2).next().unwrap().xid, 79);
    }

    #[test]
    fn unknown_devices_and_reused_seqs_are_refused() {
        let bad = |text: &str| parse(text).unwrap_err().key().unwrap_or("").to_owned();
        assert_eq!(bad("lost = [\"GPU-nope\"]"), "lost[0]");
        assert_eq!(
            bad("[[xid]]\nseq = 1\nuuid = \"MIG-0d4b7102-166c-4d26-804d-35a10322fc1b\"\nxid = 79"),
            "xid[0].uuid"
        );
        let twice = format!(
            "[[xid]]\nseq = 1\nuuid = \"{GPU0}\"\nxid = 79\n[[xid]]\nseq = 1\nuuid = \"{GPU0}\"\nxid = 48\n"
        );
        assert_eq!(bad(&twice), "xid[1].seq");
        assert_eq!(
            bad(&format!("[[xid]]\nseq = 0\nuuid = \"{GPU0}\"\nxid = 79")),
            "xid[0].seq"
        );
        assert_eq!(bad("lots = []"), "lots");
    }
}
