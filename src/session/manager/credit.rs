//! Control-plane mode: each session's credit control, in the manner of
//! online charging (RFC 4006). A launch asks for a slot and an initial grant
//! (CCR-Initial) before its container starts; a running session asks for
//! more before its grant runs out (CCR-Update, with the used units since the
//! last report); an ended session reports its final units (CCR-Terminate).
//! A grant with a final-unit indication ends the session when it is used up;
//! while the control plane is unreachable, sessions run on for the offline
//! grace beyond their grant, then follow `on_balance_exhausted`.
//!
//! Every answer is kept in the ledger (`credit_control`), so a restarted
//! agent continues each session's dialogue where it was and a terminate
//! owed is sent once the control plane answers again.

use std::sync::Arc;
use std::time::Duration;

use super::{DEFAULT_STOP_GRACE, SessionManager};
use crate::api::convert;
use crate::clock::UnixNanos;
use crate::control_plane::credit::{self, REQUESTED_SERVICE};
use crate::control_plane::{ControlPlane, LinkError, LinkState, Retries};
use crate::error::{Reason, Refusal};
use crate::ledger::{Actor, CreditState};
use crate::policy::OnBalanceExhausted;
use crate::proto;
use crate::runtime::ContainerId;
use crate::session::{EndReason, Scope, SessionId, SessionRecord, SessionState};

/// What the session manager needs of the control plane.
#[derive(Debug, Clone)]
pub struct CreditControl {
    /// Every call's result is told to `link` (an [`crate::control_plane::Observed`]).
    pub plane: Arc<dyn ControlPlane>,
    pub link: Arc<LinkState>,
    /// When each session's failed ExtendGrant or ReleaseSession goes out again.
    pub retries: Arc<Retries>,
    pub offline_grace: Duration,
    pub node_id: String,
}

/// A CCR-Initial that did not reach the control plane is sent again this
/// often at most, with the same session id (the control plane answers a
/// repeat the same)...
const AUTHORIZE_ATTEMPTS: u32 = 3;
/// ... and only while the launch has waited less than this: a call that
/// timed out is not repeated inside the caller's launch.
const AUTHORIZE_RETRY_WITHIN: Duration = Duration::from_secs(5);
const AUTHORIZE_BACKOFF: Duration = Duration::from_millis(250);

impl CreditControl {
    /// Launches fail closed: no link or no policy yet, no launch.
    pub fn gate(&self) -> Result<(), Refusal> {
        if !self.link.is_up() {
            return Err(unavailable(
                "the control plane is unreachable, and launches need its authorization",
            ));
        }
        if self.link.policy_version() == 0 {
            return Err(unavailable(
                "no policy has arrived from the control plane yet",
            ));
        }
        Ok(())
    }

    /// Whether `session` has gone without credit for the offline grace: the
    /// link has been down that long, or this session's own calls have
    /// failed that long while others were answered.
    fn offline_grace_over(&self, session: &SessionId, now: UnixNanos) -> bool {
        let grace = i64::try_from(self.offline_grace.as_nanos()).unwrap_or(i64::MAX);
        [self.link.down_since(), self.retries.failing_since(session)]
            .into_iter()
            .flatten()
            .any(|since| now.0.saturating_sub(since.0) >= grace)
    }
}

fn unavailable(why: &str) -> Refusal {
    Refusal::new(
        Reason::ControlPlaneUnavailable,
        format!("{why}; retry later or launch on another node"),
    )
}

