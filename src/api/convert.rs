//! Domain types to protobuf messages and back. Nothing here decides
//! anything; it only changes shape.

use std::time::SystemTime;

use crate::clock::UnixNanos;
use crate::error::{Reason, Refusal};
use crate::events::{BalanceNotice, Event, EventKind};
use crate::gpu::{BackendKind, DeviceUuid};
use crate::inventory::{DeviceKind, DeviceView, Health, InventoryView, LinkView};
use crate::ledger::{Actor, AuditEntry, PageKey};
use crate::metering::Credits;
use crate::proto;
use crate::session::manager::UsageReport;
use crate::session::request::{ContainerRequest, LaunchRequest, VolumeRequest};
use crate::session::{
    BillingPath, EndReason, Principal, PrincipalKind, Scope, SessionId, SessionRecord, SessionState,
};

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
            control_plane: view
                .control_plane
                .as_ref()
                .map(|link| proto::ControlPlaneLink {
                    up: link.up,
                    since: Some(timestamp(link.since)),
                    policy_version: link.policy_version,
                    outbox_backlog: link.outbox_backlog,
                }),
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
        let mut view = InventoryView::new(
            inventory.node_id,
            inventory.hostname,
            inventory.driver_version,
            inventory.cuda_version,
            backend,
            system_time(inventory.scanned_at),
            inventory.draining,
            devices,
        );
        view.control_plane = inventory.control_plane.map(|link| LinkView {
            up: link.up,
            since: system_time(link.since),
            policy_version: link.policy_version,
            outbox_backlog: link.outbox_backlog,
        });
        Ok(view)
    }
}

/// A principal from a request; an unspecified kind is a user.
pub fn principal(principal: Option<proto::Principal>) -> Result<Option<Principal>, Refusal> {
    let Some(principal) = principal else {
        return Ok(None);
    };
    let kind = match proto::PrincipalKind::try_from(principal.kind) {
        Ok(proto::PrincipalKind::Unspecified | proto::PrincipalKind::User) => PrincipalKind::User,
        Ok(proto::PrincipalKind::ServiceAccount) => PrincipalKind::ServiceAccount,
        Err(_) => {
            return Err(Refusal::new(
                Reason::InvalidRequest,
                format!("principal.kind {} is not a PrincipalKind", principal.kind),
            ));
        }
    };
    Ok(Some(Principal {
        subject: principal.subject,
        kind,
    }))
}

fn scope(value: i32) -> Result<Option<Scope>, Refusal> {
    match proto::Scope::try_from(value) {
        Ok(proto::Scope::Unspecified) => Ok(None),
        Ok(proto::Scope::Personal) => Ok(Some(Scope::Personal)),
        Ok(proto::Scope::Org) => Ok(Some(Scope::Org)),
        Err(_) => Err(Refusal::new(
            Reason::InvalidRequest,
            format!("scope {value} is not a Scope: use SCOPE_PERSONAL or SCOPE_ORG"),
        )),
    }
}

impl TryFrom<proto::LaunchRequest> for LaunchRequest {
    type Error = Refusal;

    fn try_from(request: proto::LaunchRequest) -> Result<Self, Refusal> {
        let devices = request.devices.unwrap_or_default();
        let container = request.container.unwrap_or_default();
        Ok(LaunchRequest {
            request_id: request.request_id,
            principal: principal(request.principal)?,
            scope: scope(request.scope)?,
            org_id: request.org_id,
            gpu_count: devices.gpu_count,
            gpu_model: devices.gpu_model,
            mig_profile: devices.mig_profile,
            mig_count: devices.mig_count,
            device_uuids: devices.device_uuids,
            container: ContainerRequest {
                image: container.image,
                command: container.command,
                env: container.env.into_iter().collect(),
                volumes: container
                    .volumes
                    .into_iter()
                    .map(|v| VolumeRequest {
                        name: v.name,
                        target: v.target,
                        read_only: v.read_only,
                    })
                    .collect(),
                privileged: container.privileged,
                network_mode: container.network_mode,
                pid_mode: container.pid_mode,
                ipc_mode: container.ipc_mode,
                cap_add: container.cap_add,
                devices: container.devices,
                binds: container.binds,
            },
        })
    }
}

pub fn nanos_timestamp(at: Option<UnixNanos>) -> Option<prost_types::Timestamp> {
    at.map(UnixNanos::to_timestamp)
}

