//! A control plane written for the tests: a tonic server implementing
//! `ControlPlane` over mutual TLS with certificates made at test time. It
//! records every call, stores usage records deduplicated by id (as a real
//! one must), and has switches to deny, delay, drop and restart.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures_util::{Stream, StreamExt as _};
use gpuwarden::proto;
use gpuwarden::proto::control_plane_server::{ControlPlane, ControlPlaneServer};
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use rcgen::ExtendedKeyUsagePurpose;
use tokio::sync::{oneshot, watch};
use tokio_stream::wrappers::{TcpListenerStream, WatchStream};
use tonic::transport::{Certificate, Channel, Identity, Server, ServerTlsConfig};
use tonic::{Request, Response, Status};

use super::launch::{gpus, launch_as, sh};
use super::tls::{Ca, write};

/// What the control plane answers; tests flip these while it runs.
#[derive(Debug, Clone)]
pub struct Switches {
    /// Every call answers UNAVAILABLE (the control plane is down).
    pub down: bool,
    /// AuthorizeSession denies with this reason and message.
    pub deny: Option<(String, String)>,
    /// ExtendGrant denies with this reason.
    pub deny_extend: Option<String>,
    /// Service seconds per grant.
    pub grant_seconds: u32,
    /// Grants carry a final-unit indication: terminate with this end reason.
    pub final_grant: Option<proto::EndReason>,
    /// How long AuthorizeSession takes to answer.
    pub authorize_delay: Duration,
    /// ReportUsage stores the records and then never answers (as if the
    /// agent were killed between send and acknowledgement).
    pub hold_usage_acks: bool,
    /// ReportUsage acknowledges every id twice and adds an unknown one.
    pub duplicate_acks: bool,
    /// Whose balance pays for org sessions, when not the org itself.
    pub billed_account: Option<String>,
    /// The next N calls of a method answer UNAVAILABLE before doing
    /// anything; then it answers again.
    pub fail_next: BTreeMap<Call, u32>,
    /// The next N calls of a method never answer and do nothing (stuck
    /// before their commit): the agent's call deadline cuts them.
    pub hang_next: BTreeMap<Call, u32>,
}

/// The methods of the `ControlPlane` service.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Call {
    RegisterNode,
    ReportStatus,
    WatchPolicy,
    AuthorizeSession,
    ExtendGrant,
    ReleaseSession,
    ReportUsage,
}

impl Default for Switches {
    fn default() -> Self {
        Self {
            down: false,
            deny: None,
            deny_extend: None,
            grant_seconds: 300,
            final_grant: None,
            authorize_delay: Duration::ZERO,
            hold_usage_acks: false,
            duplicate_acks: false,
            billed_account: None,
            fail_next: BTreeMap::new(),
            hang_next: BTreeMap::new(),
        }
    }
}

/// Everything the agent told the control plane.
#[derive(Debug, Default, Clone)]
pub struct Record {
    pub registrations: Vec<proto::RegisterNodeRequest>,
    pub statuses: Vec<proto::NodeStatus>,
    pub authorizations: Vec<proto::AuthorizeSessionRequest>,
    pub extensions: Vec<proto::ExtendGrantRequest>,
    pub releases: Vec<proto::ReleaseSessionRequest>,
    /// Usage records by id: each stored once however often it arrives.
    pub usage: BTreeMap<String, proto::UsageRecord>,
    /// Every record received, duplicates included.
    pub usage_received: usize,
    /// Calls lost on purpose (`fail_next`, `hang_next`), by method.
    pub lost: BTreeMap<Call, u32>,
}

impl Record {
    /// The ExtendGrant calls for `session` that were taken, in order.
    pub fn extensions_of(&self, session: &str) -> Vec<&proto::ExtendGrantRequest> {
        self.extensions
            .iter()
            .filter(|r| r.session_id == session)
            .collect()
    }

    /// How many calls of `call` were lost on purpose.
    pub fn lost_calls(&self, call: Call) -> u32 {
        self.lost.get(&call).copied().unwrap_or_default()
    }

    /// How many ReleaseSession calls for `session` were taken.
    pub fn releases_of(&self, session: &str) -> usize {
        self.releases
            .iter()
            .filter(|r| r.session_id == session)
            .count()
    }
}

#[derive(Debug)]
struct Shared {
    switches: Mutex<Switches>,
    record: Mutex<Record>,
    policy: watch::Sender<proto::PolicyUpdate>,
    /// Bumped by `stop`: ends the policy streams, so the server's
    /// graceful shutdown completes and its port is free again.
    cut: watch::Sender<u64>,
}

