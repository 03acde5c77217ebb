//! The crash loop of RELIABILITY.md: the agent is killed with SIGKILL at
//! pseudo-random moments (a fixed, printed seed) while launches, stops,
//! balance adjustments and one-second checkpoints are under way, and
//! restarted, cycle after cycle; sessions of different lengths run across
//! the crashes (some exit by themselves, others are stopped). Afterwards
//! every session is ended and the ledger is checked against Docker's own
//! times (`tests/invariants`): device-seconds within 10 ms of
//! StartedAt..FinishedAt, records tiling each run without gap or overlap,
//! no device in two sessions, balances equal to their debits.
//!
//! `CRASH_CYCLES` (default 50) and `CRASH_SEED` change the run:
//! `CRASH_CYCLES=500 cargo test --test crash_loop -- --nocapture`.

#![allow(clippy::unwrap_used)]

mod common;
mod invariants;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::launch::{TRAPPED, stop_request, user};
use common::operator::open_sessions;
use common::{Daemon, test_image};
use gpuwarden::api::status::reason_of;
use gpuwarden::proto;
use tokio::task::JoinSet;

const DEFAULT_CYCLES: u64 = 50;
const DEFAULT_SEED: u64 = 0x6770_7577_6172_6465;

/// splitmix64: the same seed gives the same plan of actions and kill
/// moments on every machine.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self, p: u64) -> bool {
        self.below(100) < p
    }

    fn pick<'a, T>(&mut self, items: &'a [T]) -> &'a T {
        &items[self.below(items.len() as u64) as usize]
    }
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(text) => {
            let text = text.trim();
            let parsed = match text.strip_prefix("0x") {
                Some(hex) => u64::from_str_radix(hex, 16),
                None => text.parse(),
            };
            parsed.unwrap_or_else(|_| panic!("{name}={text} is not a number"))
        }
        Err(_) => default,
    }
}

/// A launch request with a random account, device selector and length.
fn random_launch(rng: &mut Rng, request_id: String) -> proto::LaunchRequest {
    let devices = match rng.below(10) {
        0..=4 => proto::DeviceSelector {
            gpu_count: 1,
            ..Default::default()
        },
        5 | 6 => proto::DeviceSelector {
            gpu_count: 2,
            ..Default::default()
        },
        7 | 8 => proto::DeviceSelector {
            mig_profile: "1g.10gb".into(),
            mig_count: 1 + rng.below(2) as u32,
            ..Default::default()
        },
        _ => proto::DeviceSelector {
            mig_profile: "3g.40gb".into(),
            mig_count: 1,
            ..Default::default()
        },
    };
    let (principal, scope, org) = match rng.below(5) {
        0 | 1 => (user("u-alice"), proto::Scope::Personal, ""),
        2 => (user("u-bob"), proto::Scope::Personal, ""),
        3 => (user("u-bob"), proto::Scope::Org, "acme"),
        _ => (
            Some(proto::Principal {
                subject: "sa-acme-ci".into(),
                kind: proto::PrincipalKind::ServiceAccount.into(),
            }),
            proto::Scope::Org,
            "acme",
        ),
    };
    // Lengths: exits at once, exits after a few seconds, runs until stopped
    // (trapping SIGTERM, or not: then SIGKILL after the grace).
    let command: Vec<String> = match rng.below(10) {
        0 | 1 => vec!["true".into()],
        2..=5 => vec![
            "sh".into(),
            "-c".into(),
            format!("sleep {}", rng.pick(&[1, 2, 3, 5])),
        ],
        6..=8 => vec!["sh".into(), "-c".into(), TRAPPED.into()],
        _ => vec!["sleep".into(), "600".into()],
    };
    proto::LaunchRequest {
        request_id,
        principal,
        scope: scope.into(),
        org_id: org.into(),
        devices: Some(devices),
        container: Some(proto::ContainerSpec {
            image: test_image(),
            command,
            ..Default::default()
        }),
    }
}

