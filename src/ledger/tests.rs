//! The ledger's sums against its records: kept in the same transactions,
//! read instead of the records, folded records changing no sum; pages of
//! sessions; the migration of a ledger an earlier version wrote.

use std::collections::BTreeMap;

use super::*;
use crate::gpu::GpuWeight;

const DAY: i64 = DAY_NS;
const HOUR: i64 = 3_600_000_000_000;

fn device(uuid: &str, class: &str, slices: u32) -> (AssignableDevice, Rate) {
    (
        AssignableDevice {
            uuid: DeviceUuid::new(uuid.to_owned()),
            class: class.to_owned(),
            model: class.to_owned(),
            mig_profile: None,
            parent: None,
            weight: GpuWeight { slices, of: 7 },
        },
        Rate(Credits(1_000_003)),
    )
}

/// A session of `account` on `devices`, created at `at`, running from
/// `at` and checkpointed every `every` until `end`, then ended there.
async fn run_session(
    ledger: &Ledger,
    account: &str,
    devices: Vec<(AssignableDevice, Rate)>,
    at: i64,
    every: i64,
    end: Option<i64>,
) -> SessionId {
    let id = SessionId::generate();
    let begun = ledger
        .begin_session(
            NewSession {
                id: id.clone(),
                request_id: format!("r-{id}"),
                node_id: "n-1".into(),
                scope: Scope::Org,
                account_id: account.into(),
                billed_account_id: account.into(),
                owner: Principal {
                    subject: "u-alice".into(),
                    kind: PrincipalKind::User,
                },
                image: "busybox".into(),
                created_at: UnixNanos(at),
            },
            move |_| {
                Ok(Admitted {
                    devices,
                    billing_path: BillingPath::Balance,
                })
            },
        )
        .await
        .unwrap();
    assert!(matches!(begun, Begun::Created(_)));
    ledger
        .mark_running(&id, "c-1", UnixNanos(at))
        .await
        .unwrap();
    let mut t = at;
    let stop = end.unwrap_or(at + 3 * DAY);
    while t + every < stop {
        t += every;
        ledger.checkpoint(&id, UnixNanos(t)).await.unwrap();
    }
    if let Some(end) = end {
        ledger
            .close(&id, Some(UnixNanos(end)), EndReason::Stopped, String::new())
            .await
            .unwrap();
    }
    id
}

/// What the raw records say of `accounts` over record ends in `(from, to]`.
fn from_records(
    path: &Path,
    accounts: &[&str],
    from: i64,
    to: i64,
) -> BTreeMap<String, (i64, i64)> {
    let db = Connection::open(path).unwrap();
    let mut statement = db
        .prepare(
            "SELECT s.account_id, u.device_class, SUM(u.device_ms), SUM(u.cost_nano)
             FROM usage_records u JOIN sessions s ON s.id = u.session_id
             WHERE u.period_end_ns > ?1 AND u.period_end_ns <= ?2 GROUP BY 1, 2",
        )
        .unwrap();
    statement
        .query_map(params![from, to], |row| {
            Ok((
                format!("{}/{}", row.get::<_, String>(0)?, row.get::<_, String>(1)?),
                (row.get(2)?, row.get(3)?),
            ))
        })
        .unwrap()
        .map(Result::unwrap)
        .filter(|(key, _)| accounts.iter().any(|a| key.starts_with(&format!("{a}/"))))
        .collect()
}

fn by_key(totals: &[UsageTotal]) -> BTreeMap<String, (i64, i64)> {
    let mut map: BTreeMap<String, (i64, i64)> = BTreeMap::new();
    for total in totals {
        let entry = map
            .entry(format!("{}/{}", total.account_id, total.device_class))
            .or_default();
        entry.0 += total.device_ms;
        entry.1 += total.cost.0;
    }
    map.retain(|_, sums| *sums != (0, 0));
    map
}

