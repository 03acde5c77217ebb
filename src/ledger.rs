//! The local, crash-safe ledger: SQLite in WAL mode with synchronous=FULL
//! under the state directory. It holds sessions, the devices each holds
//! (a device is held by at most one open session: the `device_holds`
//! primary key enforces it), and the usage records cut at every checkpoint
//! and at each session's end: the outbox later delivered to the control
//! plane. Every change of a session and its usage is one transaction.
//!
//! Every read it serves costs the same whatever the history (`usage`): sums
//! are kept beside the records they sum, in the same transaction (per
//! session, per account and day, all-time; the outbox backlog is a
//! counter), sessions are listed in pages through indexes, and raw records
//! past the retention are folded away without changing any sum. Tables and
//! their migrations are in `schema`.
//!
//! SQLite calls block (an fsync per commit); async code reaches them on
//! tokio's blocking pool only: writes through `Ledger::call_with` on the
//! writer connection, reads through `Ledger::read` on a connection of
//! their own, so that no read (a scrape, a usage report) holds up a launch,
//! a checkpoint or a stop.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use rusqlite::{Connection, OptionalExtension, Row, Transaction, params};

mod schema;
#[cfg(test)]
mod tests;
mod usage;

pub use usage::DAY_NS;

use crate::clock::UnixNanos;
use crate::error::{Reason, Refusal};
use crate::gpu::{AssignableDevice, DeviceUuid, GpuWeight};
use crate::metering::{self, Credits, MeteredDevice, Rate};
use crate::session::{
    BillingPath, EndReason, Principal, PrincipalKind, RecordedUsage, Scope, SessionId,
    SessionRecord, SessionState, text_enum,
};

pub const FILE_NAME: &str = "ledger.db";

#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The state directory could not be made.
    #[error("cannot create the state directory {}: {source}", path.display())]
    StateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused a read or a write (disk full, read-only, corrupt).
    #[error("ledger {}: {source}", path.display())]
    Sqlite {
        path: PathBuf,
        #[source]
        source: rusqlite::Error,
    },
    /// A row holds what this version cannot read.
    #[error("ledger row is unreadable: {0}")]
    Corrupt(String),
    /// The blocking task died.
    #[error("ledger task failed: {0}")]
    TaskFailed(String),
}

impl From<LedgerError> for Refusal {
    fn from(error: LedgerError) -> Self {
        Refusal::new(
            Reason::LedgerUnavailable,
            format!(
                "the usage ledger cannot be written, so nothing is launched unmetered: {}; \
                 the operator must free disk space or fix the state directory",
                crate::error::chain(&error)
            ),
        )
    }
}

/// What a session is created with.
#[derive(Debug, Clone)]
pub struct NewSession {
    pub id: SessionId,
    pub request_id: String,
    pub node_id: String,
    pub scope: Scope,
    pub account_id: String,
    pub billed_account_id: String,
    pub owner: Principal,
    pub image: String,
    pub created_at: UnixNanos,
}

/// The result of [`Ledger::begin_session`].
#[derive(Debug)]
pub enum Begun {
    /// A new session holding its devices, state STARTING.
    Created(SessionRecord),
    /// The request id was seen before: its session, untouched.
    Existing(SessionRecord),
}

#[derive(Debug, thiserror::Error)]
pub enum BeginError {
    #[error(transparent)]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
}

/// What a launch is admitted on: the ledger's state inside the transaction
/// that records the launch.
#[derive(Debug, Clone, Default)]
pub struct LedgerView {
    /// Open sessions (STARTING, RUNNING, STOPPING), with the devices they
    /// hold.
    pub open: Vec<OpenSessionRow>,
    /// What the ledger moved on the launch's billed account since its
    /// opening balance.
    pub billed_delta: Credits,
}

/// An open session as admission counts it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpenSessionRow {
    pub id: SessionId,
    pub scope: Scope,
    pub account_id: String,
    pub devices: Vec<DeviceUuid>,
}

/// What admission decided for a launch.
#[derive(Debug, Clone)]
pub struct Admitted {
    pub devices: Vec<(AssignableDevice, Rate)>,
    pub billing_path: BillingPath,
}

text_enum!(
    /// What an audit entry records.
    AuditAction {
        Launch = "launch",
        Refuse = "refuse",
        Stop = "stop",
        AdjustBalance = "adjust_balance",
        Drain = "drain",
        Undrain = "undrain",
        PolicyReload = "policy_reload",
        PolicyReloadRefused = "policy_reload_refused",
    }
);

/// Who did what an audit entry records.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    /// A user or service account, under its own id.
    Principal(Principal),
    /// The local operator (the Unix socket).
    Operator,
    /// The agent itself (a balance run out, a reservation window opened).
    Agent,
}

impl Actor {
    fn columns(&self) -> (&str, &str) {
        match self {
            Self::Principal(principal) => (&principal.subject, principal.kind.as_str()),
            Self::Operator => ("operator", "operator"),
            Self::Agent => ("agent", "agent"),
        }
    }

    fn from_columns(actor: String, kind: &str) -> Result<Self, String> {
        Ok(match kind {
            "operator" => Self::Operator,
            "agent" => Self::Agent,
            kind => Self::Principal(Principal {
                subject: actor,
                kind: parsed("actor kind", kind, PrincipalKind::parse)?,
            }),
        })
    }
}

impl std::fmt::Display for Actor {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.columns().0)
    }
}

/// One line of the audit trail.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditRecord {
    pub at: UnixNanos,
    pub action: AuditAction,
    pub actor: Actor,
    pub account_id: String,
    pub session_id: String,
    /// The refusal's reason or the end reason.
    pub reason: String,
    pub detail: String,
}

/// An audit line as stored, with its id.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AuditEntry {
    pub id: i64,
    pub record: AuditRecord,
}

/// Which audit lines to read: most recent first.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub account_id: Option<String>,
    pub since: Option<UnixNanos>,
    pub limit: u32,
}

/// A top-up or correction of an account's balance.
#[derive(Debug, Clone)]
pub struct Adjustment {
    pub account_id: String,
    pub delta: Credits,
    pub reason: String,
    pub actor: Actor,
    pub at: UnixNanos,
}

/// One aggregate of usage records.
#[derive(Debug, Clone, PartialEq)]
pub struct UsageTotal {
    pub account_id: String,
    pub scope: Scope,
    pub billing_path: BillingPath,
    pub device_class: String,
    pub device_ms: i64,
    pub gpu_seconds: f64,
    pub cost: Credits,
}

text_enum!(
    /// RFC 4006 Final-Unit-Action: what happens when a final grant is used.
    FinalUnitAction {
        Terminate = "terminate",
        Continue = "continue",
    }
);

