//! Where sessions live and die. This module holds the manager's state and
//! what a caller asks of it (get, list, stop, usage, balances, audit);
//! its children hold the rest:
//! - `launch`: where a launch is decided (`launch::admit`, inside the
//!   ledger transaction that records it) and its container built with
//!   exactly its devices;
//! - `reconcile`: Docker's events, and the reconcile pass that runs at
//!   start-up and at every checkpoint. It is the one place the ledger is
//!   brought in line with what the engine says: it adopts running
//!   containers, closes the ones that finished or vanished at Docker's own
//!   times, cuts checkpoint usage, and reports containers it does not know;
//! - `enforcement`: balances and reservation windows;
//! - `credit`: credit control with the control plane.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use super::request::clipped;
use super::{Caller, EndReason, Principal, SessionId, SessionRecord, SessionState};
use crate::clock::{Clock, UnixNanos};
use crate::config::DeviceInjection;
use crate::error::{Reason, Refusal};
use crate::events::{EventBus, EventFilter, EventKind};
use crate::gpu::DeviceUuid;
use crate::ledger::{
    Actor, Adjustment, AuditAction, AuditEntry, AuditFilter, AuditRecord, Ledger, LedgerError,
    SessionFilter, SessionPage, UsageTotal,
};
use crate::metering::Credits;
use crate::policy::admission::{self};
use crate::policy::{AccountKind, Policy};
use crate::runtime::{ContainerId, ContainerRuntime, ContainerState, RuntimeError};

/// Grace between SIGTERM and SIGKILL when a stop names none.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a reconcile is retried while launches wait on one.
const RECOVERY_RETRY: Duration = Duration::from_secs(5);
/// Processes a session's container may have.
const PIDS_LIMIT: i64 = 4096;

mod credit;
mod enforcement;
mod launch;
mod reconcile;
#[cfg(test)]
mod tests;

pub use credit::CreditControl;
use enforcement::{BalanceState, ScheduledStop};

/// How much of a refused request's ids and message is recorded.
const RECORDED_ID_LEN: usize = 160;
const RECORDED_MESSAGE_LEN: usize = 1024;

/// Where the session manager's collaborators and settings come from.
#[derive(Debug, Clone)]
pub struct SessionSettings {
    pub node_id: String,
    pub injection: DeviceInjection,
    /// Raw usage records older than this are folded into the sums that
    /// hold them (acknowledged ones only, in control-plane mode).
    pub usage_retention: Option<Duration>,
}

#[derive(Debug)]
pub struct SessionManager {
    settings: SessionSettings,
    ledger: Ledger,
    runtime: Arc<dyn ContainerRuntime>,
    clock: Arc<dyn Clock>,
    draining: AtomicBool,
    /// Devices claimed by running containers with our labels that the
    /// ledger does not know: never handed out while they run.
    foreign: Mutex<HashMap<DeviceUuid, ContainerId>>,
    /// The standalone policy in force; replaced whole on reload.
    policy: RwLock<Arc<Policy>>,
    events: Arc<EventBus>,
    /// Stops the agent itself decided (a balance ran out, a reservation
    /// window opened), due at the end of their grace period.
    scheduled: Mutex<HashMap<SessionId, ScheduledStop>>,
    /// Whether `scheduled` was read back from the ledger (the stops an
    /// earlier run of the agent scheduled keep their due time).
    scheduled_loaded: AtomicBool,
    /// Sessions whose stop this process is carrying out. A STOPPING
    /// session not in here whose container runs had its stop cut short (the
    /// agent died, the engine was away): the next reconcile carries it out.
    stops_in_flight: Arc<Mutex<HashSet<SessionId>>>,
    /// Sessions whose launch this process is carrying out, from before
    /// the session is recorded until the launch returns: the reconcile
    /// leaves a STARTING session in here to its launch, however long the
    /// engine's calls take or the clock jumps.
    launches_in_flight: Mutex<HashSet<SessionId>>,
    /// Billed accounts already told they are low or out, so each change is
    /// announced once.
    balance_notices: Mutex<HashMap<String, BalanceState>>,
    /// Control-plane mode: slots and credit come from the control plane.
    credit: Option<CreditControl>,
    /// Why the start-up reconcile has not succeeded yet (the ledger could
    /// not be written, the engine did not answer); `None` once it has.
    /// Until then launches are refused with that reason, and every
    /// reconcile runs as the start-up one (settling STARTING sessions),
    /// holding this lock for writing.
    recovery: tokio::sync::RwLock<Option<Refusal>>,
}

