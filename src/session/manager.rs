//! Where sessions live and die: launch (reserve devices in the ledger, then
//! create and start the container), stop, Docker's events, and the
//! reconcile pass that runs at start-up and at every checkpoint. The
//! reconcile is the one place the ledger is brought in line with what the
//! engine says: it adopts running containers, closes the ones that finished
//! or vanished at Docker's own times, cuts checkpoint usage, and reports
//! containers it does not know.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use super::request::{HOST_DEVICE_VARIABLES, LaunchPlan, clipped};
use super::{Caller, EndReason, Principal, SessionId, SessionRecord, SessionState};
use crate::allocation::{self, DeviceSelector, Unavailable};
use crate::clock::{Clock, UnixNanos};
use crate::config::DeviceInjection;
use crate::error::{Reason, Refusal};
use crate::events::{EventBus, EventFilter, EventKind};
use crate::gpu::{AssignableDevice, DeviceUuid};
use crate::ledger::{
    Actor, Adjustment, Admitted, AuditAction, AuditEntry, AuditFilter, AuditRecord, BeginError,
    Begun, Ledger, LedgerError, LedgerView, NewSession, SessionFilter, UsageTotal,
};
use crate::metering::{Credits, Rate};
use crate::policy::admission::{self, LaunchAccount, OpenSession};
use crate::policy::{AccountKind, Policy};
use crate::runtime::{
    ContainerEvent, ContainerEventKind, ContainerId, ContainerRuntime, ContainerSpec,
    ContainerState, DeviceRequest, RuntimeError, VolumeMount, labels,
};
use crate::session::BillingPath;

/// Grace between SIGTERM and SIGKILL when a stop names none.
pub const DEFAULT_STOP_GRACE: Duration = Duration::from_secs(10);
/// How often a reconcile is retried while launches wait on one.
const RECOVERY_RETRY: Duration = Duration::from_secs(5);
/// A STARTING session younger than this may still be in its launch; the
/// periodic reconcile leaves it alone.
const LAUNCH_WINDOW: Duration = Duration::from_secs(120);
/// Processes a session's container may have.
const PIDS_LIMIT: i64 = 4096;

