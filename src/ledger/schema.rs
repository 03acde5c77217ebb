//! The ledger's tables, and the migrations that bring a ledger written by
//! an earlier version up to date (`PRAGMA user_version` says which have
//! run). A migration runs in one transaction with its backfill, so a crash
//! in the middle leaves the ledger as it was.

use rusqlite::Connection;

/// The tables of the first version (less the `sessions_account` index it
/// had, which version 1 replaces); every later change is a migration. On a
/// ledger that has them, these statements write nothing: an agent starts
/// on a full or read-only state directory.
const BASE: &str = r#"
CREATE TABLE IF NOT EXISTS sessions (
    id                TEXT PRIMARY KEY,
    request_id        TEXT NOT NULL UNIQUE,
    node_id           TEXT NOT NULL,
    scope             TEXT NOT NULL,
    account_id        TEXT NOT NULL,
    billed_account_id TEXT NOT NULL,
    owner             TEXT NOT NULL,
    owner_kind        TEXT NOT NULL,
    image             TEXT NOT NULL,
    container_id      TEXT,
    state             TEXT NOT NULL,
    billing_path      TEXT NOT NULL,
    created_at_ns     INTEGER NOT NULL,
    started_at_ns     INTEGER,
    ended_at_ns       INTEGER,
    metered_until_ns  INTEGER,
    end_reason        TEXT,
    end_detail        TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS sessions_open ON sessions(state) WHERE state != 'ended';
CREATE TABLE IF NOT EXISTS session_devices (
    session_id   TEXT NOT NULL REFERENCES sessions(id),
    position     INTEGER NOT NULL,
    device_uuid  TEXT NOT NULL,
    device_class TEXT NOT NULL,
    weight_slices INTEGER NOT NULL,
    weight_of    INTEGER NOT NULL,
    rate_nano    INTEGER NOT NULL,
    PRIMARY KEY (session_id, device_uuid)
);
-- One row per device held by an open session: the primary key is the
-- guarantee that no device is ever in two sessions.
CREATE TABLE IF NOT EXISTS device_holds (
    device_uuid TEXT PRIMARY KEY,
    session_id  TEXT NOT NULL REFERENCES sessions(id)
);
-- The outbox: usage records, each with a stable id; delivered_at_ns is set
-- once the control plane acknowledged it.
CREATE TABLE IF NOT EXISTS usage_records (
    id                TEXT PRIMARY KEY,
    session_id        TEXT NOT NULL REFERENCES sessions(id),
    seq               INTEGER NOT NULL,
    device_uuid       TEXT NOT NULL,
    device_class      TEXT NOT NULL,
    period_start_ns   INTEGER NOT NULL,
    period_end_ns     INTEGER NOT NULL,
    device_ms         INTEGER NOT NULL,
    gpu_seconds       REAL NOT NULL,
    cost_nano         INTEGER NOT NULL,
    final             INTEGER NOT NULL,
    delivered_at_ns   INTEGER
);
CREATE INDEX IF NOT EXISTS usage_session ON usage_records(session_id);
CREATE INDEX IF NOT EXISTS usage_period_end ON usage_records(period_end_ns);
-- What the ledger has moved on each account since the policy's opening
-- balance: debits of balance-billed usage (written with the usage record,
-- in its transaction) and adjustments. Balance = opening + delta.
CREATE TABLE IF NOT EXISTS account_balances (
    account_id TEXT PRIMARY KEY,
    delta_nano INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS balance_adjustments (
    id         TEXT PRIMARY KEY,
    account_id TEXT NOT NULL,
    delta_nano INTEGER NOT NULL,
    reason     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    at_ns      INTEGER NOT NULL
);
-- Control-plane mode: each session's credit control (RFC 4006): the
-- request number, the grant in force, its final-unit indication, how far
-- used units were reported, and when the terminate was delivered.
CREATE TABLE IF NOT EXISTS credit_control (
    session_id        TEXT PRIMARY KEY REFERENCES sessions(id),
    cc_request_number INTEGER NOT NULL,
    granted_until_ns  INTEGER NOT NULL,
    granted_ns        INTEGER NOT NULL,
    final_action      TEXT,
    final_end_reason  TEXT,
    reported_until_ns INTEGER,
    released_at_ns    INTEGER
);
-- Version 0 only: sums of usage records compacted away, per session
-- (since version 1 the session row carries its sums). Read once, by the
-- migration to version 1.
CREATE TABLE IF NOT EXISTS session_totals (
    session_id  TEXT PRIMARY KEY REFERENCES sessions(id),
    device_ms   INTEGER NOT NULL,
    gpu_seconds REAL NOT NULL,
    cost_nano   INTEGER NOT NULL
);
-- Who launched, stopped, adjusted, was refused, and why.
CREATE TABLE IF NOT EXISTS audit (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    at_ns      INTEGER NOT NULL,
    action     TEXT NOT NULL,
    actor      TEXT NOT NULL,
    actor_kind TEXT NOT NULL,
    account_id TEXT NOT NULL,
    session_id TEXT NOT NULL,
    reason     TEXT NOT NULL,
    detail     TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS audit_account ON audit(account_id, id);
CREATE INDEX IF NOT EXISTS usage_undelivered ON usage_records(delivered_at_ns) WHERE delivered_at_ns IS NULL;
"#;

/// Version 1: every read the agent serves costs the same whatever the
/// history. Sums are kept beside the records they sum, in the same
/// transaction: per session (on its row), per account, scope, billing path,
/// device class and UTC day (`usage_daily`), and all-time per account,
/// scope and billing path (`usage_totals`); the outbox backlog is a
/// counter. Sessions are listed in pages by creation time.
const V1: &str = r#"
ALTER TABLE sessions ADD COLUMN recorded_ms INTEGER NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN recorded_gpu_seconds REAL NOT NULL DEFAULT 0;
ALTER TABLE sessions ADD COLUMN recorded_cost_nano INTEGER NOT NULL DEFAULT 0;
-- The seq of the session's last usage record: ids stay unique (the control
-- plane deduplicates by id) once old records are folded away.
ALTER TABLE sessions ADD COLUMN usage_seq INTEGER NOT NULL DEFAULT 0;
DROP INDEX IF EXISTS sessions_account;
CREATE INDEX sessions_created ON sessions(created_at_ns, id);
CREATE INDEX sessions_account_created ON sessions(account_id, created_at_ns, id);
CREATE INDEX sessions_billed_created ON sessions(billed_account_id, created_at_ns, id);
-- An update sent and not answered yet: its retry repeats it exactly.
ALTER TABLE credit_control ADD COLUMN pending_until_ns INTEGER;
-- Credit control of sessions whose terminate is owed (every open session's
-- is): what the credit tick reads every second.
CREATE INDEX credit_unreleased ON credit_control(session_id) WHERE released_at_ns IS NULL;
-- A record counts on the UTC day its period ends (day = period_end_ns /
-- 86400e9), under the account, scope and billing path of its session.
CREATE TABLE usage_daily (
    account_id   TEXT NOT NULL,
    day          INTEGER NOT NULL,
    scope        TEXT NOT NULL,
    billing_path TEXT NOT NULL,
    device_class TEXT NOT NULL,
    device_ms    INTEGER NOT NULL,
    gpu_seconds  REAL NOT NULL,
    cost_nano    INTEGER NOT NULL,
    PRIMARY KEY (account_id, day, scope, billing_path, device_class)
) WITHOUT ROWID;
CREATE TABLE usage_totals (
    account_id   TEXT NOT NULL,
    scope        TEXT NOT NULL,
    billing_path TEXT NOT NULL,
    device_ms    INTEGER NOT NULL,
    gpu_seconds  REAL NOT NULL,
    cost_nano    INTEGER NOT NULL,
    PRIMARY KEY (account_id, scope, billing_path)
) WITHOUT ROWID;
-- Stops the agent scheduled (a balance ran out, a reservation window
-- opened) and when they fall due: a restart during the grace does not
-- grant a fresh one.
CREATE TABLE scheduled_stops (
    session_id TEXT PRIMARY KEY REFERENCES sessions(id),
    reason     TEXT NOT NULL,
    at_ns      INTEGER NOT NULL
) WITHOUT ROWID;
-- Named counters kept in the transactions that change what they count:
-- `undelivered` (usage records not yet acknowledged), `raw_from_day` (raw
-- records of days before this one may be folded away: usage of those days
-- is read from the daily sums only).
CREATE TABLE ledger_counters (
    name  TEXT PRIMARY KEY,
    value INTEGER NOT NULL
) WITHOUT ROWID;

-- The sums of what an earlier version wrote.
UPDATE sessions SET
    recorded_ms = COALESCE((SELECT SUM(device_ms) FROM usage_records u WHERE u.session_id = sessions.id), 0)
        + COALESCE((SELECT device_ms FROM session_totals t WHERE t.session_id = sessions.id), 0),
    recorded_gpu_seconds = COALESCE((SELECT SUM(gpu_seconds) FROM usage_records u WHERE u.session_id = sessions.id), 0.0)
        + COALESCE((SELECT gpu_seconds FROM session_totals t WHERE t.session_id = sessions.id), 0.0),
    recorded_cost_nano = COALESCE((SELECT SUM(cost_nano) FROM usage_records u WHERE u.session_id = sessions.id), 0)
        + COALESCE((SELECT cost_nano FROM session_totals t WHERE t.session_id = sessions.id), 0),
    usage_seq = COALESCE((SELECT MAX(seq) FROM usage_records u WHERE u.session_id = sessions.id), 0);
INSERT INTO usage_daily
    SELECT s.account_id, u.period_end_ns / 86400000000000, s.scope, s.billing_path, u.device_class,
           SUM(u.device_ms), SUM(u.gpu_seconds), SUM(u.cost_nano)
    FROM usage_records u JOIN sessions s ON s.id = u.session_id
    GROUP BY 1, 2, 3, 4, 5;
-- Records compacted by version 0 kept only their session's sums: they
-- count on the day the session's metering ended, under its first device's
-- class.
INSERT INTO usage_daily
    SELECT s.account_id, COALESCE(s.metered_until_ns, s.ended_at_ns, s.created_at_ns) / 86400000000000,
           s.scope, s.billing_path,
           COALESCE((SELECT d.device_class FROM session_devices d WHERE d.session_id = s.id ORDER BY d.position LIMIT 1), ''),
           t.device_ms, t.gpu_seconds, t.cost_nano
    FROM session_totals t JOIN sessions s ON s.id = t.session_id
    WHERE true
    ON CONFLICT (account_id, day, scope, billing_path, device_class) DO UPDATE SET
        device_ms = device_ms + excluded.device_ms,
        gpu_seconds = gpu_seconds + excluded.gpu_seconds,
        cost_nano = cost_nano + excluded.cost_nano;
INSERT INTO usage_totals
    SELECT account_id, scope, billing_path, SUM(device_ms), SUM(gpu_seconds), SUM(cost_nano)
    FROM usage_daily GROUP BY 1, 2, 3;
INSERT INTO ledger_counters
    SELECT 'undelivered', COUNT(*) FROM usage_records WHERE delivered_at_ns IS NULL;
-- Days up to the last one a compacted session metered have lost raw
-- records: reports read them whole.
INSERT INTO ledger_counters
    SELECT 'raw_from_day', COALESCE(MAX(COALESCE(s.metered_until_ns, s.ended_at_ns, s.created_at_ns)) / 86400000000000 + 1, 0)
    FROM session_totals t JOIN sessions s ON s.id = t.session_id;
DELETE FROM session_totals;
"#;

/// The migrations in order; `user_version` is how many have run.
const MIGRATIONS: [&str; 1] = [V1];

/// Creates the tables a new ledger needs and runs the migrations a ledger
/// of an earlier version has not had yet.
pub fn apply(connection: &mut Connection) -> rusqlite::Result<()> {
    connection.execute_batch(BASE)?;
    let done: usize = connection.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    for (index, migration) in MIGRATIONS.iter().enumerate().skip(done) {
        let tx = connection.transaction()?;
        tx.execute_batch(migration)?;
        tx.execute_batch(&format!("PRAGMA user_version = {}", index + 1))?;
        tx.commit()?;
    }
    Ok(())
}