/// What was under way when a kill landed.
#[derive(Debug, Default)]
struct Tally {
    launches: usize,
    launched: usize,
    refused: Vec<String>,
    /// Launches the kill cut off before they were answered.
    interrupted: usize,
    stops: usize,
    adjustments: usize,
    retries: usize,
    /// Kills that landed while a launch / a stop was in flight.
    killed_in_launch: usize,
    killed_in_stop: usize,
    killed_in_start: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn kill_9_at_random_moments_neither_loses_nor_double_bills_a_second() {
    let cycles = env_u64("CRASH_CYCLES", DEFAULT_CYCLES);
    let seed = env_u64("CRASH_SEED", DEFAULT_SEED);
    eprintln!("crash loop: {cycles} cycles, seed {seed:#x} (CRASH_CYCLES, CRASH_SEED)");
    let began = Instant::now();
    let mut rng = Rng(seed);
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "[metering]\ncheckpoint_seconds = 1\n");
    let ledger = daemon.dir.path().join("state/ledger.db");
    let mut tally = Tally::default();
    let mut past_requests: Vec<proto::LaunchRequest> = Vec::new();
    let mut next_request = 0;

    for cycle in 0..cycles {
        // Now and then the kill lands while the agent is still starting
        // (reconciling with Docker before it serves).
        if cycle > 0 && rng.percent(10) {
            daemon.restart();
            tokio::time::sleep(Duration::from_millis(rng.below(400))).await;
            daemon.kill9().await;
            tally.killed_in_start += 1;
            let shared = invariants::shared_devices(&ledger);
            assert!(shared.is_empty(), "cycle {cycle} (in start): {shared:?}");
        }
        if cycle > 0 {
            daemon.restart();
        }
        let mut client = daemon.client().await;
        let open = open_sessions(&mut client).await;
        let stoppable: Vec<String> = open
            .iter()
            .filter(|s| s.state() == proto::SessionState::Running)
            .map(|s| s.id.clone())
            .collect();

        let in_launch = Arc::new(Mutex::new(0usize));
        let in_stop = Arc::new(Mutex::new(0usize));
        let outcomes: Arc<Mutex<Vec<Result<String, String>>>> = Arc::default();
        let mut tasks = JoinSet::new();
        let launches = 1 + rng.below(3);
        for _ in 0..launches {
            // A client retrying a launch the crash interrupted, or a new one.
            let request = if !past_requests.is_empty() && rng.percent(15) {
                tally.retries += 1;
                rng.pick(&past_requests).clone()
            } else {
                next_request += 1;
                let request = random_launch(&mut rng, format!("crash-{seed:x}-{next_request}"));
                past_requests.push(request.clone());
                request
            };
            let offset = Duration::from_millis(rng.below(900));
            let (mut client, outcomes, in_launch) =
                (client.clone(), outcomes.clone(), in_launch.clone());
            tally.launches += 1;
            tasks.spawn(async move {
                tokio::time::sleep(offset).await;
                *in_launch.lock().unwrap() += 1;
                let result = client.launch(request).await;
                *in_launch.lock().unwrap() -= 1;
                outcomes.lock().unwrap().push(match result {
                    Ok(session) => Ok(session.into_inner().id),
                    Err(status) => Err(reason_of(&status).unwrap_or_default()),
                });
            });
        }
        // Stops: more of them when many sessions run, so devices free up.
        let stops = if stoppable.len() > 8 {
            3
        } else {
            rng.below(3) as usize
        };
        for _ in 0..stops.min(stoppable.len()) {
            let id = rng.pick(&stoppable).clone();
            let offset = Duration::from_millis(rng.below(900));
            let (mut client, in_stop) = (client.clone(), in_stop.clone());
            tally.stops += 1;
            tasks.spawn(async move {
                tokio::time::sleep(offset).await;
                *in_stop.lock().unwrap() += 1;
                let _ = client.stop(stop_request(&id, None)).await;
                *in_stop.lock().unwrap() -= 1;
            });
        }
        if rng.percent(15) {
            let offset = Duration::from_millis(rng.below(900));
            let account = rng.pick(&["u-alice", "u-bob", "acme"]).to_string();
            let delta = rng.below(5_000_000_000) as i64 - 1_000_000_000;
            let mut client = client.clone();
            tally.adjustments += 1;
            tasks.spawn(async move {
                tokio::time::sleep(offset).await;
                let _ = client
                    .adjust_balance(proto::AdjustBalanceRequest {
                        account_id: account,
                        delta: Some(proto::Credits {
                            nano_credits: delta,
                        }),
                        reason: "crash loop".into(),
                    })
                    .await;
            });
        }

        let kill_at = Duration::from_millis(rng.below(1_500));
        tokio::time::sleep(kill_at).await;
        tally.killed_in_launch += usize::from(*in_launch.lock().unwrap() > 0);
        tally.killed_in_stop += usize::from(*in_stop.lock().unwrap() > 0);
        daemon.kill9().await;
        tasks.abort_all();
        while tasks.join_next().await.is_some() {}
        for outcome in outcomes.lock().unwrap().drain(..) {
            match outcome {
                Ok(_) => tally.launched += 1,
                Err(reason) if reason.is_empty() => tally.interrupted += 1,
                Err(reason) => tally.refused.push(reason),
            }
        }
        // Between the kill and the next start: no device in two open
        // sessions, no hold outside its session.
        let shared = invariants::shared_devices(&ledger);
        assert!(shared.is_empty(), "cycle {cycle}: {shared:?}");
    }

