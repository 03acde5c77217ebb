//! Device health: what a backend reports ([`HealthEvent`]), which XIDs count
//! ([`is_application_xid`]), and the pure state machine that turns events
//! and the passing of time into a device's health ([`DeviceHealthTracker`]).
//!
//! Per DESIGN.md: a critical XID marks a GPU unhealthy, as does a lost GPU;
//! application XIDs do not. An unhealthy GPU recovers after
//! `health.recovery_seconds` without a new critical XID, or by operator
//! action; a lost GPU only by operator action (it needs a reset or a reboot
//! to come back). Events name full GPUs; a MIG instance is as healthy as its
//! GPU ([`DeviceHealthTracker::effective`]).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::DeviceUuid;

/// Something a backend saw happen to a GPU since it was last asked.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum HealthEvent {
    /// A critical-XID event (NVML `nvmlEventTypeXidCriticalError`). Whether it
    /// makes the GPU unhealthy is [`is_application_xid`]'s call.
    Xid { device: DeviceUuid, xid: u64 },
    /// The GPU has fallen off the bus or is otherwise inaccessible
    /// (NVML_ERROR_GPU_IS_LOST). Reported once each time a GPU is lost.
    Lost { device: DeviceUuid },
}

impl HealthEvent {
    pub fn device(&self) -> &DeviceUuid {
        match self {
            Self::Xid { device, .. } | Self::Lost { device } => device,
        }
    }
}

/// XIDs caused by the application running on the GPU rather than by the GPU:
/// 13 (graphics engine exception), 31 (GPU memory page fault), 43 (GPU
/// stopped processing), 45 (preemptive cleanup), 68 (video processor
/// exception), 109 (context switch timeout). They do not make a device
/// unhealthy; every other XID of a critical-XID event does.
pub const APPLICATION_XIDS: [u64; 6] = [13, 31, 43, 45, 68, 109];

/// Whether `xid` is an application XID, which leaves the device healthy.
pub fn is_application_xid(xid: u64) -> bool {
    APPLICATION_XIDS.contains(&xid)
}

/// A device's health as the tracker sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceHealth {
    Healthy,
    /// A critical XID arrived at `since` (the latest one: each new critical
    /// XID restarts the recovery clock).
    Unhealthy {
        since: Instant,
        last_xid: u64,
    },
    /// Fell off the bus; never recovers by time.
    Lost,
}

impl DeviceHealth {
    pub fn is_healthy(&self) -> bool {
        matches!(self, Self::Healthy)
    }

    /// `healthy`, `unhealthy` or `lost`, for tables, JSON and metric labels.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Healthy => "healthy",
            Self::Unhealthy { .. } => "unhealthy",
            Self::Lost => "lost",
        }
    }

    /// Orders states by how bad they are, for a MIG instance's effective
    /// health.
    fn severity(&self) -> u8 {
        match self {
            Self::Healthy => 0,
            Self::Unhealthy { .. } => 1,
            Self::Lost => 2,
        }
    }
}

/// Why a device's health changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HealthCause {
    /// A critical XID (this one) made a healthy device unhealthy.
    CriticalXid(u64),
    /// The device was reported lost.
    Lost,
    /// `recovery` passed without a new critical XID.
    Recovered,
    /// The operator reset the device's health.
    Reset,
}

/// A device whose health moved from one state to another: what a caller
/// publishes as an event. Only moves between healthy, unhealthy and lost are
/// reported; a further critical XID on an unhealthy device restarts its
/// recovery clock without a change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HealthChange {
    pub device: DeviceUuid,
    pub from: DeviceHealth,
    pub to: DeviceHealth,
    pub cause: HealthCause,
}

/// The health of every device that is not healthy, driven by
/// [`HealthEvent`]s, the clock and the operator. Pure: time is passed in.
#[derive(Debug, Clone, Default)]
pub struct DeviceHealthTracker {
    /// Devices not healthy; a device absent here is healthy.
    states: BTreeMap<DeviceUuid, DeviceHealth>,
}

impl DeviceHealthTracker {
    pub fn new() -> Self {
        Self::default()
    }

    /// The health of `device` (healthy when nothing was ever recorded).
    pub fn health(&self, device: &DeviceUuid) -> DeviceHealth {
        self.states
            .get(device)
            .copied()
            .unwrap_or(DeviceHealth::Healthy)
    }

    /// The health a device has for scheduling: its own, or its parent GPU's
    /// when that is worse (a MIG instance of a lost GPU is lost).
    pub fn effective(&self, device: &DeviceUuid, parent: Option<&DeviceUuid>) -> DeviceHealth {
        let own = self.health(device);
        match parent.map(|parent| self.health(parent)) {
            Some(theirs) if theirs.severity() > own.severity() => theirs,
            _ => own,
        }
    }

