//! Where balances and reservations act on running sessions: after each
//! checkpoint (which debits the balances), a billed balance at or below
//! zero schedules its sessions' stop after the grace period, and an open
//! reservation window schedules the stop of other accounts' sessions on its
//! devices; stops that fall due are carried out with their end reason.
//! In control-plane mode balances are the control plane's (see `credit`);
//! reservations are still enforced here, from its policy.

use std::collections::{BTreeMap, HashMap};
use std::sync::PoisonError;
use std::sync::atomic::Ordering;
use std::time::Duration;

use super::{DEFAULT_STOP_GRACE, SessionManager};
use crate::clock::UnixNanos;
use crate::error::Refusal;
use crate::events::{BalanceNotice, EventKind};
use crate::gpu::DeviceUuid;
use crate::ledger::{Actor, SessionFilter};
use crate::metering::Credits;
use crate::policy::OnBalanceExhausted;
use crate::policy::admission::{self, OpenSession};
use crate::session::{BillingPath, EndReason, SessionId, SessionRecord, SessionState};

/// A stop the agent will carry out at `at` unless the reason goes away.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct ScheduledStop {
    pub(super) reason: EndReason,
    pub(super) at: UnixNanos,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum BalanceState {
    Low,
    Exhausted,
}

impl SessionManager {
    /// How long until the earliest scheduled stop is due.
    pub(super) fn next_scheduled_stop(&self) -> Option<Duration> {
        let now = self.clock.now();
        self.scheduled
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .values()
            .map(|stop| stop.at)
            .min()
            .map(|at| Duration::from_nanos(u64::try_from(at.0.saturating_sub(now.0)).unwrap_or(0)))
    }

    /// Where balances and reservations act on running sessions: a billed
    /// balance at or below zero schedules its sessions' stop after the
    /// grace period (unless the policy says "continue"); an open
    /// reservation window schedules the stop of other accounts' sessions on
    /// its devices. A cause that goes away (a top-up, a reload) cancels its
    /// stop. Stops that are due are carried out.
    pub async fn enforce(&self) -> Result<(), Refusal> {
        let now = self.clock.now();
        let policy = self.policy();
        let enforcement = policy.enforcement();
        let open = self.ledger.list(SessionFilter::open()).await?.sessions;
        let deltas = self.ledger.balance_deltas().await?;
        let running: Vec<&SessionRecord> = open
            .iter()
            .filter(|s| s.state == SessionState::Running)
            .collect();

        let mut wanted: HashMap<SessionId, EndReason> = HashMap::new();
        let mut by_billed: BTreeMap<&str, Vec<&SessionRecord>> = BTreeMap::new();
        // With a control plane, balances are its to enforce, through grants.
        let local_balances = self.credit.is_none();
        for session in running
            .iter()
            .filter(|s| local_balances && s.billing_path == BillingPath::Balance)
        {
            by_billed
                .entry(&session.billed_account_id)
                .or_default()
                .push(session);
        }
        let mut states = Vec::new();
        for (billed, sessions) in &by_billed {
            let balance =
                policy.opening_balance(billed) + deltas.get(*billed).copied().unwrap_or_default();
            let per_second: Credits = sessions
                .iter()
                .flat_map(|s| s.devices.iter().map(|d| d.rate.0))
                .sum();
            let low_mark = Credits(per_second.0.saturating_mul(
                i64::try_from(enforcement.min_balance_seconds).unwrap_or(i64::MAX),
            ));
            let state = if balance <= Credits::ZERO {
                Some(BalanceState::Exhausted)
            } else if balance < low_mark {
                Some(BalanceState::Low)
            } else {
                None
            };
            if state == Some(BalanceState::Exhausted)
                && enforcement.on_balance_exhausted == OnBalanceExhausted::Stop
            {
                for session in sessions {
                    wanted.insert(session.id.clone(), EndReason::BalanceExhausted);
                }
            }
            states.push((
                billed.to_string(),
                balance,
                state,
                sessions.iter().map(|s| s.id.clone()).collect::<Vec<_>>(),
            ));
        }
        let devices: Vec<Vec<DeviceUuid>> = running
            .iter()
            .map(|s| s.devices.iter().map(|d| d.uuid.clone()).collect())
            .collect();
        let open_view: Vec<OpenSession<'_>> = running
            .iter()
            .zip(&devices)
            .map(|(s, devices)| OpenSession {
                id: &s.id,
                scope: s.scope,
                account_id: &s.account_id,
                devices,
            })
            .collect();
        for id in admission::displaced_by_reservations(&policy, now, &open_view) {
            wanted.entry(id).or_insert(EndReason::ReservationStarted);
        }

        let grace = i64::try_from(enforcement.grace.as_nanos()).unwrap_or(i64::MAX);
        self.load_scheduled_stops().await;
        let (newly, forgotten, due) = {
            let mut scheduled = self
                .scheduled
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            let mut forgotten = Vec::new();
            scheduled.retain(|id, stop| {
                let keep = wanted.get(id) == Some(&stop.reason);
                if !keep {
                    forgotten.push(id.clone());
                }
                keep
            });
            let mut newly = Vec::new();
            for (id, reason) in &wanted {
                scheduled.entry(id.clone()).or_insert_with(|| {
                    let stop = ScheduledStop {
                        reason: *reason,
                        at: UnixNanos(now.0.saturating_add(grace)),
                    };
                    newly.push((id.clone(), stop));
                    stop
                });
            }
            let due: Vec<(SessionId, EndReason)> = scheduled
                .iter()
                .filter(|(_, stop)| stop.at <= now)
                .map(|(id, stop)| (id.clone(), stop.reason))
                .collect();
            (newly, forgotten, due)
        };
        if !newly.is_empty() || !forgotten.is_empty() {
            let scheduled = newly
                .iter()
                .map(|(id, stop)| (id.clone(), stop.reason, stop.at))
                .collect();
            if let Err(error) = self
                .ledger
                .update_scheduled_stops(scheduled, forgotten)
                .await
            {
                tracing::warn!(error = %error, "could not record scheduled stops; a restart before they fall due grants a fresh grace");
            }
        }
        for (id, stop) in &newly {
            let account_id = open
                .iter()
                .find(|s| &s.id == id)
                .map(|s| s.account_id.clone())
                .unwrap_or_default();
            tracing::warn!(session = %id, reason = %stop.reason, stop_at = %stop.at, "session will be stopped when its grace period ends");
            self.events.publish(
                now,
                EventKind::SessionStopScheduled {
                    session_id: id.clone(),
                    account_id,
                    reason: stop.reason,
                    stop_at: stop.at,
                },
            );
        }
        self.announce_balances(now, states);
        for (id, reason) in due {
            let Some(session) = self.ledger.get(&id).await? else {
                continue;
            };
            if session.state != SessionState::Running {
                continue;
            }
            match self
                .stop_session(session, DEFAULT_STOP_GRACE, reason, Actor::Agent)
                .await
            {
                Ok(_) => {}
                Err(refusal) => {
                    tracing::error!(session = %id, reason = %reason, error = %refusal, "could not stop a session the policy ends; retried at the next checkpoint");
                }
            }
        }
        Ok(())
    }

