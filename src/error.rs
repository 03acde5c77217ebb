//! What the agent says when it refuses a request: one [`Reason`] per
//! contract error (DESIGN.md, "Errors"), carried by [`Refusal`]. The gRPC
//! layer turns these into statuses in one place (`api::status`).

use std::fmt;

/// The `google.rpc.ErrorInfo` reasons of the contract.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Reason {
    SessionLimitReached,
    BalanceExhausted,
    NoFreeDevices,
    DeviceReserved,
    RoleForbidden,
    NotAMember,
    DeviceUnhealthy,
    NodeDraining,
    LedgerUnavailable,
    ControlPlaneUnavailable,
    UnknownAccount,
    UnknownDevice,
    ForbiddenContainerOption,
    InvalidRequest,
    /// Not in DESIGN.md's list: a session id this node does not know.
    UnknownSession,
    /// Not in DESIGN.md's list: the local Docker engine failed or is down.
    ContainerEngineUnavailable,
}

impl Reason {
    pub const ALL: [Reason; 16] = [
        Self::SessionLimitReached,
        Self::BalanceExhausted,
        Self::NoFreeDevices,
        Self::DeviceReserved,
        Self::RoleForbidden,
        Self::NotAMember,
        Self::DeviceUnhealthy,
        Self::NodeDraining,
        Self::LedgerUnavailable,
        Self::ControlPlaneUnavailable,
        Self::UnknownAccount,
        Self::UnknownDevice,
        Self::ForbiddenContainerOption,
        Self::InvalidRequest,
        Self::UnknownSession,
        Self::ContainerEngineUnavailable,
    ];

    /// The reason as it appears on the wire and in the audit log.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::SessionLimitReached => "SESSION_LIMIT_REACHED",
            Self::BalanceExhausted => "BALANCE_EXHAUSTED",
            Self::NoFreeDevices => "NO_FREE_DEVICES",
            Self::DeviceReserved => "DEVICE_RESERVED",
            Self::RoleForbidden => "ROLE_FORBIDDEN",
            Self::NotAMember => "NOT_A_MEMBER",
            Self::DeviceUnhealthy => "DEVICE_UNHEALTHY",
            Self::NodeDraining => "NODE_DRAINING",
            Self::LedgerUnavailable => "LEDGER_UNAVAILABLE",
            Self::ControlPlaneUnavailable => "CONTROL_PLANE_UNAVAILABLE",
            Self::UnknownAccount => "UNKNOWN_ACCOUNT",
            Self::UnknownDevice => "UNKNOWN_DEVICE",
            Self::ForbiddenContainerOption => "FORBIDDEN_CONTAINER_OPTION",
            Self::InvalidRequest => "INVALID_REQUEST",
            Self::UnknownSession => "UNKNOWN_SESSION",
            Self::ContainerEngineUnavailable => "CONTAINER_ENGINE_UNAVAILABLE",
        }
    }

    pub fn parse(reason: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == reason)
    }
}

impl fmt::Display for Reason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A request the agent will not carry out, with a message that says what to
/// change and, where it helps, machine-readable detail (the option refused,
/// the limit reached).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{reason}: {message}")]
pub struct Refusal {
    pub reason: Reason,
    pub message: String,
    pub metadata: Vec<(String, String)>,
}

impl Refusal {
    pub fn new(reason: Reason, message: impl Into<String>) -> Self {
        Self {
            reason,
            message: message.into(),
            metadata: Vec::new(),
        }
    }

    pub fn with(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.metadata.push((key.into(), value.into()));
        self
    }
}

/// An error and its sources joined with `: `, for one log or terminal line.
/// A source whose text its parent already quotes is not repeated.
pub fn chain(error: &dyn std::error::Error) -> String {
    chain_onto(error.to_string(), error.source())
}

/// `text`, then each cause from `source` on that it does not already say.
pub fn chain_onto(mut text: String, mut source: Option<&dyn std::error::Error>) -> String {
    while let Some(cause) = source {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            text.push_str(": ");
            text.push_str(&cause_text);
        }
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot read x.pem: {source}")]
    struct Quoting {
        source: std::io::Error,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("transport error")]
    struct Terse {
        #[source]
        source: std::io::Error,
    }

    #[test]
    fn chains_add_what_the_parent_does_not_already_say() {
        let io = || std::io::Error::new(std::io::ErrorKind::NotFound, "no such file");
        assert_eq!(
            chain(&Quoting { source: io() }),
            "cannot read x.pem: no such file"
        );
        assert_eq!(
            chain(&Terse { source: io() }),
            "transport error: no such file"
        );
    }

    #[test]
    fn reasons_round_trip_through_their_wire_names() {
        for reason in Reason::ALL {
            assert_eq!(Reason::parse(reason.as_str()), Some(reason));
        }
        assert_eq!(Reason::parse("NOPE"), None);
    }
}