    /// Applies one event at `now`; returns the change it made, if any.
    pub fn record(&mut self, event: &HealthEvent, now: Instant) -> Option<HealthChange> {
        let device = event.device();
        let from = self.health(device);
        let (to, cause) = match (event, from) {
            (_, DeviceHealth::Lost) => return None,
            (HealthEvent::Lost { .. }, _) => (DeviceHealth::Lost, HealthCause::Lost),
            (&HealthEvent::Xid { xid, .. }, _) if is_application_xid(xid) => return None,
            (&HealthEvent::Xid { xid, .. }, _) => (
                DeviceHealth::Unhealthy {
                    since: now,
                    last_xid: xid,
                },
                HealthCause::CriticalXid(xid),
            ),
        };
        self.states.insert(device.clone(), to);
        // An unhealthy device stays unhealthy: its clock restarted, no change.
        (from.severity() != to.severity()).then(|| HealthChange {
            device: device.clone(),
            from,
            to,
            cause,
        })
    }

    /// Recovers every unhealthy device whose last critical XID is at least
    /// `recovery` before `now` (exactly `recovery` counts). Lost devices stay
    /// lost.
    pub fn tick(&mut self, now: Instant, recovery: Duration) -> Vec<HealthChange> {
        let mut changes = Vec::new();
        self.states.retain(|device, health| match *health {
            DeviceHealth::Unhealthy { since, .. }
                if now.saturating_duration_since(since) >= recovery =>
            {
                changes.push(HealthChange {
                    device: device.clone(),
                    from: *health,
                    to: DeviceHealth::Healthy,
                    cause: HealthCause::Recovered,
                });
                false
            }
            _ => true,
        });
        changes
    }

    /// The operator's reset: `device` is healthy again, whatever it was.
    pub fn reset(&mut self, device: &DeviceUuid) -> Option<HealthChange> {
        self.states.remove(device).map(|from| HealthChange {
            device: device.clone(),
            from,
            to: DeviceHealth::Healthy,
            cause: HealthCause::Reset,
        })
    }