/// What holds a busy device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Holder {
    Session(SessionId),
    /// A running container with this node's labels that the ledger does not
    /// know.
    Unknown(ContainerId),
}

impl std::fmt::Display for Holder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::Session(id) => write!(f, "{id}"),
            Self::Unknown(container) => write!(f, "unknown container {container}"),
        }
    }
}

/// An account's usage in a period and the balance that pays for it.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageReport {
    pub account_id: String,
    pub from: UnixNanos,
    pub to: UnixNanos,
    pub lines: Vec<UsageTotal>,
    pub billed_account_id: String,
    pub balance: Credits,
}

fn engine(error: RuntimeError) -> Refusal {
    match error {
        RuntimeError::NoSuchImage(image) => Refusal::new(
            Reason::InvalidRequest,
            format!("image `{image}` is not present on this node; load it first or pick another"),
        ),
        other => Refusal::new(
            Reason::ContainerEngineUnavailable,
            format!(
                "the container engine failed: {}",
                crate::error::chain(&other)
            ),
        ),
    }
}

impl SessionManager {
    pub fn new(
        settings: SessionSettings,
        ledger: Ledger,
        runtime: Arc<dyn ContainerRuntime>,
        clock: Arc<dyn Clock>,
        policy: Arc<Policy>,
        events: Arc<EventBus>,
    ) -> Self {
        Self {
            settings,
            ledger,
            runtime,
            clock,
            draining: AtomicBool::new(false),
            foreign: Mutex::new(HashMap::new()),
            policy: RwLock::new(policy),
            events,
            scheduled: Mutex::new(HashMap::new()),
            scheduled_loaded: AtomicBool::new(false),
            stops_in_flight: Arc::default(),
            launches_in_flight: Mutex::new(HashSet::new()),
            balance_notices: Mutex::new(HashMap::new()),
            credit: None,
            recovery: tokio::sync::RwLock::new(None),
        }
    }

    /// The control-plane link, in control-plane mode.
    pub fn link_state(&self) -> Option<&Arc<crate::control_plane::LinkState>> {
        self.credit.as_ref().map(|credit| &credit.link)
    }

    /// Control-plane mode: every launch is authorized by the control plane
    /// and runs on its grants; balances are the control plane's.
    pub fn with_credit_control(mut self, credit: CreditControl) -> Self {
        self.credit = Some(credit);
        self
    }