impl SessionManager {
    /// CCR-Initial for a session just admitted locally (STARTING, devices
    /// held): a refusal or an unreachable control plane refuses the launch;
    /// a grant is recorded, with whose balance pays and how.
    pub(super) async fn authorize_session(
        &self,
        credit: &CreditControl,
        session: &SessionRecord,
    ) -> Result<SessionRecord, Refusal> {
        let now = self.clock.now();
        let request = proto::AuthorizeSessionRequest {
            node_id: credit.node_id.clone(),
            session_id: session.id.0.clone(),
            request_id: session.request_id.clone(),
            principal: Some(proto::Principal {
                subject: session.owner.subject.clone(),
                kind: convert::principal_kind_to_proto(session.owner.kind),
            }),
            scope: convert::scope_to_proto(session.scope),
            org_id: match session.scope {
                Scope::Org => session.account_id.clone(),
                Scope::Personal => String::new(),
            },
            devices: session
                .devices
                .iter()
                .map(|d| proto::DeviceRequested {
                    uuid: d.uuid.to_string(),
                    device_class: d.class.clone(),
                    gpu_weight: d.weight.as_f64(),
                })
                .collect(),
            requested_service_seconds: u32::try_from(REQUESTED_SERVICE.as_secs())
                .unwrap_or(u32::MAX),
        };
        // Recorded before the call: should the answer be lost (a timeout,
        // a crash), the control plane may have granted, and the release of
        // that grant is owed like any other (the credit tick sends it once
        // the session has ended).
        self.ledger
            .record_credit(credit::pending(&session.id, now), None)
            .await?;
        let answer = self.send_authorize(credit, request).await?;
        let granted = match credit::read_answer(answer, self.clock.now()) {
            Ok(granted) => granted,
            Err(refusal) => {
                // Denied: nothing was granted, nothing is owed.
                self.ledger
                    .record_credit(
                        CreditState {
                            released_at: Some(self.clock.now()),
                            ..credit::pending(&session.id, now)
                        },
                        None,
                    )
                    .await?;
                return Err(refusal);
            }
        };
        let billed = (!granted.billed_account_id.is_empty()).then(|| {
            (
                granted.billed_account_id.clone(),
                granted.billing_path.unwrap_or(session.billing_path),
            )
        });
        let granted_session = self
            .ledger
            .record_credit(credit::state_after(&session.id, 0, &granted, None), billed)
            .await?;
        tracing::info!(session = %session.id, until = %granted.until, final_unit = granted.final_unit.is_some(), "control plane granted the session");
        Ok(granted_session.unwrap_or_else(|| session.clone()))
    }

    /// Sends a CCR-Initial; one that did not reach the control plane quickly
    /// is sent again, so a single lost call does not refuse the launch.
    async fn send_authorize(
        &self,
        credit: &CreditControl,
        request: proto::AuthorizeSessionRequest,
    ) -> Result<proto::CreditControlAnswer, Refusal> {
        let began = tokio::time::Instant::now();
        let mut backoff = AUTHORIZE_BACKOFF;
        let mut attempt = 1;
        loop {
            match credit.plane.authorize_session(request.clone()).await {
                Ok(answer) => return Ok(answer),
                Err(error @ LinkError::Unreachable(_))
                    if attempt < AUTHORIZE_ATTEMPTS
                        && began.elapsed() + backoff < AUTHORIZE_RETRY_WITHIN =>
                {
                    tracing::info!(session = %request.session_id, attempt, error = %error, "AuthorizeSession did not reach the control plane; sending it again");
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                    attempt += 1;
                }
                Err(error) => {
                    return Err(unavailable(&format!(
                        "the control plane did not authorize the session ({error})"
                    )));
                }
            }
        }
    }

    /// Every second in control-plane mode: updates grants that run low,
    /// ends sessions whose final grant is used up or whose offline grace
    /// ran out, and sends the terminates owed.
    pub async fn credit_tick(&self) -> Result<(), Refusal> {
        let Some(credit) = &self.credit else {
            return Ok(());
        };
        for (state, session) in self.ledger.credit_states().await? {
            let result = match session.state {
                SessionState::Ended => self.terminate(credit, &state, &session).await,
                SessionState::Running => self.keep_granted(credit, &state, session).await,
                SessionState::Starting | SessionState::Stopping => Ok(()),
            };
            if let Err(refusal) = result {
                tracing::warn!(session = %state.session_id, error = %refusal, "credit control of a session failed; retried next tick");
            }
        }
        Ok(())
    }

