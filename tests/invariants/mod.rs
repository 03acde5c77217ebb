//! The accounting invariants of RELIABILITY.md, checked on a daemon's
//! ledger (opened read-only) against what Docker itself recorded. Used by
//! the crash-loop, engine-restart and state-directory tests once every
//! session has ended:
//!
//! - every session that ran has usage records that tile Docker's
//!   `StartedAt..FinishedAt` per device: the first starts at StartedAt, each
//!   ends where the next starts, the last (and only it, marked final) ends
//!   at the session's end, which is Docker's FinishedAt (within 10 ms), and
//!   their device-milliseconds add up to Docker's within 10 ms;
//! - a session that never started has no usage and its container, if any,
//!   never ran: no container runs unmetered;
//! - no device is ever in two sessions: no device hold is left, and the
//!   containers of the sessions that held a device never ran at the same
//!   time, as Docker's own times say;
//! - every balance moved by exactly the debits of its records (balance
//!   billing path) and the operator's adjustments;
//! - SQLite's `integrity_check` finds nothing.
#![allow(dead_code, clippy::unwrap_used)]

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::Path;

use gpuwarden::clock::UnixNanos;
use rusqlite::{Connection, OpenFlags, params};

/// Most a session's device-seconds (or its end) may differ from Docker's.
pub const TOLERANCE_MS: i64 = 10;

/// What a check saw, for the figures of RELIABILITY.md.
#[derive(Debug, Default, Clone)]
pub struct Report {
    pub sessions: usize,
    /// Sessions whose container started (billed).
    pub ran: usize,
    /// Sessions that never started (a refused or interrupted launch).
    pub never_started: usize,
    pub records: usize,
    pub devices_seconds: f64,
    /// Largest |ledger device-ms - Docker's StartedAt..FinishedAt ms| of a
    /// device of a session.
    pub max_deviation_ms: i64,
    /// Largest distance between a session's end in the ledger and Docker's
    /// FinishedAt.
    pub max_end_deviation_ms: i64,
    pub accounts: usize,
    /// Sessions by end reason.
    pub end_reasons: BTreeMap<String, usize>,
}

impl std::fmt::Display for Report {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} sessions ({} ran, {} never started), {} usage records, {:.1} device-seconds, \
             max deviation from Docker {} ms (ends {} ms), {} balances, end reasons {:?}",
            self.sessions,
            self.ran,
            self.never_started,
            self.records,
            self.devices_seconds,
            self.max_deviation_ms,
            self.max_end_deviation_ms,
            self.accounts,
            self.end_reasons
        )
    }
}

/// What Docker says of one container.
#[derive(Debug, Clone)]
pub struct DockerContainer {
    pub id: String,
    pub session: String,
    pub started_at: Option<UnixNanos>,
    pub finished_at: Option<UnixNanos>,
    pub running: bool,
}

/// Every container (running or not) labelled with one of `nodes`.
pub fn docker_containers(nodes: &[&str]) -> Vec<DockerContainer> {
    let mut ids = Vec::new();
    for node in nodes {
        let out = crate::common::docker(&[
            "ps",
            "-aq",
            "--no-trunc",
            "--filter",
            &format!("label=dev.gpuwarden.node={node}"),
        ]);
        ids.extend(out.split_whitespace().map(str::to_owned));
    }
    let mut containers = Vec::new();
    // A bounded command line per call.
    for chunk in ids.chunks(100) {
        let mut args = vec![
            "inspect",
            "-f",
            "{{.Id}}|{{index .Config.Labels \"dev.gpuwarden.session\"}}|{{.State.StartedAt}}|{{.State.FinishedAt}}|{{.State.Running}}",
        ];
        args.extend(chunk.iter().map(String::as_str));
        for line in crate::common::docker(&args).lines() {
            let fields: Vec<&str> = line.trim().split('|').collect();
            assert_eq!(fields.len(), 5, "unexpected inspect line {line:?}");
            containers.push(DockerContainer {
                id: fields[0].to_owned(),
                session: fields[1].to_owned(),
                started_at: UnixNanos::parse_rfc3339(fields[2]),
                finished_at: UnixNanos::parse_rfc3339(fields[3]),
                running: fields[4] == "true",
            });
        }
    }
    containers
}