    // The end: one more start (reconcile), stop what runs, wait for the
    // rest to exit by themselves.
    daemon.restart();
    let mut client = daemon.client().await;
    let mut stops = JoinSet::new();
    for session in open_sessions(&mut client).await {
        let mut client = client.clone();
        stops.spawn(async move {
            client
                .stop(stop_request(&session.id, None))
                .await
                .map_err(|status| format!("{}: {status}", session.id))
        });
    }
    while let Some(stopped) = stops.join_next().await {
        stopped.unwrap().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let open = open_sessions(&mut client).await;
        if open.is_empty() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sessions never ended: {:?}",
            open.iter()
                .map(|s| (&s.id, s.state(), &s.container_id))
                .collect::<Vec<_>>()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait(Duration::from_secs(20)).await;

    let report = invariants::check(&ledger, &[&daemon.node_id]);
    let mut refused: Vec<String> = tally.refused.clone();
    refused.sort();
    refused.dedup();
    eprintln!(
        "crash loop: {cycles} cycles (seed {seed:#x}) in {:.1} s: {} kills during a launch, {} during a stop, \
         {} during start-up; {} launches ({} answered, {} cut off by the kill, {} retried request ids), \
         {} stops, {} adjustments; refusals: {refused:?}",
        began.elapsed().as_secs_f64(),
        tally.killed_in_launch,
        tally.killed_in_stop,
        tally.killed_in_start,
        tally.launches,
        tally.launched,
        tally.interrupted,
        tally.retries,
        tally.stops,
        tally.adjustments,
    );
    eprintln!("crash loop ledger: {report}");
    assert!(
        report.ran >= (cycles as usize) / 2,
        "too few sessions ran to prove anything: {report}"
    );
}

/// The check above is only as good as what it catches: a real session's
/// ledger passes, and copies of it with a gap, an overlap (a second
/// billed twice), a missing record, 20 ms too much, a balance off by one
/// nano-credit or a record for a session that never started each fail.
#[tokio::test]
async fn the_accounting_check_catches_gaps_overlaps_drift_and_wrong_balances() {
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "[metering]\ncheckpoint_seconds = 1\n");
    let mut client = daemon.client().await;
    let mut request = random_launch(&mut Rng(1), "checked".into());
    request.container.as_mut().unwrap().command = vec!["sh".into(), "-c".into(), "sleep 3".into()];
    let session = client.launch(request).await.unwrap().into_inner();
    common::wait_for_session(&mut client, &session.id, |s| {
        s.state() == proto::SessionState::Ended
    })
    .await;
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait(Duration::from_secs(20)).await;
    let ledger = daemon.dir.path().join("state/ledger.db");
    let nodes = [daemon.node_id.as_str()];
    let report = invariants::check(&ledger, &nodes);
    assert_eq!(report.ran, 1);
    assert!(report.records >= 3, "{report}");