/// A session's credit control as the ledger keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CreditState {
    pub session_id: SessionId,
    /// RFC 4006 CC-Request-Number of the last request answered.
    pub cc_request_number: u64,
    /// The grant in force runs out here.
    pub granted_until: UnixNanos,
    /// The length of the last grant.
    pub granted_ns: i64,
    /// Set when no more will be granted: what to do at `granted_until`.
    pub final_unit: Option<(FinalUnitAction, EndReason)>,
    /// Used units are reported up to here.
    pub reported_until: Option<UnixNanos>,
    /// When the terminate (ReleaseSession) was acknowledged.
    pub released_at: Option<UnixNanos>,
    /// An update (request `cc_request_number + 1`) was sent reporting used
    /// units up to here and not answered yet: it is sent again exactly (a
    /// control plane answers a repeat as the first), also after a restart.
    pub pending_until: Option<UnixNanos>,
}

/// A usage record of the outbox with its session's facts, ready to send.
#[derive(Debug, Clone, PartialEq)]
pub struct OutboxRecord {
    pub id: String,
    pub session_id: String,
    pub node_id: String,
    pub account_id: String,
    pub billed_account_id: String,
    pub scope: Scope,
    pub billing_path: BillingPath,
    pub owner: String,
    pub device_uuid: String,
    pub device_class: String,
    pub period_start: UnixNanos,
    pub period_end: UnixNanos,
    pub device_ms: i64,
    pub gpu_seconds: f64,
    pub cost: Credits,
    pub last: bool,
}

/// Which sessions to list, and which page of them: sessions come in
/// creation order (then id), `limit` at a time.
#[derive(Debug, Clone, Default)]
pub struct SessionFilter {
    /// Sessions launched under or billed to this account.
    pub account_id: Option<String>,
    pub include_ended: bool,
    /// Created at or after this instant.
    pub created_from: Option<UnixNanos>,
    /// Created before this instant.
    pub created_before: Option<UnixNanos>,
    /// Only sessions after this one (the previous page's `next`).
    pub after: Option<PageKey>,
    /// At most this many; 0: all.
    pub limit: u32,
}

impl SessionFilter {
    /// Every open session (a node has few: one per device at most).
    pub fn open() -> Self {
        Self::default()
    }
}

/// Where a page of sessions ends: the next page starts after it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PageKey {
    pub created_at: UnixNanos,
    pub id: SessionId,
}

/// A page of sessions; `next` is set when more follow.
#[derive(Debug, Clone, Default)]
pub struct SessionPage {
    pub sessions: Vec<SessionRecord>,
    pub next: Option<PageKey>,
}

#[derive(Debug, Clone)]
pub struct Ledger {
    path: PathBuf,
    /// Every write, and reads that decide a write.
    connection: Arc<Mutex<Connection>>,
    /// Reads served to callers (lists, usage, audit, metrics).
    reader: Arc<Mutex<Connection>>,
    /// Observes how long each transaction takes (commit and fsync included).
    write_latency: Option<prometheus_client::metrics::histogram::Histogram>,
}

const SESSION_COLUMNS: &str = "id, request_id, node_id, scope, account_id, billed_account_id, owner, owner_kind, \
     image, container_id, state, billing_path, created_at_ns, started_at_ns, ended_at_ns, \
     metered_until_ns, end_reason, end_detail, recorded_ms, recorded_gpu_seconds, recorded_cost_nano";

impl Ledger {
    /// Opens (creating when needed) `ledger.db` in `state_dir`.
    pub fn open(state_dir: &Path) -> Result<Self, LedgerError> {
        std::fs::create_dir_all(state_dir).map_err(|source| LedgerError::StateDir {
            path: state_dir.to_path_buf(),
            source,
        })?;
        let path = state_dir.join(FILE_NAME);
        let sqlite = |source| LedgerError::Sqlite {
            path: path.clone(),
            source,
        };
        let connection = Connection::open(&path).map_err(sqlite)?;
        connection
            .execute_batch(
                "PRAGMA journal_mode = WAL;
                 PRAGMA synchronous = FULL;
                 PRAGMA foreign_keys = ON;
                 PRAGMA busy_timeout = 5000;",
            )
            .map_err(sqlite)?;
        let mut connection = connection;
        // Room for every statement the ledger prepares, so none is
        // prepared twice.
        connection.set_prepared_statement_cache_capacity(64);
        schema::apply(&mut connection).map_err(sqlite)?;
        // Reads have a connection of their own: WAL readers see the last
        // commit and never wait for the writer, nor it for them.
        let reader = Connection::open(&path).map_err(sqlite)?;
        reader
            .execute_batch("PRAGMA query_only = ON; PRAGMA busy_timeout = 5000;")
            .map_err(sqlite)?;
        reader.set_prepared_statement_cache_capacity(64);
        Ok(Self {
            path,
            connection: Arc::new(Mutex::new(connection)),
            reader: Arc::new(Mutex::new(reader)),
            write_latency: None,
        })
    }

