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

/// The refusal owed for a request tonic could not read before any handler
/// saw it (too large, not protobuf, invalid UTF-8 in a string, nesting past
/// prost's limit, a truncated frame), so that it gets INVALID_ARGUMENT with
/// an ErrorInfo like every other bad request rather than tonic's INTERNAL or
/// OUT_OF_RANGE. `None` for a status the agent made itself: each of those
/// carries an ErrorInfo already.
pub fn unreadable_request(status: &Status) -> Option<Refusal> {
    if status.get_details_error_info().is_some() {
        return None;
    }
    let message = match status.code() {
        // OUT_OF_RANGE: the frame is over the decoding limit;
        // RESOURCE_EXHAUSTED: it decompresses past it.
        Code::OutOfRange | Code::ResourceExhausted => format!(
            "the request is too large ({}): send fewer or shorter container.env entries, \
             container.command arguments or container.volumes",
            status.message()
        ),
        Code::Internal => format!(
            "the request is not a readable gpuwarden.v1 message ({}): encode it from \
             proto/gpuwarden/v1, with UTF-8 in every string field",
            status.message()
        ),
        _ => return None,
    };
    Some(Refusal::new(Reason::InvalidRequest, message))
}

/// The reason a client got, read back from a status's ErrorInfo.
pub fn reason_of(status: &Status) -> Option<String> {
    status.get_details_error_info().map(|info| info.reason)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_tonic_could_not_read_become_invalid_request() {
        for (status, says) in [
            (
                Status::out_of_range(
                    "Error, decoded message length too large: found 4194400 bytes, the limit is: 4194304 bytes",
                ),
                "the limit is: 4194304 bytes",
            ),
            (
                Status::resource_exhausted(
                    "Error decompressing: size limit, of 4194304 bytes, exceeded while decompressing message",
                ),
                "4194304",
            ),
            (
                Status::internal(
                    "failed to decode Protobuf message: ContainerSpec.env: invalid string value: data is not UTF-8 encoded",
                ),
                "ContainerSpec.env",
            ),
        ] {
            let refusal = unreadable_request(&status).unwrap();
            assert_eq!(refusal.reason, Reason::InvalidRequest);
            assert!(refusal.message.contains(says), "{}", refusal.message);
            assert_eq!(Status::from(refusal).code(), Code::InvalidArgument);
        }
        // The agent's own statuses, and other codes, are left as they are.
        let own = Status::from(Refusal::new(Reason::LedgerUnavailable, "disk full"));
        assert_eq!(unreadable_request(&own), None);
        let own_size = Status::from(Refusal::new(Reason::NoFreeDevices, "none free"));
        assert_eq!(unreadable_request(&own_size), None);
        assert_eq!(
            unreadable_request(&Status::unimplemented("no such method")),
            None
        );
        assert_eq!(unreadable_request(&Status::cancelled("gone")), None);
    }

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