    async fn keep_granted(
        &self,
        credit: &CreditControl,
        state: &CreditState,
        session: SessionRecord,
    ) -> Result<(), Refusal> {
        let now = self.clock.now();
        if let Some(reason) = credit::final_stop(state, now) {
            tracing::info!(session = %session.id, reason = %reason, "the final grant is used up");
            self.stop_session(session, DEFAULT_STOP_GRACE, reason, Actor::Agent)
                .await?;
            return Ok(());
        }
        if !credit::update_due(state, now) {
            return Ok(());
        }
        let generation = credit.link.generation();
        if credit.retries.due(&session.id, now, generation) {
            let until = match state.pending_until {
                Some(pending) => pending,
                None => {
                    // Used units go as far as the engine confirms the
                    // container ran. Recorded before the call: its retry,
                    // after a restart too, repeats it exactly.
                    let from = state.reported_until.or(session.started_at).unwrap_or(now);
                    let until = self.confirmed_until(&session, now).await.max(from);
                    self.ledger
                        .record_credit(
                            CreditState {
                                pending_until: Some(until),
                                ..state.clone()
                            },
                            None,
                        )
                        .await?;
                    until
                }
            };
            let number = state.cc_request_number + 1;
            match self.send_update(credit, state, &session, until).await {
                Ok(answer) => {
                    credit.retries.answered(&session.id);
                    let next = match credit::read_answer(answer, now) {
                        Ok(granted) => {
                            credit::state_after(&session.id, number, &granted, Some(until))
                        }
                        Err(refusal) => {
                            let reason = match refusal.reason {
                                Reason::BalanceExhausted => EndReason::BalanceExhausted,
                                _ => EndReason::GrantDenied,
                            };
                            tracing::warn!(session = %session.id, reason = %refusal, until = %state.granted_until, "the control plane denied more credit; the session ends with its grant");
                            CreditState {
                                cc_request_number: number,
                                reported_until: Some(until),
                                ..credit::state_after_denial(state, reason)
                            }
                        }
                    };
                    self.ledger.record_credit(next, None).await?;
                    return Ok(());
                }
                Err(error) => {
                    credit.retries.failed(&session.id, now, generation);
                    tracing::info!(session = %session.id, error = %error, until = %state.granted_until, "ExtendGrant failed; sent again with backoff");
                }
            }
        }
        // Not extended: the grant is used up; the session runs on for the
        // offline grace, then follows the policy.
        if now >= state.granted_until
            && credit.offline_grace_over(&session.id, now)
            && self.policy().enforcement().on_balance_exhausted == OnBalanceExhausted::Stop
        {
            tracing::warn!(session = %session.id, "the control plane stayed unreachable past the offline grace; stopping");
            self.stop_session(
                session,
                DEFAULT_STOP_GRACE,
                EndReason::ControlPlaneUnavailable,
                Actor::Agent,
            )
            .await?;
        }
        Ok(())
    }

    /// CCR-Update `state.cc_request_number + 1`: the used units from the
    /// last report to `until`.
    async fn send_update(
        &self,
        credit: &CreditControl,
        state: &CreditState,
        session: &SessionRecord,
        until: UnixNanos,
    ) -> Result<proto::CreditControlAnswer, LinkError> {
        let from = state
            .reported_until
            .or(session.started_at)
            .unwrap_or(until)
            .min(until);
        credit
            .plane
            .extend_grant(proto::ExtendGrantRequest {
                node_id: credit.node_id.clone(),
                session_id: session.id.0.clone(),
                cc_request_number: state.cc_request_number + 1,
                used: Some(credit::used_units(&session.devices, from, until)),
                requested_service_seconds: u32::try_from(REQUESTED_SERVICE.as_secs())
                    .unwrap_or(u32::MAX),
            })
            .await
    }

