//! Domain types to protobuf messages and back. Nothing here decides
//! anything; it only changes shape.

use std::time::SystemTime;

use crate::gpu::{BackendKind, DeviceUuid};
use crate::inventory::{DeviceKind, DeviceView, Health, InventoryView};
use crate::proto;

/// A message that does not describe what it should.
#[derive(Debug, thiserror::Error)]
#[error("malformed {message} from the agent: {problem}")]
pub struct MalformedMessage {
    message: &'static str,
    problem: String,
}

fn malformed(message: &'static str, problem: impl Into<String>) -> MalformedMessage {
    MalformedMessage {
        message,
        problem: problem.into(),
    }
}

fn timestamp(at: SystemTime) -> prost_types::Timestamp {
    at.into()
}

fn system_time(at: Option<prost_types::Timestamp>) -> SystemTime {
    at.and_then(|t| SystemTime::try_from(t).ok())
        .unwrap_or(SystemTime::UNIX_EPOCH)
}

fn health_to_proto(health: Health) -> proto::DeviceHealth {
    match health {
        Health::Healthy => proto::DeviceHealth::Healthy,
        Health::Unhealthy => proto::DeviceHealth::Unhealthy,
        Health::Lost => proto::DeviceHealth::Lost,
    }
}

impl From<&DeviceView> for proto::Device {
    fn from(device: &DeviceView) -> Self {
        let kind = match device.kind {
            DeviceKind::Gpu => proto::DeviceKind::Gpu,
            DeviceKind::Mig => proto::DeviceKind::Mig,
        };
        proto::Device {
            kind: kind.into(),
            uuid: device.uuid.to_string(),
            name: device.name.clone(),
            device_class: device.class.clone(),
            memory_mib: device.memory_mib,
            index: device.index,
            pci_bus_id: device.pci_bus_id.clone().unwrap_or_default(),
            mig_mode: device.mig_mode.unwrap_or_default(),
            parent_uuid: device
                .parent_uuid
                .as_ref()
                .map(ToString::to_string)
                .unwrap_or_default(),
            mig_profile: device.mig_profile.clone().unwrap_or_default(),
            gpu_instance_id: device.gpu_instance_id.unwrap_or_default(),
            compute_instance_id: device.compute_instance_id.unwrap_or_default(),
            compute_slices: device.compute_slices,
            gpu_compute_slices: device.gpu_compute_slices,
            health: Some(proto::HealthStatus {
                state: health_to_proto(device.health).into(),
                ..Default::default()
            }),
            assignable: device.assignable,
            session_id: device.session_id.clone().unwrap_or_default(),
            telemetry: None,
        }
    }
}

impl From<&InventoryView> for proto::Inventory {
    fn from(view: &InventoryView) -> Self {
        proto::Inventory {
            node_id: view.node_id.clone(),
            hostname: view.hostname.clone(),
            driver_version: view.driver_version.clone(),
            cuda_version: view.cuda_version.clone(),
            backend: view.backend.as_str().to_owned(),
            scanned_at: Some(timestamp(view.scanned_at)),
            devices: view.devices.iter().map(proto::Device::from).collect(),
            draining: view.draining,
        }
    }
}

impl TryFrom<proto::Device> for DeviceView {
    type Error = MalformedMessage;

    fn try_from(device: proto::Device) -> Result<Self, Self::Error> {
        let kind = match device.kind() {
            proto::DeviceKind::Gpu => DeviceKind::Gpu,
            proto::DeviceKind::Mig => DeviceKind::Mig,
            proto::DeviceKind::Unspecified => {
                return Err(malformed("Device", format!("{} has no kind", device.uuid)));
            }
        };
        let health = match device.health.as_ref().map(|h| h.state()) {
            Some(proto::DeviceHealth::Healthy) => Health::Healthy,
            Some(proto::DeviceHealth::Unhealthy) => Health::Unhealthy,
            Some(proto::DeviceHealth::Lost) => Health::Lost,
            _ => {
                return Err(malformed(
                    "Device",
                    format!("{} has no health", device.uuid),
                ));
            }
        };
        let gpu = kind == DeviceKind::Gpu;
        let non_empty = |s: String| (!s.is_empty()).then_some(s);
        Ok(DeviceView {
            kind,
            uuid: DeviceUuid::new(device.uuid),
            name: device.name,
            class: device.device_class,
            memory_mib: device.memory_mib,
            index: device.index,
            pci_bus_id: gpu.then_some(device.pci_bus_id),
            mig_mode: gpu.then_some(device.mig_mode),
            parent_uuid: non_empty(device.parent_uuid).map(DeviceUuid::new),
            mig_profile: non_empty(device.mig_profile),
            gpu_instance_id: (!gpu).then_some(device.gpu_instance_id),
            compute_instance_id: (!gpu).then_some(device.compute_instance_id),
            compute_slices: device.compute_slices,
            gpu_compute_slices: device.gpu_compute_slices,
            health,
            assignable: device.assignable,
            session_id: non_empty(device.session_id),
        })
    }
}

impl TryFrom<proto::Inventory> for InventoryView {
    type Error = MalformedMessage;

    fn try_from(inventory: proto::Inventory) -> Result<Self, Self::Error> {
        let backend = match inventory.backend.as_str() {
            "nvml" => BackendKind::Nvml,
            "simulated" => BackendKind::Simulated,
            other => return Err(malformed("Inventory", format!("unknown backend `{other}`"))),
        };
        let devices = inventory
            .devices
            .into_iter()
            .map(DeviceView::try_from)
            .collect::<Result<_, _>>()?;
        Ok(InventoryView::new(
            inventory.node_id,
            inventory.hostname,
            inventory.driver_version,
            inventory.cuda_version,
            backend,
            system_time(inventory.scanned_at),
            inventory.draining,
            devices,
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::simulated::load_fixture;
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn an_inventory_survives_the_trip_through_protobuf() {
        let scan = load_fixture(Path::new("fixtures/sim-dgx-a100.toml")).unwrap();
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_392_000_123);
        let view = InventoryView::from_scan("n1", &scan, at);
        let wire = proto::Inventory::from(&view);
        assert_eq!(wire.devices.len(), 19);
        assert_eq!(wire.devices[1].parent_uuid, wire.devices[0].uuid);
        assert_eq!(wire.devices[1].mig_profile, "1g.10gb");
        assert_eq!(InventoryView::try_from(wire).unwrap(), view);
    }

    #[test]
    fn a_device_without_a_kind_is_malformed() {
        let device = proto::Device {
            uuid: "GPU-x".into(),
            ..Default::default()
        };
        let err = DeviceView::try_from(device).unwrap_err();
        assert!(err.to_string().contains("GPU-x has no kind"), "{err}");
    }
}