    /// Observes every transaction's duration into `histogram`.
    pub fn observed_by(
        mut self,
        histogram: prometheus_client::metrics::histogram::Histogram,
    ) -> Self {
        self.write_latency = Some(histogram);
        self
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `work` on the writer connection on tokio's blocking pool: the
    /// one way async code writes SQLite. The connection's lock is taken
    /// inside the blocking task and never held across an await.
    async fn call_with<T, E, F>(&self, work: F) -> Result<T, CallError<E>>
    where
        T: Send + 'static,
        E: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, Outcome<E>> + Send + 'static,
    {
        let latency = self.write_latency.clone();
        blocking(&self.connection, &self.path, move |connection| {
            let began = std::time::Instant::now();
            let result = work(connection);
            if let Some(latency) = &latency {
                latency.observe(began.elapsed().as_secs_f64());
            }
            result
        })
        .await
    }

    /// Runs `work` in one read transaction (a consistent snapshot) on the
    /// reader connection: it waits for no write, and no write for it.
    async fn read<T, F>(&self, work: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, Outcome<std::convert::Infallible>>
            + Send
            + 'static,
    {
        blocking(&self.reader, &self.path, in_transaction(work))
            .await
            .map_err(CallError::into_ledger)
    }

    /// In one transaction: returns the session of `new.request_id` if there
    /// is one; otherwise shows `admit` what is open and what balances moved
    /// (the [`LedgerView`]), and records what it admits: the session
    /// (STARTING), its device holds and the launch's audit entry. Two
    /// launches are never admitted on the same view.
    pub async fn begin_session<P>(&self, new: NewSession, admit: P) -> Result<Begun, BeginError>
    where
        P: FnOnce(&LedgerView) -> Result<Admitted, Refusal> + Send + 'static,
    {
        self.call_with(move |connection| {
            let tx = connection.transaction()?;
            if let Some(existing) = session_by(&tx, "request_id", &new.request_id)? {
                // The idempotency key is the caller's: the same key from
                // another principal or account gets nothing of that session.
                if existing.owner == new.owner && existing.account_id == new.account_id {
                    return Ok(Begun::Existing(existing));
                }
                return Err(Outcome::Other(Refusal::new(
                    Reason::InvalidRequest,
                    "this request_id is already in use; pick another (a fresh UUID per launch)",
                )));
            }
            let view = LedgerView {
                open: open_sessions(&tx)?,
                billed_delta: account_delta(&tx, &new.billed_account_id)?,
            };
            let admitted = admit(&view).map_err(Outcome::Other)?;
            let record = insert_session(&tx, &new, &admitted)?;
            tx.commit()?;
            Ok(Begun::Created(record))
        })
        .await
        .map_err(|error| match error {
            CallError::Ledger(error) => BeginError::Ledger(error),
            CallError::Other(refusal) => BeginError::Refused(refusal),
        })
    }

    /// The container started at Docker's `started_at`: metering begins
    /// there. Only a STARTING session moves: `None` says it was not (ended
    /// or running already), and nothing changed.
    pub async fn mark_running(
        &self,
        id: &SessionId,
        container_id: &str,
        started_at: UnixNanos,
    ) -> Result<Option<SessionRecord>, LedgerError> {
        let (id, container_id) = (id.0.clone(), container_id.to_owned());
        self.transaction(move |tx| mark_running_tx(tx, &id, &container_id, started_at))
            .await
    }

    /// A stop began, for `reason`: kept so that whoever sees the container
    /// die (the stop itself, Docker's event, a reconcile) ends it so.
    pub async fn mark_stopping(
        &self,
        id: &SessionId,
        reason: EndReason,
    ) -> Result<(), LedgerError> {
        let id = id.0.clone();
        self.transaction(move |tx| {
            tx.execute(
                "UPDATE sessions SET state = 'stopping', end_reason = ?2 WHERE id = ?1 AND state = 'running'",
                params![id, reason.as_str()],
            )?;
            Ok(())
        })
        .await
    }

    /// Cuts usage records of an open, started session up to `until` (a
    /// checkpoint). Returns how many records were written.
    pub async fn checkpoint(&self, id: &SessionId, until: UnixNanos) -> Result<usize, LedgerError> {
        let id = id.0.clone();
        self.transaction(move |tx| checkpoint_tx(tx, &id, until))
            .await
    }

    /// Ends a session: the last usage records up to `ended_at` (when it ever
    /// started), state ENDED, devices released; all in one transaction.
    /// Ending an ended session changes nothing and returns `None`.
    pub async fn close(
        &self,
        id: &SessionId,
        ended_at: Option<UnixNanos>,
        reason: EndReason,
        detail: String,
    ) -> Result<Option<SessionRecord>, LedgerError> {
        let id = id.0.clone();
        self.transaction(move |tx| close_tx(tx, &id, ended_at, reason, &detail))
            .await
    }

    pub async fn get(&self, id: &SessionId) -> Result<Option<SessionRecord>, LedgerError> {
        let id = id.0.clone();
        self.read(move |tx| session_by(tx, "id", &id)).await
    }

    /// A page of the sessions `filter` names. Each page costs the same
    /// whatever the history: open sessions through their partial index,
    /// all sessions through (account,) creation time.
    pub async fn list(&self, filter: SessionFilter) -> Result<SessionPage, LedgerError> {
        self.read(move |tx| {
            let limit = match filter.limit {
                0 => i64::MAX,
                n => i64::from(n),
            };
            let (after_at, after_id) = filter
                .after
                .map_or((i64::MIN, String::new()), |key| (key.created_at.0, key.id.0));
            let page = "(created_at_ns, id) > (?1, ?2) AND created_at_ns >= ?3 AND created_at_ns < ?4";
            let order = "ORDER BY created_at_ns, id LIMIT ?5";
            let sql = match (filter.include_ended, filter.account_id.is_some()) {
                (false, with_account) => format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions INDEXED BY sessions_open
                     WHERE state != 'ended' AND {page}{} {order}",
                    if with_account {
                        " AND (account_id = ?6 OR billed_account_id = ?6)"
                    } else {
                        " AND ?6 IS NULL"
                    }
                ),
                (true, false) => format!(
                    "SELECT {SESSION_COLUMNS} FROM sessions WHERE {page} AND ?6 IS NULL {order}"
                ),
                // Launched under it or billed to it: each through its own
                // index, at most a page from each.
                (true, true) => format!(
                    "SELECT * FROM (
                         SELECT * FROM (SELECT {SESSION_COLUMNS} FROM sessions WHERE account_id = ?6 AND {page} {order})
                         UNION
                         SELECT * FROM (SELECT {SESSION_COLUMNS} FROM sessions WHERE billed_account_id = ?6 AND {page} {order})
                     ) {order}"
                ),
            };
            let mut statement = tx.prepare_cached(&sql)?;
            let rows = statement
                .query_map(
                    params![
                        after_at,
                        after_id,
                        filter.created_from.map_or(i64::MIN, |t| t.0),
                        filter.created_before.map_or(i64::MAX, |t| t.0),
                        limit.saturating_add(1),
                        filter.account_id,
                    ],
                    read_session,
                )?
                .collect::<Result<Vec<_>, _>>()?;
            drop(statement);
            let more = i64::try_from(rows.len()).unwrap_or(i64::MAX) > limit;
            let mut sessions = rows
                .into_iter()
                .take(usize::try_from(limit).unwrap_or(usize::MAX))
                .map(|session| complete(tx, session))
                .collect::<Result<Vec<_>, _>>()?;
            sessions.shrink_to_fit();
            let next = more
                .then(|| sessions.last())
                .flatten()
                .map(|last| PageKey {
                    created_at: last.created_at,
                    id: last.id.clone(),
                });
            Ok(SessionPage { sessions, next })
        })
        .await
    }

    /// What the ledger moved on `account` since its opening balance.
    pub async fn balance_delta(&self, account: &str) -> Result<Credits, LedgerError> {
        let account = account.to_owned();
        self.transaction(move |tx| account_delta(tx, &account))
            .await
    }

    /// What the ledger moved on every account it moved.
    pub async fn balance_deltas(&self) -> Result<HashMap<String, Credits>, LedgerError> {
        self.transaction(balance_deltas).await
    }