    /// The policy in force now.
    pub fn policy(&self) -> Arc<Policy> {
        Arc::clone(&self.policy.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Puts a validated policy in force for every decision from now on.
    pub fn set_policy(&self, policy: Arc<Policy>) {
        *self.policy.write().unwrap_or_else(PoisonError::into_inner) = policy;
    }

    pub fn events(&self) -> &Arc<EventBus> {
        &self.events
    }

    pub fn ledger(&self) -> &Ledger {
        &self.ledger
    }

    pub fn now(&self) -> UnixNanos {
        self.clock.now()
    }

    /// Takes or stops taking new sessions; running ones are untouched.
    pub async fn set_draining(&self, draining: bool, reason: String, actor: Actor) {
        let was = self.draining.swap(draining, Ordering::SeqCst);
        if was == draining {
            return;
        }
        tracing::info!(draining, reason = %reason, by = %actor, "drain changed");
        let now = self.clock.now();
        let action = if draining {
            AuditAction::Drain
        } else {
            AuditAction::Undrain
        };
        self.audit(AuditRecord {
            at: now,
            action,
            actor,
            account_id: String::new(),
            session_id: String::new(),
            reason: String::new(),
            detail: reason.clone(),
        })
        .await;
        self.events
            .publish(now, EventKind::DrainChanged { draining, reason });
    }

    /// A reloaded policy is in force: audited, and acted on at once (a
    /// changed balance or reservation may cancel or schedule stops).
    pub async fn policy_reloaded(&self, path: &std::path::Path) {
        self.audit(AuditRecord {
            at: self.clock.now(),
            action: AuditAction::PolicyReload,
            actor: Actor::Operator,
            account_id: String::new(),
            session_id: String::new(),
            reason: String::new(),
            detail: path.display().to_string(),
        })
        .await;
        if let Err(refusal) = self.enforce().await {
            tracing::warn!(error = %refusal, "enforcing after a policy reload failed; retried at the next checkpoint");
        }
    }

    /// A policy file that failed validation on reload: audited with why.
    pub async fn policy_reload_refused(&self, error: String) {
        self.audit(AuditRecord {
            at: self.clock.now(),
            action: AuditAction::PolicyReloadRefused,
            actor: Actor::Operator,
            account_id: String::new(),
            session_id: String::new(),
            reason: Reason::InvalidRequest.as_str().to_owned(),
            detail: error,
        })
        .await;
    }

    /// Appends to the audit trail; a ledger that cannot take it is logged
    /// (the action itself already happened or was refused).
    async fn audit(&self, record: AuditRecord) {
        if let Err(error) = self.ledger.audit(record.clone()).await {
            tracing::error!(error = %error, action = %record.action, account = %record.account_id, "could not write the audit trail");
        }
    }

    /// Records a refused launch in the audit trail and on the event stream.
    pub async fn launch_refused(
        &self,
        request_id: &str,
        principal: Option<&Principal>,
        account_id: &str,
        refusal: &Refusal,
    ) {
        // What a refused request says about itself is untrusted and may be
        // huge: each field is clipped before it is logged, kept or sent.
        let request_id = clipped(request_id, RECORDED_ID_LEN).into_owned();
        let account_id = clipped(account_id, RECORDED_ID_LEN).into_owned();
        let principal = principal.map(|p| Principal {
            subject: clipped(&p.subject, RECORDED_ID_LEN).into_owned(),
            kind: p.kind,
        });
        let message = clipped(&refusal.message, RECORDED_MESSAGE_LEN).into_owned();
        let now = self.clock.now();
        tracing::info!(request_id, account = account_id, reason = %refusal.reason, "launch refused");
        self.audit(AuditRecord {
            at: now,
            action: AuditAction::Refuse,
            actor: principal.clone().map_or(Actor::Operator, Actor::Principal),
            account_id: account_id.clone(),
            session_id: String::new(),
            reason: refusal.reason.as_str().to_owned(),
            detail: format!("request {request_id}: {message}"),
        })
        .await;
        self.events.publish(
            now,
            EventKind::LaunchRefused {
                request_id,
                principal,
                account_id,
                reason: refusal.reason,
                message,
            },
        );
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// Devices held by sessions or claimed by unknown containers.
    pub async fn busy_devices(&self) -> Result<HashMap<DeviceUuid, Holder>, Refusal> {
        let mut busy: HashMap<DeviceUuid, Holder> = self
            .ledger
            .holds()
            .await?
            .into_iter()
            .map(|(device, session)| (device, Holder::Session(session)))
            .collect();
        for (device, container) in self.foreign_devices() {
            busy.entry(device).or_insert(Holder::Unknown(container));
        }
        Ok(busy)
    }

    fn foreign_devices(&self) -> HashMap<DeviceUuid, ContainerId> {
        self.foreign
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    pub async fn get(&self, caller: &Caller, id: &SessionId) -> Result<SessionRecord, Refusal> {
        let session = self
            .ledger
            .get(id)
            .await?
            .ok_or_else(|| unknown_session(id))?;
        self.authorize(caller, &session)?;
        Ok(session)
    }

    /// Whether `caller` may see and stop `session`: a named principal by
    /// the policy's role rules, the local operator without one always.
    fn authorize(&self, caller: &Caller, session: &SessionRecord) -> Result<(), Refusal> {
        match &caller.principal {
            Some(principal) => admission::may_manage_session(
                &self.policy(),
                principal,
                session.scope,
                &session.account_id,
                &session.owner,
            ),
            None if caller.operator => Ok(()),
            None => Err(principal_required()),
        }
    }

    /// A page of the sessions `filter` names that the caller may see (of
    /// its account, launched under it or billed to it, or of every
    /// account). Sessions the caller may not see are left out of the page,
    /// so a page may hold fewer than its limit while `next` says more
    /// follow.
    pub async fn list(
        &self,
        caller: &Caller,
        filter: SessionFilter,
    ) -> Result<SessionPage, Refusal> {
        match (&caller.principal, &filter.account_id) {
            (Some(principal), Some(account)) => {
                admission::may_list_account(&self.policy(), principal, account)?;
            }
            (None, _) if !caller.operator => return Err(principal_required()),
            _ => {}
        }
        let mut page = self.ledger.list(filter).await?;
        page.sessions
            .retain(|session| self.authorize(caller, session).is_ok());
        Ok(page)
    }

    /// The balance `account` has now: the policy's opening balance and what
    /// the ledger moved since.
    pub async fn balance_of(&self, account: &str) -> Result<Credits, Refusal> {
        Ok(self.policy().opening_balance(account) + self.ledger.balance_delta(account).await?)
    }

    /// Records a top-up or correction (the local operator's, standalone
    /// mode) and acts on it at once: a top-up cancels the stops its
    /// balance had scheduled.
    pub async fn adjust_balance(
        &self,
        caller: &Caller,
        account_id: &str,
        delta: Credits,
        reason: &str,
    ) -> Result<(String, Credits), Refusal> {
        if caller.principal.is_some() || !caller.operator {
            return Err(Refusal::new(
                Reason::RoleForbidden,
                "AdjustBalance is for the local operator: call it on the Unix socket without a principal",
            ));
        }
        let policy = self.policy();
        if policy.kind_of(account_id).is_none() {
            return Err(unknown_account(account_id));
        }
        let billed = policy.billed_account(account_id);
        if billed != account_id {
            return Err(Refusal::new(
                Reason::InvalidRequest,
                format!(
                    "{account_id} is a sub-account billed to {billed}; adjust {billed}'s balance"
                ),
            ));
        }
        if reason.trim().is_empty() {
            return Err(Refusal::new(
                Reason::InvalidRequest,
                "say why the balance changes (reason), e.g. an invoice or ticket number",
            ));
        }
        let (id, delta_now) = self
            .ledger
            .adjust_balance(Adjustment {
                account_id: account_id.to_owned(),
                delta,
                reason: reason.to_owned(),
                actor: Actor::Operator,
                at: self.clock.now(),
            })
            .await?;
        let balance = policy.opening_balance(account_id) + delta_now;
        tracing::info!(account = account_id, delta = %delta, balance = %balance, adjustment = %id, "balance adjusted");
        if let Err(refusal) = self.enforce().await {
            tracing::warn!(error = %refusal, "enforcing after a balance adjustment failed; retried at the next checkpoint");
        }
        Ok((id, balance))
    }

    /// Usage of `account_id` (an org's includes its sub-accounts) with
    /// records ending in `(from, to]`, and the balance that pays for it.
    pub async fn usage(
        &self,
        caller: &Caller,
        account_id: &str,
        from: UnixNanos,
        to: UnixNanos,
    ) -> Result<UsageReport, Refusal> {
        let policy = self.policy();
        match &caller.principal {
            Some(principal) => admission::may_view_account(&policy, principal, account_id)?,
            None if caller.operator => {
                if policy.kind_of(account_id).is_none() {
                    return Err(unknown_account(account_id));
                }
            }
            None => return Err(principal_required()),
        }
        let lines = self
            .ledger
            .usage(policy.with_sub_accounts(account_id), from, to)
            .await?;
        let billed_account_id = policy.billed_account(account_id).to_owned();
        let balance = self.balance_of(&billed_account_id).await?;
        Ok(UsageReport {
            account_id: account_id.to_owned(),
            from,
            to,
            lines,
            billed_account_id,
            balance,
        })
    }

    /// What a `WatchEvents` caller may receive: events of `account` (and
    /// its sub-accounts) when named, else of every account the principal
    /// belongs to; all of them for the local operator.
    pub fn event_filter(
        &self,
        caller: &Caller,
        account: Option<String>,
    ) -> Result<EventFilter, Refusal> {
        let policy = self.policy();
        let accounts = match (&caller.principal, account) {
            (Some(principal), Some(account)) => {
                admission::may_list_account(&policy, principal, &account)?;
                policy.with_sub_accounts(&account)
            }
            (Some(principal), None) => {
                let mut accounts = vec![principal.subject.clone()];
                if let Some(org) = policy.service_account_org(&principal.subject) {
                    accounts.extend(policy.with_sub_accounts(org));
                }
                for org in policy
                    .accounts()
                    .filter(|a| policy.kind_of(a) == Some(AccountKind::Org))
                {
                    if policy.role_of(&principal.subject, org).is_some() {
                        accounts.push(org.to_owned());
                    }
                }
                accounts
            }
            (None, Some(account)) if caller.operator => policy.with_sub_accounts(&account),
            (None, None) if caller.operator => return Ok(EventFilter { accounts: None }),
            (None, _) => return Err(principal_required()),
        };
        Ok(EventFilter {
            accounts: Some(accounts.into_iter().collect()),
        })
    }

    /// Reads the audit trail (the local operator's).
    pub async fn audit_trail(
        &self,
        caller: &Caller,
        filter: AuditFilter,
    ) -> Result<Vec<AuditEntry>, Refusal> {
        if caller.principal.is_some() || !caller.operator {
            return Err(Refusal::new(
                Reason::RoleForbidden,
                "the audit trail is for the local operator: call ListAudit on the Unix socket",
            ));
        }
        Ok(self.ledger.list_audit(filter).await?)
    }

    /// Stops a session on a caller's request, after the role check.
    pub async fn stop(
        &self,
        caller: &Caller,
        id: &SessionId,
        grace: Duration,
    ) -> Result<SessionRecord, Refusal> {
        let session = self.get(caller, id).await?;
        let actor = match &caller.principal {
            Some(principal) => Actor::Principal(principal.clone()),
            None => Actor::Operator,
        };
        self.stop_session(session, grace, EndReason::Stopped, actor)
            .await
    }

    /// Stops a session's container (SIGTERM, SIGKILL after `grace`) and
    /// closes it at Docker's FinishedAt with `reason`. Stopping an ended
    /// session returns it.
    async fn stop_session(
        &self,
        session: SessionRecord,
        grace: Duration,
        reason: EndReason,
        actor: Actor,
    ) -> Result<SessionRecord, Refusal> {
        let id = &session.id;
        match session.state {
            SessionState::Ended => return Ok(session),
            SessionState::Starting => {
                return Err(Refusal::new(
                    Reason::InvalidRequest,
                    format!("session {id} is still starting; stop it once Launch has answered"),
                ));
            }
            SessionState::Running | SessionState::Stopping => {}
        }
        let container = session.container_id.clone().map(ContainerId);
        // Until Docker answers, a reconcile leaves this stop to us.
        self.claim_stop(id);
        let stopped = async {
            self.ledger.mark_stopping(id, reason).await?;
            if let Some(container) = &container {
                self.runtime
                    .stop(container, grace)
                    .await
                    .or_else(|error| match error {
                        RuntimeError::NoSuchContainer(_) => Ok(()),
                        other => Err(engine(other)),
                    })?;
            }
            Ok::<_, Refusal>(())
        }
        .await;
        release_stop(&self.stops_in_flight, id);
        stopped?;
        let mut finished_at = None;
        let mut detail = format!("stopped by {actor}");
        if let Some(container) = container
            && let Some(state) = self.runtime.inspect(&container).await.map_err(engine)?
        {
            finished_at = state.finished_at;
            detail = format!("{detail}; {}", exit_detail(&state));
        }
        self.audit(AuditRecord {
            at: self.clock.now(),
            action: AuditAction::Stop,
            actor: actor.clone(),
            account_id: session.account_id.clone(),
            session_id: id.0.clone(),
            reason: reason.as_str().to_owned(),
            detail: detail.clone(),
        })
        .await;
        let closed = self.close(id, finished_at, reason, detail).await?;
        match closed {
            Some(session) => {
                tracing::info!(session = %session.id, by = %actor, reason = %reason, "session stopped");
                Ok(session)
            }
            // Docker's die event closed it meanwhile.
            None => self
                .ledger
                .get(id)
                .await?
                .ok_or_else(|| unknown_session(id)),
        }
    }

    /// Marks a session's stop as carried out by this process; false when it
    /// already is.
    fn claim_stop(&self, id: &SessionId) -> bool {
        self.stops_in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone())
    }

    /// Ends a session in the ledger and announces it; ending an ended
    /// session changes nothing.
    async fn close(
        &self,
        id: &SessionId,
        ended_at: Option<UnixNanos>,
        reason: EndReason,
        detail: String,
    ) -> Result<Option<SessionRecord>, LedgerError> {
        let closed = self.ledger.close(id, ended_at, reason, detail).await?;
        if let Some(session) = &closed {
            self.scheduled
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .remove(id);
            self.events.publish(
                self.clock.now(),
                EventKind::SessionEnded(Box::new(session.clone())),
            );
        }
        Ok(closed)
    }
}

/// A launch in flight (`SessionManager::launches_in_flight`): gone when the
/// launch returns, or is dropped because its caller went away.
#[derive(Debug)]
struct LaunchInFlight<'a> {
    in_flight: &'a Mutex<HashSet<SessionId>>,
    id: SessionId,
}

impl Drop for LaunchInFlight<'_> {
    fn drop(&mut self) {
        release_stop(self.in_flight, &self.id);
    }
}

impl SessionManager {
    /// Registers the launch of session `id` until the guard is dropped.
    fn launching(&self, id: &SessionId) -> LaunchInFlight<'_> {
        self.launches_in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(id.clone());
        LaunchInFlight {
            in_flight: &self.launches_in_flight,
            id: id.clone(),
        }
    }