    /// The last instant the engine confirms `session`'s container ran:
    /// `now` (taken before asking) when it runs, with usage records cut
    /// there so that they and the used units agree; else the last cut.
    /// Late or missing engine events never make the control plane debit
    /// time a container did not run.
    async fn confirmed_until(&self, session: &SessionRecord, now: UnixNanos) -> UnixNanos {
        let last = session.metered_until.or(session.started_at).unwrap_or(now);
        let Some(container) = &session.container_id else {
            return last;
        };
        match self.runtime.inspect(&ContainerId(container.clone())).await {
            Ok(Some(state)) if state.running => {
                match self.ledger.checkpoint(&session.id, now).await {
                    Ok(_) => now,
                    Err(error) => {
                        tracing::warn!(session = %session.id, error = %error, "could not cut usage before ExtendGrant; reporting up to the last cut");
                        last
                    }
                }
            }
            _ => last,
        }
    }

    /// CCR-Terminate for an ended session: its final used units.
    async fn terminate(
        &self,
        credit: &CreditControl,
        state: &CreditState,
        session: &SessionRecord,
    ) -> Result<(), Refusal> {
        let now = self.clock.now();
        let generation = credit.link.generation();
        if !credit.retries.due(&session.id, now, generation) {
            return Ok(());
        }
        // An update sent and never answered goes first, exactly as it was:
        // the control plane may have applied it. Released after it, the
        // rest is neither debited twice nor lost.
        let mut state = state.clone();
        if let Some(until) = state.pending_until {
            match self.send_update(credit, &state, session, until).await {
                Ok(_) => {
                    state = CreditState {
                        cc_request_number: state.cc_request_number + 1,
                        reported_until: Some(until),
                        pending_until: None,
                        ..state
                    };
                }
                // Refused, so not applied: the release reports from the
                // last answered update, under a number of its own.
                Err(LinkError::Status { code, message }) => {
                    tracing::warn!(session = %session.id, code, message, "the control plane refused the pending update; the release reports its units");
                    state = CreditState {
                        cc_request_number: state.cc_request_number + 1,
                        pending_until: None,
                        ..state
                    };
                }
                Err(error) => {
                    credit.retries.failed(&session.id, now, generation);
                    tracing::info!(session = %session.id, error = %error, "the pending ExtendGrant failed again; the release waits for it");
                    return Ok(());
                }
            }
            self.ledger.record_credit(state.clone(), None).await?;
        }
        let ended_at = session.ended_at;
        let used = match (state.reported_until.or(session.started_at), ended_at) {
            (Some(from), Some(to)) => Some(credit::used_units(&session.devices, from, to)),
            _ => None,
        };
        let request = proto::ReleaseSessionRequest {
            node_id: credit.node_id.clone(),
            session_id: session.id.0.clone(),
            cc_request_number: state.cc_request_number + 1,
            used,
            end_reason: convert::end_reason_to_proto(Some(session.stop_reason())),
            ended_at: ended_at.map(UnixNanos::to_timestamp),
        };
        let answered = match credit.plane.release_session(request).await {
            Ok(()) => true,
            // It holds nothing for this session (a launch whose
            // authorization never reached it): nothing to release.
            Err(LinkError::Status { code, message }) if code == "NotFound" => {
                tracing::info!(session = %session.id, message, "the control plane does not know the session; nothing to release");
                true
            }
            Err(error) => {
                credit.retries.failed(&session.id, now, generation);
                tracing::info!(session = %session.id, error = %error, "ReleaseSession failed; sent again with backoff");
                false
            }
        };
        if answered {
            {
                credit.retries.answered(&session.id);
                self.ledger
                    .record_credit(
                        CreditState {
                            cc_request_number: state.cc_request_number + 1,
                            released_at: Some(now),
                            ..state.clone()
                        },
                        None,
                    )
                    .await?;
                tracing::info!(session = %session.id, "session released at the control plane");
            }
        }
        Ok(())
    }

    /// Runs [`Self::credit_tick`] every `interval` until `shutdown`.
    pub async fn credit_loop(
        self: Arc<Self>,
        interval: Duration,
        shutdown: tokio_util::sync::CancellationToken,
    ) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    if let Err(refusal) = self.credit_tick().await {
                        tracing::warn!(error = %refusal, "credit control failed; retried next tick");
                    }
                }
            }
        }
    }
}
