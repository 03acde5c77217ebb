//! The link to the fleet's control plane (control-plane mode). The agent
//! registers, reports its status, follows the policy the control plane
//! streams, delivers usage from the ledger's outbox, and asks for each
//! session's slot and credit the way online charging does (RFC 4006
//! Diameter Credit-Control):
//!
//! - CCR-Initial: [`ControlPlane::authorize_session`] before a container
//!   starts: a slot in the account's fleet-wide pool and an initial grant of
//!   service seconds;
//! - CCR-Update: [`ControlPlane::extend_grant`] before the grant runs out,
//!   reporting the used service units since the last request;
//! - CCR-Terminate: [`ControlPlane::release_session`] once the session
//!   ended, with the final used units;
//! - the Final-Unit-Indication of a grant says what to do when it is used
//!   up: terminate (with the end reason the answer names) or continue.
//!
//! The interface is the trait below; `client` implements it over gRPC with
//! mutual TLS, tests implement the server side. `link` runs the long-lived
//! tasks; `credit` holds the pure parts of credit control.

pub mod client;
pub mod credit;
pub mod health;
pub mod link;
pub mod policy;

pub use health::{LinkState, Observed, Retries};

use std::fmt::Debug;
use std::pin::Pin;

use futures_util::Stream;

use crate::proto;

/// The control plane did not answer as it should.
#[derive(Debug, Clone, thiserror::Error)]
pub enum LinkError {
    /// Not reachable (connect, TLS, transport, deadline).
    #[error("the control plane is unreachable: {0}")]
    Unreachable(String),
    /// It answered with an error status.
    #[error("the control plane answered {code}: {message}")]
    Status { code: String, message: String },
    /// It answered something the agent cannot use.
    #[error("the control plane sent a malformed answer: {0}")]
    Malformed(String),
}

impl From<tonic::Status> for LinkError {
    fn from(status: tonic::Status) -> Self {
        // A status with a source was made on this side from a transport
        // error (connect, TLS, a reset), whatever its code.
        let transport = std::error::Error::source(&status).is_some();
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                Self::Unreachable(transport_cause(&status))
            }
            _ if transport => Self::Unreachable(transport_cause(&status)),
            code => Self::Status {
                code: format!("{code:?}"),
                message: status.message().to_owned(),
            },
        }
    }
}

/// Why a call did not reach the control plane: tonic's message, the
/// causes under it (connect, TLS, I/O), and for a certificate problem what
/// to change.
fn transport_cause(status: &tonic::Status) -> String {
    let mut text = crate::error::chain_onto(
        status.message().to_owned(),
        std::error::Error::source(status),
    );
    if let Some(hint) = tls_hint(&text) {
        text.push_str(" (");
        text.push_str(hint);
        text.push(')');
    }
    text
}

/// What a rustls certificate error means for the operator, read from its
/// message (rustls names the problem, e.g. `UnknownIssuer`).
fn tls_hint(cause: &str) -> Option<&'static str> {
    const HINTS: [(&str, &str); 6] = [
        (
            "UnknownIssuer",
            "unknown CA: the control plane's certificate is not signed by the CA in control_plane.ca",
        ),
        (
            "not valid for name",
            "wrong name: the control plane's certificate does not name the endpoint's host",
        ),
        (
            "certificate expired",
            "the control plane's certificate has expired (or this host's clock is wrong)",
        ),
        (
            "certificate not valid yet",
            "the control plane's certificate is not valid yet (or this host's clock is wrong)",
        ),
        (
            "received fatal alert: CertificateRequired",
            "the control plane wants a client certificate: set control_plane.tls_cert and tls_key",
        ),
        (
            "received fatal alert",
            "the control plane refused this agent's certificate: is control_plane.tls_cert signed by a CA the control plane trusts?",
        ),
    ];
    HINTS
        .iter()
        .find(|(needle, _)| cause.contains(needle))
        .map(|(_, hint)| *hint)
}

pub type PolicyStream = Pin<Box<dyn Stream<Item = Result<proto::PolicyUpdate, LinkError>> + Send>>;

/// The control plane as the agent uses it. The messages are the contract's
/// (`proto/gpuwarden/v1/control_plane.proto`); what they mean to the agent
/// is decided in `credit` and `link`.
#[async_trait::async_trait]
pub trait ControlPlane: Send + Sync + Debug + 'static {
    async fn register_node(
        &self,
        request: proto::RegisterNodeRequest,
    ) -> Result<proto::RegisterNodeResponse, LinkError>;
    async fn report_status(&self, status: proto::NodeStatus) -> Result<(), LinkError>;
    async fn watch_policy(
        &self,
        request: proto::WatchPolicyRequest,
    ) -> Result<PolicyStream, LinkError>;
    async fn authorize_session(
        &self,
        request: proto::AuthorizeSessionRequest,
    ) -> Result<proto::CreditControlAnswer, LinkError>;
    async fn extend_grant(
        &self,
        request: proto::ExtendGrantRequest,
    ) -> Result<proto::CreditControlAnswer, LinkError>;
    async fn release_session(&self, request: proto::ReleaseSessionRequest)
    -> Result<(), LinkError>;
    async fn report_usage(&self, batch: proto::UsageBatch) -> Result<proto::UsageAck, LinkError>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_transport_error_is_unreachable_and_a_certificate_problem_says_what_to_change() {
        let transport = tonic::Status::from_error(Box::new(std::io::Error::other(
            "invalid peer certificate: UnknownIssuer",
        )));
        let LinkError::Unreachable(cause) = LinkError::from(transport) else {
            panic!("a transport error of any code is unreachable");
        };
        assert!(cause.contains("UnknownIssuer"), "{cause}");
        assert!(cause.contains("unknown CA"), "{cause}");
        assert!(cause.contains("control_plane.ca"), "{cause}");

        // An answer the server gave keeps its code.
        let answered = LinkError::from(tonic::Status::permission_denied("not this node"));
        assert!(
            matches!(&answered, LinkError::Status { code, .. } if code == "PermissionDenied"),
            "{answered:?}"
        );
        assert_eq!(tls_hint("connection refused"), None);
    }
}
