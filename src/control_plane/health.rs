//! Whether the control plane answers, judged from what it does: every call
//! the agent makes goes through [`Observed`], which tells [`LinkState`] of
//! each answer and each failure.
//!
//! - An answer to any call (a registration, a status report, a policy
//!   update, a grant, an acknowledgement, an error status it chose to
//!   send) is evidence the control plane is up: the link is up from then
//!   on. Only calls that got no answer (unreachable, a deadline, a
//!   transport error) count as failures.
//! - One failed or timed-out call is not an outage (a replica restarting, a
//!   lost answer): the link is declared down only after
//!   [`DOWN_AFTER_FAILURES`] calls in a row failed, and then counts as down
//!   from the first of them. That instant starts the offline grace.
//! - Each change, and the first failure to come up, is logged at the
//!   default level with its cause; a TLS failure names the certificate
//!   problem.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::watch;

use super::{ControlPlane, LinkError, PolicyStream};
use crate::clock::{Clock, UnixNanos};
use crate::proto;
use crate::session::SessionId;

/// Calls in a row that must fail before the link counts as down.
pub const DOWN_AFTER_FAILURES: u32 = 3;

/// Whether the link is up, since when, and which policy version is held:
/// read by launches (fail closed), the offline grace, metrics and `ctl`.
#[derive(Debug)]
pub struct LinkState {
    health: Mutex<Health>,
    /// `up`, for tasks that wait for the link to come back.
    up: watch::Sender<bool>,
    /// The policy version in force (0: none yet).
    policy_version: AtomicU64,
}

#[derive(Debug, Clone)]
struct Health {
    up: bool,
    /// When `up` last changed; going down, the first unanswered call.
    changed_at: UnixNanos,
    /// Calls failed in a row since the last answer.
    failures: u32,
    /// The first of those failures.
    failing_since: Option<UnixNanos>,
    /// How many times the link came up: retries scheduled before the last
    /// time go out at once.
    generation: u64,
    /// The causes logged since the link was last up: each is logged once.
    causes: Vec<String>,
}

impl LinkState {
    /// Starts down, counted from `at` (the offline grace runs from start).
    pub fn down_from(at: UnixNanos) -> Self {
        Self {
            health: Mutex::new(Health {
                up: false,
                changed_at: at,
                failures: 0,
                failing_since: None,
                generation: 0,
                causes: Vec::new(),
            }),
            up: watch::Sender::new(false),
            policy_version: AtomicU64::new(0),
        }
    }

    fn health(&self) -> Health {
        self.health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    fn change<T>(&self, change: impl FnOnce(&mut Health) -> T) -> T {
        let mut health = self
            .health
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let result = change(&mut health);
        // Sent under the lock, so the channel never ends on a stale value
        // when two changes race.
        let up = health.up;
        self.up.send_if_modified(|was| {
            let changed = *was != up;
            *was = up;
            changed
        });
        result
    }

    pub fn is_up(&self) -> bool {
        self.health().up
    }

    /// Follows `is_up`: `changed()` wakes at each change.
    pub fn subscribe(&self) -> watch::Receiver<bool> {
        self.up.subscribe()
    }

    /// When the link went down (or the agent started without it).
    pub fn down_since(&self) -> Option<UnixNanos> {
        let health = self.health();
        (!health.up).then_some(health.changed_at)
    }

    /// When the link last went up or down.
    pub fn changed_at(&self) -> UnixNanos {
        self.health().changed_at
    }

    /// How many times the link came up.
    pub fn generation(&self) -> u64 {
        self.health().generation
    }

    pub fn policy_version(&self) -> u64 {
        self.policy_version.load(Ordering::SeqCst)
    }

    pub fn set_policy_version(&self, version: u64) {
        self.policy_version.store(version, Ordering::SeqCst);
    }

    /// The control plane answered `call` at `at`.
    pub fn answered(&self, call: &'static str, at: UnixNanos) {
        self.change(|health| {
            health.failures = 0;
            health.failing_since = None;
            health.causes.clear();
            if !health.up {
                let down_for = Duration::from_nanos(
                    u64::try_from(at.0.saturating_sub(health.changed_at.0)).unwrap_or(0),
                );
                health.up = true;
                health.changed_at = at;
                health.generation += 1;
                tracing::info!(call, down_for = ?down_for, "control-plane link up");
            }
        });
    }

    /// `call` failed at `at`: the link goes down after
    /// [`DOWN_AFTER_FAILURES`] of these in a row.
    pub fn failed(&self, call: &'static str, error: &LinkError, at: UnixNanos) {
        let cause = error.to_string();
        self.change(|health| {
            health.failures = health.failures.saturating_add(1);
            let since = *health.failing_since.get_or_insert(at);
            let failures = health.failures;
            if health.up {
                if failures >= DOWN_AFTER_FAILURES {
                    health.up = false;
                    health.changed_at = since;
                    tracing::warn!(call, failures, error = %cause, "control-plane link down; retrying with backoff");
                    health.causes.push(cause);
                } else {
                    tracing::info!(call, failures, error = %cause, "a control-plane call failed; retried before the link counts as down");
                }
            } else if !health.causes.contains(&cause) {
                if health.generation == 0 && health.causes.is_empty() {
                    tracing::warn!(call, error = %cause, "the control-plane link does not come up; retrying with backoff");
                } else {
                    tracing::warn!(call, error = %cause, "the control-plane link is still down, for another cause");
                }
                // Bounded: a cause that names something changing (a port,
                // a count) must not grow this without end.
                if health.causes.len() < 16 {
                    health.causes.push(cause);
                }
            } else {
                tracing::debug!(call, failures, error = %cause, "control plane still unreachable");
            }
        });
    }
}

/// A [`ControlPlane`] whose every answer and failure is told to the
/// [`LinkState`]: the one place the link's health is judged.
#[derive(Debug)]
pub struct Observed {
    inner: Arc<dyn ControlPlane>,
    state: Arc<LinkState>,
    clock: Arc<dyn Clock>,
}

impl Observed {
    pub fn new(inner: Arc<dyn ControlPlane>, state: Arc<LinkState>, clock: Arc<dyn Clock>) -> Self {
        Self {
            inner,
            state,
            clock,
        }
    }