    /// Records a top-up (or correction) and its audit entry in one
    /// transaction; returns the adjustment's id and the account's new delta.
    pub async fn adjust_balance(
        &self,
        adjustment: Adjustment,
    ) -> Result<(String, Credits), LedgerError> {
        self.transaction(move |tx| {
            let id = format!("adj-{}", uuid::Uuid::new_v4().simple());
            tx.execute(
                "INSERT INTO balance_adjustments (id, account_id, delta_nano, reason, actor, at_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![
                    id,
                    adjustment.account_id,
                    adjustment.delta.0,
                    adjustment.reason,
                    adjustment.actor.to_string(),
                    adjustment.at.0,
                ],
            )?;
            move_balance(tx, &adjustment.account_id, adjustment.delta)?;
            insert_audit(
                tx,
                &AuditRecord {
                    at: adjustment.at,
                    action: AuditAction::AdjustBalance,
                    actor: adjustment.actor.clone(),
                    account_id: adjustment.account_id.clone(),
                    session_id: String::new(),
                    reason: String::new(),
                    detail: format!(
                        "{} {:+} credits: {}",
                        id,
                        adjustment.delta.as_f64(),
                        adjustment.reason
                    ),
                },
            )?;
            Ok((id, account_delta(tx, &adjustment.account_id)?))
        })
        .await
    }

    /// Appends one line to the audit trail.
    pub async fn audit(&self, record: AuditRecord) -> Result<(), LedgerError> {
        self.transaction(move |tx| insert_audit(tx, &record)).await
    }

    /// Reads the audit trail, most recent first.
    pub async fn list_audit(&self, filter: AuditFilter) -> Result<Vec<AuditEntry>, LedgerError> {
        self.read(move |tx| {
            // Two statements, so that an account's query walks its index
            // (`?1 IS NULL OR account_id = ?1` would walk the whole trail).
            const COLUMNS: &str =
                "id, at_ns, action, actor, actor_kind, account_id, session_id, reason, detail";
            let mut statement = match &filter.account_id {
                Some(_) => tx.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM audit WHERE account_id = ?1 AND at_ns >= ?2
                     ORDER BY id DESC LIMIT ?3"
                ))?,
                None => tx.prepare_cached(&format!(
                    "SELECT {COLUMNS} FROM audit WHERE ?1 IS NULL AND at_ns >= ?2
                     ORDER BY id DESC LIMIT ?3"
                ))?,
            };
            let rows = statement.query_map(
                params![
                    filter.account_id,
                    filter.since.map_or(i64::MIN, |t| t.0),
                    i64::from(filter.limit),
                ],
                |row| {
                    Ok((
                        row.get::<_, i64>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, String>(2)?,
                        row.get::<_, String>(3)?,
                        row.get::<_, String>(4)?,
                        row.get::<_, String>(5)?,
                        row.get::<_, String>(6)?,
                        row.get::<_, String>(7)?,
                        row.get::<_, String>(8)?,
                    ))
                },
            )?;
            let mut entries = Vec::new();
            for row in rows {
                let (id, at, action, actor, kind, account_id, session_id, reason, detail) = row?;
                let record = (|| {
                    Ok::<_, String>(AuditRecord {
                        at: UnixNanos(at),
                        action: parsed("audit action", &action, AuditAction::parse)?,
                        actor: Actor::from_columns(actor, &kind)?,
                        account_id,
                        session_id,
                        reason,
                        detail,
                    })
                })()
                .map_err(Outcome::Corrupt)?;
                entries.push(AuditEntry { id, record });
            }
            Ok(entries)
        })
        .await
    }

    /// Usage of sessions launched under `accounts` whose records end in
    /// `(from, to]`, summed by account, scope, billing path and device
    /// class. A record belongs to the period its end falls in, so adjacent
    /// periods never count a record twice; days whose raw records were
    /// folded away count whole (see `usage`).
    pub async fn usage(
        &self,
        accounts: Vec<String>,
        from: UnixNanos,
        to: UnixNanos,
    ) -> Result<Vec<UsageTotal>, LedgerError> {
        self.read(move |tx| usage::report(tx, &accounts, from, to))
            .await
    }

    /// Records a credit-control answer for a session; `billed` (from the
    /// initial answer) replaces whose balance pays and on which path.
    pub async fn record_credit(
        &self,
        state: CreditState,
        billed: Option<(String, BillingPath)>,
    ) -> Result<Option<SessionRecord>, LedgerError> {
        self.transaction(move |tx| {
            tx.execute(
                "INSERT INTO credit_control (session_id, cc_request_number, granted_until_ns, granted_ns,
                     final_action, final_end_reason, reported_until_ns, released_at_ns, pending_until_ns)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)
                 ON CONFLICT (session_id) DO UPDATE SET cc_request_number = excluded.cc_request_number,
                     granted_until_ns = excluded.granted_until_ns, granted_ns = excluded.granted_ns,
                     final_action = excluded.final_action, final_end_reason = excluded.final_end_reason,
                     reported_until_ns = excluded.reported_until_ns, released_at_ns = excluded.released_at_ns,
                     pending_until_ns = excluded.pending_until_ns",
                params![
                    state.session_id.0,
                    i64::try_from(state.cc_request_number).unwrap_or(i64::MAX),
                    state.granted_until.0,
                    state.granted_ns,
                    state.final_unit.map(|(action, _)| action.as_str()),
                    state.final_unit.map(|(_, reason)| reason.as_str()),
                    state.reported_until.map(|t| t.0),
                    state.released_at.map(|t| t.0),
                    state.pending_until.map(|t| t.0),
                ],
            )?;
            if let Some((billed_account_id, path)) = billed {
                tx.execute(
                    "UPDATE sessions SET billed_account_id = ?2, billing_path = ?3 WHERE id = ?1",
                    params![state.session_id.0, billed_account_id, path.as_str()],
                )?;
            }
            session_by(tx, "id", &state.session_id.0)
        })
        .await
    }

    /// Credit control of open sessions and of ended ones whose terminate
    /// is not acknowledged yet, each with its session.
    pub async fn credit_states(&self) -> Result<Vec<(CreditState, SessionRecord)>, LedgerError> {
        self.transaction(|tx| {
            let mut statement = tx.prepare_cached(
                "SELECT c.session_id, c.cc_request_number, c.granted_until_ns, c.granted_ns,
                        c.final_action, c.final_end_reason, c.reported_until_ns, c.released_at_ns,
                        c.pending_until_ns
                 FROM credit_control c INDEXED BY credit_unreleased CROSS JOIN sessions s
                 WHERE c.released_at_ns IS NULL AND s.id = c.session_id
                 ORDER BY s.created_at_ns",
            )?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, i64>(1)?,
                        row.get::<_, i64>(2)?,
                        row.get::<_, i64>(3)?,
                        row.get::<_, Option<String>>(4)?,
                        row.get::<_, Option<String>>(5)?,
                        row.get::<_, Option<i64>>(6)?,
                        row.get::<_, Option<i64>>(7)?,
                        row.get::<_, Option<i64>>(8)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(
                    |(id, number, until, granted, action, reason, reported, released, pending)| {
                        let final_unit = match (action, reason) {
                            (Some(action), Some(reason)) => Some((
                                parsed("final unit action", &action, FinalUnitAction::parse)
                                    .map_err(Outcome::Corrupt)?,
                                parsed("end reason", &reason, EndReason::parse)
                                    .map_err(Outcome::Corrupt)?,
                            )),
                            _ => None,
                        };
                        let session = session_by(tx, "id", &id)?.ok_or_else(|| {
                            Outcome::Corrupt(format!("session {id} is not in the ledger"))
                        })?;
                        let state = CreditState {
                            session_id: SessionId(id),
                            cc_request_number: u64::try_from(number).unwrap_or_default(),
                            granted_until: UnixNanos(until),
                            granted_ns: granted,
                            final_unit,
                            reported_until: reported.map(UnixNanos),
                            released_at: released.map(UnixNanos),
                            pending_until: pending.map(UnixNanos),
                        };
                        Ok((state, session))
                    },
                )
                .collect()
        })
        .await
    }

    /// Usage records not yet acknowledged, oldest first, at most `limit`.
    pub async fn undelivered_usage(&self, limit: u32) -> Result<Vec<OutboxRecord>, LedgerError> {
        self.transaction(move |tx| {
            let mut statement = tx.prepare_cached(
                "SELECT u.id, u.session_id, s.node_id, s.account_id, s.billed_account_id, s.scope,
                        s.billing_path, s.owner, u.device_uuid, u.device_class, u.period_start_ns,
                        u.period_end_ns, u.device_ms, u.gpu_seconds, u.cost_nano, u.final
                 FROM usage_records u JOIN sessions s ON s.id = u.session_id
                 WHERE u.delivered_at_ns IS NULL
                 ORDER BY u.period_end_ns, u.id LIMIT ?1",
            )?;
            let rows = statement
                .query_map(params![i64::from(limit)], |row| {
                    Ok((
                        (
                            row.get::<_, String>(0)?,
                            row.get::<_, String>(1)?,
                            row.get::<_, String>(2)?,
                            row.get::<_, String>(3)?,
                            row.get::<_, String>(4)?,
                            row.get::<_, String>(5)?,
                            row.get::<_, String>(6)?,
                            row.get::<_, String>(7)?,
                        ),
                        (
                            row.get::<_, String>(8)?,
                            row.get::<_, String>(9)?,
                            row.get::<_, i64>(10)?,
                            row.get::<_, i64>(11)?,
                            row.get::<_, i64>(12)?,
                            row.get::<_, f64>(13)?,
                            row.get::<_, i64>(14)?,
                            row.get::<_, bool>(15)?,
                        ),
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(session, usage)| {
                    let (id, session_id, node_id, account_id, billed_account_id, scope, path, owner) =
                        session;
                    let (device_uuid, device_class, start, end, device_ms, gpu_seconds, cost, last) =
                        usage;
                    Ok(OutboxRecord {
                        id,
                        session_id,
                        node_id,
                        account_id,
                        billed_account_id,
                        scope: parsed("scope", &scope, Scope::parse).map_err(Outcome::Corrupt)?,
                        billing_path: parsed("billing path", &path, BillingPath::parse)
                            .map_err(Outcome::Corrupt)?,
                        owner,
                        device_uuid,
                        device_class,
                        period_start: UnixNanos(start),
                        period_end: UnixNanos(end),
                        device_ms,
                        gpu_seconds,
                        cost: Credits(cost),
                        last,
                    })
                })
                .collect()
        })
        .await
    }

    /// Marks the records the control plane acknowledged as delivered;
    /// unknown or already delivered ids change nothing. Returns how many
    /// were newly marked.
    pub async fn mark_delivered(
        &self,
        ids: Vec<String>,
        at: UnixNanos,
    ) -> Result<usize, LedgerError> {
        self.transaction(move |tx| {
            let mut statement = tx.prepare_cached(
                "UPDATE usage_records SET delivered_at_ns = ?2 WHERE id = ?1 AND delivered_at_ns IS NULL",
            )?;
            let mut marked = 0;
            for id in &ids {
                marked += statement.execute(params![id, at.0])?;
            }
            drop(statement);
            usage::add_to_counter(tx, "undelivered", -i64::try_from(marked).unwrap_or(i64::MAX))?;
            Ok(marked)
        })
        .await
    }

    /// How many usage records wait for delivery (a counter kept with the
    /// records).
    pub async fn outbox_backlog(&self) -> Result<u64, LedgerError> {
        self.read(|tx| Ok(u64::try_from(usage::counter(tx, "undelivered")?).unwrap_or_default()))
            .await
    }

    /// Folds raw usage records whose period ended before `before` (only
    /// acknowledged ones when `delivered_only`) into the sums that already
    /// hold them, in transactions of a bounded size; returns how many
    /// records went. Nothing of any sum changes: a session's usage, an
    /// account's balance, the daily and all-time sums stay as they were.
    pub async fn fold_usage(
        &self,
        before: UnixNanos,
        delivered_only: bool,
    ) -> Result<usize, LedgerError> {
        let mut folded = 0;
        loop {
            let removed = self
                .transaction(move |tx| usage::fold(tx, before, delivered_only))
                .await?;
            folded += removed;
            if i64::try_from(removed).unwrap_or(i64::MAX) < usage::FOLD_BATCH {
                return Ok(folded);
            }
        }
    }

    /// Every account's usage since the ledger began, by scope and billing
    /// path; `device_class` is empty.
    pub async fn usage_totals(&self) -> Result<Vec<UsageTotal>, LedgerError> {
        self.read(usage::totals).await
    }

    /// The stops the agent scheduled, with their reason and due time.
    pub async fn scheduled_stops(
        &self,
    ) -> Result<Vec<(SessionId, EndReason, UnixNanos)>, LedgerError> {
        self.read(|tx| {
            let mut statement =
                tx.prepare_cached("SELECT session_id, reason, at_ns FROM scheduled_stops")?;
            let rows = statement
                .query_map([], |row| {
                    Ok((
                        row.get::<_, String>(0)?,
                        row.get::<_, String>(1)?,
                        row.get::<_, i64>(2)?,
                    ))
                })?
                .collect::<Result<Vec<_>, _>>()?;
            rows.into_iter()
                .map(|(id, reason, at)| {
                    let reason = parsed("end reason", &reason, EndReason::parse)
                        .map_err(Outcome::Corrupt)?;
                    Ok((SessionId(id), reason, UnixNanos(at)))
                })
                .collect()
        })
        .await
    }

    /// Records stops newly scheduled and forgets those cancelled or done,
    /// in one transaction.
    pub async fn update_scheduled_stops(
        &self,
        scheduled: Vec<(SessionId, EndReason, UnixNanos)>,
        forgotten: Vec<SessionId>,
    ) -> Result<(), LedgerError> {
        self.transaction(move |tx| {
            // Forgotten first: a stop whose reason changed is forgotten
            // and scheduled anew in the same call.
            let mut delete =
                tx.prepare_cached("DELETE FROM scheduled_stops WHERE session_id = ?1")?;
            for id in &forgotten {
                delete.execute(params![id.0])?;
            }
            let mut insert = tx.prepare_cached(
                "INSERT INTO scheduled_stops (session_id, reason, at_ns) VALUES (?1, ?2, ?3)
                 ON CONFLICT (session_id) DO UPDATE SET reason = excluded.reason, at_ns = excluded.at_ns",
            )?;
            for (id, reason, at) in &scheduled {
                insert.execute(params![id.0, reason.as_str(), at.0])?;
            }
            Ok(())
        })
        .await
    }

    /// Devices held by open sessions.
    pub async fn holds(&self) -> Result<HashMap<DeviceUuid, SessionId>, LedgerError> {
        self.transaction(held_devices).await
    }

    /// Runs several of the agent's own ledger operations in one
    /// transaction: for building histories of months or years in
    /// benchmarks. The agent itself never batches: each of its changes is
    /// its own transaction.
    #[doc(hidden)]
    pub async fn batch<T, F>(&self, work: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Batch<'_>) -> Result<T, BatchError> + Send + 'static,
    {
        self.transaction(move |tx| work(&Batch(tx)).map_err(|error| error.0))
            .await
    }

    /// Runs `work` in one transaction, committed when it returns `Ok`.
    async fn transaction<T, F>(&self, work: F) -> Result<T, LedgerError>
    where
        T: Send + 'static,
        F: FnOnce(&Transaction<'_>) -> Result<T, Outcome<std::convert::Infallible>>
            + Send
            + 'static,
    {
        self.call_with(in_transaction(work))
            .await
            .map_err(CallError::into_ledger)
    }
}

/// The agent's ledger operations inside one [`Ledger::batch`].
#[doc(hidden)]
#[derive(Debug)]
pub struct Batch<'a>(&'a Transaction<'a>);

/// An operation of a [`Batch`] failed; the batch is rolled back.
#[doc(hidden)]
#[derive(Debug)]
pub struct BatchError(Outcome<std::convert::Infallible>);

impl From<Outcome<std::convert::Infallible>> for BatchError {
    fn from(outcome: Outcome<std::convert::Infallible>) -> Self {
        Self(outcome)
    }
}

impl Batch<'_> {
    /// [`Ledger::begin_session`] of a session already admitted.
    pub fn begin(
        &self,
        new: &NewSession,
        admitted: &Admitted,
    ) -> Result<SessionRecord, BatchError> {
        Ok(insert_session(self.0, new, admitted)?)
    }

    /// [`Ledger::mark_running`].
    pub fn mark_running(
        &self,
        id: &SessionId,
        container_id: &str,
        started_at: UnixNanos,
    ) -> Result<Option<SessionRecord>, BatchError> {
        Ok(mark_running_tx(self.0, &id.0, container_id, started_at)?)
    }

    /// [`Ledger::checkpoint`].
    pub fn checkpoint(&self, id: &SessionId, until: UnixNanos) -> Result<usize, BatchError> {
        Ok(checkpoint_tx(self.0, &id.0, until)?)
    }

    /// [`Ledger::close`].
    pub fn close(
        &self,
        id: &SessionId,
        ended_at: UnixNanos,
        reason: EndReason,
    ) -> Result<Option<SessionRecord>, BatchError> {
        Ok(close_tx(self.0, &id.0, Some(ended_at), reason, "")?)
    }
}

/// `work` in one transaction of a connection, committed when it returns
/// `Ok`: what `Ledger::transaction` runs on the writer and `Ledger::read`
/// on the reader.
fn in_transaction<T, F>(
    work: F,
) -> impl FnOnce(&mut Connection) -> Result<T, Outcome<std::convert::Infallible>>
where
    F: FnOnce(&Transaction<'_>) -> Result<T, Outcome<std::convert::Infallible>>,
{
    move |connection| {
        let tx = connection.transaction()?;
        let value = work(&tx)?;
        tx.commit()?;
        Ok(value)
    }
}

impl CallError<std::convert::Infallible> {
    fn into_ledger(self) -> LedgerError {
        match self {
            Self::Ledger(error) => error,
            Self::Other(never) => match never {},
        }
    }
}

/// Runs `work` on `connection` on tokio's blocking pool.
async fn blocking<T, E, F>(
    connection: &Arc<Mutex<Connection>>,
    path: &Path,
    work: F,
) -> Result<T, CallError<E>>
where
    T: Send + 'static,
    E: Send + 'static,
    F: FnOnce(&mut Connection) -> Result<T, Outcome<E>> + Send + 'static,
{
    let connection = Arc::clone(connection);
    let path = path.to_path_buf();
    tokio::task::spawn_blocking(move || {
        let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
        work(&mut connection).map_err(|outcome| match outcome {
            Outcome::Sqlite(source) => CallError::Ledger(LedgerError::Sqlite { path, source }),
            Outcome::Corrupt(text) => CallError::Ledger(LedgerError::Corrupt(text)),
            Outcome::Other(other) => CallError::Other(other),
        })
    })
    .await
    .map_err(|join| CallError::Ledger(LedgerError::TaskFailed(join.to_string())))?
}

/// How work inside a blocking ledger call fails.
#[derive(Debug)]
enum Outcome<E> {
    Sqlite(rusqlite::Error),
    Corrupt(String),
    Other(E),
}

impl<E> From<rusqlite::Error> for Outcome<E> {
    fn from(error: rusqlite::Error) -> Self {
        Self::Sqlite(error)
    }
}

#[derive(Debug)]
enum CallError<E> {
    Ledger(LedgerError),
    Other(E),
}

fn require<E>(session: Option<SessionRecord>, id: &str) -> Result<SessionRecord, Outcome<E>> {
    session.ok_or_else(|| Outcome::Corrupt(format!("session {id} is not in the ledger")))
}

/// Records an admitted session (STARTING), its devices, their holds and the
/// launch's audit entry.
fn insert_session<E>(
    tx: &Transaction<'_>,
    new: &NewSession,
    admitted: &Admitted,
) -> Result<SessionRecord, Outcome<E>> {
    tx.prepare_cached(&format!(
        "INSERT INTO sessions ({SESSION_COLUMNS}) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, NULL, 'starting', ?10, ?11, NULL, NULL, NULL, NULL, '', 0, 0.0, 0)"
    ))?
    .execute(params![
        new.id.0,
        new.request_id,
        new.node_id,
        new.scope.as_str(),
        new.account_id,
        new.billed_account_id,
        new.owner.subject,
        new.owner.kind.as_str(),
        new.image,
        admitted.billing_path.as_str(),
        new.created_at.0,
    ])?;
    for (position, (device, rate)) in admitted.devices.iter().enumerate() {
        tx.prepare_cached(
            "INSERT INTO session_devices (session_id, position, device_uuid, device_class, weight_slices, weight_of, rate_nano)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
        )?
        .execute(params![
            new.id.0,
            position as i64,
            device.uuid.as_str(),
            device.class,
            device.weight.slices,
            device.weight.of,
            rate.0.0,
        ])?;
        tx.prepare_cached("INSERT INTO device_holds (device_uuid, session_id) VALUES (?1, ?2)")?
            .execute(params![device.uuid.as_str(), new.id.0])?;
    }
    let record = session_by(tx, "id", &new.id.0)?
        .ok_or_else(|| Outcome::Corrupt(format!("session {} vanished", new.id)))?;
    insert_audit(
        tx,
        &AuditRecord {
            at: new.created_at,
            action: AuditAction::Launch,
            actor: Actor::Principal(new.owner.clone()),
            account_id: new.account_id.clone(),
            session_id: new.id.0.clone(),
            reason: String::new(),
            detail: format!(
                "request {} devices {}",
                new.request_id,
                record.device_list()
            ),
        },
    )?;
    Ok(record)
}

/// The container started at `started_at`: metering begins there. `None`
/// when the session was not STARTING (nothing changed).
fn mark_running_tx<E>(
    tx: &Transaction<'_>,
    id: &str,
    container_id: &str,
    started_at: UnixNanos,
) -> Result<Option<SessionRecord>, Outcome<E>> {
    let moved = tx
        .prepare_cached(
            "UPDATE sessions SET state = 'running', container_id = ?2, started_at_ns = ?3, metered_until_ns = ?3
             WHERE id = ?1 AND state = 'starting'",
        )?
        .execute(params![id, container_id, started_at.0])?;
    if moved == 0 {
        return Ok(None);
    }
    require(session_by(tx, "id", id)?, id).map(Some)
}

/// Cuts usage records of an open, started session up to `until`.
fn checkpoint_tx<E>(tx: &Transaction<'_>, id: &str, until: UnixNanos) -> Result<usize, Outcome<E>> {
    let Some(session) = session_by(tx, "id", id)? else {
        return Ok(0);
    };
    if !matches!(
        session.state,
        SessionState::Running | SessionState::Stopping
    ) {
        return Ok(0);
    }
    match session.metered_until {
        Some(from) if until.millis() > from.millis() => write_cut(tx, &session, from, until, false),
        _ => Ok(0),
    }
}

/// Ends a session: its last usage records, state ENDED, devices released.
fn close_tx<E>(
    tx: &Transaction<'_>,
    id: &str,
    ended_at: Option<UnixNanos>,
    reason: EndReason,
    detail: &str,
) -> Result<Option<SessionRecord>, Outcome<E>> {
    let Some(session) = session_by(tx, "id", id)? else {
        return Ok(None);
    };
    if !session.is_open() {
        return Ok(None);
    }
    // The first stop's reason stands: a session stopping because its
    // balance ran out and then stopped by its user ended for its balance.
    let reason = match (session.state, session.end_reason) {
        (SessionState::Stopping, Some(first)) => first,
        _ => reason,
    };
    // A session never started bills nothing; one that did is billed to its
    // end, and never before the last checkpoint.
    let ended_at = match (session.metered_until, ended_at) {
        (Some(from), Some(end)) => {
            let end = end.max(from);
            write_cut(tx, &session, from, end, true)?;
            Some(end)
        }
        (Some(from), None) => {
            write_cut(tx, &session, from, from, true)?;
            Some(from)
        }
        (None, _) => None,
    };
    tx.prepare_cached(
        "UPDATE sessions SET state = 'ended', ended_at_ns = ?2, end_reason = ?3, end_detail = ?4 WHERE id = ?1",
    )?
    .execute(params![id, ended_at.map(|t| t.0), reason.as_str(), detail])?;
    tx.prepare_cached("DELETE FROM device_holds WHERE session_id = ?1")?
        .execute(params![id])?;
    session_by(tx, "id", id)
}

/// Writes one usage record per device of `session` for `from..to`, advances
/// its metering mark; `last` marks the session's final records.
fn write_cut<E>(
    tx: &Transaction<'_>,
    session: &SessionRecord,
    from: UnixNanos,
    to: UnixNanos,
    last: bool,
) -> Result<usize, Outcome<E>> {
    let seq: i64 = tx
        .prepare_cached(
            "UPDATE sessions SET usage_seq = usage_seq + 1 WHERE id = ?1 RETURNING usage_seq",
        )?
        .query_row(params![session.id.0], |row| row.get(0))?;
    let cuts = metering::cut(&session.devices, from, to);
    let mut insert = tx.prepare_cached(
        "INSERT INTO usage_records (id, session_id, seq, device_uuid, device_class, period_start_ns,
             period_end_ns, device_ms, gpu_seconds, cost_nano, final, delivered_at_ns)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, NULL)",
    )?;
    for cut in &cuts {
        insert.execute(params![
            format!("{}/{seq}/{}", session.id, cut.device_uuid),
            session.id.0,
            seq,
            cut.device_uuid.as_str(),
            cut.device_class,
            cut.period_start.0,
            cut.period_end.0,
            cut.device_ms,
            cut.gpu_seconds,
            cut.cost.0,
            last,
        ])?;
    }
    drop(insert);
    tx.prepare_cached("UPDATE sessions SET metered_until_ns = ?2 WHERE id = ?1")?
        .execute(params![session.id.0, to.0])?;
    // The sums go with the records they sum: one transaction.
    usage::add_to_sums(tx, session, &cuts)?;
    // The debit goes with the record it pays for: one transaction.
    // Reservation usage is metered, never debited.
    if session.billing_path == BillingPath::Balance {
        let cost: Credits = cuts.iter().map(|cut| cut.cost).sum();
        if cost != Credits::ZERO {
            move_balance(tx, &session.billed_account_id, -cost)?;
        }
    }
    Ok(cuts.len())
}

/// A usage aggregate row: account, scope, billing path, device class, then
/// the sums of device_ms, gpu_seconds and cost_nano. An unreadable scope or
/// path is an error text rather than a failed query.
fn read_usage_total(row: &Row<'_>) -> rusqlite::Result<Result<UsageTotal, String>> {
    let (account_id, scope, path, device_class): (String, String, String, String) =
        (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
    let (device_ms, gpu_seconds, cost) = (row.get(4)?, row.get(5)?, row.get(6)?);
    Ok((|| {
        Ok(UsageTotal {
            account_id,
            scope: parsed("scope", &scope, Scope::parse)?,
            billing_path: parsed("billing path", &path, BillingPath::parse)?,
            device_class,
            device_ms,
            gpu_seconds,
            cost: Credits(cost),
        })
    })())
}

fn move_balance<E>(tx: &Transaction<'_>, account: &str, delta: Credits) -> Result<(), Outcome<E>> {
    tx.prepare_cached(
        "INSERT INTO account_balances (account_id, delta_nano) VALUES (?1, ?2)
         ON CONFLICT (account_id) DO UPDATE SET delta_nano = delta_nano + excluded.delta_nano",
    )?
    .execute(params![account, delta.0])?;
    Ok(())
}

fn account_delta<E>(tx: &Transaction<'_>, account: &str) -> Result<Credits, Outcome<E>> {
    let delta: Option<i64> = tx
        .query_row(
            "SELECT delta_nano FROM account_balances WHERE account_id = ?1",
            params![account],
            |row| row.get(0),
        )
        .optional()?;
    Ok(Credits(delta.unwrap_or(0)))
}

fn balance_deltas<E>(tx: &Transaction<'_>) -> Result<HashMap<String, Credits>, Outcome<E>> {
    let mut statement = tx.prepare_cached("SELECT account_id, delta_nano FROM account_balances")?;
    let deltas = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, Credits(row.get(1)?)))
        })?
        .collect::<Result<HashMap<_, _>, _>>()?;
    Ok(deltas)
}