/// Opens a ledger read-only: no checkpoint of its WAL on close, so a
/// daemon started on it afterwards finds it exactly as its predecessor
/// left it.
pub fn open(ledger: &Path) -> Connection {
    Connection::open_with_flags(
        ledger,
        OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_NO_MUTEX,
    )
    .unwrap_or_else(|e| panic!("cannot open {}: {e}", ledger.display()))
}

/// `PRAGMA integrity_check` of the ledger: "ok" or what is wrong.
pub fn integrity(ledger: &Path) -> String {
    let db = open(ledger);
    let rows: Vec<String> = db
        .prepare("PRAGMA integrity_check")
        .unwrap()
        .query_map([], |row| row.get(0))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    rows.join("; ")
}

/// Devices that two open sessions of the ledger share (there must be
/// none), and holds that do not belong to an open session of that device.
/// Usable at any moment, also between a kill and the next start.
pub fn shared_devices(ledger: &Path) -> Vec<String> {
    let db = open(ledger);
    let mut problems = Vec::new();
    let mut statement = db
        .prepare(
            "SELECT d.device_uuid, GROUP_CONCAT(s.id) FROM session_devices d JOIN sessions s ON s.id = d.session_id
             WHERE s.state != 'ended' GROUP BY d.device_uuid HAVING COUNT(*) > 1",
        )
        .unwrap();
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })
        .unwrap();
    for row in rows {
        let (device, sessions) = row.unwrap();
        problems.push(format!(
            "device {device} is in open sessions {sessions} at once"
        ));
    }
    let mut statement = db
        .prepare(
            "SELECT h.device_uuid, h.session_id FROM device_holds h
             WHERE NOT EXISTS (SELECT 1 FROM sessions s JOIN session_devices d ON d.session_id = s.id
                               WHERE s.id = h.session_id AND d.device_uuid = h.device_uuid AND s.state != 'ended')",
        )
        .unwrap();
    let rows = statement
        .query_map([], |row| {
            Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
        })
        .unwrap();
    for row in rows {
        let (device, session) = row.unwrap();
        problems.push(format!(
            "device {device} is held for {session}, which is not an open session of it"
        ));
    }
    problems
}

#[derive(Debug)]
struct SessionRow {
    id: String,
    state: String,
    container_id: Option<String>,
    started_at: Option<i64>,
    ended_at: Option<i64>,
    metered_until: Option<i64>,
    billing_path: String,
    billed_account: String,
    end_reason: Option<String>,
}

#[derive(Debug)]
struct RecordRow {
    id: String,
    seq: i64,
    device: String,
    start: i64,
    end: i64,
    device_ms: i64,
    cost: i64,
    last: bool,
}

fn ms(nanos: i64) -> i64 {
    UnixNanos(nanos).millis()
}

/// Checks every invariant of the module's documentation on the ledger at
/// `ledger` and the containers of `nodes`; panics listing what is wrong.
/// Every session must have ended.
pub fn check(ledger: &Path, nodes: &[&str]) -> Report {
    let (report, problems) = audit(ledger, nodes);
    assert!(
        problems.is_empty(),
        "{} accounting problems (of {report}):\n{}",
        problems.len(),
        problems
            .iter()
            .take(40)
            .cloned()
            .collect::<Vec<_>>()
            .join("\n")
    );
    report
}