    /// Reads back, once, the stops an earlier run of the agent scheduled:
    /// they fall due when they were going to.
    async fn load_scheduled_stops(&self) {
        if self.scheduled_loaded.load(Ordering::SeqCst) {
            return;
        }
        match self.ledger.scheduled_stops().await {
            Ok(stops) => {
                let mut scheduled = self
                    .scheduled
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                for (id, reason, at) in stops {
                    scheduled.entry(id).or_insert(ScheduledStop { reason, at });
                }
                self.scheduled_loaded.store(true, Ordering::SeqCst);
            }
            Err(error) => {
                tracing::warn!(error = %error, "could not read the scheduled stops back; retried at the next checkpoint");
            }
        }
    }

    /// Announces each billed account's balance state once per change.
    fn announce_balances(
        &self,
        now: UnixNanos,
        states: Vec<(String, Credits, Option<BalanceState>, Vec<SessionId>)>,
    ) {
        let policy = self.policy();
        let enforcement = policy.enforcement();
        let mut notices = self
            .balance_notices
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        let scheduled = self
            .scheduled
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        for (account_id, balance, state, session_ids) in states {
            let previous = match state {
                Some(state) => notices.insert(account_id.clone(), state),
                None => notices.remove(&account_id),
            };
            let Some(state) = state.filter(|state| previous != Some(*state)) else {
                continue;
            };
            let stop_at = (state == BalanceState::Exhausted
                && enforcement.on_balance_exhausted == OnBalanceExhausted::Stop)
                .then(|| {
                    session_ids
                        .iter()
                        .filter_map(|id| scheduled.get(id).map(|stop| stop.at))
                        .min()
                })
                .flatten();
            tracing::warn!(account = %account_id, balance = %balance, state = ?state, "balance notice");
            let notice = BalanceNotice {
                account_id,
                balance,
                session_ids,
                stop_at,
            };
            self.events.publish(
                now,
                match state {
                    BalanceState::Low => EventKind::BalanceLow(notice),
                    BalanceState::Exhausted => EventKind::BalanceExhausted(notice),
                },
            );
        }
    }
}
