use std::collections::BTreeMap;

use super::*;
use crate::events::Event;
use crate::gpu::AssignableDevice;
use crate::gpu::simulated::load_fixture;
use crate::runtime::fake::{FakeCall, FakeCallKind, FakeRuntime};
use crate::runtime::{ContainerEvent, ContainerEventKind, ContainerSpec, DeviceRequest, labels};
use crate::session::BillingPath;
use crate::session::request::LaunchPlan;
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
            usage_retention: None,
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
    let failed = s
        .manager
        .list(&OPERATOR, all_sessions())
        .await
        .unwrap()
        .sessions;
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
async fn a_container_that_exits_as_it_starts_is_announced_started_then_ended() {
    let s = setup(DeviceInjection::Env);
    let mut events = s.manager.events().subscribe();
    s.runtime.exit_next_on_start(1);
    let session = s
        .manager
        .launch(plan("r1", None), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    assert_eq!(session.state, SessionState::Ended);
    assert_eq!(session.end_reason, Some(EndReason::Exited));
    assert_eq!(session.ended_at, session.started_at);
    let announced: Vec<(bool, SessionState)> = drain_events(&mut events)
        .into_iter()
        .filter_map(|kind| match kind {
            EventKind::SessionStarted(s) => Some((true, s.state)),
            EventKind::SessionEnded(s) => Some((false, s.state)),
            _ => None,
        })
        .collect();
    assert_eq!(
        announced,
        [(true, SessionState::Running), (false, SessionState::Ended)]
    );
    assert!(s.manager.busy_devices().await.unwrap().is_empty());
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
    // Reserved for another org and busy too: the lasting reason.
    let refusal = s
        .manager
        .launch(
            exact("r4", "u-bob", Scope::Personal, ""),
            s.devices.clone(),
            Vec::new(),
        )
        .await
        .unwrap_err();
    assert_eq!(refusal.reason, Reason::DeviceReserved);
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
    ) -> futures_util::stream::BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
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
            usage_retention: None,
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
    assert!(
        s.manager
            .list(&bob, all_sessions())
            .await
            .unwrap()
            .sessions
            .is_empty()
    );
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

#[tokio::test]
async fn a_stop_of_a_session_already_stopping_keeps_the_first_reason() {
    let s = setup(DeviceInjection::Env);
    let session = s
        .manager
        .launch(plan("first-reason", None), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    // Its balance ran out: the agent's stop began (and was cut short).
    s.manager
        .ledger()
        .mark_stopping(&session.id, EndReason::BalanceExhausted)
        .await
        .unwrap();
    let alice = Caller {
        principal: Some(session.owner.clone()),
        operator: false,
    };
    s.runtime.advance(Duration::from_secs(2));
    let stopped = s
        .manager
        .stop(&alice, &session.id, Duration::ZERO)
        .await
        .unwrap();
    assert_eq!(stopped.state, SessionState::Ended);
    assert_eq!(stopped.end_reason, Some(EndReason::BalanceExhausted));
    assert_eq!(stopped.recorded.device_ms, 2_000);
}

#[tokio::test]
async fn a_restart_during_the_grace_keeps_the_stop_when_it_was_due() {
    let s = setup_with_policy(SMALL_BALANCE);
    let session = s
        .manager
        .launch(alice_gpu("grace"), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    // 0.5 credits at 0.01/s: out after 50 s; the stop is due 30 s later.
    s.runtime.advance(Duration::from_secs(51));
    s.manager.reconcile(false).await.unwrap();
    s.manager.enforce().await.unwrap();
    let due = UnixNanos(s.runtime.now().0 + 30_000_000_000);

    // The agent restarts 20 s into the grace.
    let Setup {
        _dir: dir,
        runtime,
        manager,
        devices: _,
    } = s;
    let policy = manager.policy();
    drop(manager);
    runtime.advance(Duration::from_secs(20));
    let manager = SessionManager::new(
        SessionSettings {
            node_id: "n1".into(),
            injection: DeviceInjection::Env,
            usage_retention: None,
        },
        Ledger::open(dir.path()).unwrap(),
        runtime.clone(),
        Arc::new(EngineClock(runtime.clone())),
        policy,
        Arc::new(EventBus::new()),
    );
    manager.reconcile(true).await.unwrap();
    manager.enforce().await.unwrap();
    assert_eq!(
        manager.get(&OPERATOR, &session.id).await.unwrap().state,
        SessionState::Running
    );
    // Due when it was going to be, not a fresh 30 s after the restart.
    runtime.advance(Duration::from_secs(10));
    assert_eq!(runtime.now(), due);
    manager.enforce().await.unwrap();
    let ended = manager.get(&OPERATOR, &session.id).await.unwrap();
    assert_eq!(ended.state, SessionState::Ended);
    assert_eq!(ended.end_reason, Some(EndReason::BalanceExhausted));
    assert_eq!(ended.ended_at, Some(due));
}

#[tokio::test]
async fn a_policy_reload_prices_new_sessions_and_leaves_running_ones_as_launched() {
    let s = setup_with_policy(SMALL_BALANCE);
    let before = s
        .manager
        .launch(alice_gpu("priced-before"), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    // The rate goes up a hundredfold.
    let dearer = SMALL_BALANCE
        .replace("default = 0.01", "default = 1.0")
        .replace("balance = 0.5", "balance = 1000.0");
    let reloaded = Policy::parse(Path::new("inline-policy.toml"), &dearer, None)
        .unwrap()
        .policy;
    s.manager.set_policy(Arc::new(reloaded));
    let after = s
        .manager
        .launch(alice_gpu("priced-after"), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    s.runtime.advance(Duration::from_secs(10));
    s.manager.reconcile(false).await.unwrap();
    let cost = |id: &SessionId| {
        let manager = &s.manager;
        let id = id.clone();
        async move { manager.get(&OPERATOR, &id).await.unwrap().recorded.cost }
    };
    // 10 s at the rate each session was launched with.
    assert_eq!(cost(&before.id).await, Credits::from_f64(0.1));
    assert_eq!(cost(&after.id).await, Credits::from_f64(10.0));
}

#[tokio::test]
async fn an_update_whose_answer_was_lost_is_sent_again_exactly_before_the_release() {
    let s = setup(DeviceInjection::Env);
    let (manager, plane) = linked(s.manager, s.runtime.now());
    let session = manager
        .launch(plan("lost-answer", None), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    // The update at 25 s is applied, its answer lost.
    plane.lose_extend_answers.store(1, Ordering::SeqCst);
    s.runtime.advance(Duration::from_secs(25));
    manager.credit_tick().await.unwrap();
    // The session is stopped before the retry would go out.
    s.runtime.advance(Duration::from_millis(500));
    let stopped = manager
        .stop(&OPERATOR, &session.id, Duration::ZERO)
        .await
        .unwrap();
    s.runtime.advance(Duration::from_secs(2));
    manager.credit_tick().await.unwrap();
    let extensions = plane.extensions.lock().unwrap().clone();
    assert_eq!(extensions.len(), 2, "{extensions:?}");
    assert_eq!(
        extensions[0], extensions[1],
        "the retry repeats the update exactly"
    );
    assert_eq!(extensions[0].cc_request_number, 1);
    let releases = plane.releases.lock().unwrap().clone();
    assert_eq!(releases.len(), 1);
    assert_eq!(releases[0].cc_request_number, 2);
    let reported = extensions[0].used.as_ref().unwrap().device_milliseconds
        + releases[0].used.as_ref().unwrap().device_milliseconds;
    assert_eq!(
        reported, stopped.recorded.device_ms,
        "every millisecond once"
    );
}

/// Yields until a launch has reached the engine's (held) start.
async fn until_start_is_held(runtime: &FakeRuntime) {
    while !runtime
        .calls()
        .iter()
        .any(|call| matches!(call, FakeCall::Start(_)))
    {
        tokio::task::yield_now().await;
    }
}

#[tokio::test]
async fn a_launch_slower_than_any_window_is_its_own_to_decide_even_across_a_clock_step() {
    let s = setup(DeviceInjection::Env);
    // The engine's start takes as long as the test wants; meanwhile the
    // clock jumps an hour and reconciles run.
    let release = s.runtime.hold_next_start();
    let launch = s
        .manager
        .launch(plan("slow", None), s.devices.clone(), Vec::new());
    let meanwhile = async {
        until_start_is_held(&s.runtime).await;
        s.runtime.advance(Duration::from_secs(3600));
        s.manager.reconcile(false).await.unwrap();
        s.manager.reconcile(false).await.unwrap();
        let open = s
            .manager
            .ledger()
            .list(SessionFilter::open())
            .await
            .unwrap()
            .sessions;
        assert_eq!(open.len(), 1, "the launch's session stays");
        assert_eq!(open[0].state, SessionState::Starting);
        release.send(()).unwrap();
    };
    let (launched, ()) = tokio::join!(launch, meanwhile);
    let session = launched.unwrap();
    assert_eq!(session.state, SessionState::Running);
    // Its device is its own, and its time is billed from Docker's start.
    let holds = s.manager.ledger().holds().await.unwrap();
    assert_eq!(holds.get(&session.devices[0].uuid), Some(&session.id));
    s.runtime.advance(Duration::from_secs(60));
    s.manager.reconcile(false).await.unwrap();
    let metered = s.manager.get(&OPERATOR, &session.id).await.unwrap();
    assert_eq!(metered.state, SessionState::Running);
    assert_eq!(metered.recorded.device_ms, 60_000);
}

#[tokio::test]
async fn a_launch_whose_session_was_ended_meanwhile_removes_its_container() {
    let s = setup(DeviceInjection::Env);
    let release = s.runtime.hold_next_start();
    let launch = s
        .manager
        .launch(plan("given-up", None), s.devices.clone(), Vec::new());
    let meanwhile = async {
        until_start_is_held(&s.runtime).await;
        // Something else ends the session while its container starts.
        let open = s
            .manager
            .ledger()
            .list(SessionFilter::open())
            .await
            .unwrap()
            .sessions;
        s.manager
            .ledger()
            .close(
                &open[0].id,
                None,
                EndReason::LaunchFailed,
                "given up".into(),
            )
            .await
            .unwrap();
        release.send(()).unwrap();
    };
    let (launched, ()) = tokio::join!(launch, meanwhile);
    let refusal = launched.unwrap_err();
    assert!(refusal.message.contains("given up"), "{refusal:?}");
    // No container of ours runs, none unmetered.
    assert!(
        s.runtime.containers().is_empty(),
        "{:?}",
        s.runtime.containers()
    );
}

/// A control plane that grants 30 s to every request and records the
/// updates and releases it is sent.
#[derive(Debug, Default)]
struct RecordingPlane {
    /// The next this many updates are applied (recorded) but their answer
    /// is lost.
    lose_extend_answers: std::sync::atomic::AtomicU32,
    extensions: Mutex<Vec<crate::proto::ExtendGrantRequest>>,
    releases: Mutex<Vec<crate::proto::ReleaseSessionRequest>>,
}

fn granted(session_id: String) -> crate::proto::CreditControlAnswer {
    crate::proto::CreditControlAnswer {
        session_id,
        result: crate::proto::CreditControlResult::Success.into(),
        grant: Some(crate::proto::CreditGrant {
            granted_service_seconds: 30,
            ..Default::default()
        }),
        ..Default::default()
    }
}

#[async_trait::async_trait]
impl crate::control_plane::ControlPlane for RecordingPlane {
    async fn register_node(
        &self,
        _: crate::proto::RegisterNodeRequest,
    ) -> Result<crate::proto::RegisterNodeResponse, crate::control_plane::LinkError> {
        Ok(Default::default())
    }
    async fn report_status(
        &self,
        _: crate::proto::NodeStatus,
    ) -> Result<(), crate::control_plane::LinkError> {
        Ok(())
    }
    async fn watch_policy(
        &self,
        _: crate::proto::WatchPolicyRequest,
    ) -> Result<crate::control_plane::PolicyStream, crate::control_plane::LinkError> {
        Ok(Box::pin(futures_util::stream::empty()))
    }
    async fn authorize_session(
        &self,
        request: crate::proto::AuthorizeSessionRequest,
    ) -> Result<crate::proto::CreditControlAnswer, crate::control_plane::LinkError> {
        Ok(granted(request.session_id))
    }
    async fn extend_grant(
        &self,
        request: crate::proto::ExtendGrantRequest,
    ) -> Result<crate::proto::CreditControlAnswer, crate::control_plane::LinkError> {
        let session_id = request.session_id.clone();
        self.extensions.lock().unwrap().push(request);
        let lose = self
            .lose_extend_answers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
            .is_ok();
        if lose {
            return Err(crate::control_plane::LinkError::Unreachable(
                "the answer was lost".into(),
            ));
        }
        Ok(granted(session_id))
    }
    async fn release_session(
        &self,
        request: crate::proto::ReleaseSessionRequest,
    ) -> Result<(), crate::control_plane::LinkError> {
        self.releases.lock().unwrap().push(request);
        Ok(())
    }
    async fn report_usage(
        &self,
        batch: crate::proto::UsageBatch,
    ) -> Result<crate::proto::UsageAck, crate::control_plane::LinkError> {
        Ok(crate::proto::UsageAck {
            acknowledged_ids: batch.records.into_iter().map(|r| r.id).collect(),
        })
    }
}

/// `manager` in control-plane mode, its link up with a policy, on a
/// [`RecordingPlane`].
fn linked(manager: SessionManager, now: UnixNanos) -> (SessionManager, Arc<RecordingPlane>) {
    let plane = Arc::new(RecordingPlane::default());
    let link = Arc::new(crate::control_plane::LinkState::down_from(now));
    link.answered("RegisterNode", now);
    link.set_policy_version(1);
    let manager = manager.with_credit_control(CreditControl {
        plane: plane.clone(),
        link,
        retries: Arc::default(),
        offline_grace: Duration::from_secs(300),
        node_id: "n1".into(),
    });
    (manager, plane)
}

#[tokio::test]
async fn credit_control_reports_only_time_the_engine_confirmed_and_agrees_with_the_records() {
    let s = setup(DeviceInjection::Env);
    let (manager, plane) = linked(s.manager, s.runtime.now());
    let exited = manager
        .launch(plan("cc-exited", None), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    let running = manager
        .launch(plan("cc-running", None), s.devices.clone(), Vec::new())
        .await
        .unwrap();
    // One container exits after 12 s; the engine's event never arrives.
    s.runtime.advance(Duration::from_secs(12));
    let container = ContainerId(exited.container_id.clone().unwrap());
    assert!(s.runtime.exit(&container, 0, s.runtime.now()));
    // 25 s in, 5 s before the grants end, updates are due.
    s.runtime.advance(Duration::from_secs(13));
    manager.credit_tick().await.unwrap();
    let used = |id: &SessionId| -> Vec<i64> {
        plane
            .extensions
            .lock()
            .unwrap()
            .iter()
            .filter(|x| x.session_id == id.0)
            .map(|x| x.used.as_ref().unwrap().device_milliseconds)
            .collect()
    };
    // Nothing the engine confirmed for the exited one (its last cut is its
    // start); the running one up to now, cut there too.
    assert_eq!(used(&exited.id), vec![0]);
    assert_eq!(used(&running.id), vec![25_000]);
    let cut = manager.get(&OPERATOR, &running.id).await.unwrap();
    assert_eq!(cut.recorded.device_ms, 25_000);

    // The reconcile ends the exited one at Docker's finish; its release
    // carries the rest: used units and records agree per session.
    manager.reconcile(false).await.unwrap();
    manager.credit_tick().await.unwrap();
    let ended = manager.get(&OPERATOR, &exited.id).await.unwrap();
    assert_eq!(ended.state, SessionState::Ended);
    assert_eq!(ended.recorded.device_ms, 12_000);
    let releases = plane.releases.lock().unwrap().clone();
    let release = releases
        .iter()
        .find(|r| r.session_id == exited.id.0)
        .unwrap();
    let released = release.used.as_ref().unwrap().device_milliseconds;
    assert_eq!(used(&exited.id).iter().sum::<i64>() + released, 12_000);
}

/// Every session, ended ones too, in one page.
fn all_sessions() -> SessionFilter {
    SessionFilter {
        include_ended: true,
        ..SessionFilter::default()
    }
}