/// What [`check`] checks, and what it found wrong.
pub fn audit(ledger: &Path, nodes: &[&str]) -> (Report, Vec<String>) {
    let mut problems: Vec<String> = Vec::new();
    let integrity = integrity(ledger);
    if integrity != "ok" {
        problems.push(format!("integrity_check: {integrity}"));
    }
    let db = open(ledger);
    let sessions: Vec<SessionRow> = db
        .prepare(
            "SELECT id, state, container_id, started_at_ns, ended_at_ns, metered_until_ns, billing_path,
                    billed_account_id, end_reason FROM sessions ORDER BY created_at_ns",
        )
        .unwrap()
        .query_map([], |row| {
            Ok(SessionRow {
                id: row.get(0)?,
                state: row.get(1)?,
                container_id: row.get(2)?,
                started_at: row.get(3)?,
                ended_at: row.get(4)?,
                metered_until: row.get(5)?,
                billing_path: row.get(6)?,
                billed_account: row.get(7)?,
                end_reason: row.get(8)?,
            })
        })
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let mut devices_of: HashMap<String, Vec<String>> = HashMap::new();
    {
        let mut statement = db
            .prepare(
                "SELECT session_id, device_uuid FROM session_devices ORDER BY session_id, position",
            )
            .unwrap();
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, String>(1)?))
            })
            .unwrap();
        for row in rows {
            let (session, device) = row.unwrap();
            devices_of.entry(session).or_default().push(device);
        }
    }
    let mut records_of: HashMap<String, Vec<RecordRow>> = HashMap::new();
    let mut record_count = 0;
    {
        let mut statement = db
            .prepare(
                "SELECT session_id, id, seq, device_uuid, period_start_ns, period_end_ns, device_ms, cost_nano, final
                 FROM usage_records ORDER BY session_id, seq, device_uuid",
            )
            .unwrap();
        let rows = statement
            .query_map([], |row| {
                Ok((
                    row.get::<_, String>(0)?,
                    RecordRow {
                        id: row.get(1)?,
                        seq: row.get(2)?,
                        device: row.get(3)?,
                        start: row.get(4)?,
                        end: row.get(5)?,
                        device_ms: row.get(6)?,
                        cost: row.get(7)?,
                        last: row.get(8)?,
                    },
                ))
            })
            .unwrap();
        for row in rows {
            let (session, record) = row.unwrap();
            records_of.entry(session).or_default().push(record);
            record_count += 1;
        }
    }
    let folded: i64 = db
        .query_row(
            "SELECT value FROM ledger_counters WHERE name = 'raw_from_day'",
            [],
            |row| row.get(0),
        )
        .unwrap();
    if folded != 0 {
        problems.push(format!(
            "records of days before day {folded} were folded: they cannot be checked"
        ));
    }
    problems.extend(sums_problems(&db));
    let holds: i64 = db
        .query_row("SELECT COUNT(*) FROM device_holds", [], |row| row.get(0))
        .unwrap();
    if holds != 0 {
        problems.push(format!(
            "{holds} device holds remain although every session ended"
        ));
    }

    let containers = docker_containers(nodes);
    let mut containers_of: HashMap<String, Vec<DockerContainer>> = HashMap::new();
    let known: HashSet<&str> = sessions.iter().map(|s| s.id.as_str()).collect();
    for container in &containers {
        if !known.contains(container.session.as_str()) {
            problems.push(format!(
                "container {} claims session {:?}, which the ledger does not know (started {:?})",
                container.id, container.session, container.started_at
            ));
        }
        containers_of
            .entry(container.session.clone())
            .or_default()
            .push(container.clone());
    }

    let mut report = Report {
        sessions: sessions.len(),
        records: record_count,
        ..Report::default()
    };
    // device -> (Docker's start, Docker's finish, session) of every session
    // that held it and ran.
    let mut runs_on: HashMap<String, Vec<(i64, i64, String)>> = HashMap::new();
    // account -> expected delta of the balance.
    let mut expected: HashMap<String, i64> = HashMap::new();
    for session in &sessions {
        let id = &session.id;
        *report
            .end_reasons
            .entry(session.end_reason.clone().unwrap_or_default())
            .or_default() += 1;
        if session.state != "ended" {
            problems.push(format!("session {id} is still {}", session.state));
            continue;
        }
        let records = records_of.remove(id).unwrap_or_default();
        let devices = devices_of.get(id).cloned().unwrap_or_default();
        if devices.is_empty() {
            problems.push(format!("session {id} has no devices"));
        }
        let own = containers_of.remove(id).unwrap_or_default();
        if own.len() > 1 {
            problems.push(format!(
                "session {id} has {} containers: {:?}",
                own.len(),
                own.iter().map(|c| &c.id).collect::<Vec<_>>()
            ));
        }
        if session.billing_path == "balance" {
            *expected.entry(session.billed_account.clone()).or_default() -=
                records.iter().map(|r| r.cost).sum::<i64>();
        }
        let Some(started) = session.started_at else {
            report.never_started += 1;
            if !records.is_empty() {
                problems.push(format!(
                    "session {id} never started but has {} usage records",
                    records.len()
                ));
            }
            for container in &own {
                if container.started_at.is_some() || container.running {
                    problems.push(format!(
                        "container {} of session {id} ran (started {:?}) but the ledger says the session never started: unmetered",
                        container.id, container.started_at
                    ));
                }
            }
            continue;
        };
        report.ran += 1;
        let Some(container) = own.first() else {
            problems.push(format!(
                "session {id} started but Docker has no container of it"
            ));
            continue;
        };
        if session.container_id.as_deref() != Some(container.id.as_str()) {
            problems.push(format!(
                "session {id} records container {:?}, Docker has {}",
                session.container_id, container.id
            ));
        }
        if container.running {
            problems.push(format!(
                "session {id} ended but its container {} still runs",
                container.id
            ));
            continue;
        }
        let (Some(docker_start), Some(docker_finish)) =
            (container.started_at, container.finished_at)
        else {
            problems.push(format!(
                "session {id} started but Docker has no StartedAt/FinishedAt for {}",
                container.id
            ));
            continue;
        };
        // As the agent reads them: an immediate exit may show FinishedAt a
        // hair before StartedAt.
        let docker_finish = docker_finish.0.max(docker_start.0);
        if started != docker_start.0 {
            problems.push(format!(
                "session {id} started at {started} in the ledger, {} in Docker",
                docker_start.0
            ));
        }
        let Some(ended) = session.ended_at else {
            problems.push(format!(
                "session {id} started and ended without an end time"
            ));
            continue;
        };
        let end_deviation = ms(ended) - ms(docker_finish);
        report.max_end_deviation_ms = report.max_end_deviation_ms.max(end_deviation.abs());
        if end_deviation.abs() > TOLERANCE_MS {
            problems.push(format!(
                "session {id} ({:?}) ended at {ended} in the ledger, Docker finished it at {docker_finish}: {end_deviation} ms apart",
                session.end_reason
            ));
        }
        if session.metered_until != Some(ended) {
            problems.push(format!(
                "session {id} is metered until {:?}, ended at {ended}",
                session.metered_until
            ));
        }
        for device in &devices {
            runs_on.entry(device.clone()).or_default().push((
                docker_start.0,
                docker_finish,
                id.clone(),
            ));
        }
        // The records: per device, tiling [StartedAt, end].
        let seqs: BTreeMap<i64, Vec<&RecordRow>> =
            records.iter().fold(BTreeMap::new(), |mut by, r| {
                by.entry(r.seq).or_insert_with(Vec::new).push(r);
                by
            });
        let mut expected_seq = 1;
        for (seq, cut) in &seqs {
            if *seq != expected_seq {
                problems.push(format!(
                    "session {id}: record seq {seq}, expected {expected_seq}"
                ));
            }
            expected_seq = seq + 1;
            let mut on: Vec<&str> = cut.iter().map(|r| r.device.as_str()).collect();
            on.sort_unstable();
            let mut want: Vec<&str> = devices.iter().map(String::as_str).collect();
            want.sort_unstable();
            if on != want {
                problems.push(format!(
                    "session {id}: cut {seq} covers devices {on:?}, the session holds {want:?}"
                ));
            }
        }
        for device in &devices {
            let mine: Vec<&RecordRow> = records.iter().filter(|r| &r.device == device).collect();
            let Some(first) = mine.first() else {
                problems.push(format!("session {id} ran but has no usage for {device}"));
                continue;
            };
            if first.start != started {
                problems.push(format!(
                    "session {id} {device}: first record starts at {}, the session at {started}",
                    first.start
                ));
            }
            for pair in mine.windows(2) {
                if pair[0].end != pair[1].start {
                    problems.push(format!(
                        "session {id} {device}: record {} ends at {}, the next starts at {}: {}",
                        pair[0].id,
                        pair[0].end,
                        pair[1].start,
                        if pair[0].end < pair[1].start {
                            "a gap (unbilled)"
                        } else {
                            "an overlap (billed twice)"
                        }
                    ));
                }
            }
            for (i, record) in mine.iter().enumerate() {
                let want_id = format!("{id}/{}/{device}", record.seq);
                if record.id != want_id {
                    problems.push(format!("record {} should be {want_id}", record.id));
                }
                if record.device_ms != (ms(record.end) - ms(record.start)).max(0)
                    || record.end < record.start
                {
                    problems.push(format!(
                        "record {}: {} ms for {}..{}",
                        record.id, record.device_ms, record.start, record.end
                    ));
                }
                let is_last = i + 1 == mine.len();
                if record.last != is_last {
                    problems.push(format!(
                        "record {} is{} marked final but is{} the last",
                        record.id,
                        if record.last { "" } else { " not" },
                        if is_last { "" } else { " not" }
                    ));
                }
            }
            let last = mine[mine.len() - 1];
            if last.end != ended {
                problems.push(format!(
                    "session {id} {device}: last record ends at {}, the session at {ended}",
                    last.end
                ));
            }
            let billed: i64 = mine.iter().map(|r| r.device_ms).sum();
            let docker_ms = ms(docker_finish) - ms(docker_start.0);
            let deviation = billed - docker_ms;
            report.max_deviation_ms = report.max_deviation_ms.max(deviation.abs());
            report.devices_seconds += billed as f64 / 1000.0;
            if deviation.abs() > TOLERANCE_MS {
                problems.push(format!(
                    "session {id} {device}: {billed} ms billed, Docker ran it {docker_ms} ms ({:?})",
                    session.end_reason
                ));
            }
        }
    }
    for (session, records) in &records_of {
        problems.push(format!(
            "{} usage records of unknown session {session}",
            records.len()
        ));
    }
    // No two sessions' containers ran on one device at the same time.
    for (device, runs) in &mut runs_on {
        runs.sort();
        for pair in runs.windows(2) {
            if pair[1].0 < pair[0].1 {
                problems.push(format!(
                    "device {device}: session {} ran {}..{} and session {} started at {} before that",
                    pair[0].2, pair[0].0, pair[0].1, pair[1].2, pair[1].0
                ));
            }
        }
    }
    // Balances: the debits of the records and the adjustments, exactly.
    {
        let mut statement = db
            .prepare(
                "SELECT account_id, SUM(delta_nano) FROM balance_adjustments GROUP BY account_id",
            )
            .unwrap();
        let rows = statement
            .query_map([], |row| {
                Ok((row.get::<_, String>(0)?, row.get::<_, i64>(1)?))
            })
            .unwrap();
        for row in rows {
            let (account, delta) = row.unwrap();
            *expected.entry(account).or_default() += delta;
        }
    }
    let actual: HashMap<String, i64> = db
        .prepare("SELECT account_id, delta_nano FROM account_balances")
        .unwrap()
        .query_map([], |row| Ok((row.get(0)?, row.get(1)?)))
        .unwrap()
        .collect::<Result<_, _>>()
        .unwrap();
    let accounts: HashSet<&String> = expected.keys().chain(actual.keys()).collect();
    report.accounts = accounts.len();
    for account in accounts {
        let want = expected.get(account).copied().unwrap_or(0);
        let got = actual.get(account).copied().unwrap_or(0);
        if want != got {
            problems.push(format!(
                "balance of {account} moved {got} nano-credits, its debits and adjustments say {want}"
            ));
        }
    }
    (report, problems)
}