#[tokio::test]
async fn a_report_over_any_period_is_what_the_records_say_and_folding_changes_no_sum() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let start = 20_000 * DAY + 5 * HOUR + 17;
    // Two accounts, two classes, sessions crossing day boundaries, one
    // still open; checkpoints at odd instants.
    run_session(
        &ledger,
        "acme",
        vec![
            device("GPU-a", "A100", 7),
            device("MIG-b", "A100 MIG 1g", 1),
        ],
        start,
        HOUR + 7_000_001,
        Some(start + 2 * DAY + 3 * HOUR + 11),
    )
    .await;
    run_session(
        &ledger,
        "acme",
        vec![device("GPU-c", "H100", 7)],
        start + 20 * HOUR,
        5 * HOUR + 3,
        Some(start + 4 * DAY),
    )
    .await;
    run_session(
        &ledger,
        "globex",
        vec![device("GPU-d", "H100", 7)],
        start + HOUR,
        7 * HOUR,
        None,
    )
    .await;
    let accounts = ["acme", "globex"];
    let owned: Vec<String> = accounts.iter().map(|a| (*a).to_owned()).collect();
    // Periods of every shape: inside a day, across days, on boundaries,
    // empty, everything.
    let day0 = 20_000 * DAY;
    let mut periods = vec![(0, i64::MAX / 2), (day0 + DAY, day0 + 3 * DAY)];
    for (i, from) in [day0, day0 + HOUR, day0 + DAY - 1, day0 + DAY + 13 * HOUR]
        .into_iter()
        .enumerate()
    {
        for span in [1, HOUR, DAY, DAY + 1, 2 * DAY + 5 * HOUR, 5 * DAY] {
            periods.push((from + i as i64, from + i as i64 + span));
        }
    }
    for (from, to) in &periods {
        let report = ledger
            .usage(owned.clone(), UnixNanos(*from), UnixNanos(*to))
            .await
            .unwrap();
        assert_eq!(
            by_key(&report),
            from_records(ledger.path(), &accounts, *from, *to),
            "({from}, {to}]"
        );
    }
    let totals_before = ledger.usage_totals().await.unwrap();
    let all = |report: &[UsageTotal]| by_key(report);
    let everything = all(&ledger
        .usage(owned.clone(), UnixNanos(0), UnixNanos(i64::MAX / 2))
        .await
        .unwrap());
    let sessions_before = ledger
        .list(SessionFilter {
            include_ended: true,
            ..SessionFilter::default()
        })
        .await
        .unwrap()
        .sessions;

    // Fold the records of the first two days (and a bit): no sum changes.
    let horizon = day0 + 2 * DAY + 3 * HOUR;
    let folded = ledger.fold_usage(UnixNanos(horizon), false).await.unwrap();
    assert!(folded > 0);
    assert_eq!(ledger.usage_totals().await.unwrap(), totals_before);
    assert_eq!(
        all(&ledger
            .usage(owned.clone(), UnixNanos(0), UnixNanos(i64::MAX / 2))
            .await
            .unwrap()),
        everything
    );
    let sessions_after = ledger
        .list(SessionFilter {
            include_ended: true,
            ..SessionFilter::default()
        })
        .await
        .unwrap()
        .sessions;
    let recorded = |sessions: &[SessionRecord]| -> Vec<(i64, Credits)> {
        sessions
            .iter()
            .map(|s| (s.recorded.device_ms, s.recorded.cost))
            .collect()
    };
    assert_eq!(recorded(&sessions_after), recorded(&sessions_before));
    // Periods that start after the folded days are still exact.
    for (from, to) in periods.iter().filter(|(from, _)| *from >= day0 + 3 * DAY) {
        let report = ledger
            .usage(owned.clone(), UnixNanos(*from), UnixNanos(*to))
            .await
            .unwrap();
        assert_eq!(
            by_key(&report),
            from_records(ledger.path(), &accounts, *from, *to)
        );
    }
    // The outbox counter followed the folded records.
    let db = Connection::open(ledger.path()).unwrap();
    let undelivered: i64 = db
        .query_row(
            "SELECT COUNT(*) FROM usage_records WHERE delivered_at_ns IS NULL",
            [],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(ledger.outbox_backlog().await.unwrap(), undelivered as u64);
}

#[tokio::test]
async fn sessions_come_in_pages_each_once_in_creation_order() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let mut ids = Vec::new();
    for i in 0..7 {
        let account = if i % 2 == 0 { "acme" } else { "globex" };
        let end = (i != 3).then_some(i * HOUR + HOUR);
        let uuid = format!("GPU-{i}");
        ids.push(
            run_session(
                &ledger,
                account,
                vec![device(&uuid, "A100", 7)],
                i * HOUR,
                HOUR / 2,
                end,
            )
            .await,
        );
    }
    let pages = |filter: SessionFilter| {
        let ledger = ledger.clone();
        async move {
            let mut all = Vec::new();
            let mut filter = filter;
            let mut count = 0;
            loop {
                let page = ledger.list(filter.clone()).await.unwrap();
                count += 1;
                all.extend(page.sessions.into_iter().map(|s| s.id));
                match page.next {
                    Some(next) => filter.after = Some(next),
                    None => return (all, count),
                }
            }
        }
    };
    let (all, count) = pages(SessionFilter {
        include_ended: true,
        limit: 3,
        ..SessionFilter::default()
    })
    .await;
    assert_eq!(all, ids);
    assert_eq!(count, 3);
    let (acme, _) = pages(SessionFilter {
        account_id: Some("acme".into()),
        include_ended: true,
        limit: 2,
        ..SessionFilter::default()
    })
    .await;
    assert_eq!(
        acme,
        vec![
            ids[0].clone(),
            ids[2].clone(),
            ids[4].clone(),
            ids[6].clone()
        ]
    );
    let (open, _) = pages(SessionFilter {
        limit: 1,
        ..SessionFilter::default()
    })
    .await;
    assert_eq!(open, vec![ids[3].clone()]);
    let (window, _) = pages(SessionFilter {
        include_ended: true,
        created_from: Some(UnixNanos(2 * HOUR)),
        created_before: Some(UnixNanos(5 * HOUR)),
        limit: 2,
        ..SessionFilter::default()
    })
    .await;
    assert_eq!(window, ids[2..5].to_vec());
}

