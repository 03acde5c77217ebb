//! The inventory as users see it: every GPU and MIG instance with what the
//! agent knows of it (health, assignability, the session holding it). One
//! shape serves `gpuwarden inventory`, `ctl inventory` and `GetInventory`.

use std::fmt::Write as _;
use std::time::SystemTime;

use serde::Serialize;

use crate::gpu::{BackendKind, DeviceUuid, HostInventory, mig_device_class};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceKind {
    Gpu,
    Mig,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Health {
    Healthy,
    Unhealthy,
    Lost,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy => "unhealthy",
            Self::Lost => "lost",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DeviceView {
    pub kind: DeviceKind,
    pub uuid: DeviceUuid,
    pub name: String,
    /// The policy's rate key.
    pub class: String,
    pub memory_mib: u64,
    /// GPU index; for a MIG instance, its parent's.
    pub index: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pci_bus_id: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_mode: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parent_uuid: Option<DeviceUuid>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mig_profile: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub gpu_instance_id: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub compute_instance_id: Option<u32>,
    /// This device's compute slices and the whole GPU's.
    pub compute_slices: u32,
    pub gpu_compute_slices: u32,
    pub health: Health,
    pub assignable: bool,
    pub session_id: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct InventoryView {
    pub node_id: String,
    pub hostname: String,
    pub driver_version: String,
    pub cuda_version: String,
    pub backend: BackendKind,
    #[serde(with = "rfc3339")]
    pub scanned_at: SystemTime,
    pub draining: bool,
    pub gpus: usize,
    pub mig_instances: usize,
    pub assignable: usize,
    /// GPUs in index order, each followed by its MIG instances.
    pub devices: Vec<DeviceView>,
    /// The control-plane link, in control-plane mode.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub control_plane: Option<LinkView>,
}

/// The agent's link to the control plane as `ctl` shows it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LinkView {
    pub up: bool,
    #[serde(with = "rfc3339")]
    pub since: SystemTime,
    pub policy_version: u64,
    pub outbox_backlog: u64,
}

impl DeviceView {
    /// A device a session still holds but the last scan did not find.
    pub fn vanished(uuid: DeviceUuid, session_id: String) -> Self {
        let mig = uuid.as_str().starts_with("MIG-");
        Self {
            kind: if mig {
                DeviceKind::Mig
            } else {
                DeviceKind::Gpu
            },
            uuid,
            name: "(gone from the last scan)".into(),
            class: String::new(),
            memory_mib: 0,
            index: 0,
            pci_bus_id: None,
            mig_mode: None,
            parent_uuid: None,
            mig_profile: None,
            gpu_instance_id: None,
            compute_instance_id: None,
            compute_slices: 0,
            gpu_compute_slices: 0,
            health: Health::Lost,
            assignable: false,
            session_id: Some(session_id),
        }
    }
}

impl InventoryView {
    /// The view of a fresh scan: every device healthy and free.
    pub fn from_scan(node_id: &str, scan: &HostInventory, scanned_at: SystemTime) -> Self {
        let mut devices = Vec::new();
        for gpu in &scan.gpus {
            devices.push(DeviceView {
                kind: DeviceKind::Gpu,
                uuid: gpu.uuid.clone(),
                name: gpu.name.clone(),
                class: gpu.name.clone(),
                memory_mib: gpu.memory_mib,
                index: gpu.index,
                pci_bus_id: Some(gpu.pci_bus_id.clone()),
                mig_mode: Some(gpu.mig_mode),
                parent_uuid: None,
                mig_profile: None,
                gpu_instance_id: None,
                compute_instance_id: None,
                compute_slices: gpu.compute_slices,
                gpu_compute_slices: gpu.compute_slices,
                health: Health::Healthy,
                assignable: !gpu.mig_mode,
                session_id: None,
            });
            for mig in gpu.mig_instances.iter().filter(|_| gpu.mig_mode) {
                devices.push(DeviceView {
                    kind: DeviceKind::Mig,
                    uuid: mig.uuid.clone(),
                    name: gpu.name.clone(),
                    class: mig_device_class(&gpu.name, &mig.profile),
                    memory_mib: mig.memory_mib,
                    index: gpu.index,
                    pci_bus_id: None,
                    mig_mode: None,
                    parent_uuid: Some(gpu.uuid.clone()),
                    mig_profile: Some(mig.profile.clone()),
                    gpu_instance_id: Some(mig.gpu_instance_id),
                    compute_instance_id: Some(mig.compute_instance_id),
                    compute_slices: mig.compute_slices,
                    gpu_compute_slices: gpu.compute_slices,
                    health: Health::Healthy,
                    assignable: true,
                    session_id: None,
                });
            }
        }
        Self::new(
            node_id.to_owned(),
            scan.hostname.clone(),
            scan.driver_version.clone(),
            scan.cuda_version.clone(),
            scan.backend,
            scanned_at,
            false,
            devices,
        )
    }

    /// Builds a view with its counts derived from `devices`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        node_id: String,
        hostname: String,
        driver_version: String,
        cuda_version: String,
        backend: BackendKind,
        scanned_at: SystemTime,
        draining: bool,
        devices: Vec<DeviceView>,
    ) -> Self {
        let count = |kind| devices.iter().filter(|d| d.kind == kind).count();
        Self {
            gpus: count(DeviceKind::Gpu),
            mig_instances: count(DeviceKind::Mig),
            assignable: devices.iter().filter(|d| d.assignable).count(),
            node_id,
            hostname,
            driver_version,
            cuda_version,
            backend,
            scanned_at,
            draining,
            devices,
            control_plane: None,
        }
    }

    /// A table for people.
    pub fn render_table(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(
            out,
            "node {}  host {}  driver {}  CUDA {}  backend {}{}",
            self.node_id,
            self.hostname,
            self.driver_version,
            self.cuda_version,
            self.backend.as_str(),
            if self.draining { "  DRAINING" } else { "" }
        );
        if let Some(link) = &self.control_plane {
            let _ = writeln!(
                out,
                "control plane {} since {}  policy v{}  usage backlog {}",
                if link.up { "up" } else { "DOWN" },
                humantime::format_rfc3339_seconds(link.since),
                link.policy_version,
                link.outbox_backlog
            );
        }
        let _ = writeln!(
            out,
            "{:<4} {:<44} {:<28} {:>10}  {:<9} {:<10} SESSION",
            "GPU", "UUID", "DEVICE", "MEMORY", "HEALTH", "ASSIGNABLE"
        );
        for device in &self.devices {
            let (index, what) = match device.kind {
                DeviceKind::Gpu => (
                    device.index.to_string(),
                    if device.mig_mode == Some(true) {
                        format!("{} (MIG)", short_model(&device.name))
                    } else {
                        device.name.clone()
                    },
                ),
                DeviceKind::Mig => (
                    format!(" {}", device.index),
                    format!(
                        "  MIG {} gi{}/ci{}",
                        device.mig_profile.as_deref().unwrap_or("?"),
                        device.gpu_instance_id.unwrap_or_default(),
                        device.compute_instance_id.unwrap_or_default()
                    ),
                ),
            };
            let _ = writeln!(
                out,
                "{:<4} {:<44} {:<28} {:>6} MiB  {:<9} {:<10} {}",
                index,
                device.uuid,
                what,
                device.memory_mib,
                device.health.as_str(),
                if device.assignable { "yes" } else { "no" },
                device.session_id.as_deref().unwrap_or("-")
            );
        }
        let _ = writeln!(
            out,
            "{} GPUs, {} MIG instances, {} assignable devices",
            self.gpus, self.mig_instances, self.assignable
        );
        out
    }
}

/// "NVIDIA A100-SXM4-80GB" -> "A100-SXM4-80GB", to keep the table narrow.
fn short_model(name: &str) -> &str {
    name.strip_prefix("NVIDIA ").unwrap_or(name)
}

/// RFC 3339 timestamps in UTC, as protobuf's Timestamp prints them.
pub mod rfc3339 {
    use std::time::SystemTime;

    use serde::Serializer;

    pub fn serialize<S: Serializer>(at: &SystemTime, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(&prost_types::Timestamp::from(*at))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::simulated::load_fixture;
    use std::path::Path;

    fn dgx() -> InventoryView {
        let scan = load_fixture(Path::new("fixtures/sim-dgx-a100.toml")).unwrap();
        InventoryView::from_scan("n1", &scan, SystemTime::UNIX_EPOCH)
    }

    #[test]
    fn counts_follow_the_devices() {
        let view = dgx();
        assert_eq!(
            (view.gpus, view.mig_instances, view.assignable),
            (8, 11, 17)
        );
        assert_eq!(view.devices.len(), 19);
    }

    #[test]
    fn mig_parents_are_listed_but_not_assignable() {
        let view = dgx();
        let parent = &view.devices[0];
        assert_eq!(parent.kind, DeviceKind::Gpu);
        assert!(!parent.assignable);
        let first_mig = &view.devices[1];
        assert_eq!(first_mig.kind, DeviceKind::Mig);
        assert_eq!(first_mig.parent_uuid.as_ref(), Some(&parent.uuid));
        assert_eq!(first_mig.class, "NVIDIA A100-SXM4-80GB MIG 1g.10gb");
        assert_eq!(
            (first_mig.compute_slices, first_mig.gpu_compute_slices),
            (1, 7)
        );
    }

    #[test]
    fn the_table_ends_with_the_counts() {
        let table = dgx().render_table();
        assert!(
            table.ends_with("8 GPUs, 11 MIG instances, 17 assignable devices\n"),
            "{table}"
        );
        assert!(
            table.contains("MIG-0d4b7102-166c-4d26-804d-35a10322fc1b"),
            "{table}"
        );
    }

    #[test]
    fn json_times_are_rfc3339() {
        let json = serde_json::to_value(dgx()).unwrap();
        assert_eq!(json["scanned_at"], "1970-01-01T00:00:00Z");
        assert_eq!(json["devices"][1]["kind"], "mig");
    }
}
