//! Usage sums that cost the same whatever the history: written with the
//! records they sum (in `write_cut`'s transaction), read instead of the
//! records. A record counts on the UTC day its period ends, under its
//! session's account, scope and billing path.
//!
//! A usage report over `(from, to]` reads whole days from `usage_daily` and
//! the parts of the (at most two) days at its edges from the raw records,
//! through the period index. Raw records of days before `raw_from_day` may
//! have been folded away (retention, or compaction after delivery); a part
//! of such a day counts the whole day when the day's last instant is in the
//! period, so adjacent periods still never count a record twice.

use std::collections::BTreeMap;

use rusqlite::{OptionalExtension, Transaction, params, params_from_iter};

use super::{Outcome, UsageTotal, parsed};
use crate::clock::UnixNanos;
use crate::metering::{Credits, UsageCut};
use crate::session::{BillingPath, Scope, SessionRecord};

/// A UTC day in nanoseconds.
pub const DAY_NS: i64 = 86_400_000_000_000;

/// The day a record whose period ends at `end` counts on.
pub fn day_of(end: UnixNanos) -> i64 {
    end.0.div_euclid(DAY_NS)
}

/// Adds `cuts` (the records just written for `session`, all ending at the
/// same instant) to the session's sums, its day's and the all-time sums,
/// and the outbox counter.
pub(super) fn add_to_sums<E>(
    tx: &Transaction<'_>,
    session: &SessionRecord,
    cuts: &[UsageCut],
) -> Result<(), Outcome<E>> {
    let Some(first) = cuts.first() else {
        return Ok(());
    };
    let day = day_of(first.period_end);
    let (scope, path) = (session.scope.as_str(), session.billing_path.as_str());
    // One row per device class among the cuts.
    let mut by_class: BTreeMap<&str, (i64, f64, i64)> = BTreeMap::new();
    for cut in cuts {
        let sums = by_class.entry(cut.device_class.as_str()).or_default();
        sums.0 = sums.0.saturating_add(cut.device_ms);
        sums.1 += cut.gpu_seconds;
        sums.2 = sums.2.saturating_add(cut.cost.0);
    }
    let mut daily = tx.prepare_cached(
        "INSERT INTO usage_daily (account_id, day, scope, billing_path, device_class, device_ms, gpu_seconds, cost_nano)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)
         ON CONFLICT (account_id, day, scope, billing_path, device_class) DO UPDATE SET
             device_ms = device_ms + excluded.device_ms, gpu_seconds = gpu_seconds + excluded.gpu_seconds,
             cost_nano = cost_nano + excluded.cost_nano",
    )?;
    for (class, (ms, gpu, cost)) in &by_class {
        daily.execute(params![
            session.account_id,
            day,
            scope,
            path,
            class,
            ms,
            gpu,
            cost
        ])?;
    }
    let (ms, gpu, cost) = by_class
        .values()
        .fold((0i64, 0f64, 0i64), |(a, b, c), (x, y, z)| {
            (a.saturating_add(*x), b + y, c.saturating_add(*z))
        });
    tx.prepare_cached(
        "INSERT INTO usage_totals (account_id, scope, billing_path, device_ms, gpu_seconds, cost_nano)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6)
         ON CONFLICT (account_id, scope, billing_path) DO UPDATE SET
             device_ms = device_ms + excluded.device_ms, gpu_seconds = gpu_seconds + excluded.gpu_seconds,
             cost_nano = cost_nano + excluded.cost_nano",
    )?
    .execute(params![session.account_id, scope, path, ms, gpu, cost])?;
    tx.prepare_cached(
        "UPDATE sessions SET recorded_ms = recorded_ms + ?2, recorded_gpu_seconds = recorded_gpu_seconds + ?3,
             recorded_cost_nano = recorded_cost_nano + ?4 WHERE id = ?1",
    )?
    .execute(params![session.id.0, ms, gpu, cost])?;
    add_to_counter(
        tx,
        "undelivered",
        i64::try_from(cuts.len()).unwrap_or(i64::MAX),
    )?;
    Ok(())
}

pub(super) fn add_to_counter<E>(
    tx: &Transaction<'_>,
    name: &str,
    delta: i64,
) -> Result<(), Outcome<E>> {
    tx.prepare_cached(
        "INSERT INTO ledger_counters (name, value) VALUES (?1, ?2)
         ON CONFLICT (name) DO UPDATE SET value = value + excluded.value",
    )?
    .execute(params![name, delta])?;
    Ok(())
}

pub(super) fn counter<E>(tx: &Transaction<'_>, name: &str) -> Result<i64, Outcome<E>> {
    Ok(tx
        .prepare_cached("SELECT value FROM ledger_counters WHERE name = ?1")?
        .query_row(params![name], |row| row.get(0))
        .optional()?
        .unwrap_or(0))
}