#[derive(Debug, Clone)]
struct Service(Arc<Shared>);

/// The running control plane and the files an agent needs to reach it.
pub struct TestPlane {
    shared: Arc<Shared>,
    pub addr: SocketAddr,
    tls: ServerTlsConfig,
    stop: Option<oneshot::Sender<()>>,
    /// `[control_plane]` for the agent's config.
    pub agent_config: String,
    _dir: tempfile::TempDir,
}

impl TestPlane {
    /// Starts on a free port with `policy` as version 1;
    /// `offline_grace_seconds` goes into the agent's config.
    pub async fn start(policy: proto::Policy, offline_grace_seconds: u64) -> Self {
        Self::start_with(Some(policy), offline_grace_seconds).await
    }

    /// Starts with no policy yet, answering `WatchPolicy` as stock grpcio
    /// servers do: the response headers come only with the first policy
    /// (see `publish`).
    pub async fn start_without_policy(offline_grace_seconds: u64) -> Self {
        Self::start_with(None, offline_grace_seconds).await
    }

    async fn start_with(policy: Option<proto::Policy>, offline_grace_seconds: u64) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let ca = Ca::new("test control plane CA");
        let (server_cert, server_key) = ca.issue("localhost", ExtendedKeyUsagePurpose::ServerAuth);
        let (agent_cert, agent_key) = ca.issue("agent", ExtendedKeyUsagePurpose::ClientAuth);
        let tls = ServerTlsConfig::new()
            .identity(Identity::from_pem(server_cert, server_key))
            .client_ca_root(Certificate::from_pem(ca.cert.pem()));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let agent_config = format!(
            "[control_plane]\nendpoint = \"https://localhost:{}\"\ntls_cert = \"{}\"\ntls_key = \"{}\"\nca = \"{}\"\noffline_grace_seconds = {offline_grace_seconds}\n",
            addr.port(),
            write(dir.path(), "agent.pem", &agent_cert),
            write(dir.path(), "agent.key", &agent_key),
            write(dir.path(), "ca.pem", &ca.cert.pem()),
        );
        let (policy, _) = watch::channel(proto::PolicyUpdate {
            version: u64::from(policy.is_some()),
            policy,
        });
        let mut plane = Self {
            shared: Arc::new(Shared {
                switches: Mutex::new(Switches::default()),
                record: Mutex::new(Record::default()),
                policy,
                cut: watch::channel(0).0,
            }),
            addr,
            tls,
            stop: None,
            agent_config,
            _dir: dir,
        };
        plane.serve(listener);
        plane
    }

    fn serve(&mut self, listener: tokio::net::TcpListener) {
        let (stop, stopped) = oneshot::channel::<()>();
        let server = Server::builder()
            .tls_config(self.tls.clone())
            .unwrap()
            .add_service(ControlPlaneServer::new(Service(Arc::clone(&self.shared))))
            .serve_with_incoming_shutdown(TcpListenerStream::new(listener), async {
                let _ = stopped.await;
            });
        tokio::spawn(server);
        self.stop = Some(stop);
    }

    /// Stops serving: connections and streams are cut.
    pub fn stop(&mut self) {
        self.shared.cut.send_modify(|generation| *generation += 1);
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }

    /// Serves again on the same address, with the state it had.
    pub async fn restart(&mut self) {
        self.stop();
        let deadline = Instant::now() + Duration::from_secs(10);
        let listener = loop {
            match tokio::net::TcpListener::bind(self.addr).await {
                Ok(listener) => break listener,
                Err(_) if Instant::now() < deadline => {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                Err(error) => panic!("cannot serve again on {}: {error}", self.addr),
            }
        };
        self.serve(listener);
    }

    pub fn switch(&self, change: impl FnOnce(&mut Switches)) {
        change(&mut self.shared.switches.lock().unwrap());
    }

    pub fn record(&self) -> Record {
        self.shared.record.lock().unwrap().clone()
    }

    /// Publishes a new policy version.
    pub fn publish(&self, version: u64, policy: proto::Policy) {
        self.shared.policy.send_replace(proto::PolicyUpdate {
            version,
            policy: Some(policy),
        });
    }

    /// Polls the record until `done` holds (bounded).
    pub async fn wait_for(&self, what: &str, done: impl Fn(&Record) -> bool) -> Record {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let record = self.record();
            if done(&record) {
                return record;
            }
            assert!(
                Instant::now() < deadline,
                "the control plane never saw {what}: {record:#?}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for TestPlane {
    fn drop(&mut self) {
        self.stop();
    }
}

impl Service {
    /// The switches for a call of `call`, or the failure they ask for.
    async fn enter(&self, call: Call) -> Result<Switches, Status> {
        let (switches, fail, hang) = {
            let mut switches = self.0.switches.lock().unwrap();
            if switches.down {
                return Err(Status::unavailable("the test control plane is down"));
            }
            let take = |counts: &mut BTreeMap<Call, u32>| match counts.get_mut(&call) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    true
                }
                _ => false,
            };
            let fail = take(&mut switches.fail_next);
            let hang = take(&mut switches.hang_next);
            (switches.clone(), fail, hang)
        };
        if fail || hang {
            self.record(|r| *r.lost.entry(call).or_default() += 1);
        }
        if fail {
            return Err(Status::unavailable(format!(
                "the test control plane lost this {call:?}"
            )));
        }
        if hang {
            std::future::pending::<()>().await;
        }
        Ok(switches)
    }

    fn record(&self, change: impl FnOnce(&mut Record)) {
        change(&mut self.0.record.lock().unwrap());
    }

    fn answer(
        &self,
        session_id: String,
        org_id: &str,
        switches: &Switches,
    ) -> proto::CreditControlAnswer {
        let billed = switches
            .billed_account
            .clone()
            .unwrap_or_else(|| org_id.to_owned());
        proto::CreditControlAnswer {
            session_id,
            result: proto::CreditControlResult::Success.into(),
            billed_account_id: billed,
            billing_path: proto::BillingPath::Balance.into(),
            grant: Some(proto::CreditGrant {
                granted_service_seconds: switches.grant_seconds,
                valid_until: None,
                final_unit_indication: switches.final_grant.is_some(),
                final_unit_action: proto::FinalUnitAction::Terminate.into(),
                final_end_reason: switches.final_grant.map(i32::from).unwrap_or_default(),
            }),
            ..Default::default()
        }
    }
}

