//! The ledger at scale: a busy DGX-class host (the simulated DGX A100's 17
//! devices, each always running one 30-minute session, usage cut every
//! 60 s: about 25,000 usage records a day) after 1, 30 and 365 days,
//! built through the agent's own ledger operations (one simulated hour per
//! transaction). On each, the real daemon serves while this prints min and
//! median of: a metrics scrape, GetUsage of one org over a day, a month and
//! all history, the first page of ListSessions with ended sessions,
//! ListAudit by account (with rows, and with none), Launch→RUNNING alone
//! and during scrapes; then idle CPU with a scrape every 15 s, RSS and
//! peak RSS, and the ledger's size.
//!
//! Targets at 365 days: scrape under 20 ms, every listed read under 50 ms,
//! launch during a scrape within 10% of launch alone, idle CPU under 0.5%
//! of a core, peak RSS under 40 MiB.
//!
//!     cargo bench --bench ledger_scale                 # 1 and 30 days
//!     DAYS=1,30,365 cargo bench --bench ledger_scale   # a year: ~9 M records
//!     RETENTION_DAYS=7 cargo bench --bench ledger_scale  # with ledger.usage_retention_days
//!     WINDOW_SECONDS=60 (idle CPU window), ROUNDS=7

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::path::Path;
use std::time::{Duration, Instant, SystemTime};

use common::launch::{SLEEP, gpus, launch_request};
use common::operator::stop;
use common::tls::free_port;
use common::{Daemon, TICKS_PER_SECOND, cpu_ticks, ms, peak_rss_kib, rss_kib, scrape};
use gpuwarden::clock::UnixNanos;
use gpuwarden::gpu::AssignableDevice;
use gpuwarden::gpu::simulated::load_fixture;
use gpuwarden::ledger::{Admitted, Ledger, NewSession};
use gpuwarden::metering::{Credits, Rate};
use gpuwarden::proto;
use gpuwarden::session::{BillingPath, EndReason, Principal, PrincipalKind, Scope, SessionId};

const MINUTE: i64 = 60_000_000_000;
const SESSION_MINUTES: i64 = 30;
const ACCOUNTS: [(&str, Scope); 3] = [
    ("acme", Scope::Org),
    ("u-alice", Scope::Personal),
    ("u-bob", Scope::Personal),
];

fn env_or(name: &str, default: &str) -> String {
    std::env::var(name).unwrap_or_else(|_| default.to_owned())
}

/// Builds `days` of history ending `end` into `dir`'s ledger, folding raw
/// records older than `retention_days` at the end of each simulated day
/// when given (as the agent does hourly); returns how many sessions it
/// holds.
async fn build(
    dir: &Path,
    days: i64,
    end: UnixNanos,
    devices: &[AssignableDevice],
    retention_days: Option<i64>,
) -> usize {
    let ledger = Ledger::open(dir).unwrap();
    let start = end.0 - days * 24 * 60 * MINUTE;
    let hours = days * 24;
    let mut sessions = 0;
    for hour in 0..hours {
        let devices = devices.to_vec();
        let hour_start = start + hour * 60 * MINUTE;
        let first_index = sessions;
        sessions += ledger
            .batch(move |batch| {
                let mut index = first_index;
                for half in 0..60 / SESSION_MINUTES {
                    let begin = hour_start + half * SESSION_MINUTES * MINUTE;
                    for device in &devices {
                        let (account, scope) = ACCOUNTS[index % ACCOUNTS.len()];
                        index += 1;
                        let id = SessionId::generate();
                        batch.begin(
                            &NewSession {
                                id: id.clone(),
                                request_id: format!("bench-{id}"),
                                node_id: "bench".into(),
                                scope,
                                account_id: account.into(),
                                billed_account_id: account.into(),
                                owner: Principal {
                                    subject: "u-alice".into(),
                                    kind: PrincipalKind::User,
                                },
                                image: "bench".into(),
                                created_at: UnixNanos(begin),
                            },
                            &Admitted {
                                devices: vec![(device.clone(), Rate(Credits(1_000_000)))],
                                billing_path: BillingPath::Balance,
                            },
                        )?;
                        batch.mark_running(&id, "bench", UnixNanos(begin))?;
                        for minute in 1..SESSION_MINUTES {
                            batch.checkpoint(&id, UnixNanos(begin + minute * MINUTE))?;
                        }
                        batch.close(
                            &id,
                            UnixNanos(begin + SESSION_MINUTES * MINUTE),
                            EndReason::Exited,
                        )?;
                    }
                }
                Ok(index - first_index)
            })
            .await
            .unwrap();
        if let Some(retention) = retention_days
            && (hour + 1) % 24 == 0
        {
            let day_end = hour_start + 60 * MINUTE;
            ledger
                .fold_usage(UnixNanos(day_end - retention * 24 * 60 * MINUTE), false)
                .await
                .unwrap();
        }
    }
    sessions
}

