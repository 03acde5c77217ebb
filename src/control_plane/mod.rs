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
pub mod link;
pub mod policy;

use std::fmt::Debug;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, Ordering};

use futures_util::Stream;

use crate::clock::UnixNanos;
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
        match status.code() {
            tonic::Code::Unavailable | tonic::Code::DeadlineExceeded | tonic::Code::Cancelled => {
                Self::Unreachable(status.message().to_owned())
            }
            code => Self::Status {
                code: format!("{code:?}"),
                message: status.message().to_owned(),
            },
        }
    }
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

/// Whether the link is up, since when, and which policy version is held:
/// read by launches (fail closed), the offline grace, metrics and `ctl`.
#[derive(Debug, Default)]
pub struct LinkState {
    up: AtomicBool,
    /// When `up` last changed (ns since the epoch; 0: never).
    changed_at: AtomicI64,
    /// The policy version in force (0: none yet).
    policy_version: AtomicU64,
}

impl LinkState {
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::SeqCst)
    }

    /// Marks the link up or down at `at`; returns whether that changed it.
    pub fn set_up(&self, up: bool, at: UnixNanos) -> bool {
        let was = self.up.swap(up, Ordering::SeqCst);
        if was != up {
            self.changed_at.store(at.0, Ordering::SeqCst);
        }
        was != up
    }

    /// When the link went down (or the agent started without it).
    pub fn down_since(&self) -> Option<UnixNanos> {
        (!self.is_up()).then(|| UnixNanos(self.changed_at.load(Ordering::SeqCst)))
    }

    /// When the link last went up or down.
    pub fn changed_at(&self) -> UnixNanos {
        UnixNanos(self.changed_at.load(Ordering::SeqCst))
    }

    pub fn policy_version(&self) -> u64 {
        self.policy_version.load(Ordering::SeqCst)
    }

    pub fn set_policy_version(&self, version: u64) {
        self.policy_version.store(version, Ordering::SeqCst);
    }

    /// Starts down, counted from `at` (the offline grace runs from start).
    pub fn down_from(at: UnixNanos) -> Self {
        let state = Self::default();
        state.changed_at.store(at.0, Ordering::SeqCst);
        state
    }
}
