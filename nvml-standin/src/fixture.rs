//! The files the stand-in answers from: a gpuwarden host fixture
//! (`fixtures/sim-*.toml`) and its runtime events file
//! (`<fixture stem>.events.toml`), both read as gpuwarden's simulated backend
//! reads them (`src/gpu/simulated.rs`, `src/gpu/simulated/events.rs`).
//! gpuwarden validates fixtures; the stand-in only needs them to parse.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use serde::Deserialize;

/// Names the fixture when no `<library>.fixture` file does.
pub const FIXTURE_ENV: &str = "GPUWARDEN_STANDIN_FIXTURE";

/// Telemetry of a GPU whose fixture entry does not say: the same defaults
/// as gpuwarden's simulated backend.
pub const DEFAULT_UTILIZATION_PERCENT: u32 = 0;
pub const DEFAULT_MEMORY_USED_MIB: u64 = 0;
pub const DEFAULT_POWER_WATTS: f64 = 60.0;
pub const DEFAULT_TEMPERATURE_C: u32 = 35;
/// Compute slices of a GPU whose fixture entry does not say (A100, H100).
pub const DEFAULT_COMPUTE_SLICES: u32 = 7;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Host {
    #[expect(
        dead_code,
        reason = "NVML has no call for it; the fixture parses whole"
    )]
    pub hostname: String,
    pub driver_version: String,
    pub cuda_version: String,
    #[serde(default)]
    pub gpus: Vec<Gpu>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Gpu {
    pub index: u32,
    pub uuid: String,
    pub name: String,
    pub memory_mib: u64,
    pub pci_bus_id: String,
    pub mig_mode: bool,
    pub compute_slices: Option<u32>,
    #[serde(default)]
    pub mig_instances: Vec<Mig>,
    pub utilization_percent: Option<u32>,
    pub memory_used_mib: Option<u64>,
    pub power_watts: Option<f64>,
    pub temperature_c: Option<u32>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Mig {
    pub uuid: String,
    pub profile: String,
    pub gpu_instance_id: u32,
    pub compute_instance_id: u32,
    pub compute_slices: u32,
    pub memory_mib: u64,
}

impl Gpu {
    pub fn compute_slices(&self) -> u32 {
        self.compute_slices.unwrap_or(DEFAULT_COMPUTE_SLICES)
    }

    /// How many MIG devices the GPU can hold: its compute slices in MIG
    /// mode, none out of it.
    pub fn max_mig_devices(&self) -> u32 {
        if self.mig_mode {
            self.compute_slices()
        } else {
            0
        }
    }

    /// Board power in NVML's whole milliwatts.
    pub fn power_milliwatts(&self) -> u32 {
        let watts = self.power_watts.unwrap_or(DEFAULT_POWER_WATTS);
        // gpuwarden refuses fixtures outside 0..=100_000 W; `as` saturates.
        (watts * 1000.0).round() as u32
    }
}

impl Mig {
    /// GPU-instance slices: the `<g>g` part of `1c.3g.40gb` or `3g.40gb`.
    pub fn gpu_slices(&self) -> u32 {
        self.profile
            .split('.')
            .find_map(|part| part.strip_suffix('g').and_then(|n| n.parse().ok()))
            .unwrap_or(self.compute_slices)
    }
}

/// Reads the fixture; GPUs in index order, as NVML enumerates them.
pub fn load_host(path: &Path) -> Result<Host, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("{}: cannot read: {e}", path.display()))?;
    let mut host: Host = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    host.gpus.sort_by_key(|gpu| gpu.index);
    Ok(host)
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsFile {
    #[serde(default)]
    lost: Vec<String>,
    #[serde(default)]
    xid: Vec<Xid>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Xid {
    pub seq: u64,
    pub uuid: String,
    pub xid: u64,
}

/// What the events file says now.
#[derive(Debug, Default)]
pub struct Events {
    /// UUIDs of lost GPUs.
    pub lost: HashSet<String>,
    /// In `seq` order.
    pub xids: Vec<Xid>,
}

impl Events {
    pub fn last_seq(&self) -> u64 {
        self.xids.last().map_or(0, |xid| xid.seq)
    }
}

/// `host.events.toml` for `host.toml`.
pub fn events_path(fixture: &Path) -> PathBuf {
    fixture.with_extension("events.toml")
}

/// Reads the events file of `fixture`; none means no events.
pub fn load_events(fixture: &Path) -> Result<Events, String> {
    let path = events_path(fixture);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Events::default()),
        Err(e) => return Err(format!("{}: cannot read: {e}", path.display())),
    };
    let file: EventsFile = toml::from_str(&text).map_err(|e| format!("{}: {e}", path.display()))?;
    let mut xids = file.xid;
    xids.sort_by_key(|xid| xid.seq);
    Ok(Events {
        lost: file.lost.into_iter().collect(),
        xids,
    })
}