    /// Whether this process is launching session `id` now.
    fn is_launching(&self, id: &SessionId) -> bool {
        self.launches_in_flight
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(id)
    }
}

/// `id`'s stop (or launch) is no longer under way in this process.
fn release_stop(in_flight: &Mutex<HashSet<SessionId>>, id: &SessionId) {
    in_flight
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(id);
}

/// Docker volume of an account: the account id namespaces the request's
/// name, so no account can name another's volume.
pub fn volume_name(account_id: &str, name: &str) -> String {
    format!("gpuwarden.{account_id}.{name}")
}

fn exit_detail(state: &ContainerState) -> String {
    match state.exit_code {
        Some(code) => format!("exit code {code}"),
        None => String::new(),
    }
}

fn unknown_session(id: &SessionId) -> Refusal {
    Refusal::new(
        Reason::UnknownSession,
        format!("no session {id} on this node; ListSessions shows the ones there are"),
    )
}

/// Until accounts and roles arrive with the policy, a session belongs to
/// its owner and to the local operator.
fn unknown_account(account: &str) -> Refusal {
    Refusal::new(
        Reason::UnknownAccount,
        format!("no account `{account}` in this node's policy; check the id or the policy file"),
    )
}

fn principal_required() -> Refusal {
    Refusal::new(
        Reason::InvalidRequest,
        "name the principal (subject and kind) the request acts for; only the local operator may omit it",
    )
}