/// A session as the API shows it; a running session's usage runs to `now`.
pub fn session(record: &SessionRecord, now: UnixNanos) -> proto::Session {
    let (device_seconds, gpu_seconds) = record.usage_until(now);
    let state = match record.state {
        SessionState::Starting => proto::SessionState::Starting,
        SessionState::Running => proto::SessionState::Running,
        SessionState::Stopping => proto::SessionState::Stopping,
        SessionState::Ended => proto::SessionState::Ended,
    };
    proto::Session {
        id: record.id.0.clone(),
        request_id: record.request_id.clone(),
        scope: scope_to_proto(record.scope),
        account_id: record.account_id.clone(),
        billed_account_id: record.billed_account_id.clone(),
        owner: record.owner.subject.clone(),
        owner_kind: principal_kind_to_proto(record.owner.kind),
        device_uuids: record.devices.iter().map(|d| d.uuid.to_string()).collect(),
        container_id: record.container_id.clone().unwrap_or_default(),
        state: state.into(),
        started_at: nanos_timestamp(record.started_at),
        ended_at: nanos_timestamp(record.ended_at),
        device_seconds,
        gpu_seconds,
        cost: credits(record.cost_until(now)),
        billing_path: billing_path_to_proto(record.billing_path),
        end_reason: end_reason_to_proto(record.end_reason),
        end_detail: record.end_detail.clone(),
        node_id: record.node_id.clone(),
        image: record.image.clone(),
    }
}

/// An amount of credits on the wire.
pub fn credits(amount: Credits) -> Option<proto::Credits> {
    Some(proto::Credits {
        nano_credits: amount.0,
    })
}

pub fn scope_to_proto(scope: Scope) -> i32 {
    match scope {
        Scope::Personal => proto::Scope::Personal,
        Scope::Org => proto::Scope::Org,
    }
    .into()
}

pub fn billing_path_to_proto(path: BillingPath) -> i32 {
    match path {
        BillingPath::Balance => proto::BillingPath::Balance,
        BillingPath::Reservation => proto::BillingPath::Reservation,
    }
    .into()
}

pub fn principal_kind_to_proto(kind: PrincipalKind) -> i32 {
    match kind {
        PrincipalKind::User => proto::PrincipalKind::User,
        PrincipalKind::ServiceAccount => proto::PrincipalKind::ServiceAccount,
    }
    .into()
}

/// The one table between the two: [`end_reason_from_proto`] reads it
/// backwards.
pub fn end_reason_to_proto(reason: Option<EndReason>) -> i32 {
    match reason {
        None => proto::EndReason::Unspecified,
        Some(EndReason::Stopped) => proto::EndReason::Stopped,
        Some(EndReason::Exited) => proto::EndReason::Exited,
        Some(EndReason::Removed) => proto::EndReason::Removed,
        Some(EndReason::BalanceExhausted) => proto::EndReason::BalanceExhausted,
        Some(EndReason::ReservationStarted) => proto::EndReason::ReservationStarted,
        Some(EndReason::GrantDenied) => proto::EndReason::GrantDenied,
        Some(EndReason::ControlPlaneUnavailable) => proto::EndReason::ControlPlaneUnavailable,
        Some(EndReason::LaunchFailed) => proto::EndReason::LaunchFailed,
        Some(EndReason::DeviceLost) => proto::EndReason::DeviceLost,
    }
    .into()
}

/// An end reason the control plane sent; `None` for unspecified or unknown.
pub fn end_reason_from_proto(value: i32) -> Option<EndReason> {
    EndReason::ALL
        .iter()
        .copied()
        .find(|reason| end_reason_to_proto(Some(*reason)) == value)
}

/// The token of the page after `key`: opaque to clients.
pub fn page_token(key: Option<&PageKey>) -> String {
    key.map(|key| format!("{}.{}", key.created_at.0, key.id))
        .unwrap_or_default()
}

/// The page a `page_token` names; empty is the first page.
pub fn page_key(token: &str) -> Result<Option<PageKey>, Refusal> {
    if token.is_empty() {
        return Ok(None);
    }
    let parsed = token.split_once('.').and_then(|(at, id)| {
        let at = at.parse::<i64>().ok()?;
        (!id.is_empty() && id.len() <= 128).then(|| PageKey {
            created_at: UnixNanos(at),
            id: SessionId(id.to_owned()),
        })
    });
    parsed.map(Some).ok_or_else(|| {
        Refusal::new(
            Reason::InvalidRequest,
            "page_token is not one this agent gave: pass the next_page_token of the previous page, or none for the first",
        )
    })
}

/// A timestamp of a request as nanoseconds; unset is `default`.
pub fn request_time(at: Option<prost_types::Timestamp>, default: UnixNanos) -> UnixNanos {
    at.map_or(default, |t| UnixNanos::from_timestamp(&t))
}

