//! The one place agent errors become gRPC statuses: every code and
//! `google.rpc.ErrorInfo` reason of the contract is decided here.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, StatusExt};

use crate::error::{Reason, Refusal};

/// The `ErrorInfo.domain` of every gpuwarden error.
pub const ERROR_DOMAIN: &str = "gpuwarden";

/// The gRPC code of each reason (DESIGN.md, "Errors").
pub fn code_of(reason: Reason) -> Code {
    match reason {
        Reason::SessionLimitReached | Reason::BalanceExhausted | Reason::NoFreeDevices => {
            Code::ResourceExhausted
        }
        Reason::DeviceReserved | Reason::RoleForbidden | Reason::NotAMember => {
            Code::PermissionDenied
        }
        // The node is in a state that retrying here will not change: the
        // scheduler should pick another node or device.
        Reason::DeviceUnhealthy | Reason::NodeDraining => Code::FailedPrecondition,
        // Transient: the same request may succeed here later.
        Reason::LedgerUnavailable
        | Reason::ControlPlaneUnavailable
        | Reason::ContainerEngineUnavailable => Code::Unavailable,
        Reason::UnknownAccount | Reason::UnknownDevice | Reason::UnknownSession => Code::NotFound,
        Reason::ForbiddenContainerOption | Reason::InvalidRequest => Code::InvalidArgument,
    }
}

impl From<Refusal> for Status {
    fn from(refusal: Refusal) -> Self {
        let metadata: std::collections::HashMap<String, String> =
            refusal.metadata.into_iter().collect();
        Status::with_error_details(
            code_of(refusal.reason),
            refusal.message,
            ErrorDetails::with_error_info(refusal.reason.as_str(), ERROR_DOMAIN, metadata),
        )
    }
}

/// The reason a client got, read back from a status's ErrorInfo.
pub fn reason_of(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_reason_carries_its_code_and_error_info() {
        let expected = [
            ("SESSION_LIMIT_REACHED", Code::ResourceExhausted),
            ("BALANCE_EXHAUSTED", Code::ResourceExhausted),
            ("NO_FREE_DEVICES", Code::ResourceExhausted),
            ("DEVICE_RESERVED", Code::PermissionDenied),
            ("ROLE_FORBIDDEN", Code::PermissionDenied),
            ("NOT_A_MEMBER", Code::PermissionDenied),
            ("DEVICE_UNHEALTHY", Code::FailedPrecondition),
            ("NODE_DRAINING", Code::FailedPrecondition),
            ("LEDGER_UNAVAILABLE", Code::Unavailable),
            ("CONTROL_PLANE_UNAVAILABLE", Code::Unavailable),
            ("UNKNOWN_ACCOUNT", Code::NotFound),
            ("UNKNOWN_DEVICE", Code::NotFound),
            ("FORBIDDEN_CONTAINER_OPTION", Code::InvalidArgument),
            ("INVALID_REQUEST", Code::InvalidArgument),
            ("UNKNOWN_SESSION", Code::NotFound),
            ("CONTAINER_ENGINE_UNAVAILABLE", Code::Unavailable),
        ];
        assert_eq!(expected.len(), Reason::ALL.len());
        for (name, code) in expected {
            let reason = Reason::parse(name).unwrap();
            let status = Status::from(
                Refusal::new(reason, "set devices.gpu_count to 2 or less").with("limit", "2"),
            );
            assert_eq!(status.code(), code, "{name}");
            assert_eq!(status.message(), "set devices.gpu_count to 2 or less");
            let info = status.get_details_error_info().unwrap();
            assert_eq!(info.reason, name);
            assert_eq!(info.domain, ERROR_DOMAIN);
            assert_eq!(info.metadata.get("limit").map(String::as_str), Some("2"));
            assert_eq!(reason_of(&status).as_deref(), Some(name));
        }
    }
}
