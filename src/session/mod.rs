//! Sessions: one container holding exactly its devices, metered from
//! Docker's StartedAt to its FinishedAt. `request` validates what a launch
//! may ask for; `manager` runs launches, stops, Docker's events, checkpoints
//! and the reconcile after a restart.

pub mod manager;
pub mod request;

use std::fmt;

use crate::clock::UnixNanos;
use crate::metering::{Credits, MeteredDevice};

/// A session's id, `s-` and 32 hex digits.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(pub String);

impl SessionId {
    pub fn generate() -> Self {
        Self(format!("s-{}", uuid::Uuid::new_v4().simple()))
    }
}

impl fmt::Display for SessionId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Enums stored as text in the ledger and labels: one table of names each.
macro_rules! text_enum {
    ($(#[$meta:meta])* $name:ident { $($variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum $name { $($variant),+ }

        impl $name {
            pub const ALL: &'static [Self] = &[$(Self::$variant),+];

            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }

            pub fn parse(text: &str) -> Option<Self> {
                match text { $($text => Some(Self::$variant),)+ _ => None }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

pub(crate) use text_enum;

text_enum!(
    /// Whose pool and balance a session uses.
    Scope { Personal = "personal", Org = "org" }
);

text_enum!(PrincipalKind {
    User = "user",
    ServiceAccount = "service_account",
});

text_enum!(SessionState {
    Starting = "starting",
    Running = "running",
    Stopping = "stopping",
    Ended = "ended",
});

text_enum!(BillingPath {
    Balance = "balance",
    Reservation = "reservation",
});

text_enum!(
    /// Why a session ended.
    EndReason {
        Stopped = "STOPPED",
        Exited = "EXITED",
        Removed = "REMOVED",
        BalanceExhausted = "BALANCE_EXHAUSTED",
        ReservationStarted = "RESERVATION_STARTED",
        GrantDenied = "GRANT_DENIED",
        ControlPlaneUnavailable = "CONTROL_PLANE_UNAVAILABLE",
        LaunchFailed = "LAUNCH_FAILED",
        DeviceLost = "DEVICE_LOST",
    }
);

/// Who asks.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Principal {
    pub subject: String,
    pub kind: PrincipalKind,
}

/// Who is calling the API: a principal named in the request, and whether
/// the connection is the local operator's (the Unix socket), who may do
/// anything.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub principal: Option<Principal>,
    pub operator: bool,
}

/// A session as the ledger holds it.
#[derive(Debug, Clone, PartialEq)]
pub struct SessionRecord {
    pub id: SessionId,
    pub request_id: String,
    pub node_id: String,
    pub scope: Scope,
    pub account_id: String,
    pub billed_account_id: String,
    pub owner: Principal,
    pub image: String,
    pub container_id: Option<String>,
    pub state: SessionState,
    pub billing_path: BillingPath,
    pub created_at: UnixNanos,
    /// Docker's StartedAt.
    pub started_at: Option<UnixNanos>,
    /// Docker's FinishedAt (or, for a container gone without one, the last
    /// instant it was known to run).
    pub ended_at: Option<UnixNanos>,
    /// End of the last usage record cut.
    pub metered_until: Option<UnixNanos>,
    pub end_reason: Option<EndReason>,
    pub end_detail: String,
    pub devices: Vec<MeteredDevice>,
    /// Sums of the usage records cut so far.
    pub recorded: RecordedUsage,
}

#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct RecordedUsage {
    pub device_ms: i64,
    pub gpu_seconds: f64,
    pub cost: Credits,
}

impl SessionRecord {
    pub fn is_open(&self) -> bool {
        self.state != SessionState::Ended
    }

    /// Why a STOPPING session ends: the reason recorded when its stop
    /// began (a balance, a reservation window), a plain stop otherwise.
    pub fn stop_reason(&self) -> EndReason {
        self.end_reason.unwrap_or(EndReason::Stopped)
    }

    /// The session's device UUIDs, comma-separated: the form of the
    /// devices label and the device variables.
    pub fn device_list(&self) -> String {
        self.devices
            .iter()
            .map(|d| d.uuid.as_str())
            .collect::<Vec<_>>()
            .join(",")
    }

    /// Device-seconds and GPU-seconds from Docker's StartedAt to its
    /// FinishedAt, or to `now` while running; the same millisecond cuts as
    /// the usage records, so an ended session's figures equal their sums.
    pub fn usage_until(&self, now: UnixNanos) -> (f64, f64) {
        let Some(start) = self.started_at else {
            return (0.0, 0.0);
        };
        let end = self.ended_at.unwrap_or(now);
        let ms = crate::metering::device_ms(start, end);
        let device_seconds = ms as f64 / 1000.0 * self.devices.len() as f64;
        let gpu_seconds = self
            .devices
            .iter()
            .map(|d| crate::metering::gpu_seconds(ms, d.weight))
            .sum();
        (device_seconds, gpu_seconds)
    }

    /// The cost so far: what the usage records hold, and while the session
    /// runs, what the next cut will add up to `now` (the same arithmetic).
    pub fn cost_until(&self, now: UnixNanos) -> Credits {
        let pending = match (self.state, self.metered_until) {
            (SessionState::Running | SessionState::Stopping, Some(from)) if now > from => {
                crate::metering::cut(&self.devices, from, now)
                    .iter()
                    .map(|cut| cut.cost)
                    .sum()
            }
            _ => Credits::ZERO,
        };
        self.recorded.cost + pending
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn text_enums_round_trip() {
        for reason in [
            EndReason::Stopped,
            EndReason::LaunchFailed,
            EndReason::DeviceLost,
        ] {
            assert_eq!(EndReason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(Scope::parse("org"), Some(Scope::Org));
        assert_eq!(SessionState::parse("nope"), None);
    }

    #[test]
    fn session_ids_are_unique_and_plain() {
        let a = SessionId::generate();
        assert_ne!(a, SessionId::generate());
        assert!(a.0.starts_with("s-") && a.0.len() == 34, "{a}");
    }
}
