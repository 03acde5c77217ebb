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
use crate::control_plane::{ControlPlane, LinkError, LinkState};
use crate::error::{Reason, Refusal};
use crate::ledger::{Actor, CreditState};
use crate::policy::OnBalanceExhausted;
use crate::proto;
use crate::session::{EndReason, Scope, SessionRecord, SessionState};

/// What the session manager needs of the control plane.
#[derive(Debug, Clone)]
pub struct CreditControl {
    pub plane: Arc<dyn ControlPlane>,
    pub link: Arc<LinkState>,
    pub offline_grace: Duration,
    pub node_id: String,
}

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

    /// A call failed: the link is down from `now` (the link task brings it
    /// back up).
    fn lost(&self, error: &LinkError, now: UnixNanos) {
        if self.link.set_up(false, now) {
            tracing::warn!(error = %error, "control-plane link down");
        }
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
        let answer = match credit.plane.authorize_session(request).await {
            Ok(answer) => answer,
            Err(error) => {
                credit.lost(&error, now);
                return Err(unavailable(&format!(
                    "the control plane did not authorize the session ({error})"
                )));
            }
        };
        let granted = credit::read_answer(answer, self.clock.now())?;
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
        if credit.link.is_up() {
            let from = state.reported_until.or(session.started_at).unwrap_or(now);
            let number = state.cc_request_number + 1;
            let request = proto::ExtendGrantRequest {
                node_id: credit.node_id.clone(),
                session_id: session.id.0.clone(),
                cc_request_number: number,
                used: Some(credit::used_units(&session.devices, from, now)),
                requested_service_seconds: u32::try_from(REQUESTED_SERVICE.as_secs())
                    .unwrap_or(u32::MAX),
            };
            match credit.plane.extend_grant(request).await {
                Ok(answer) => {
                    let next = match credit::read_answer(answer, now) {
                        Ok(granted) => {
                            credit::state_after(&session.id, number, &granted, Some(now))
                        }
                        Err(refusal) => {
                            let reason = match refusal.reason {
                                Reason::BalanceExhausted => EndReason::BalanceExhausted,
                                _ => EndReason::GrantDenied,
                            };
                            tracing::warn!(session = %session.id, reason = %refusal, until = %state.granted_until, "the control plane denied more credit; the session ends with its grant");
                            CreditState {
                                cc_request_number: number,
                                reported_until: Some(now),
                                ..credit::state_after_denial(state, reason)
                            }
                        }
                    };
                    self.ledger.record_credit(next, None).await?;
                    return Ok(());
                }
                Err(error) => credit.lost(&error, now),
            }
        }
        // Offline: the grant is used up; the session runs on for the offline
        // grace, then follows the policy.
        let down_since = credit.link.down_since().unwrap_or(now);
        let grace = i64::try_from(credit.offline_grace.as_nanos()).unwrap_or(i64::MAX);
        let offline_over = now.0.saturating_sub(down_since.0) >= grace;
        if now >= state.granted_until
            && offline_over
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

    /// CCR-Terminate for an ended session: its final used units.
    async fn terminate(
        &self,
        credit: &CreditControl,
        state: &CreditState,
        session: &SessionRecord,
    ) -> Result<(), Refusal> {
        if !credit.link.is_up() {
            return Ok(());
        }
        let now = self.clock.now();
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
        match credit.plane.release_session(request).await {
            Ok(()) => {
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
            Err(error) => credit.lost(&error, now),
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