type PolicyStream =
    std::pin::Pin<Box<dyn Stream<Item = Result<proto::PolicyUpdate, Status>> + Send>>;

#[tonic::async_trait]
impl ControlPlane for Service {
    async fn register_node(
        &self,
        request: Request<proto::RegisterNodeRequest>,
    ) -> Result<Response<proto::RegisterNodeResponse>, Status> {
        self.enter(Call::RegisterNode).await?;
        let request = request.into_inner();
        self.record(|r| r.registrations.push(request));
        Ok(Response::new(proto::RegisterNodeResponse {
            status_interval_seconds: 1,
        }))
    }

    async fn report_status(
        &self,
        request: Request<proto::NodeStatus>,
    ) -> Result<Response<proto::ReportStatusResponse>, Status> {
        self.enter(Call::ReportStatus).await?;
        let status = request.into_inner();
        self.record(|r| r.statuses.push(status));
        Ok(Response::new(proto::ReportStatusResponse {}))
    }

    async fn watch_policy(
        &self,
        _request: Request<proto::WatchPolicyRequest>,
    ) -> Result<Response<PolicyStream>, Status> {
        self.enter(Call::WatchPolicy).await?;
        let mut cut = self.0.cut.subscribe();
        let mut policy = self.0.policy.subscribe();
        // No response (and so no headers) before there is a policy.
        tokio::select! {
            _ = policy.wait_for(|update| update.version > 0) => {}
            _ = cut.changed() => return Err(Status::unavailable("the test control plane stops")),
        }
        let updates = WatchStream::new(policy)
            .filter(|update| std::future::ready(update.version > 0))
            .map(Ok)
            .take_until(async move {
                let _ = cut.changed().await;
            });
        Ok(Response::new(Box::pin(updates)))
    }

    async fn authorize_session(
        &self,
        request: Request<proto::AuthorizeSessionRequest>,
    ) -> Result<Response<proto::CreditControlAnswer>, Status> {
        let switches = self.enter(Call::AuthorizeSession).await?;
        tokio::time::sleep(switches.authorize_delay).await;
        let request = request.into_inner();
        self.record(|r| r.authorizations.push(request.clone()));
        if let Some((reason, message)) = &switches.deny {
            return Ok(Response::new(proto::CreditControlAnswer {
                session_id: request.session_id,
                result: proto::CreditControlResult::Denied.into(),
                deny_reason: reason.clone(),
                deny_message: message.clone(),
                ..Default::default()
            }));
        }
        let account = if request.org_id.is_empty() {
            request
                .principal
                .as_ref()
                .map(|p| p.subject.clone())
                .unwrap_or_default()
        } else {
            request.org_id.clone()
        };
        Ok(Response::new(self.answer(
            request.session_id,
            &account,
            &switches,
        )))
    }