    fn observe<T>(&self, call: &'static str, result: Result<T, LinkError>) -> Result<T, LinkError> {
        let now = self.clock.now();
        match &result {
            // An error status is an answer: the control plane is there.
            Ok(_) | Err(LinkError::Status { .. }) => self.state.answered(call, now),
            Err(error) => self.state.failed(call, error, now),
        }
        result
    }
}

#[async_trait::async_trait]
impl ControlPlane for Observed {
    async fn register_node(
        &self,
        request: proto::RegisterNodeRequest,
    ) -> Result<proto::RegisterNodeResponse, LinkError> {
        let result = self.inner.register_node(request).await;
        self.observe("RegisterNode", result)
    }

    async fn report_status(&self, status: proto::NodeStatus) -> Result<(), LinkError> {
        let result = self.inner.report_status(status).await;
        self.observe("ReportStatus", result)
    }

    async fn watch_policy(
        &self,
        request: proto::WatchPolicyRequest,
    ) -> Result<PolicyStream, LinkError> {
        let result = self.inner.watch_policy(request).await;
        let stream = self.observe("WatchPolicy", result)?;
        let state = Arc::clone(&self.state);
        let clock = Arc::clone(&self.clock);
        Ok(Box::pin(futures_util::StreamExt::inspect(
            stream,
            move |item| match item {
                Ok(_) => state.answered("WatchPolicy", clock.now()),
                Err(error) => state.failed("WatchPolicy", error, clock.now()),
            },
        )))
    }

    async fn authorize_session(
        &self,
        request: proto::AuthorizeSessionRequest,
    ) -> Result<proto::CreditControlAnswer, LinkError> {
        let result = self.inner.authorize_session(request).await;
        self.observe("AuthorizeSession", result)
    }

    async fn extend_grant(
        &self,
        request: proto::ExtendGrantRequest,
    ) -> Result<proto::CreditControlAnswer, LinkError> {
        let result = self.inner.extend_grant(request).await;
        self.observe("ExtendGrant", result)
    }

    async fn release_session(
        &self,
        request: proto::ReleaseSessionRequest,
    ) -> Result<(), LinkError> {
        let result = self.inner.release_session(request).await;
        self.observe("ReleaseSession", result)
    }

    async fn report_usage(&self, batch: proto::UsageBatch) -> Result<proto::UsageAck, LinkError> {
        let result = self.inner.report_usage(batch).await;
        self.observe("ReportUsage", result)
    }
}

/// The first retry of a session's failed call waits this long.
const RETRY_START: Duration = Duration::from_secs(1);
/// Retries of a session's call are at most this far apart.
const RETRY_MAX: Duration = Duration::from_secs(30);

/// When each session's failed credit-control call (ExtendGrant,
/// ReleaseSession) is tried again: with backoff while it fails, and at
/// once when the link has come up since it was scheduled.
#[derive(Debug, Default)]
pub struct Retries {
    by_session: Mutex<HashMap<SessionId, Retry>>,
}

#[derive(Debug, Clone, Copy)]
struct Retry {
    /// The first failure of this run.
    failing_since: UnixNanos,
    next_at: UnixNanos,
    backoff: Duration,
    /// The link's generation when it was scheduled.
    generation: u64,
}

impl Retries {
    fn with<T>(&self, f: impl FnOnce(&mut HashMap<SessionId, Retry>) -> T) -> T {
        f(&mut self
            .by_session
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner))
    }

    /// Whether `session`'s call may go out at `now` (the link at
    /// `generation`).
    pub fn due(&self, session: &SessionId, now: UnixNanos, generation: u64) -> bool {
        self.with(|all| match all.get(session) {
            None => true,
            Some(retry) => retry.generation != generation || now >= retry.next_at,
        })
    }