/// Runs `params![]`-free SQL returning one integer, for small probes.
/// The sums the ledger keeps beside its records (per session, per account
/// and day, all-time, the outbox counter) against the records themselves:
/// written in the same transactions, they never disagree.
pub fn sums_problems(db: &Connection) -> Vec<String> {
    // Each pair: what the records say, what the ledger keeps; integer
    // columns exactly, GPU-seconds within rounding.
    let checks = [
        (
            "session sums",
            "SELECT s.id, COALESCE(SUM(u.device_ms), 0), COALESCE(SUM(u.cost_nano), 0), COALESCE(SUM(u.gpu_seconds), 0.0)
             FROM sessions s LEFT JOIN usage_records u ON u.session_id = s.id GROUP BY s.id",
            "SELECT id, recorded_ms, recorded_cost_nano, recorded_gpu_seconds FROM sessions",
        ),
        (
            "daily sums",
            "SELECT s.account_id || '/' || (u.period_end_ns / 86400000000000) || '/' || s.scope || '/' || s.billing_path || '/' || u.device_class,
                    SUM(u.device_ms), SUM(u.cost_nano), SUM(u.gpu_seconds)
             FROM usage_records u JOIN sessions s ON s.id = u.session_id
             GROUP BY s.account_id, u.period_end_ns / 86400000000000, s.scope, s.billing_path, u.device_class",
            "SELECT account_id || '/' || day || '/' || scope || '/' || billing_path || '/' || device_class,
                    device_ms, cost_nano, gpu_seconds FROM usage_daily",
        ),
        (
            "all-time sums",
            "SELECT s.account_id || '/' || s.scope || '/' || s.billing_path, SUM(u.device_ms), SUM(u.cost_nano), SUM(u.gpu_seconds)
             FROM usage_records u JOIN sessions s ON s.id = u.session_id
             GROUP BY s.account_id, s.scope, s.billing_path",
            "SELECT account_id || '/' || scope || '/' || billing_path, device_ms, cost_nano, gpu_seconds FROM usage_totals",
        ),
        (
            // What the ledger moved on each account is its adjustments less
            // the cost of its balance-path records: every debit is paid by a
            // record, and no record is debited twice or not at all.
            "balance debits",
            "SELECT account_id, SUM(delta), 0, 0.0 FROM (
                 SELECT account_id, delta_nano AS delta FROM balance_adjustments
                 UNION ALL
                 SELECT s.billed_account_id, -u.cost_nano FROM usage_records u JOIN sessions s ON s.id = u.session_id
                 WHERE s.billing_path = 'balance'
             ) GROUP BY account_id",
            "SELECT account_id, delta_nano, 0, 0.0 FROM account_balances",
        ),
        (
            "outbox counter",
            "SELECT 'undelivered', COUNT(*), 0, 0.0 FROM usage_records WHERE delivered_at_ns IS NULL",
            "SELECT name, value, 0, 0.0 FROM ledger_counters WHERE name = 'undelivered'",
        ),
    ];
    let read = |sql: &str| -> HashMap<String, (i64, i64, f64)> {
        db.prepare(sql)
            .unwrap()
            .query_map([], |row| {
                Ok((row.get(0)?, (row.get(1)?, row.get(2)?, row.get(3)?)))
            })
            .unwrap()
            .collect::<Result<_, _>>()
            .unwrap()
    };
    let mut problems = Vec::new();
    for (what, from_records, kept) in checks {
        let (records, kept) = (read(from_records), read(kept));
        for key in records.keys().chain(kept.keys()).collect::<HashSet<_>>() {
            let (a, b) = (records.get(key), kept.get(key));
            let agree = match (a, b) {
                (Some(a), Some(b)) => {
                    a.0 == b.0 && a.1 == b.1 && (a.2 - b.2).abs() <= 1e-6 * a.2.abs().max(1.0)
                }
                // A sum of nothing may be kept as a zero row, or not at all.
                (Some(x), None) | (None, Some(x)) => x.0 == 0 && x.1 == 0 && x.2 == 0.0,
                (None, None) => true,
            };
            if !agree {
                problems.push(format!(
                    "{what} of {key}: records say {a:?}, the ledger keeps {b:?}"
                ));
            }
        }
    }
    problems
}

pub fn count(ledger: &Path, sql: &str) -> i64 {
    open(ledger)
        .query_row(sql, params![], |row| row.get(0))
        .unwrap()
}