    async fn extend_grant(
        &self,
        request: Request<proto::ExtendGrantRequest>,
    ) -> Result<Response<proto::CreditControlAnswer>, Status> {
        let switches = self.enter(Call::ExtendGrant).await?;
        let request = request.into_inner();
        self.record(|r| r.extensions.push(request.clone()));
        if let Some(reason) = &switches.deny_extend {
            return Ok(Response::new(proto::CreditControlAnswer {
                session_id: request.session_id,
                result: proto::CreditControlResult::Denied.into(),
                deny_reason: reason.clone(),
                deny_message: "no more credit".into(),
                ..Default::default()
            }));
        }
        Ok(Response::new(self.answer(
            request.session_id,
            "",
            &switches,
        )))
    }

    async fn release_session(
        &self,
        request: Request<proto::ReleaseSessionRequest>,
    ) -> Result<Response<proto::ReleaseSessionResponse>, Status> {
        self.enter(Call::ReleaseSession).await?;
        let request = request.into_inner();
        self.record(|r| r.releases.push(request));
        Ok(Response::new(proto::ReleaseSessionResponse {}))
    }

    async fn report_usage(
        &self,
        request: Request<proto::UsageBatch>,
    ) -> Result<Response<proto::UsageAck>, Status> {
        let switches = self.enter(Call::ReportUsage).await?;
        let batch = request.into_inner();
        let mut ids: Vec<String> = batch.records.iter().map(|r| r.id.clone()).collect();
        self.record(|r| {
            r.usage_received += batch.records.len();
            for record in batch.records {
                r.usage.entry(record.id.clone()).or_insert(record);
            }
        });
        if switches.hold_usage_acks {
            // Stored, never acknowledged: the agent must send them again.
            std::future::pending::<()>().await;
        }
        if switches.duplicate_acks {
            ids.extend(ids.clone());
            ids.push("no-such-record".into());
        }
        Ok(Response::new(proto::UsageAck {
            acknowledged_ids: ids,
        }))
    }
}

/// u-alice's launch of one GPU, in org `org`'s scope where one is given.
pub fn launch(request_id: &str, org: Option<&str>) -> proto::LaunchRequest {
    // Exits promptly on SIGTERM, as well-behaved workloads do.
    let command = sh("trap 'exit 0' TERM; sleep 300 & wait");
    launch_as(request_id, "u-alice", org, gpus(1), &command)
}

pub async fn link(client: &mut NodeAgentClient<Channel>) -> proto::ControlPlaneLink {
    client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .control_plane
        .expect("control-plane mode shows its link")
}

/// Waits until the link is up with a policy in force.
pub async fn wait_linked(client: &mut NodeAgentClient<Channel>) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let link = link(client).await;
        if link.up && link.policy_version > 0 {
            return;
        }
        assert!(Instant::now() < deadline, "never linked: {link:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

pub fn ended(reason: proto::EndReason) -> impl Fn(&proto::Session) -> bool {
    move |s| s.state == proto::SessionState::Ended as i32 && s.end_reason == reason as i32
}

/// Device milliseconds the control plane stored for `session`.
pub fn delivered_ms(record: &Record, session: &str) -> i64 {
    record
        .usage
        .values()
        .filter(|r| r.session_id == session)
        .map(|r| r.device_milliseconds)
        .sum()
}

/// A policy for tests: users alice and bob, org acme (enterprise) with both.
pub fn test_policy() -> proto::Policy {
    let credits = |c: i64| {
        Some(proto::Credits {
            nano_credits: c * 1_000_000_000,
        })
    };
    proto::Policy {
        default_rate: Some(proto::Credits {
            nano_credits: 1_000_000,
        }),
        enforcement: Some(proto::Enforcement {
            min_balance_seconds: 60,
            on_balance_exhausted: proto::OnBalanceExhausted::Stop.into(),
            grace_seconds: 1,
        }),
        users: ["u-alice", "u-bob"]
            .into_iter()
            .map(|id| proto::User {
                id: id.into(),
                email: format!("{id}@example.com"),
                plan: "pro".into(),
                balance: credits(1000),
                max_sessions: Some(100),
            })
            .collect(),
        orgs: vec![proto::Org {
            id: "acme".into(),
            name: "Acme".into(),
            plan: "enterprise".into(),
            balance: credits(1000),
            members: vec![
                proto::Membership {
                    user: "u-alice".into(),
                    role: proto::OrgRole::Owner.into(),
                },
                proto::Membership {
                    user: "u-bob".into(),
                    role: proto::OrgRole::Member.into(),
                },
            ],
            ..Default::default()
        }],
        ..Default::default()
    }
}