    /// `session`'s call failed at `now`: the next try waits twice as long
    /// as the last (from one second, at most thirty).
    pub fn failed(&self, session: &SessionId, now: UnixNanos, generation: u64) {
        self.with(|all| {
            let retry = all
                .entry(session.clone())
                .and_modify(|retry| retry.backoff = (retry.backoff * 2).min(RETRY_MAX))
                .or_insert(Retry {
                    failing_since: now,
                    next_at: now,
                    backoff: RETRY_START,
                    generation,
                });
            retry.generation = generation;
            retry.next_at = UnixNanos(
                now.0
                    .saturating_add(i64::try_from(retry.backoff.as_nanos()).unwrap_or(i64::MAX)),
            );
        });
    }

    /// `session`'s call was answered.
    pub fn answered(&self, session: &SessionId) {
        self.with(|all| all.remove(session));
    }

    /// Since when `session`'s calls have failed without an answer.
    pub fn failing_since(&self, session: &SessionId) -> Option<UnixNanos> {
        self.with(|all| all.get(session).map(|retry| retry.failing_since))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const S: i64 = 1_000_000_000;

    fn unreachable() -> LinkError {
        LinkError::Unreachable("connection refused".into())
    }

    #[test]
    fn one_failure_is_not_an_outage_and_an_answer_of_any_call_brings_the_link_up() {
        let state = LinkState::down_from(UnixNanos(0));
        assert!(!state.is_up());
        assert_eq!(state.down_since(), Some(UnixNanos(0)));
        state.answered("RegisterNode", UnixNanos(S));
        assert!(state.is_up());
        assert_eq!(state.generation(), 1);

        // Two failures in a row: still up.
        state.failed("AuthorizeSession", &unreachable(), UnixNanos(2 * S));
        state.failed("ExtendGrant", &unreachable(), UnixNanos(3 * S));
        assert!(state.is_up());
        // An answer in between starts the count over.
        state.answered("ReportStatus", UnixNanos(4 * S));
        state.failed("ExtendGrant", &unreachable(), UnixNanos(5 * S));
        state.failed("ExtendGrant", &unreachable(), UnixNanos(6 * S));
        assert!(state.is_up());
        // The third in a row: down, counted from the first of them.
        state.failed("ReleaseSession", &unreachable(), UnixNanos(7 * S));
        assert!(!state.is_up());
        assert_eq!(state.down_since(), Some(UnixNanos(5 * S)));
        state.failed("ReportStatus", &unreachable(), UnixNanos(8 * S));
        assert_eq!(state.down_since(), Some(UnixNanos(5 * S)));

        // Any answer brings it up again, a new generation.
        state.answered("ReportStatus", UnixNanos(9 * S));
        assert!(state.is_up());
        assert_eq!(state.changed_at(), UnixNanos(9 * S));
        assert_eq!(state.generation(), 2);
    }

    #[tokio::test]
    async fn subscribers_see_each_change_of_the_link() {
        let state = LinkState::down_from(UnixNanos(0));
        let mut up = state.subscribe();
        state.failed("RegisterNode", &unreachable(), UnixNanos(S));
        assert!(!up.has_changed().unwrap(), "still down: no change");
        state.answered("RegisterNode", UnixNanos(2 * S));
        assert!(up.has_changed().unwrap());
        assert!(*up.borrow_and_update());
        state.answered("ReportStatus", UnixNanos(3 * S));
        assert!(!up.has_changed().unwrap(), "still up: no change");
    }

    #[test]
    fn a_failed_session_call_backs_off_and_goes_out_at_once_when_the_link_comes_back() {
        let retries = Retries::default();
        let session = SessionId("s-1".into());
        assert!(retries.due(&session, UnixNanos(0), 1));
        retries.failed(&session, UnixNanos(0), 1);
        assert_eq!(retries.failing_since(&session), Some(UnixNanos(0)));
        assert!(!retries.due(&session, UnixNanos(S / 2), 1));
        assert!(retries.due(&session, UnixNanos(S), 1));
        retries.failed(&session, UnixNanos(S), 1);
        assert!(!retries.due(&session, UnixNanos(2 * S), 1));
        assert!(retries.due(&session, UnixNanos(3 * S), 1), "2 s after 1 s");
        // Backoff is capped.
        let mut at = 3 * S;
        for _ in 0..10 {
            retries.failed(&session, UnixNanos(at), 1);
            at += 30 * S;
            assert!(retries.due(&session, UnixNanos(at), 1));
        }
        assert_eq!(retries.failing_since(&session), Some(UnixNanos(0)));
        // The link came up since: at once.
        retries.failed(&session, UnixNanos(at), 1);
        assert!(!retries.due(&session, UnixNanos(at + 1), 1));
        assert!(retries.due(&session, UnixNanos(at + 1), 2));
        retries.answered(&session);
        assert_eq!(retries.failing_since(&session), None);
    }
}