mod credit;
mod enforcement;

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
    /// Sessions whose stop this process is carrying out. A STOPPING
    /// session not in here whose container runs had its stop cut short (the
    /// agent died, the engine was away): the next reconcile carries it out.
    stops_in_flight: Arc<Mutex<HashSet<SessionId>>>,
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
            stops_in_flight: Arc::default(),
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
    pub async fn busy_devices(&self) -> Result<HashMap<DeviceUuid, String>, Refusal> {
        let mut busy: HashMap<DeviceUuid, String> = self
            .ledger
            .holds()
            .await?
            .into_iter()
            .map(|(device, session)| (device, session.0))
            .collect();
        for (device, container) in self.foreign_devices() {
            busy.entry(device)
                .or_insert(format!("unknown container {container}"));
        }
        Ok(busy)
    }

    fn foreign_devices(&self) -> HashMap<DeviceUuid, ContainerId> {
        self.foreign
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Starts a session: reserves devices among `devices` (those in
    /// `unhealthy` excluded) and records the session in one ledger
    /// transaction, then creates and starts its container. A repeated
    /// request id returns the first session. Anything failing after the
    /// reservation removes the container and releases the devices.
    pub async fn launch(
        &self,
        plan: LaunchPlan,
        devices: Vec<AssignableDevice>,
        unhealthy: Vec<DeviceUuid>,
    ) -> Result<SessionRecord, Refusal> {
        if self.is_draining() {
            return Err(Refusal::new(
                Reason::NodeDraining,
                "this node is draining and takes no new sessions; launch on another node",
            ));
        }
        // Only a recovering reconcile takes this lock for writing, and a
        // launch that finds it free never meets one: once recovered, no
        // reconcile settles STARTING sessions again.
        let recovering = match self.recovery.try_read() {
            Ok(cause) => cause.clone(),
            Err(_) => Some(Refusal::new(
                Reason::LedgerUnavailable,
                "a reconcile after a failure is under way",
            )),
        };
        if let Some(cause) = recovering {
            return Err(Refusal::new(
                cause.reason,
                format!(
                    "this agent has not yet brought its ledger in line with the container \
                     engine since it started ({}); launches resume once it has: retry later \
                     or launch on another node",
                    cause.message
                ),
            ));
        }
        let mut unavailable: HashMap<DeviceUuid, Unavailable> = unhealthy
            .into_iter()
            .map(|uuid| (uuid, Unavailable::Unhealthy))
            .collect();
        for device in self.foreign_devices().into_keys() {
            unavailable.entry(device).or_insert(Unavailable::Foreign);
        }
        if let Some(credit) = &self.credit {
            credit.gate()?;
        }
        let policy = self.policy();
        let account =
            admission::authorize_launch(&policy, &plan.principal, plan.scope, &plan.account_id)?;
        let now = self.clock.now();
        let new = NewSession {
            id: SessionId::generate(),
            request_id: plan.request_id.clone(),
            node_id: self.settings.node_id.clone(),
            scope: plan.scope,
            account_id: account.account_id.clone(),
            billed_account_id: account.billed_account_id.clone(),
            owner: plan.principal.clone(),
            image: plan.image.clone(),
            billing_path: BillingPath::Balance,
            created_at: now,
        };
        let selector = plan.devices.clone();
        // With a control plane, balances are its own: local debits do not
        // count against the balance it sent.
        let local_balances = self.credit.is_none();
        // Decided on the ledger's view inside the transaction that records
        // the session: concurrent launches see each other's sessions.
        let begun = self
            .ledger
            .begin_session(new, move |view| {
                admit(
                    &policy,
                    &account,
                    view,
                    &devices,
                    unavailable,
                    &selector,
                    now,
                    local_balances,
                )
            })
            .await;
        let session = match begun {
            Ok(Begun::Existing(session)) => {
                tracing::info!(session = %session.id, request_id = %session.request_id, "repeated launch request: returning its session");
                return Ok(session);
            }
            Ok(Begun::Created(session)) => session,
            Err(BeginError::Refused(refusal)) => return Err(refusal),
            Err(BeginError::Ledger(error)) => return Err(error.into()),
        };

        let mut created = None;
        let started = async {
            let session = match &self.credit {
                Some(credit) => self.authorize_session(credit, &session).await?,
                None => session.clone(),
            };
            self.start_container(&session, &plan, &mut created).await
        };
        match started.await {
            Ok(running) => {
                tracing::info!(
                    session = %running.id,
                    account = %running.account_id,
                    devices = %running.device_list(),
                    container = running.container_id.as_deref().unwrap_or(""),
                    "session started"
                );
                self.events.publish(
                    self.clock.now(),
                    EventKind::SessionStarted(Box::new(running.clone())),
                );
                Ok(running)
            }
            Err(refusal) => {
                tracing::warn!(session = %session.id, reason = %refusal, "launch failed; releasing its devices");
                if let Some(id) = created
                    && let Err(error) = self.runtime.remove(&id).await
                {
                    tracing::error!(session = %session.id, container = %id, error = %error, "could not remove the container of a failed launch; the next reconcile retries");
                }
                if let Err(error) = self
                    .ledger
                    .close(
                        &session.id,
                        None,
                        EndReason::LaunchFailed,
                        refusal.message.clone(),
                    )
                    .await
                {
                    tracing::error!(session = %session.id, error = %error, "could not record the failed launch; the next reconcile closes it");
                }
                Err(refusal)
            }
        }
    }

    async fn start_container(
        &self,
        session: &SessionRecord,
        plan: &LaunchPlan,
        created: &mut Option<ContainerId>,
    ) -> Result<SessionRecord, Refusal> {
        let spec = self.container_spec(session, plan);
        for volume in &spec.volumes {
            let owner =
                BTreeMap::from([(labels::VOLUME_OWNER.to_owned(), session.account_id.clone())]);
            self.runtime
                .ensure_volume(&volume.volume, &owner)
                .await
                .map_err(engine)?;
        }
        let id = self.runtime.create(&spec).await.map_err(engine)?;
        *created = Some(id.clone());
        self.runtime.start(&id).await.map_err(engine)?;
        let state = self
            .runtime
            .inspect(&id)
            .await
            .map_err(engine)?
            .ok_or_else(|| engine(RuntimeError::NoSuchContainer(id.0.clone())))?;
        let started_at = state.started_at.ok_or_else(|| {
            engine(RuntimeError::Engine {
                call: "inspect",
                detail: format!("container {id} reports no StartedAt after its start"),
            })
        })?;
        let running = self
            .ledger
            .mark_running(&session.id, &id.0, started_at)
            .await?;
        if state.running {
            return Ok(running);
        }
        // It already exited: it ran from StartedAt to FinishedAt, billed so.
        Ok(self
            .ledger
            .close(
                &session.id,
                state.finished_at,
                EndReason::Exited,
                exit_detail(&state),
            )
            .await?
            .unwrap_or(running))
    }

    /// The container a plan asks for, with the session's devices and labels.
    fn container_spec(&self, session: &SessionRecord, plan: &LaunchPlan) -> ContainerSpec {
        let uuids: Vec<String> = session.devices.iter().map(|d| d.uuid.to_string()).collect();
        let visible = uuids.join(",");
        let mut env = plan.env.clone();
        env.insert("NVIDIA_VISIBLE_DEVICES".into(), visible.clone());
        env.insert("CUDA_VISIBLE_DEVICES".into(), visible.clone());
        for (variable, neutral) in HOST_DEVICE_VARIABLES {
            env.insert(variable.into(), neutral.into());
        }
        let devices = match self.settings.injection {
            DeviceInjection::Env => DeviceRequest::None,
            DeviceInjection::Nvidia => DeviceRequest::Devices {
                driver: "nvidia".into(),
                device_ids: uuids.clone(),
                capabilities: vec!["gpu".into()],
            },
            DeviceInjection::Cdi => DeviceRequest::Devices {
                driver: "cdi".into(),
                device_ids: uuids
                    .iter()
                    .map(|u| format!("nvidia.com/gpu={u}"))
                    .collect(),
                capabilities: Vec::new(),
            },
        };
        let labels = BTreeMap::from([
            (labels::SESSION.to_owned(), session.id.0.clone()),
            (labels::NODE.to_owned(), self.settings.node_id.clone()),
            (labels::ACCOUNT.to_owned(), session.account_id.clone()),
            (
                labels::BILLED_ACCOUNT.to_owned(),
                session.billed_account_id.clone(),
            ),
            (labels::SCOPE.to_owned(), session.scope.as_str().to_owned()),
            (labels::OWNER.to_owned(), session.owner.subject.clone()),
            (labels::DEVICES.to_owned(), visible),
        ]);
        ContainerSpec {
            name: format!("gpuwarden-{}", session.id),
            image: plan.image.clone(),
            command: plan.command.clone(),
            env,
            labels,
            volumes: plan
                .volumes
                .iter()
                .map(|v| VolumeMount {
                    volume: volume_name(&session.account_id, &v.name),
                    target: v.target.clone(),
                    read_only: v.read_only,
                })
                .collect(),
            devices,
            network: plan.network,
            pids_limit: PIDS_LIMIT,
        }
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

    /// Sessions the caller may see, of `account_id` (launched under it or
    /// billed to it) or of every account.
    pub async fn list(
        &self,
        caller: &Caller,
        account_id: Option<String>,
        include_ended: bool,
    ) -> Result<Vec<SessionRecord>, Refusal> {
        match (&caller.principal, &account_id) {
            (Some(principal), Some(account)) => {
                admission::may_list_account(&self.policy(), principal, account)?;
            }
            (None, _) if !caller.operator => return Err(principal_required()),
            _ => {}
        }
        let sessions = self
            .ledger
            .list(SessionFilter {
                account_id,
                include_ended,
            })
            .await?;
        Ok(sessions
            .into_iter()
            .filter(|session| self.authorize(caller, session).is_ok())
            .collect())
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
        let accounts: Vec<String> = match policy.kind_of(account_id) {
            Some(AccountKind::Org) => policy
                .subtree(account_id)
                .into_iter()
                .map(str::to_owned)
                .collect(),
            _ => vec![account_id.to_owned()],
        };
        let lines = self.ledger.usage(accounts, from, to).await?;
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
        let with_subtree = |account: &str| -> Vec<String> {
            match policy.kind_of(account) {
                Some(AccountKind::Org) => policy
                    .subtree(account)
                    .into_iter()
                    .map(str::to_owned)
                    .collect(),
                _ => vec![account.to_owned()],
            }
        };
        let accounts = match (&caller.principal, account) {
            (Some(principal), Some(account)) => {
                admission::may_list_account(&policy, principal, &account)?;
                with_subtree(&account)
            }
            (Some(principal), None) => {
                let mut accounts = vec![principal.subject.clone()];
                if let Some(org) = policy.service_account_org(&principal.subject) {
                    accounts.extend(with_subtree(org));
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
            (None, Some(account)) if caller.operator => with_subtree(&account),
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

    /// Acts on one engine event of a container of this node.
    pub async fn on_event(&self, event: ContainerEvent) {
        let Some(id) = event.labels.get(labels::SESSION).cloned().map(SessionId) else {
            return;
        };
        let result = match event.kind {
            ContainerEventKind::Start => self.on_start(&id, &event).await,
            ContainerEventKind::Die => {
                self.release_foreign(&event.id);
                self.on_exit(&id, &event).await
            }
            ContainerEventKind::Destroy => {
                self.release_foreign(&event.id);
                self.close_if_started(
                    &id,
                    Some(event.at),
                    EndReason::Removed,
                    "container removed".into(),
                )
                .await
            }
        };
        if let Err(error) = result {
            tracing::error!(session = %id, event = ?event.kind, error = %error, "could not record a container event; the next reconcile retries");
        }
    }

    /// A container with our labels started: ours when the ledger holds its
    /// session open (a launch records the session before creating the
    /// container), otherwise foreign, and its devices are withheld at once
    /// rather than at the next reconcile.
    async fn on_start(&self, id: &SessionId, event: &ContainerEvent) -> Result<(), Refusal> {
        let open = self
            .ledger
            .get(id)
            .await?
            .is_some_and(|session| session.state != SessionState::Ended);
        if open {
            return Ok(());
        }
        // A container known to have exited claims nothing: one that ran for
        // an instant, its session closed by its launch before this event.
        let exited = matches!(
            self.runtime.inspect(&event.id).await,
            Ok(Some(state)) if !state.running
        );
        if !exited {
            let mut foreign = self.foreign.lock().unwrap_or_else(PoisonError::into_inner);
            let seen_before = foreign.values().any(|holder| *holder == event.id);
            withhold_devices(&mut foreign, &event.id, &event.labels, &id.0, seen_before);
        }
        Ok(())
    }

    fn release_foreign(&self, container: &ContainerId) {
        self.foreign
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, holder| holder != container);
    }

    async fn on_exit(&self, id: &SessionId, event: &ContainerEvent) -> Result<(), Refusal> {
        let state = self.runtime.inspect(&event.id).await.map_err(engine)?;
        let finished_at = state
            .as_ref()
            .and_then(|s| s.finished_at)
            .or(Some(event.at));
        let detail = state.as_ref().map(exit_detail).unwrap_or_default();
        self.close_if_started(id, finished_at, EndReason::Exited, detail)
            .await
    }

    /// Closes a running (or stopping) session; STARTING ones belong to their
    /// launch, ended ones stay as they are.
    async fn close_if_started(
        &self,
        id: &SessionId,
        at: Option<UnixNanos>,
        reason: EndReason,
        detail: String,
    ) -> Result<(), Refusal> {
        let Some(session) = self.ledger.get(id).await? else {
            return Ok(());
        };
        let reason = match (session.state, reason) {
            (SessionState::Running, reason) => reason,
            // A die during a stop is the stop's, with the stop's reason.
            (SessionState::Stopping, _) => session.end_reason.unwrap_or(EndReason::Stopped),
            (SessionState::Starting | SessionState::Ended, _) => return Ok(()),
        };
        if let Some(closed) = self.close(id, at, reason, detail).await? {
            tracing::info!(session = %closed.id, reason = %reason, ended_at = ?closed.ended_at.map(|t| t.to_string()), "session ended");
        }
        Ok(())
    }

    /// Brings the ledger in line with the engine. `at_start` (the daemon's
    /// first reconcile, before it serves): no launch is in flight, so
    /// STARTING sessions are settled too. Until one such reconcile has
    /// succeeded, every reconcile is one, and launches are refused.
    pub async fn reconcile(&self, at_start: bool) -> Result<(), Refusal> {
        if !at_start && self.recovery.read().await.is_none() {
            return self.bring_in_line(false).await;
        }
        let mut recovery = self.recovery.write().await;
        if !at_start && recovery.is_none() {
            // Another reconcile recovered while this one waited.
            drop(recovery);
            return self.bring_in_line(false).await;
        }
        let result = self.bring_in_line(true).await;
        match &result {
            Ok(()) => {
                if recovery.take().is_some() {
                    tracing::info!(
                        "the ledger is in line with the container engine again; launches resume"
                    );
                }
            }
            Err(cause) => *recovery = Some(cause.clone()),
        }
        result
    }

    /// Why launches are refused until a reconcile succeeds, if they are.
    pub async fn recovering(&self) -> Option<Refusal> {
        self.recovery.read().await.clone()
    }

    async fn bring_in_line(&self, at_start: bool) -> Result<(), Refusal> {
        let containers = self
            .runtime
            .list_labelled(labels::NODE, &self.settings.node_id)
            .await
            .map_err(engine)?;
        let mut by_session: HashMap<String, ContainerState> = HashMap::new();
        for container in containers {
            if let Some(session) = container.labels.get(labels::SESSION) {
                by_session.insert(session.clone(), container);
            }
        }
        let open = self
            .ledger
            .list(SessionFilter {
                account_id: None,
                include_ended: false,
            })
            .await?;
        for session in open {
            // Taken before asking the engine: a container that answers
            // "running" was running at this instant too.
            let now = self.clock.now();
            let container = match &session.container_id {
                Some(id) => self
                    .runtime
                    .inspect(&ContainerId(id.clone()))
                    .await
                    .map_err(engine)?,
                None => by_session.get(&session.id.0).cloned(),
            };
            self.settle(&session, container, now, at_start).await?;
            by_session.remove(&session.id.0);
        }
        // The list is older than the ledger's view: a session that ended in
        // between (a stop, an exit) left its container in it as running.
        // Unknown are only those that still run now.
        let mut unknown = Vec::new();
        for container in by_session.into_values().filter(|c| c.running) {
            match self.runtime.inspect(&container.id).await {
                Ok(Some(state)) if state.running => unknown.push(state),
                Ok(_) => {}
                Err(_) => unknown.push(container),
            }
        }
        self.report_unknown(unknown);
        Ok(())
    }

    async fn settle(
        &self,
        session: &SessionRecord,
        container: Option<ContainerState>,
        now: UnixNanos,
        at_start: bool,
    ) -> Result<(), Refusal> {
        let id = &session.id;
        if session.state == SessionState::Starting {
            let young =
                now.0.saturating_sub(session.created_at.0) < LAUNCH_WINDOW.as_nanos() as i64;
            if young && !at_start {
                return Ok(());
            }
            return match container {
                Some(state) if state.running && state.started_at.is_some() => {
                    let started_at = state.started_at.unwrap_or(now);
                    self.ledger
                        .mark_running(id, &state.id.0, started_at)
                        .await?;
                    tracing::info!(session = %id, container = %state.id, "adopted a container whose launch was cut short");
                    Ok(())
                }
                Some(state) => {
                    // Created (and maybe started and finished) by a launch
                    // that never recorded it: bill what Docker says it ran.
                    if let Some(started_at) = state.started_at {
                        self.ledger
                            .mark_running(id, &state.id.0, started_at)
                            .await?;
                        self.close(
                            id,
                            state.finished_at,
                            EndReason::Exited,
                            exit_detail(&state),
                        )
                        .await?;
                    } else {
                        self.runtime.remove(&state.id).await.map_err(engine)?;
                        self.close(
                            id,
                            None,
                            EndReason::LaunchFailed,
                            "the agent stopped before this launch finished; the container \
                             never started and nothing was billed: launch again with a new \
                             request_id"
                                .into(),
                        )
                        .await?;
                    }
                    Ok(())
                }
                None => {
                    self.close(
                        id,
                        None,
                        EndReason::LaunchFailed,
                        "the agent stopped before this launch made its container; nothing \
                         ran and nothing was billed: launch again with a new request_id"
                            .into(),
                    )
                    .await?;
                    Ok(())
                }
            };
        }
        match container {
            Some(state) if state.running => {
                self.ledger.checkpoint(id, now).await?;
                if session.state == SessionState::Stopping && self.claim_stop(id) {
                    // A stop recorded but that Docker never carried out: the
                    // agent died first, or the engine was away. Carried out
                    // now, in the background so that a start does not wait
                    // out the grace; Docker's die event (or the next
                    // reconcile) closes the session with the stop's reason.
                    let reason = session.end_reason.unwrap_or(EndReason::Stopped);
                    tracing::info!(session = %id, container = %state.id, reason = %reason, "resuming a stop cut short");
                    self.audit(AuditRecord {
                        at: now,
                        action: AuditAction::Stop,
                        actor: Actor::Agent,
                        account_id: session.account_id.clone(),
                        session_id: id.0.clone(),
                        reason: reason.as_str().to_owned(),
                        detail: "resumed a stop cut short by an agent restart or an engine outage"
                            .into(),
                    })
                    .await;
                    let (runtime, in_flight) =
                        (Arc::clone(&self.runtime), Arc::clone(&self.stops_in_flight));
                    let (container, id) = (state.id.clone(), id.clone());
                    tokio::spawn(async move {
                        if let Err(error) = runtime.stop(&container, DEFAULT_STOP_GRACE).await {
                            tracing::warn!(session = %id, container = %container, error = %error, "could not resume a stop; the next reconcile retries");
                        }
                        release_stop(&in_flight, &id);
                    });
                } else if at_start {
                    tracing::info!(session = %id, container = %state.id, "adopted a running container");
                }
            }
            Some(state) => {
                let reason = if session.state == SessionState::Stopping {
                    session.end_reason.unwrap_or(EndReason::Stopped)
                } else {
                    EndReason::Exited
                };
                self.close(id, state.finished_at, reason, exit_detail(&state))
                    .await?;
                tracing::info!(session = %id, reason = %reason, "closed a session whose container finished");
            }
            None => {
                // Gone without a trace: billed up to the last instant it was
                // known to run (its last checkpoint), not a second more.
                self.close(id, None, EndReason::Removed, "container vanished".into())
                    .await?;
                tracing::warn!(session = %id, "closed a session whose container vanished");
            }
        }
        Ok(())
    }

    /// Containers with our node's labels that the ledger has no open
    /// session for: never billed or killed, reported, and their devices
    /// kept from other sessions while they run.
    fn report_unknown(&self, containers: Vec<ContainerState>) {
        let previous = self.foreign_devices();
        let mut foreign = HashMap::new();
        for container in containers.into_iter().filter(|c| c.running) {
            let session = container
                .labels
                .get(labels::SESSION)
                .map(String::as_str)
                .unwrap_or("");
            let seen_before = previous.values().any(|holder| *holder == container.id);
            withhold_devices(
                &mut foreign,
                &container.id,
                &container.labels,
                session,
                seen_before,
            );
        }
        *self.foreign.lock().unwrap_or_else(PoisonError::into_inner) = foreign;
    }

    /// Follows the engine's events until `shutdown`, re-subscribing with
    /// backoff when the stream breaks and reconciling after each
    /// (re)subscription so nothing missed meanwhile is lost.
    pub async fn follow_events(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let mut events = self.runtime.events(labels::NODE, &self.settings.node_id);
            if let Err(refusal) = self.reconcile(false).await {
                tracing::warn!(error = %refusal, "reconcile after subscribing to engine events failed");
            } else {
                backoff = Duration::from_millis(500);
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    event = events.next() => match event {
                        Some(Ok(event)) => self.on_event(event).await,
                        Some(Err(error)) => {
                            tracing::warn!(error = %error, "engine event stream failed; resubscribing");
                            break;
                        }
                        None => {
                            tracing::warn!("engine event stream ended; resubscribing");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Reconciles (and so cuts checkpoint usage and debits balances) every
    /// `interval` until `shutdown`, then enforces balances and
    /// reservations; wakes early when a scheduled stop falls due.
    pub async fn checkpoint_loop(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        loop {
            let next_stop = self.next_scheduled_stop().unwrap_or(interval);
            // Launches wait on a recovery: it is retried sooner than a checkpoint.
            let recovering = self.recovering().await.is_some();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    if let Err(refusal) = self.reconcile(false).await {
                        tracing::warn!(error = %refusal, "checkpoint failed; usage stays measured from Docker's times and is cut at the next one");
                    }
                }
                _ = tokio::time::sleep(RECOVERY_RETRY.min(interval)), if recovering => {
                    if let Err(refusal) = self.reconcile(false).await {
                        tracing::warn!(error = %refusal, "reconcile failed again; launches stay refused");
                    }
                }
                _ = tokio::time::sleep(next_stop) => {}
            }
            if let Err(refusal) = self.enforce().await {
                tracing::warn!(error = %refusal, "enforcing balances and reservations failed; retried at the next checkpoint");
            }
        }
    }
}

/// The stop of `id` is no longer under way in this process.
fn release_stop(in_flight: &Mutex<HashSet<SessionId>>, id: &SessionId) {
    in_flight
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .remove(id);
}

#[allow(clippy::too_many_arguments)]
/// Where a launch is decided, on the ledger's view inside the transaction
/// that records it: the account's pools, the devices (reservations of
/// other orgs kept out, the account's own preferred), the billing path and
/// the balance, in that order.
fn admit(
    policy: &Policy,
    account: &LaunchAccount,
    view: &LedgerView,
    devices: &[AssignableDevice],
    mut unavailable: HashMap<DeviceUuid, Unavailable>,
    selector: &DeviceSelector,
    now: UnixNanos,
    local_balances: bool,
) -> Result<Admitted, Refusal> {
    let open: Vec<OpenSession<'_>> = view
        .open
        .iter()
        .map(|session| OpenSession {
            id: &session.id,
            scope: session.scope,
            account_id: &session.account_id,
            devices: &session.devices,
        })
        .collect();
    admission::check_pools(account, policy, &open)?;
    for device in view.held.keys() {
        unavailable.insert(device.clone(), Unavailable::Held);
    }
    for (device, reserved) in admission::reserved_for_others(policy, account, now) {
        unavailable.entry(device).or_insert(reserved);
    }
    let preferred = admission::reserved_for(policy, account, now);
    let picked = allocation::pick_preferring(devices, &unavailable, selector, &preferred)?;
    let uuids: Vec<DeviceUuid> = picked.iter().map(|d| d.uuid.clone()).collect();
    let billing_path = admission::billing_path(policy, account, &uuids, now);
    let rates: Vec<Rate> = picked.iter().map(|d| policy.rate(&d.class)).collect();
    let mut balance = policy.opening_balance(&account.billed_account_id);
    if local_balances {
        balance = balance + view.balance_delta(&account.billed_account_id);
    }
    admission::check_balance(policy, account, billing_path, balance, &rates)?;
    Ok(Admitted {
        devices: picked.into_iter().zip(rates).collect(),
        billed_account_id: account.billed_account_id.clone(),
        billing_path,
    })
}

/// Records the devices a foreign container's labels claim; warns when the
/// container was not seen before, so the operator hears of it once.
fn withhold_devices(
    foreign: &mut HashMap<DeviceUuid, ContainerId>,
    container: &ContainerId,
    container_labels: &BTreeMap<String, String>,
    session: &str,
    seen_before: bool,
) {
    let devices = container_labels
        .get(labels::DEVICES)
        .map(String::as_str)
        .unwrap_or("");
    if !seen_before {
        tracing::warn!(
            container = %container,
            session,
            devices,
            "a running container with gpuwarden labels has no open session here: not billed, not stopped; its devices are withheld"
        );
    }
    for device in devices.split(',').filter(|d| !d.is_empty()) {
        foreign.insert(DeviceUuid::new(device), container.clone());
    }
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::events::Event;
    use crate::gpu::simulated::load_fixture;
    use crate::runtime::fake::{FakeCall, FakeCallKind, FakeRuntime};
    use crate::session::request::{ContainerRequest, LaunchRequest};
    use crate::session::{Principal, PrincipalKind, Scope};
    use std::path::Path;

    /// The manager's clock reads the fake engine's, so Docker's times and
    /// the agent's agree as they do on one host.
    #[derive(Debug)]
    struct EngineClock(Arc<FakeRuntime>);

    impl Clock for EngineClock {
        fn now(&self) -> UnixNanos {
            self.0.now()
        }
    }

    struct Setup {
        _dir: tempfile::TempDir,
        runtime: Arc<FakeRuntime>,
        manager: SessionManager,
        devices: Vec<AssignableDevice>,
    }

    fn setup(injection: DeviceInjection) -> Setup {
        let policy = Policy::load(Path::new("fixtures/policy-test.toml"), None)
            .unwrap()
            .policy;
        setup_with(injection, policy)
    }

    /// A manager under a policy written inline.
    fn setup_with_policy(text: &str) -> Setup {
        let policy = Policy::parse(Path::new("inline-policy.toml"), text, None)
            .unwrap()
            .policy;
        setup_with(DeviceInjection::Env, policy)
    }

    fn setup_with(injection: DeviceInjection, policy: Policy) -> Setup {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let runtime = Arc::new(FakeRuntime::new());
        let manager = SessionManager::new(
            SessionSettings {
                node_id: "n1".into(),
                injection,
            },
            ledger,
            runtime.clone(),
            Arc::new(EngineClock(runtime.clone())),
            Arc::new(policy),
            Arc::new(EventBus::new()),
        );
        let devices = load_fixture(Path::new("fixtures/sim-dgx-a100.toml"))
            .unwrap()
            .assignable();
        Setup {
            _dir: dir,
            runtime,
            manager,
            devices,
        }
    }

    fn plan(request_id: &str, mig: Option<&str>) -> LaunchPlan {
        LaunchRequest {
            request_id: request_id.into(),
            principal: Some(Principal {
                subject: "u-alice".into(),
                kind: PrincipalKind::User,
            }),
            scope: Some(Scope::Personal),
            gpu_count: if mig.is_some() { 0 } else { 1 },
            mig_profile: mig.unwrap_or_default().into(),
            mig_count: u32::from(mig.is_some()),
            container: ContainerRequest {
                image: "busybox".into(),
                ..Default::default()
            },
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    const OPERATOR: Caller = Caller {
        principal: None,
        operator: true,
    };

    fn created_specs(runtime: &FakeRuntime) -> Vec<ContainerSpec> {
        runtime
            .calls()
            .into_iter()
            .filter_map(|call| match call {
                FakeCall::Create(spec) => Some(*spec),
                _ => None,
            })
            .collect()
    }

    #[tokio::test]
    async fn a_launch_builds_the_container_with_its_devices_labels_and_docker_start_time() {
        let s = setup(DeviceInjection::Nvidia);
        let session = s
            .manager
            .launch(plan("r1", Some("3g.40gb")), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        assert_eq!(session.state, SessionState::Running);
        assert_eq!(session.started_at, Some(s.runtime.now()));
        let spec = &created_specs(&s.runtime)[0];
        let mig = "MIG-9346009d-10be-482f-b6aa-079b9d66247a";
        assert_eq!(spec.env["NVIDIA_VISIBLE_DEVICES"], mig);
        assert_eq!(spec.env["CUDA_VISIBLE_DEVICES"], mig);
        // The toolkit's other device variables are set neutral, so an
        // image's own ENV cannot turn them on.
        assert_eq!(spec.env["NVIDIA_MOFED"], "disabled");
        assert_eq!(spec.env["NVIDIA_IMEX_CHANNELS"], "");
        assert_eq!(spec.env["NVIDIA_MIG_CONFIG_DEVICES"], "");
        assert_eq!(spec.labels[labels::SESSION], session.id.0);
        assert_eq!(spec.labels[labels::NODE], "n1");
        assert_eq!(spec.labels[labels::DEVICES], mig);
        assert_eq!(
            spec.devices,
            DeviceRequest::Devices {
                driver: "nvidia".into(),
                device_ids: vec![mig.into()],
                capabilities: vec!["gpu".into()],
            }
        );
    }

    #[tokio::test]
    async fn cdi_and_env_injection_build_their_requests() {
        let s = setup(DeviceInjection::Cdi);
        s.manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        let DeviceRequest::Devices {
            driver, device_ids, ..
        } = &created_specs(&s.runtime)[0].devices
        else {
            panic!("CDI needs a device request");
        };
        assert_eq!(driver, "cdi");
        assert_eq!(
            device_ids,
            &["nvidia.com/gpu=GPU-faba74c6-7dc9-4bfd-ab4e-85cb4d26fa32"]
        );

        let s = setup(DeviceInjection::Env);
        s.manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        let spec = &created_specs(&s.runtime)[0];
        assert_eq!(spec.devices, DeviceRequest::None);
        assert_eq!(
            spec.env["NVIDIA_VISIBLE_DEVICES"],
            "GPU-faba74c6-7dc9-4bfd-ab4e-85cb4d26fa32"
        );
    }

    #[tokio::test]
    async fn a_launch_failing_half_way_releases_devices_and_removes_its_container() {
        let s = setup(DeviceInjection::Env);
        s.runtime.fail_next_start(RuntimeError::Engine {
            call: "start",
            detail: "boom".into(),
        });
        let refusal = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::ContainerEngineUnavailable);
        assert!(
            s.runtime
                .calls()
                .iter()
                .any(|c| c.kind() == FakeCallKind::Remove)
        );
        assert!(s.runtime.containers().is_empty());
        assert!(s.manager.busy_devices().await.unwrap().is_empty());
        let failed = s.manager.list(&OPERATOR, None, true).await.unwrap();
        assert_eq!(failed[0].end_reason, Some(EndReason::LaunchFailed));
        assert_eq!(failed[0].recorded.device_ms, 0);
        // The same request again is answered with that session, ended, and
        // its cause: never a second container for one request_id.
        let creates = |s: &Setup| {
            s.runtime
                .calls()
                .iter()
                .filter(|c| c.kind() == FakeCallKind::Create)
                .count()
        };
        let before = creates(&s);
        let again = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        assert_eq!(again.id, failed[0].id);
        assert_eq!(again.state, SessionState::Ended);
        assert_eq!(again.end_reason, Some(EndReason::LaunchFailed));
        assert!(!again.end_detail.is_empty(), "{again:?}");
        assert_eq!(creates(&s), before);
        // The same device goes to the next launch.
        let next = s
            .manager
            .launch(plan("r2", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        assert_eq!(next.devices[0].uuid, failed[0].devices[0].uuid);
    }

    #[tokio::test]
    async fn an_unwritable_ledger_refuses_launches_before_any_container_exists() {
        let s = setup(DeviceInjection::Env);
        // Another writer holding the database: every write here fails.
        let blocker = rusqlite::Connection::open(s.manager.ledger().path()).unwrap();
        blocker.execute_batch("BEGIN EXCLUSIVE; INSERT INTO sessions (id, request_id, node_id, scope, account_id, billed_account_id, owner, owner_kind, image, state, billing_path, created_at_ns) VALUES ('x','x','x','personal','x','x','x','user','x','ended','balance',0);").unwrap();
        let refusal = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::LedgerUnavailable);
        assert!(
            created_specs(&s.runtime).is_empty(),
            "a container was made without a ledger entry"
        );
    }

    #[tokio::test]
    async fn unhealthy_and_draining_refuse_with_their_reasons() {
        let s = setup(DeviceInjection::Env);
        let gpus: Vec<DeviceUuid> = s
            .devices
            .iter()
            .filter(|d| d.mig_profile.is_none())
            .map(|d| d.uuid.clone())
            .collect();
        let refusal = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), gpus)
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::NoFreeDevices);
        s.manager
            .set_draining(true, "maintenance".into(), Actor::Operator)
            .await;
        let refusal = s
            .manager
            .launch(plan("r2", None), s.devices.clone(), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::NodeDraining);
    }

    #[tokio::test]
    async fn a_foreign_container_starting_withholds_its_devices_until_it_dies() {
        let s = setup(DeviceInjection::Env);
        let mut gpus = s.devices.iter().filter(|d| d.mig_profile.is_none());
        let free = gpus.next().unwrap().uuid.clone();
        let unhealthy: Vec<DeviceUuid> = gpus.map(|d| d.uuid.clone()).collect();
        let stray = ContainerId("stray".into());
        let event = |kind| ContainerEvent {
            id: stray.clone(),
            kind,
            at: s.runtime.now(),
            labels: BTreeMap::from([
                (labels::NODE.to_owned(), "n1".to_owned()),
                (labels::SESSION.to_owned(), "s-unknown".to_owned()),
                (labels::DEVICES.to_owned(), free.to_string()),
            ]),
        };
        s.manager.on_event(event(ContainerEventKind::Start)).await;
        let refusal = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), unhealthy.clone())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::NoFreeDevices);
        assert!(s.manager.ledger().holds().await.unwrap().is_empty());

        s.manager.on_event(event(ContainerEventKind::Die)).await;
        let session = s
            .manager
            .launch(plan("r2", None), s.devices.clone(), unhealthy)
            .await
            .unwrap();
        assert_eq!(session.devices[0].uuid, free);
    }

    #[tokio::test]
    async fn checkpoints_cut_usage_and_the_end_bills_up_to_dockers_finish() {
        let s = setup(DeviceInjection::Env);
        let session = s
            .manager
            .launch(plan("r1", Some("1g.10gb")), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        let container = ContainerId(session.container_id.clone().unwrap());
        s.runtime.advance(Duration::from_millis(60_250));
        s.manager.reconcile(false).await.unwrap();
        let after_checkpoint = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(after_checkpoint.recorded.device_ms, 60_250);
        assert_eq!(after_checkpoint.state, SessionState::Running);

        s.runtime.advance(Duration::from_millis(9_750));
        let finished = s.runtime.now();
        assert!(s.runtime.exit(&container, 0, finished));
        s.runtime.advance(Duration::from_secs(5));
        s.manager
            .on_event(ContainerEvent {
                id: container.clone(),
                kind: ContainerEventKind::Die,
                at: s.runtime.now(),
                labels: BTreeMap::from([(labels::SESSION.to_owned(), session.id.0.clone())]),
            })
            .await;
        let ended = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(ended.state, SessionState::Ended);
        assert_eq!(ended.end_reason, Some(EndReason::Exited));
        assert_eq!(ended.ended_at, Some(finished));
        assert_eq!(ended.recorded.device_ms, 70_000);
        assert!((ended.recorded.gpu_seconds - 10.0).abs() < 1e-9);
        assert!(s.manager.busy_devices().await.unwrap().is_empty());
    }

    /// One A100 at 0.01 credits a second; a launch needs 10 s of credit.
    const SMALL_BALANCE: &str = r#"
        [rates]
        default = 0.01
        [enforcement]
        min_balance_seconds = 10
        grace_seconds = 30
        on_balance_exhausted = "stop"
        [[users]]
        id = "u-alice"
        email = "a@example.com"
        plan = "pro"
        balance = 0.5
    "#;

    fn alice_gpu(request_id: &str) -> LaunchPlan {
        plan(request_id, None)
    }

    fn drain_events(receiver: &mut tokio::sync::broadcast::Receiver<Event>) -> Vec<EventKind> {
        let mut kinds = Vec::new();
        while let Ok(event) = receiver.try_recv() {
            kinds.push(event.kind);
        }
        kinds
    }

    #[tokio::test]
    async fn each_checkpoint_debits_the_billed_balance_by_the_cost_of_its_records() {
        let s = setup_with_policy(SMALL_BALANCE);
        let session = s
            .manager
            .launch(alice_gpu("r1"), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        s.runtime.advance(Duration::from_millis(12_345));
        s.manager.reconcile(false).await.unwrap();
        let checkpointed = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(checkpointed.recorded.cost, Credits(123_450_000));
        assert_eq!(
            s.manager.balance_of("u-alice").await.unwrap(),
            Credits::from_f64(0.5) - Credits(123_450_000)
        );
    }

    #[tokio::test]
    async fn a_balance_too_low_for_the_minimum_refuses_the_launch_before_any_container() {
        let s = setup_with_policy(&SMALL_BALANCE.replace("balance = 0.5", "balance = 0.099"));
        let refusal = s
            .manager
            .launch(alice_gpu("r1"), s.devices.clone(), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::BalanceExhausted);
        assert!(s.runtime.calls().is_empty(), "{:?}", s.runtime.calls());
        assert!(s.manager.ledger().holds().await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn an_exhausted_balance_stops_its_sessions_after_the_grace_period_and_says_so() {
        let s = setup_with_policy(SMALL_BALANCE);
        let mut events = s.manager.events().subscribe();
        let session = s
            .manager
            .launch(alice_gpu("r1"), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        // 0.5 credits at 0.01/s last 50 s.
        s.runtime.advance(Duration::from_secs(45));
        s.manager.reconcile(false).await.unwrap();
        s.manager.enforce().await.unwrap();
        let kinds = drain_events(&mut events);
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, EventKind::BalanceLow(n) if n.account_id == "u-alice")),
            "{kinds:?}"
        );

        s.runtime.advance(Duration::from_secs(6));
        s.manager.reconcile(false).await.unwrap();
        s.manager.enforce().await.unwrap();
        let exhausted_at = s.runtime.now();
        let kinds = drain_events(&mut events);
        let stop_at = UnixNanos(exhausted_at.0 + 30_000_000_000);
        assert!(
            kinds.contains(&EventKind::SessionStopScheduled {
                session_id: session.id.clone(),
                account_id: "u-alice".into(),
                reason: EndReason::BalanceExhausted,
                stop_at,
            }),
            "{kinds:?}"
        );
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, EventKind::BalanceExhausted(n)
                if n.session_ids == vec![session.id.clone()] && n.stop_at == Some(stop_at)
                    && n.balance < Credits::ZERO)),
            "{kinds:?}"
        );
        // Within the grace period it runs on.
        s.runtime.advance(Duration::from_secs(29));
        s.manager.enforce().await.unwrap();
        let running = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(running.state, SessionState::Running);

        s.runtime.advance(Duration::from_secs(1));
        s.manager.enforce().await.unwrap();
        let ended = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(ended.state, SessionState::Ended);
        assert_eq!(ended.end_reason, Some(EndReason::BalanceExhausted));
        assert_eq!(ended.ended_at, Some(stop_at));
        let kinds = drain_events(&mut events);
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, EventKind::SessionEnded(r) if r.id == session.id)),
            "{kinds:?}"
        );
        // Billed to the end: 81 s at 0.01.
        assert_eq!(ended.recorded.cost, Credits::from_f64(0.81));
        assert_eq!(
            s.manager.balance_of("u-alice").await.unwrap(),
            Credits::from_f64(0.5 - 0.81)
        );
    }

    #[tokio::test]
    async fn a_top_up_within_the_grace_period_cancels_the_stop() {
        let s = setup_with_policy(SMALL_BALANCE);
        let session = s
            .manager
            .launch(alice_gpu("r1"), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        s.runtime.advance(Duration::from_secs(60));
        s.manager.reconcile(false).await.unwrap();
        s.manager.enforce().await.unwrap();
        s.runtime.advance(Duration::from_secs(10));
        let (_, balance) = s
            .manager
            .adjust_balance(&OPERATOR, "u-alice", Credits::from_f64(100.0), "invoice 42")
            .await
            .unwrap();
        assert_eq!(balance, Credits::from_f64(100.5 - 0.6));
        s.runtime.advance(Duration::from_secs(60));
        s.manager.reconcile(false).await.unwrap();
        s.manager.enforce().await.unwrap();
        let running = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(running.state, SessionState::Running);
        let audit = s
            .manager
            .audit_trail(
                &OPERATOR,
                AuditFilter {
                    account_id: Some("u-alice".into()),
                    since: None,
                    limit: 10,
                },
            )
            .await
            .unwrap();
        assert_eq!(audit[0].record.action, AuditAction::AdjustBalance);
        assert!(audit[0].record.detail.contains("invoice 42"), "{audit:?}");
        assert_eq!(audit[1].record.action, AuditAction::Launch);
    }

    #[tokio::test]
    async fn with_continue_an_exhausted_balance_is_announced_and_the_session_runs_on() {
        let s = setup_with_policy(&SMALL_BALANCE.replace("\"stop\"", "\"continue\""));
        let mut events = s.manager.events().subscribe();
        let session = s
            .manager
            .launch(alice_gpu("r1"), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        s.runtime.advance(Duration::from_secs(200));
        s.manager.reconcile(false).await.unwrap();
        s.manager.enforce().await.unwrap();
        s.runtime.advance(Duration::from_secs(200));
        s.manager.enforce().await.unwrap();
        let kinds = drain_events(&mut events);
        assert!(
            kinds
                .iter()
                .any(|k| matches!(k, EventKind::BalanceExhausted(n) if n.stop_at.is_none())),
            "{kinds:?}"
        );
        assert!(
            !kinds
                .iter()
                .any(|k| matches!(k, EventKind::SessionStopScheduled { .. }))
        );
        let running = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(running.state, SessionState::Running);
    }

    /// GPU index 7 of sim-dgx-a100, reserved for acme from 10 s after the
    /// fake engine's start (2023-11-14T22:13:20Z).
    const GPU7: &str = "GPU-6a5da790-0728-45bf-9407-3e280f594b6d";
    const RESERVED_SOON: &str = r#"
        [rates]
        default = 0.01
        [enforcement]
        grace_seconds = 5
        [[users]]
        id = "u-alice"
        email = "a@example.com"
        plan = "pro"
        balance = 100.0
        [[users]]
        id = "u-bob"
        email = "b@example.com"
        plan = "pro"
        balance = 100.0
        [[orgs]]
        id = "acme"
        name = "Acme"
        plan = "business"
        balance = 100.0
        members = [{ user = "u-alice", role = "owner" }]
        [[orgs]]
        id = "acme-vision"
        name = "Acme Vision"
        parent = "acme"
        members = [{ user = "u-alice", role = "member" }]
        [[reservations]]
        org = "acme"
        devices = ["GPU-6a5da790-0728-45bf-9407-3e280f594b6d"]
        windows = [{ start = "2023-11-14T22:13:30Z", end = "2023-11-14T23:13:30Z" }]
        billing = "reservation"
    "#;

    fn exact(request_id: &str, subject: &str, scope: Scope, org: &str) -> LaunchPlan {
        LaunchRequest {
            request_id: request_id.into(),
            principal: Some(Principal {
                subject: subject.into(),
                kind: PrincipalKind::User,
            }),
            scope: Some(scope),
            org_id: org.into(),
            device_uuids: vec![GPU7.into()],
            container: ContainerRequest {
                image: "busybox".into(),
                ..Default::default()
            },
            ..Default::default()
        }
        .validate()
        .unwrap()
    }

    #[tokio::test]
    async fn a_reservation_window_opening_stops_other_accounts_sessions_after_the_grace() {
        let s = setup_with_policy(RESERVED_SOON);
        let bobs = s
            .manager
            .launch(
                exact("r1", "u-bob", Scope::Personal, ""),
                s.devices.clone(),
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(bobs.billing_path, BillingPath::Balance);
        s.runtime.advance(Duration::from_millis(9_999));
        s.manager.enforce().await.unwrap();
        s.runtime.advance(Duration::from_millis(1));
        s.manager.enforce().await.unwrap();
        assert_eq!(
            s.manager.get(&OPERATOR, &bobs.id).await.unwrap().state,
            SessionState::Running
        );
        s.runtime.advance(Duration::from_secs(5));
        s.manager.enforce().await.unwrap();
        let ended = s.manager.get(&OPERATOR, &bobs.id).await.unwrap();
        assert_eq!(ended.end_reason, Some(EndReason::ReservationStarted));

        // In the window: others are refused, the org's sub-account gets it
        // on the reservation's billing path, metered and not debited.
        let refusal = s
            .manager
            .launch(
                exact("r2", "u-bob", Scope::Personal, ""),
                s.devices.clone(),
                Vec::new(),
            )
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::DeviceReserved);
        let vision = s
            .manager
            .launch(
                exact("r3", "u-alice", Scope::Org, "acme-vision"),
                s.devices.clone(),
                Vec::new(),
            )
            .await
            .unwrap();
        assert_eq!(vision.billing_path, BillingPath::Reservation);
        assert_eq!(vision.billed_account_id, "acme");
        s.runtime.advance(Duration::from_secs(100));
        s.manager.reconcile(false).await.unwrap();
        let metered = s.manager.get(&OPERATOR, &vision.id).await.unwrap();
        assert_eq!(metered.recorded.device_ms, 100_000);
        assert_eq!(
            s.manager.balance_of("acme").await.unwrap(),
            Credits::from_f64(100.0)
        );
    }

    #[tokio::test]
    async fn a_sub_accounts_usage_is_billed_to_the_top_and_reported_under_the_parent() {
        let s = setup_with_policy(RESERVED_SOON);
        let plan = LaunchRequest {
            request_id: "r1".into(),
            principal: Some(Principal {
                subject: "u-alice".into(),
                kind: PrincipalKind::User,
            }),
            scope: Some(Scope::Org),
            org_id: "acme-vision".into(),
            gpu_count: 1,
            container: ContainerRequest {
                image: "busybox".into(),
                ..Default::default()
            },
            ..Default::default()
        }
        .validate()
        .unwrap();
        let session = s
            .manager
            .launch(plan, s.devices.clone(), Vec::new())
            .await
            .unwrap();
        assert_eq!(session.billed_account_id, "acme");
        s.runtime.advance(Duration::from_secs(10));
        s.manager
            .stop(&OPERATOR, &session.id, Duration::from_secs(1))
            .await
            .unwrap();
        let report = s
            .manager
            .usage(&OPERATOR, "acme", UnixNanos(0), s.runtime.now())
            .await
            .unwrap();
        assert_eq!(report.billed_account_id, "acme");
        assert_eq!(report.lines.len(), 1, "{report:?}");
        assert_eq!(report.lines[0].account_id, "acme-vision");
        assert_eq!(report.lines[0].device_ms, 10_000);
        assert_eq!(report.lines[0].cost, Credits::from_f64(0.1));
        assert_eq!(report.balance, Credits::from_f64(99.9));
        // A plain member of acme-vision who owns acme is its owner too.
        let alice = Caller {
            principal: Some(Principal {
                subject: "u-alice".into(),
                kind: PrincipalKind::User,
            }),
            operator: false,
        };
        let refusal = s
            .manager
            .usage(&alice, "acme-vision", UnixNanos(0), s.runtime.now())
            .await;
        assert!(
            refusal.is_ok(),
            "the owner of acme is owner of acme-vision: {refusal:?}"
        );
    }

    #[tokio::test]
    async fn until_a_start_up_reconcile_succeeds_launches_are_refused_with_its_reason() {
        let s = setup(DeviceInjection::Env);
        let running = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        s.runtime.fail_next(
            FakeCallKind::List,
            RuntimeError::Unreachable {
                socket: "fake".into(),
                detail: "the engine is away".into(),
            },
        );
        let cause = s.manager.reconcile(true).await.unwrap_err();
        assert_eq!(cause.reason, Reason::ContainerEngineUnavailable);
        let refusal = s
            .manager
            .launch(plan("r2", None), s.devices.clone(), Vec::new())
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::ContainerEngineUnavailable);
        assert!(
            refusal
                .message
                .contains("not yet brought its ledger in line")
                && refusal.message.contains("the engine is away"),
            "{}",
            refusal.message
        );
        assert_eq!(s.manager.recovering().await, Some(cause));
        // Reads still work.
        let seen = s.manager.get(&OPERATOR, &running.id).await.unwrap();
        assert_eq!(seen.state, SessionState::Running);

        // The next periodic reconcile succeeds: launches resume.
        s.manager.reconcile(false).await.unwrap();
        assert_eq!(s.manager.recovering().await, None);
        let second = s
            .manager
            .launch(plan("r2", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        assert_eq!(second.state, SessionState::Running);
        assert_ne!(second.devices, running.devices);
    }

    #[tokio::test]
    async fn a_stop_that_never_reached_the_engine_is_carried_out_by_the_next_reconcile() {
        let s = setup(DeviceInjection::Env);
        let session = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        s.runtime.advance(Duration::from_secs(5));
        s.runtime.fail_next(
            FakeCallKind::Stop,
            RuntimeError::Unreachable {
                socket: "fake".into(),
                detail: "the engine is away".into(),
            },
        );
        let refusal = s
            .manager
            .stop(&OPERATOR, &session.id, Duration::from_secs(1))
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::ContainerEngineUnavailable);
        let stopping = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(stopping.state, SessionState::Stopping);
        // The engine is back: the reconcile carries the stop out (in the
        // background), the next one closes the session with its reason.
        s.runtime.advance(Duration::from_secs(5));
        let container = ContainerId(session.container_id.clone().unwrap());
        for _ in 0..100 {
            s.manager.reconcile(false).await.unwrap();
            if s.manager.get(&OPERATOR, &session.id).await.unwrap().state == SessionState::Ended {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        let ended = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(ended.state, SessionState::Ended);
        assert_eq!(ended.end_reason, Some(EndReason::Stopped));
        assert_eq!(ended.recorded.device_ms, 10_000);
        let stops = s
            .runtime
            .calls()
            .into_iter()
            .filter(|call| *call == FakeCall::Stop(container.clone()))
            .count();
        assert_eq!(stops, 2, "the failed stop and the one carried out");
    }

    #[tokio::test]
    async fn the_late_start_event_of_a_container_that_already_exited_withholds_nothing() {
        let s = setup(DeviceInjection::Env);
        let session = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        let container = ContainerId(session.container_id.clone().unwrap());
        s.runtime.advance(Duration::from_secs(1));
        assert!(s.runtime.exit(&container, 0, s.runtime.now()));
        s.manager.reconcile(false).await.unwrap();
        s.manager
            .on_event(ContainerEvent {
                id: container.clone(),
                kind: ContainerEventKind::Start,
                at: s.runtime.now(),
                labels: s.runtime.spec(&container).unwrap().labels,
            })
            .await;
        assert!(s.manager.busy_devices().await.unwrap().is_empty());
    }

    /// The fake engine, except that a session is stopped (its container
    /// exits, the ledger closes it) between a reconcile's list of
    /// containers and its read of the ledger, as a concurrent Stop can.
    #[derive(Debug)]
    struct StopDuringList {
        fake: Arc<FakeRuntime>,
        ledger: Ledger,
        victim: Mutex<Option<(SessionId, ContainerId)>>,
    }

    #[async_trait::async_trait]
    impl ContainerRuntime for StopDuringList {
        async fn ensure_volume(
            &self,
            name: &str,
            labels: &BTreeMap<String, String>,
        ) -> Result<(), RuntimeError> {
            self.fake.ensure_volume(name, labels).await
        }
        async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
            self.fake.create(spec).await
        }
        async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
            self.fake.start(id).await
        }
        async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerState>, RuntimeError> {
            self.fake.inspect(id).await
        }
        async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
            self.fake.stop(id, grace).await
        }
        async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
            self.fake.remove(id).await
        }
        async fn list_labelled(
            &self,
            key: &str,
            value: &str,
        ) -> Result<Vec<ContainerState>, RuntimeError> {
            let list = self.fake.list_labelled(key, value).await?;
            let victim = self.victim.lock().unwrap().take();
            if let Some((session, container)) = victim {
                let at = self.fake.now();
                self.fake.exit(&container, 0, at);
                self.ledger
                    .close(&session, Some(at), EndReason::Stopped, String::new())
                    .await
                    .unwrap();
            }
            Ok(list)
        }
        fn events(
            &self,
            key: &str,
            value: &str,
        ) -> futures_util::stream::BoxStream<'static, Result<ContainerEvent, RuntimeError>>
        {
            self.fake.events(key, value)
        }
    }

    #[tokio::test]
    async fn a_session_stopped_during_a_reconcile_leaves_no_device_withheld() {
        let dir = tempfile::tempdir().unwrap();
        let ledger = Ledger::open(dir.path()).unwrap();
        let fake = Arc::new(FakeRuntime::new());
        let runtime = Arc::new(StopDuringList {
            fake: fake.clone(),
            ledger: ledger.clone(),
            victim: Mutex::new(None),
        });
        let policy = Policy::load(Path::new("fixtures/policy-test.toml"), None)
            .unwrap()
            .policy;
        let manager = SessionManager::new(
            SessionSettings {
                node_id: "n1".into(),
                injection: DeviceInjection::Env,
            },
            ledger,
            runtime.clone(),
            Arc::new(EngineClock(fake.clone())),
            Arc::new(policy),
            Arc::new(EventBus::new()),
        );
        let devices = load_fixture(Path::new("fixtures/sim-dgx-a100.toml"))
            .unwrap()
            .assignable();
        let session = manager
            .launch(plan("r1", None), devices, Vec::new())
            .await
            .unwrap();
        fake.advance(Duration::from_secs(5));
        *runtime.victim.lock().unwrap() = Some((
            session.id.clone(),
            ContainerId(session.container_id.clone().unwrap()),
        ));
        manager.reconcile(false).await.unwrap();
        let ended = manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(ended.state, SessionState::Ended);
        let busy = manager.busy_devices().await.unwrap();
        assert!(
            busy.is_empty(),
            "withheld after their session ended: {busy:?}"
        );
    }

    #[tokio::test]
    async fn a_container_that_vanished_is_billed_to_its_last_checkpoint_only() {
        let s = setup(DeviceInjection::Env);
        let session = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        s.runtime.advance(Duration::from_secs(60));
        s.manager.reconcile(false).await.unwrap();
        s.runtime
            .vanish(&ContainerId(session.container_id.clone().unwrap()));
        s.runtime.advance(Duration::from_secs(60));
        s.manager.reconcile(true).await.unwrap();
        let ended = s.manager.get(&OPERATOR, &session.id).await.unwrap();
        assert_eq!(ended.end_reason, Some(EndReason::Removed));
        assert_eq!(ended.recorded.device_ms, 60_000);
    }

    #[tokio::test]
    async fn stop_is_for_the_owner_and_the_operator() {
        let s = setup(DeviceInjection::Env);
        let session = s
            .manager
            .launch(plan("r1", None), s.devices.clone(), Vec::new())
            .await
            .unwrap();
        let bob = Caller {
            principal: Some(Principal {
                subject: "u-bob".into(),
                kind: PrincipalKind::User,
            }),
            operator: false,
        };
        let refusal = s
            .manager
            .stop(&bob, &session.id, Duration::ZERO)
            .await
            .unwrap_err();
        assert_eq!(refusal.reason, Reason::RoleForbidden);
        assert!(s.manager.list(&bob, None, true).await.unwrap().is_empty());
        let alice = Caller {
            principal: Some(session.owner.clone()),
            operator: false,
        };
        s.runtime.advance(Duration::from_secs(3));
        let stopped = s
            .manager
            .stop(&alice, &session.id, Duration::ZERO)
            .await
            .unwrap();
        assert_eq!(stopped.end_reason, Some(EndReason::Stopped));
        assert_eq!(stopped.recorded.device_ms, 3_000);
        // Stopping again returns the ended session unchanged.
        assert_eq!(
            s.manager
                .stop(&alice, &session.id, Duration::ZERO)
                .await
                .unwrap(),
            stopped
        );
    }
}