/// Min and median of `rounds` runs of `work`, in ms.
async fn timed<F, Fut>(rounds: usize, mut work: F) -> (f64, f64)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut times = Vec::with_capacity(rounds);
    for _ in 0..rounds {
        let began = Instant::now();
        work().await;
        times.push(began.elapsed());
    }
    times.sort();
    (ms(times[0]), ms(times[times.len() / 2]))
}

fn at(nanos: i64) -> Option<prost_types::Timestamp> {
    Some(UnixNanos(nanos).to_timestamp())
}

#[tokio::main]
async fn main() {
    let days: Vec<i64> = env_or("DAYS", "1,30")
        .split(',')
        .map(|d| d.trim().parse().unwrap())
        .collect();
    let rounds: usize = env_or("ROUNDS", "7").parse().unwrap();
    let retention_days: Option<i64> = std::env::var("RETENTION_DAYS")
        .ok()
        .map(|d| d.parse().unwrap());
    let window = Duration::from_secs(env_or("WINDOW_SECONDS", "60").parse().unwrap());
    let devices = load_fixture(&common::fixture("sim-dgx-a100.toml"))
        .unwrap()
        .assignable();
    println!(
        "ledger at scale: {} devices, one {SESSION_MINUTES}-minute session each at a time, usage cut every 60 s{}",
        devices.len(),
        retention_days.map_or(String::new(), |days| format!(
            ", raw records kept {days} day(s)"
        ))
    );
    for days in days {
        let built = tempfile::tempdir().unwrap();
        let now = UnixNanos::from_system_time(SystemTime::now());
        // History ends an hour ago; the daemon serves on top of it.
        let end = UnixNanos(now.0 - 60 * MINUTE);
        let began = Instant::now();
        let sessions = build(built.path(), days, end, &devices, retention_days).await;
        let build_time = began.elapsed();
        let bytes = std::fs::metadata(built.path().join("ledger.db"))
            .unwrap()
            .len();
        let port = free_port();
        let mut daemon = Daemon::start_with_state(
            "sim-dgx-a100.toml",
            &format!("[metrics]\nlisten = \"127.0.0.1:{port}\"\n"),
            |state| {
                for file in ["ledger.db", "ledger.db-wal", "ledger.db-shm"] {
                    let from = built.path().join(file);
                    if from.exists() {
                        std::fs::rename(from, state.join(file)).unwrap();
                    }
                }
            },
        );
        let mut client = daemon.client().await;
        let pid = daemon.pid();
        println!(
            "\n{days} day(s): {sessions} sessions, ~{} usage records, ledger {:.1} MiB ({:.1} MiB a day), built in {:.0} s",
            sessions as i64 * SESSION_MINUTES,
            bytes as f64 / 1048576.0,
            bytes as f64 / 1048576.0 / days as f64,
            build_time.as_secs_f64()
        );
        scrape(port);

        let (min, median) = timed(rounds, || async {
            scrape(port);
        })
        .await;
        println!("  GET /metrics                         {min:8.2} / {median:8.2} ms");
        for (what, from) in [
            ("a day", now.0 - 24 * 60 * MINUTE),
            ("a month", now.0 - 30 * 24 * 60 * MINUTE),
            ("all history", 0),
        ] {
            let (min, median) = timed(rounds, || {
                let mut client = client.clone();
                async move {
                    client
                        .get_usage(proto::GetUsageRequest {
                            principal: None,
                            account_id: "acme".into(),
                            from: at(from),
                            to: at(now.0),
                        })
                        .await
                        .unwrap();
                }
            })
            .await;
            println!("  GetUsage acme, {what:<12}             {min:8.2} / {median:8.2} ms");
        }
        let (min, median) = timed(rounds, || {
            let mut client = client.clone();
            async move {
                client
                    .list_sessions(proto::ListSessionsRequest {
                        include_ended: true,
                        ..Default::default()
                    })
                    .await
                    .unwrap();
            }
        })
        .await;
        println!("  ListSessions --all, first page       {min:8.2} / {median:8.2} ms");
        for account in ["acme", "u-bench"] {
            let (min, median) = timed(rounds, || {
                let mut client = client.clone();
                async move {
                    client
                        .list_audit(proto::ListAuditRequest {
                            account_id: account.into(),
                            since: None,
                            limit: 100,
                        })
                        .await
                        .unwrap();
                }
            })
            .await;
            println!("  ListAudit {account:<8}                   {min:8.2} / {median:8.2} ms");
        }

        // Launch→RUNNING alone, then while scrapes run back to back.
        let mut counter = 0;
        let mut launch = |client: &mut proto::node_agent_client::NodeAgentClient<_>| {
            counter += 1;
            let request = launch_request(&format!("scale-{days}-{counter}"), gpus(1), SLEEP);
            let mut client = client.clone();
            async move {
                let began = Instant::now();
                let session = client.launch(request).await.unwrap().into_inner();
                let took = began.elapsed();
                stop(&mut client, &session.id).await;
                took
            }
        };
        let mut alone = Vec::new();
        for _ in 0..rounds {
            alone.push(launch(&mut client).await);
        }
        let mut during = Vec::new();
        for _ in 0..rounds {
            // A scrape starts with the launch, as Prometheus' would.
            let scraper = std::thread::spawn(move || scrape(port));
            during.push(launch(&mut client).await);
            scraper.join().unwrap();
        }
        alone.sort();
        during.sort();
        let (alone_median, during_median) = (ms(alone[rounds / 2]), ms(during[rounds / 2]));
        println!(
            "  Launch→RUNNING alone                 {:8.2} / {alone_median:8.2} ms",
            ms(alone[0])
        );
        println!(
            "  Launch→RUNNING during a scrape       {:8.2} / {during_median:8.2} ms ({:.2}x)",
            ms(during[0]),
            during_median / alone_median
        );

        // Idle, scraped every 15 s.
        let ticks_before = cpu_ticks(pid);
        let started = Instant::now();
        while started.elapsed() < window {
            scrape(port);
            let left = window.saturating_sub(started.elapsed());
            tokio::time::sleep(left.min(Duration::from_secs(15))).await;
        }
        let cpu = (cpu_ticks(pid) - ticks_before) as f64 / TICKS_PER_SECOND;
        println!(
            "  idle CPU, a scrape every 15 s        {:.3}% of a core over {:.0} s",
            cpu / started.elapsed().as_secs_f64() * 100.0,
            started.elapsed().as_secs_f64()
        );
        println!(
            "  RSS now / peak                       {:.1} / {:.1} MiB",
            rss_kib(pid) as f64 / 1024.0,
            peak_rss_kib(pid) as f64 / 1024.0
        );
        drop(daemon);
    }
}