/// Which fixture this copy of the library answers from: the path in
/// `<library file>.fixture` next to the loaded library (relative to its
/// folder), else `$GPUWARDEN_STANDIN_FIXTURE`. The file lets one process
/// load several copies of the stand-in, each with its own fixture.
pub fn fixture_path() -> Result<PathBuf, String> {
    if let Some(library) = own_path() {
        let mut sidecar = library.clone().into_os_string();
        sidecar.push(".fixture");
        if let Ok(text) = std::fs::read_to_string(&sidecar) {
            let named = PathBuf::from(text.trim());
            return Ok(match library.parent() {
                Some(folder) if named.is_relative() => folder.join(named),
                _ => named,
            });
        }
    }
    std::env::var_os(FIXTURE_ENV)
        .map(PathBuf::from)
        .ok_or_else(|| {
            format!("no fixture: set {FIXTURE_ENV} or write its path in <library>.fixture")
        })
}

/// The file this code was loaded from, found in `/proc/self/maps`.
fn own_path() -> Option<PathBuf> {
    let here = own_path as fn() -> Option<PathBuf> as usize;
    let maps = std::fs::read_to_string("/proc/self/maps").ok()?;
    maps.lines().find_map(|line| {
        // `start-end perms offset dev inode    path`
        let mut fields = line.splitn(6, ' ');
        let (start, end) = fields.next()?.split_once('-')?;
        let start = usize::from_str_radix(start, 16).ok()?;
        let end = usize::from_str_radix(end, 16).ok()?;
        if !(start..end).contains(&here) {
            return None;
        }
        let path = fields.nth(4)?.trim_start();
        path.starts_with('/').then(|| PathBuf::from(path))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn both_shared_fixtures_parse() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
        let dgx = load_host(&root.join("sim-dgx-a100.toml")).unwrap();
        assert_eq!(dgx.gpus.len(), 8);
        assert_eq!(dgx.gpus[1].mig_instances[0].gpu_slices(), 3);
        let pair = load_host(&root.join("sim-h100-pair.toml")).unwrap();
        assert_eq!(pair.gpus[0].power_milliwatts(), 60_000);
    }

    #[test]
    fn gpu_slices_come_from_the_profile() {
        let mig = |profile: &str, compute_slices| Mig {
            uuid: "MIG-x".into(),
            profile: profile.into(),
            gpu_instance_id: 1,
            compute_instance_id: 0,
            compute_slices,
            memory_mib: 1,
        };
        assert_eq!(mig("1c.3g.40gb", 1).gpu_slices(), 3);
        assert_eq!(mig("2g.20gb", 2).gpu_slices(), 2);
        assert_eq!(mig("odd", 4).gpu_slices(), 4);
    }

    #[test]
    fn this_code_knows_the_file_it_runs_from() {
        // In a test, the test executable.
        let path = own_path().unwrap();
        assert_eq!(path, std::env::current_exe().unwrap());
    }
}