/// How a report over record ends in `(from, to]` is read.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(super) struct Plan {
    /// Days read whole from the daily sums (inclusive range).
    pub days: Option<(i64, i64)>,
    /// Parts of days read from the raw records: record ends in `[lo, hi)`.
    pub raw: Vec<(i64, i64)>,
}

/// Splits `(from, to]` into whole days and raw parts; parts of days before
/// `raw_from_day` are counted whole when the day's last instant is in the
/// period, else not at all.
pub(super) fn plan(from: UnixNanos, to: UnixNanos, raw_from_day: i64) -> Plan {
    if from >= to {
        return Plan::default();
    }
    // Record ends e with from < e <= to: [lo, hi).
    let (lo, hi) = (from.0.saturating_add(1), to.0.saturating_add(1));
    let (first, last) = (lo.div_euclid(DAY_NS), to.0.div_euclid(DAY_NS));
    let mut whole = (first, last);
    let mut raw = Vec::new();
    let mut extra_days = Vec::new();
    for day in if first == last {
        vec![first]
    } else {
        vec![first, last]
    } {
        let (start, end) = (
            day.saturating_mul(DAY_NS),
            day.saturating_add(1).saturating_mul(DAY_NS),
        );
        let part = (lo.max(start), hi.min(end));
        if part == (start, end) {
            continue;
        }
        // Not whole: out of the range of whole days.
        if day == whole.0 {
            whole.0 += 1;
        }
        if day == whole.1 {
            whole.1 -= 1;
        }
        if day >= raw_from_day {
            raw.push(part);
        } else if hi >= end {
            // Its last instant is in the period.
            extra_days.push(day);
        }
    }
    let mut days = (whole.0 <= whole.1).then_some(whole);
    for day in extra_days {
        days = Some(match days {
            None => (day, day),
            Some((a, b)) => (a.min(day), b.max(day)),
        });
    }
    Plan { days, raw }
}

type Key = (String, String, String, String);
type Sums = (i64, f64, i64);

/// The report of `accounts` over record ends in `(from, to]`, by account,
/// scope, billing path and device class.
pub(super) fn report<E>(
    tx: &Transaction<'_>,
    accounts: &[String],
    from: UnixNanos,
    to: UnixNanos,
) -> Result<Vec<UsageTotal>, Outcome<E>> {
    let plan = plan(from, to, counter(tx, "raw_from_day")?);
    let mut sums: BTreeMap<Key, Sums> = BTreeMap::new();
    let mut add = |row: &rusqlite::Row<'_>| -> rusqlite::Result<()> {
        let key = (row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?);
        let entry = sums.entry(key).or_default();
        entry.0 += row.get::<_, i64>(4)?;
        entry.1 += row.get::<_, f64>(5)?;
        entry.2 = entry.2.saturating_add(row.get::<_, i64>(6)?);
        Ok(())
    };
    if let Some((first, last)) = plan.days {
        let mut daily = tx.prepare_cached(
            "SELECT account_id, scope, billing_path, device_class, SUM(device_ms), SUM(gpu_seconds), SUM(cost_nano)
             FROM usage_daily WHERE account_id = ?1 AND day >= ?2 AND day <= ?3
             GROUP BY 1, 2, 3, 4",
        )?;
        for account in accounts {
            let mut rows = daily.query(params![account, first, last])?;
            while let Some(row) = rows.next()? {
                add(row)?;
            }
        }
    }
    if !plan.raw.is_empty() && !accounts.is_empty() {
        // The period index first (CROSS JOIN keeps that order): a part of
        // a day is at most a day of records, whatever the history.
        let placeholders = vec!["?"; accounts.len()].join(", ");
        let mut raw = tx.prepare_cached(&format!(
            "SELECT s.account_id, s.scope, s.billing_path, u.device_class,
                    SUM(u.device_ms), SUM(u.gpu_seconds), SUM(u.cost_nano)
             FROM usage_records u CROSS JOIN sessions s
             WHERE u.period_end_ns >= ? AND u.period_end_ns < ? AND s.id = u.session_id
               AND s.account_id IN ({placeholders})
             GROUP BY 1, 2, 3, 4"
        ))?;
        for (lo, hi) in &plan.raw {
            let values: Vec<rusqlite::types::Value> = [*lo, *hi]
                .into_iter()
                .map(rusqlite::types::Value::Integer)
                .chain(
                    accounts
                        .iter()
                        .map(|a| rusqlite::types::Value::Text(a.clone())),
                )
                .collect();
            let mut rows = raw.query(params_from_iter(values))?;
            while let Some(row) = rows.next()? {
                add(row)?;
            }
        }
    }
    sums.into_iter()
        .map(
            |((account_id, scope, path, device_class), (device_ms, gpu_seconds, cost))| {
                Ok(UsageTotal {
                    account_id,
                    scope: parsed("scope", &scope, Scope::parse).map_err(Outcome::Corrupt)?,
                    billing_path: parsed("billing path", &path, BillingPath::parse)
                        .map_err(Outcome::Corrupt)?,
                    device_class,
                    device_ms,
                    gpu_seconds,
                    cost: Credits(cost),
                })
            },
        )
        .collect()
}