    /// Devices that are unhealthy or lost, in UUID order.
    #[cfg(test)]
    pub fn unhealthy(&self) -> Vec<DeviceUuid> {
        self.states.keys().cloned().collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GPU: &str = "GPU-b644960d-a808-45b0-b4e1-f6add005db2d";
    const OTHER: &str = "GPU-116bf74a-3c17-4839-a37a-c5835ed8645b";
    const RECOVERY: Duration = Duration::from_secs(600);

    fn gpu() -> DeviceUuid {
        DeviceUuid::new(GPU)
    }

    fn xid(xid: u64) -> HealthEvent {
        HealthEvent::Xid { device: gpu(), xid }
    }

    fn secs(s: u64) -> Duration {
        Duration::from_secs(s)
    }

    #[test]
    fn application_xids_are_the_six_of_the_design() {
        for xid in [13, 31, 43, 45, 68, 109] {
            assert!(is_application_xid(xid), "{xid}");
        }
        for xid in [
            0, 8, 12, 14, 32, 44, 48, 63, 64, 74, 79, 92, 94, 95, 108, 110, 119, 999,
        ] {
            assert!(!is_application_xid(xid), "{xid}");
        }
    }

    #[test]
    fn a_critical_xid_makes_a_device_unhealthy_and_says_so() {
        let mut tracker = DeviceHealthTracker::new();
        let t0 = Instant::now();
        let change = tracker.record(&xid(79), t0).unwrap();
        assert_eq!(change.device, gpu());
        assert_eq!(change.from, DeviceHealth::Healthy);
        assert_eq!(
            change.to,
            DeviceHealth::Unhealthy {
                since: t0,
                last_xid: 79
            }
        );
        assert_eq!(change.cause, HealthCause::CriticalXid(79));
        assert_eq!(tracker.unhealthy(), [gpu()]);
        assert_eq!(
            tracker.health(&DeviceUuid::new(OTHER)),
            DeviceHealth::Healthy
        );
    }

    #[test]
    fn an_application_xid_is_ignored() {
        let mut tracker = DeviceHealthTracker::new();
        let t0 = Instant::now();
        assert_eq!(tracker.record(&xid(13), t0), None);
        assert_eq!(tracker.record(&xid(43), t0), None);
        assert!(tracker.health(&gpu()).is_healthy());
        assert!(tracker.unhealthy().is_empty());
        // Nor does it restart the recovery clock of an unhealthy device.
        tracker.record(&xid(48), t0);
        assert_eq!(tracker.record(&xid(31), t0 + secs(500)), None);
        assert_eq!(tracker.tick(t0 + RECOVERY, RECOVERY).len(), 1);
    }

    #[test]
    fn recovery_happens_exactly_at_the_boundary_not_before() {
        let mut tracker = DeviceHealthTracker::new();
        let t0 = Instant::now();
        tracker.record(&xid(79), t0);
        let just_before = t0 + RECOVERY - Duration::from_nanos(1);
        assert!(tracker.tick(just_before, RECOVERY).is_empty());
        assert!(!tracker.health(&gpu()).is_healthy());
        let changes = tracker.tick(t0 + RECOVERY, RECOVERY);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].to, DeviceHealth::Healthy);
        assert_eq!(changes[0].cause, HealthCause::Recovered);
        assert!(tracker.health(&gpu()).is_healthy());
        // Recovered once: the next tick has nothing to say.
        assert!(tracker.tick(t0 + RECOVERY * 2, RECOVERY).is_empty());
    }

    #[test]
    fn a_new_critical_xid_restarts_the_recovery_clock_without_a_change() {
        let mut tracker = DeviceHealthTracker::new();
        let t0 = Instant::now();
        tracker.record(&xid(79), t0);
        let t1 = t0 + secs(300);
        assert_eq!(tracker.record(&xid(48), t1), None);
        assert_eq!(
            tracker.health(&gpu()),
            DeviceHealth::Unhealthy {
                since: t1,
                last_xid: 48
            }
        );
        assert!(tracker.tick(t0 + RECOVERY, RECOVERY).is_empty());
        assert_eq!(tracker.tick(t1 + RECOVERY, RECOVERY).len(), 1);
    }

    #[test]
    fn lost_stays_lost_until_reset() {
        let mut tracker = DeviceHealthTracker::new();
        let t0 = Instant::now();
        tracker.record(&xid(79), t0);
        let change = tracker
            .record(&HealthEvent::Lost { device: gpu() }, t0 + secs(1))
            .unwrap();
        assert_eq!(change.to, DeviceHealth::Lost);
        assert_eq!(change.cause, HealthCause::Lost);
        assert!(matches!(change.from, DeviceHealth::Unhealthy { .. }));
        // Time does not bring it back, nor do further events change it.
        assert!(tracker.tick(t0 + RECOVERY * 100, RECOVERY).is_empty());
        assert_eq!(tracker.record(&xid(79), t0 + secs(2)), None);
        assert_eq!(
            tracker.record(&HealthEvent::Lost { device: gpu() }, t0 + secs(3)),
            None
        );
        assert_eq!(tracker.health(&gpu()), DeviceHealth::Lost);
        let reset = tracker.reset(&gpu()).unwrap();
        assert_eq!(
            (reset.from, reset.to),
            (DeviceHealth::Lost, DeviceHealth::Healthy)
        );
        assert_eq!(reset.cause, HealthCause::Reset);
        assert!(tracker.unhealthy().is_empty());
    }

    #[test]
    fn reset_of_a_healthy_device_changes_nothing() {
        let mut tracker = DeviceHealthTracker::new();
        assert_eq!(tracker.reset(&gpu()), None);
        tracker.record(&xid(79), Instant::now());
        assert!(tracker.reset(&gpu()).is_some());
        assert_eq!(tracker.reset(&gpu()), None);
    }

    #[test]
    fn a_lost_healthy_device_is_reported_lost() {
        let mut tracker = DeviceHealthTracker::new();
        let change = tracker
            .record(&HealthEvent::Lost { device: gpu() }, Instant::now())
            .unwrap();
        assert_eq!(
            (change.from, change.to),
            (DeviceHealth::Healthy, DeviceHealth::Lost)
        );
    }

    #[test]
    fn tick_recovers_each_device_on_its_own_clock() {
        let mut tracker = DeviceHealthTracker::new();
        let t0 = Instant::now();
        let other = DeviceUuid::new(OTHER);
        tracker.record(&xid(79), t0);
        tracker.record(
            &HealthEvent::Xid {
                device: other.clone(),
                xid: 94,
            },
            t0 + secs(100),
        );
        assert_eq!(tracker.unhealthy(), [other.clone(), gpu()]);
        let changes = tracker.tick(t0 + RECOVERY, RECOVERY);
        assert_eq!(changes.len(), 1);
        assert_eq!(changes[0].device, gpu());
        assert_eq!(tracker.unhealthy(), [other]);
    }

    #[test]
    fn a_mig_instance_is_as_healthy_as_its_gpu() {
        let mut tracker = DeviceHealthTracker::new();
        let mig = DeviceUuid::new("MIG-0d4b7102-166c-4d26-804d-35a10322fc1b");
        assert!(tracker.effective(&mig, Some(&gpu())).is_healthy());
        tracker.record(&HealthEvent::Lost { device: gpu() }, Instant::now());
        assert_eq!(tracker.effective(&mig, Some(&gpu())), DeviceHealth::Lost);
        assert!(tracker.effective(&mig, None).is_healthy());
        assert_eq!(DeviceHealth::Lost.as_str(), "lost");
    }
}