pub fn usage_report(report: &UsageReport) -> proto::UsageReport {
    proto::UsageReport {
        account_id: report.account_id.clone(),
        from: nanos_timestamp(Some(report.from)),
        to: nanos_timestamp(Some(report.to)),
        lines: report
            .lines
            .iter()
            .map(|line| proto::UsageLine {
                account_id: line.account_id.clone(),
                scope: scope_to_proto(line.scope),
                billing_path: billing_path_to_proto(line.billing_path),
                device_class: line.device_class.clone(),
                device_seconds: line.device_ms as f64 / 1000.0,
                gpu_seconds: line.gpu_seconds,
                cost: credits(line.cost),
            })
            .collect(),
        billed_account_id: report.billed_account_id.clone(),
        balance: credits(report.balance),
    }
}

pub fn audit_entry(entry: &AuditEntry) -> proto::AuditEntry {
    let record = &entry.record;
    let actor_kind = match &record.actor {
        Actor::Principal(principal) => principal_kind_to_proto(principal.kind),
        Actor::Operator | Actor::Agent => proto::PrincipalKind::Unspecified.into(),
    };
    proto::AuditEntry {
        id: u64::try_from(entry.id).unwrap_or_default(),
        at: nanos_timestamp(Some(record.at)),
        action: record.action.as_str().to_owned(),
        actor: record.actor.to_string(),
        actor_kind,
        account_id: record.account_id.clone(),
        session_id: record.session_id.clone(),
        reason: record.reason.clone(),
        detail: record.detail.clone(),
    }
}

fn balance_event(notice: &BalanceNotice) -> proto::BalanceEvent {
    proto::BalanceEvent {
        account_id: notice.account_id.clone(),
        balance: credits(notice.balance),
        session_ids: notice.session_ids.iter().map(|id| id.0.clone()).collect(),
        stop_at: nanos_timestamp(notice.stop_at),
    }
}

pub fn event(event: &Event, now: UnixNanos) -> proto::Event {
    use proto::event::Kind;
    let kind = match &event.kind {
        EventKind::SessionStarted(record) => Kind::SessionStarted(proto::SessionEvent {
            session: Some(session(record, now)),
        }),
        EventKind::SessionEnded(record) => Kind::SessionEnded(proto::SessionEvent {
            session: Some(session(record, now)),
        }),
        EventKind::LaunchRefused {
            request_id,
            principal,
            account_id,
            reason,
            message,
        } => Kind::LaunchRefused(proto::LaunchRefused {
            request_id: request_id.clone(),
            principal: principal.as_ref().map(|p| proto::Principal {
                subject: p.subject.clone(),
                kind: principal_kind_to_proto(p.kind),
            }),
            account_id: account_id.clone(),
            reason: reason.as_str().to_owned(),
            message: message.clone(),
        }),
        EventKind::BalanceLow(notice) => Kind::BalanceLow(balance_event(notice)),
        EventKind::BalanceExhausted(notice) => Kind::BalanceExhausted(balance_event(notice)),
        EventKind::SessionStopScheduled {
            session_id,
            reason,
            stop_at,
            ..
        } => Kind::SessionStopScheduled(proto::SessionStopScheduled {
            session_id: session_id.0.clone(),
            reason: end_reason_to_proto(Some(*reason)),
            stop_at: nanos_timestamp(Some(*stop_at)),
        }),
        EventKind::DrainChanged { draining, reason } => Kind::DrainChanged(proto::DrainChanged {
            draining: *draining,
            reason: reason.clone(),
        }),
        EventKind::DeviceHealthChanged {
            device,
            health,
            cause,
        } => Kind::DeviceHealthChanged(proto::DeviceHealthChanged {
            device_uuid: device.to_string(),
            health: Some(proto::HealthStatus {
                state: health_to_proto(*health).into(),
                reason: cause.clone(),
                ..Default::default()
            }),
        }),
        EventKind::InventoryChanged { added, removed } => {
            Kind::InventoryChanged(proto::InventoryChanged {
                added_uuids: added.iter().map(ToString::to_string).collect(),
                removed_uuids: removed.iter().map(ToString::to_string).collect(),
            })
        }
    };
    proto::Event {
        sequence: event.sequence,
        at: nanos_timestamp(Some(event.at)),
        kind: Some(kind),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::simulated::load_fixture;
    use std::path::Path;
    use std::time::Duration;

    #[test]
    fn every_end_reason_has_its_own_proto_value_and_comes_back() {
        let unspecified = i32::from(proto::EndReason::Unspecified);
        assert_eq!(end_reason_to_proto(None), unspecified);
        assert_eq!(end_reason_from_proto(unspecified), None);
        assert_eq!(end_reason_from_proto(9_999), None);
        for reason in EndReason::ALL {
            let value = end_reason_to_proto(Some(*reason));
            assert_ne!(value, unspecified, "{reason}");
            // The proto's names are the ledger's with a prefix.
            assert_eq!(
                proto::EndReason::try_from(value).unwrap().as_str_name(),
                format!("END_REASON_{reason}")
            );
            assert_eq!(end_reason_from_proto(value), Some(*reason));
        }
    }

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