    let tampered = [
        (
            "UPDATE usage_records SET period_end_ns = period_end_ns - 2000000, device_ms = device_ms - 2 WHERE seq = 1",
            "a gap (unbilled)",
        ),
        (
            "INSERT INTO usage_records SELECT session_id || '/9/' || device_uuid, session_id, 9, device_uuid, device_class,
                 period_start_ns, period_end_ns, device_ms, gpu_seconds, cost_nano, 0, NULL FROM usage_records WHERE seq = 1",
            "an overlap (billed twice)",
        ),
        ("DELETE FROM usage_records WHERE seq = 2", "a gap (unbilled)"),
        (
            "UPDATE sessions SET ended_at_ns = ended_at_ns + 20000000, metered_until_ns = metered_until_ns + 20000000;
             UPDATE usage_records SET period_end_ns = period_end_ns + 20000000, device_ms = device_ms + 20 WHERE final = 1",
            "ms billed, Docker ran it",
        ),
        (
            "UPDATE account_balances SET delta_nano = delta_nano - 1",
            "its debits and adjustments say",
        ),
        (
            "UPDATE sessions SET started_at_ns = NULL",
            "never started but has",
        ),
    ];
    for (i, (sql, caught)) in tampered.iter().enumerate() {
        let copy = daemon.dir.path().join(format!("tampered-{i}.db"));
        invariants::open(&ledger)
            .execute("VACUUM INTO ?1", [copy.to_str().unwrap()])
            .unwrap();
        rusqlite::Connection::open(&copy)
            .unwrap()
            .execute_batch(sql)
            .unwrap();
        let (_, problems) = invariants::audit(&copy, &nodes);
        assert!(
            problems.iter().any(|p| p.contains(caught)),
            "{sql}: expected a problem with {caught:?}, got {problems:#?}"
        );
    }
}

/// A crash between a stop's record in the ledger (STOPPING) and its call to
/// Docker must not leave the session STOPPING for ever, its container
/// running and billed: the restarted agent carries the stop out, with the
/// stop's reason, and bills it to Docker's FinishedAt.
#[tokio::test]
async fn a_stop_cut_short_by_a_crash_is_carried_out_after_the_restart() {
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    let mut client = daemon.client().await;
    let mut request = random_launch(&mut Rng(2), "cut-short".into());
    request.container.as_mut().unwrap().command = vec!["sh".into(), "-c".into(), TRAPPED.into()];
    let session = client.launch(request).await.unwrap().into_inner();
    daemon.kill9().await;
    // Where the crash hit: the stop is recorded, Docker never heard of it.
    rusqlite::Connection::open(daemon.dir.path().join("state/ledger.db"))
        .unwrap()
        .execute(
            "UPDATE sessions SET state = 'stopping', end_reason = 'BALANCE_EXHAUSTED' WHERE id = ?1",
            [&session.id],
        )
        .unwrap();
    daemon.restart();
    let mut client = daemon.client().await;
    let ended = common::wait_for_session(&mut client, &session.id, |s| {
        s.state() == proto::SessionState::Ended
    })
    .await;
    assert_eq!(ended.end_reason(), proto::EndReason::BalanceExhausted);
    assert_eq!(
        common::docker(&["inspect", "-f", "{{.State.Running}}", &session.container_id]),
        "false"
    );
    daemon.signal(nix::sys::signal::Signal::SIGTERM);
    daemon.wait(Duration::from_secs(20)).await;
    invariants::check(
        &daemon.dir.path().join("state/ledger.db"),
        &[&daemon.node_id],
    );
}