#[tokio::test]
async fn a_ledger_of_the_first_version_gets_its_sums_from_its_records() {
    let dir = tempfile::tempdir().unwrap();
    let ledger = Ledger::open(dir.path()).unwrap();
    let start = 20_000 * DAY;
    let kept = run_session(
        &ledger,
        "acme",
        vec![device("GPU-a", "A100", 7)],
        start,
        HOUR,
        Some(start + 5 * HOUR),
    )
    .await;
    let compacted = run_session(
        &ledger,
        "acme",
        vec![device("GPU-b", "A100", 7)],
        start,
        HOUR,
        Some(start + 3 * HOUR),
    )
    .await;
    let expected = by_key(
        &ledger
            .usage(vec!["acme".into()], UnixNanos(0), UnixNanos(start + DAY))
            .await
            .unwrap(),
    );
    let sums_of = |ledger: &Ledger, id: &SessionId| {
        let (ledger, id) = (ledger.clone(), id.clone());
        async move { ledger.get(&id).await.unwrap().unwrap().recorded }
    };
    let (kept_sums, compacted_sums) = (
        sums_of(&ledger, &kept).await,
        sums_of(&ledger, &compacted).await,
    );
    drop(ledger);

    // Back to version 0: no sums, and one session compacted the way it
    // compacted then (its records gone, its sums in session_totals).
    {
        let db = Connection::open(dir.path().join(FILE_NAME)).unwrap();
        db.execute_batch(&format!(
            "INSERT INTO session_totals SELECT session_id, SUM(device_ms), SUM(gpu_seconds), SUM(cost_nano)
                 FROM usage_records WHERE session_id = '{compacted}' GROUP BY session_id;
             DELETE FROM usage_records WHERE session_id = '{compacted}';
             DROP TABLE usage_daily; DROP TABLE usage_totals; DROP TABLE ledger_counters; DROP TABLE scheduled_stops;
             DROP INDEX sessions_created; DROP INDEX sessions_account_created; DROP INDEX sessions_billed_created;
             DROP INDEX credit_unreleased;
             ALTER TABLE sessions DROP COLUMN recorded_ms;
             ALTER TABLE sessions DROP COLUMN recorded_gpu_seconds;
             ALTER TABLE sessions DROP COLUMN recorded_cost_nano;
             ALTER TABLE sessions DROP COLUMN usage_seq;
             ALTER TABLE credit_control DROP COLUMN pending_until_ns;
             PRAGMA user_version = 0;"
        ))
        .unwrap();
    }
    let ledger = Ledger::open(dir.path()).unwrap();
    assert_eq!(sums_of(&ledger, &kept).await, kept_sums);
    assert_eq!(sums_of(&ledger, &compacted).await, compacted_sums);
    assert_eq!(
        by_key(
            &ledger
                .usage(vec!["acme".into()], UnixNanos(0), UnixNanos(start + DAY))
                .await
                .unwrap()
        ),
        expected
    );
    // Adjacent periods that split a day the compacted session metered add
    // up to their union: each record counts in exactly one of them.
    let half = |from: i64, to: i64| {
        let ledger = ledger.clone();
        async move {
            by_key(
                &ledger
                    .usage(vec!["acme".into()], UnixNanos(from), UnixNanos(to))
                    .await
                    .unwrap(),
            )
        }
    };
    let (first, second) = (
        half(0, start + 2 * HOUR).await,
        half(start + 2 * HOUR, start + DAY).await,
    );
    let mut union = first.clone();
    for (key, (ms, cost)) in second {
        let entry = union.entry(key).or_default();
        entry.0 += ms;
        entry.1 += cost;
    }
    assert_eq!(union, expected, "{first:?}");
    assert_eq!(ledger.outbox_backlog().await.unwrap(), 5);
    // The next record of a migrated session does not reuse an id.
    let db = Connection::open(ledger.path()).unwrap();
    let seq: i64 = db
        .query_row(
            "SELECT usage_seq FROM sessions WHERE id = ?1",
            params![kept.0],
            |row| row.get(0),
        )
        .unwrap();
    assert_eq!(seq, 5);
}