fn open_sessions<E>(tx: &Transaction<'_>) -> Result<Vec<OpenSessionRow>, Outcome<E>> {
    let mut statement = tx.prepare_cached(
        "SELECT id, scope, account_id FROM sessions INDEXED BY sessions_open
         WHERE state != 'ended' ORDER BY created_at_ns, id",
    )?;
    let rows = statement
        .query_map([], |row| {
            Ok((
                row.get::<_, String>(0)?,
                row.get::<_, String>(1)?,
                row.get::<_, String>(2)?,
            ))
        })?
        .collect::<Result<Vec<_>, _>>()?;
    let mut devices = tx.prepare_cached(
        "SELECT device_uuid FROM session_devices WHERE session_id = ?1 ORDER BY position",
    )?;
    let mut open = Vec::with_capacity(rows.len());
    for (id, scope, account_id) in rows {
        let uuids = devices
            .query_map(params![id], |row| {
                Ok(DeviceUuid::new(row.get::<_, String>(0)?))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        open.push(OpenSessionRow {
            id: SessionId(id),
            scope: parsed("scope", &scope, Scope::parse).map_err(Outcome::Corrupt)?,
            account_id,
            devices: uuids,
        });
    }
    Ok(open)
}

fn insert_audit<E>(tx: &Transaction<'_>, record: &AuditRecord) -> Result<(), Outcome<E>> {
    let (actor, kind) = record.actor.columns();
    tx.prepare_cached(
        "INSERT INTO audit (at_ns, action, actor, actor_kind, account_id, session_id, reason, detail)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
    )?
    .execute(params![
            record.at.0,
            record.action.as_str(),
            actor,
            kind,
            record.account_id,
            record.session_id,
            record.reason,
            record.detail,
        ],
    )?;
    Ok(())
}

fn held_devices<E>(tx: &Transaction<'_>) -> Result<HashMap<DeviceUuid, SessionId>, Outcome<E>> {
    let mut statement = tx.prepare("SELECT device_uuid, session_id FROM device_holds")?;
    let holds = statement
        .query_map([], |row| {
            Ok((
                DeviceUuid::new(row.get::<_, String>(0)?),
                SessionId(row.get(1)?),
            ))
        })?
        .collect::<Result<HashMap<_, _>, _>>()?;
    Ok(holds)
}

fn session_by<E>(
    tx: &Transaction<'_>,
    column: &'static str,
    value: &str,
) -> Result<Option<SessionRecord>, Outcome<E>> {
    let session = tx
        .prepare_cached(&format!(
            "SELECT {SESSION_COLUMNS} FROM sessions WHERE {column} = ?1"
        ))?
        .query_row(params![value], read_session)
        .optional()?;
    session.map(|session| complete(tx, session)).transpose()
}

/// A session row as read, before its devices and usage sums are added; an
/// unreadable row is an error text rather than a failed query.
type PartialSession = Result<SessionRecord, String>;

fn parsed<T>(what: &str, text: &str, parse: fn(&str) -> Option<T>) -> Result<T, String> {
    parse(text).ok_or_else(|| format!("unknown {what} `{text}`"))
}

fn read_session(row: &Row<'_>) -> rusqlite::Result<PartialSession> {
    let (scope, kind, state, path): (String, String, String, String) =
        (row.get(3)?, row.get(7)?, row.get(10)?, row.get(11)?);
    let end_reason: Option<String> = row.get(16)?;
    let nanos = |i: usize| row.get::<_, Option<i64>>(i).map(|v| v.map(UnixNanos));
    let (started_at, ended_at, metered_until) = (nanos(13)?, nanos(14)?, nanos(15)?);
    let (id, request_id, node_id, account_id, billed_account_id, subject, image) = (
        row.get(0)?,
        row.get(1)?,
        row.get(2)?,
        row.get(4)?,
        row.get(5)?,
        row.get(6)?,
        row.get(8)?,
    );
    let (container_id, created_at, end_detail) = (row.get(9)?, row.get(12)?, row.get(17)?);
    let recorded = RecordedUsage {
        device_ms: row.get(18)?,
        gpu_seconds: row.get(19)?,
        cost: Credits(row.get(20)?),
    };
    Ok((|| {
        Ok(SessionRecord {
            id: SessionId(id),
            request_id,
            node_id,
            scope: parsed("scope", &scope, Scope::parse)?,
            account_id,
            billed_account_id,
            owner: Principal {
                subject,
                kind: parsed("owner kind", &kind, PrincipalKind::parse)?,
            },
            image,
            container_id,
            state: parsed("state", &state, SessionState::parse)?,
            billing_path: parsed("billing path", &path, BillingPath::parse)?,
            created_at: UnixNanos(created_at),
            started_at,
            ended_at,
            metered_until,
            end_reason: end_reason
                .map(|reason| parsed("end reason", &reason, EndReason::parse))
                .transpose()?,
            end_detail,
            devices: Vec::new(),
            recorded,
        })
    })())
}

/// Adds a session's devices.
fn complete<E>(tx: &Transaction<'_>, session: PartialSession) -> Result<SessionRecord, Outcome<E>> {
    let mut session = session.map_err(Outcome::Corrupt)?;
    let mut statement = tx.prepare_cached(
        "SELECT device_uuid, device_class, weight_slices, weight_of, rate_nano
         FROM session_devices WHERE session_id = ?1 ORDER BY position",
    )?;
    session.devices = statement
        .query_map(params![session.id.0], |row| {
            Ok(MeteredDevice {
                uuid: DeviceUuid::new(row.get::<_, String>(0)?),
                class: row.get(1)?,
                weight: GpuWeight {
                    slices: row.get(2)?,
                    of: row.get(3)?,
                },
                rate: Rate(Credits(row.get(4)?)),
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(session)
}