/// Every account's all-time usage by scope and billing path
/// (`device_class` empty).
pub(super) fn totals<E>(tx: &Transaction<'_>) -> Result<Vec<UsageTotal>, Outcome<E>> {
    let mut statement = tx.prepare_cached(
        "SELECT account_id, scope, billing_path, '', device_ms, gpu_seconds, cost_nano
         FROM usage_totals ORDER BY account_id, scope, billing_path",
    )?;
    statement
        .query_map([], super::read_usage_total)?
        .map(|total| total?.map_err(Outcome::Corrupt))
        .collect()
}

/// Raw records folded per transaction, so that folding a long history
/// never holds the writer for long.
pub(super) const FOLD_BATCH: i64 = 20_000;

/// Removes up to [`FOLD_BATCH`] raw records whose period ended before
/// `before` (only acknowledged ones when `delivered_only`): their sums
/// stay in the session, daily and all-time sums, and usage of the days they
/// were in is read from the daily sums from now on. Returns how many went.
pub(super) fn fold<E>(
    tx: &Transaction<'_>,
    before: UnixNanos,
    delivered_only: bool,
) -> Result<usize, Outcome<E>> {
    let delivered = if delivered_only {
        " AND delivered_at_ns IS NOT NULL"
    } else {
        ""
    };
    let chosen = format!(
        "SELECT rowid FROM usage_records WHERE period_end_ns < ?1{delivered} ORDER BY period_end_ns LIMIT ?2"
    );
    let undelivered: i64 = tx.query_row(
        &format!(
            "SELECT COUNT(*) FROM usage_records WHERE rowid IN ({chosen}) AND delivered_at_ns IS NULL"
        ),
        params![before.0, FOLD_BATCH],
        |row| row.get(0),
    )?;
    let removed = tx.execute(
        &format!("DELETE FROM usage_records WHERE rowid IN ({chosen})"),
        params![before.0, FOLD_BATCH],
    )?;
    if removed > 0 {
        add_to_counter(tx, "undelivered", -undelivered)?;
        // Days with a record folded away (all before `before`'s day ends)
        // are read whole from now on.
        let from_day = before.0.saturating_sub(1).div_euclid(DAY_NS) + 1;
        tx.execute(
            "UPDATE ledger_counters SET value = MAX(value, ?1) WHERE name = 'raw_from_day'",
            params![from_day],
        )?;
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: i64 = DAY_NS;

    fn at(ns: i64) -> UnixNanos {
        UnixNanos(ns)
    }

    #[test]
    fn a_period_splits_into_whole_days_and_raw_parts_at_its_edges() {
        // Whole days only: (day 10 start - 1, day 13 start - 1].
        assert_eq!(
            plan(at(10 * D - 1), at(13 * D - 1), 0),
            Plan {
                days: Some((10, 12)),
                raw: vec![]
            }
        );
        // Parts at both edges.
        assert_eq!(
            plan(at(10 * D + 5), at(13 * D + 7), 0),
            Plan {
                days: Some((11, 12)),
                raw: vec![(10 * D + 6, 11 * D), (13 * D, 13 * D + 8)]
            }
        );
        // Within one day.
        assert_eq!(
            plan(at(10 * D + 5), at(10 * D + 9), 0),
            Plan {
                days: None,
                raw: vec![(10 * D + 6, 10 * D + 10)]
            }
        );
        // Empty.
        assert_eq!(plan(at(5), at(5), 0), Plan::default());
    }

    #[test]
    fn folded_days_count_whole_in_the_period_that_holds_their_last_instant() {
        // Raw records before day 12 are gone.
        let left = plan(at(10 * D + 5), at(11 * D + 3), 12);
        // Day 10's last instant is in the period, day 11's is not.
        assert_eq!(
            left,
            Plan {
                days: Some((10, 10)),
                raw: vec![]
            }
        );
        let right = plan(at(11 * D + 3), at(12 * D + 3), 12);
        assert_eq!(
            right,
            Plan {
                days: Some((11, 11)),
                raw: vec![(12 * D, 12 * D + 4)]
            }
        );
        // Adjacent periods: every day counted once.
        let cuts = [0, 10 * D + 5, 11 * D + 3, 12 * D + 3, 14 * D];
        let mut counted = Vec::new();
        for pair in cuts.windows(2) {
            let plan = plan(at(pair[0]), at(pair[1]), 12);
            if let Some((a, b)) = plan.days {
                counted.extend(a..=b);
            }
        }
        counted.sort_unstable();
        let unique: std::collections::BTreeSet<_> = counted.iter().collect();
        assert_eq!(counted.len(), unique.len(), "{counted:?}");
    }
}
