//! The tonic `NodeAgent` service. It only converts requests to domain calls
//! and results back; decisions live in the agent. RPCs whose behaviour has
//! not landed answer UNIMPLEMENTED through the generated default methods.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

use futures_util::Stream;
use tokio::sync::broadcast::error::RecvError;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::convert;
use crate::agent::Agent;
use crate::clock::UnixNanos;
use crate::error::{Reason, Refusal};
use crate::ledger::{Actor, AuditFilter, SessionFilter};
use crate::metering::Credits;
use crate::proto;
use crate::proto::node_agent_server::NodeAgent;
use crate::session::manager::DEFAULT_STOP_GRACE;
use crate::session::request::LaunchRequest;
use crate::session::{Caller, SessionId};

/// Sessions per ListSessions page when the request names no size...
const DEFAULT_PAGE_SIZE: u32 = 100;
/// ... and at most, whatever it names.
const MAX_PAGE_SIZE: u32 = 1000;

#[derive(Debug, Clone)]
pub struct NodeAgentService {
    agent: Arc<Agent>,
    /// Ends event streams when the agent stops, so the drain is not held
    /// up by watchers.
    shutdown: CancellationToken,
}

impl NodeAgentService {
    pub fn new(agent: Arc<Agent>, shutdown: CancellationToken) -> Self {
        Self { agent, shutdown }
    }

    fn session(&self, record: &crate::session::SessionRecord) -> proto::Session {
        convert::session(record, self.agent.sessions().now())
    }
}

/// Who calls: connections on the Unix socket are the local operator's (the
/// socket is root's and its group's only).
fn caller<T>(request: &Request<T>, principal: Option<proto::Principal>) -> Result<Caller, Status> {
    Ok(Caller {
        principal: convert::principal(principal)?,
        operator: request.extensions().get::<UdsConnectInfo>().is_some(),
    })
}

fn operator_only(caller: &Caller, what: &str) -> Result<(), Status> {
    if caller.operator {
        return Ok(());
    }
    Err(Refusal::new(
        Reason::RoleForbidden,
        format!("{what} is for the local operator: call it on the Unix socket"),
    )
    .into())
}

#[tonic::async_trait]
impl NodeAgent for NodeAgentService {
    async fn get_inventory(
        &self,
        _request: Request<proto::GetInventoryRequest>,
    ) -> Result<Response<proto::Inventory>, Status> {
        let view = self.agent.inventory().await?;
        Ok(Response::new((&view).into()))
    }

    async fn rescan_inventory(
        &self,
        request: Request<proto::RescanInventoryRequest>,
    ) -> Result<Response<proto::Inventory>, Status> {
        let caller = caller(&request, None)?;
        operator_only(&caller, "RescanInventory")?;
        self.agent.rescan().await.map_err(|error| {
            Status::from(Refusal::new(
                Reason::DeviceUnhealthy,
                format!(
                    "the rescan failed, the last inventory stays: {}",
                    crate::error::chain(&error)
                ),
            ))
        })?;
        let view = self.agent.inventory().await?;
        Ok(Response::new((&view).into()))
    }

    async fn reset_device_health(
        &self,
        request: Request<proto::ResetDeviceHealthRequest>,
    ) -> Result<Response<proto::Device>, Status> {
        let caller = caller(&request, None)?;
        operator_only(&caller, "ResetDeviceHealth")?;
        let uuid = crate::gpu::DeviceUuid::new(request.into_inner().device_uuid);
        self.agent.reset_health(&uuid)?;
        let view = self.agent.inventory().await?;
        let device = view
            .devices
            .iter()
            .find(|d| d.uuid == uuid)
            .map(proto::Device::from)
            .unwrap_or_default();
        Ok(Response::new(device))
    }

    async fn launch(
        &self,
        request: Request<proto::LaunchRequest>,
    ) -> Result<Response<proto::Session>, Status> {
        let caller = caller(&request, None)?;
        let launch = LaunchRequest::try_from(request.into_inner())?;
        let record = self.agent.launch(&caller, launch).await?;
        Ok(Response::new(self.session(&record)))
    }

    async fn stop(
        &self,
        request: Request<proto::StopRequest>,
    ) -> Result<Response<proto::Session>, Status> {
        let caller = caller(&request, request.get_ref().principal.clone())?;
        let stop = request.into_inner();
        let grace = match stop.timeout_seconds {
            0 => DEFAULT_STOP_GRACE,
            seconds => Duration::from_secs(u64::from(seconds).min(3600)),
        };
        let record = self
            .agent
            .sessions()
            .stop(&caller, &SessionId(stop.session_id), grace)
            .await?;
        Ok(Response::new(self.session(&record)))
    }

    async fn get_session(
        &self,
        request: Request<proto::GetSessionRequest>,
    ) -> Result<Response<proto::Session>, Status> {
        let caller = caller(&request, request.get_ref().principal.clone())?;
        let id = SessionId(request.into_inner().session_id);
        let record = self.agent.sessions().get(&caller, &id).await?;
        Ok(Response::new(self.session(&record)))
    }

    async fn list_sessions(
        &self,
        request: Request<proto::ListSessionsRequest>,
    ) -> Result<Response<proto::ListSessionsResponse>, Status> {
        let caller = caller(&request, request.get_ref().principal.clone())?;
        let list = request.into_inner();
        let filter = SessionFilter {
            account_id: (!list.account_id.is_empty()).then_some(list.account_id),
            include_ended: list.include_ended,
            created_from: list.created_after.map(|t| UnixNanos::from_timestamp(&t)),
            created_before: list.created_before.map(|t| UnixNanos::from_timestamp(&t)),
            after: convert::page_key(&list.page_token)?,
            limit: match list.page_size {
                0 => DEFAULT_PAGE_SIZE,
                size => size.min(MAX_PAGE_SIZE),
            },
        };
        let page = self.agent.sessions().list(&caller, filter).await?;
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: page.sessions.iter().map(|r| self.session(r)).collect(),
            next_page_token: convert::page_token(page.next.as_ref()),
        }))
    }

    async fn set_drain(
        &self,
        request: Request<proto::SetDrainRequest>,
    ) -> Result<Response<proto::SetDrainResponse>, Status> {
        let caller = caller(&request, None)?;
        operator_only(&caller, "SetDrain")?;
        let drain = request.into_inner();
        let sessions = self.agent.sessions();
        sessions
            .set_draining(drain.drain, drain.reason, Actor::Operator)
            .await;
        let open = sessions
            .list(&caller, SessionFilter::open())
            .await?
            .sessions;
        Ok(Response::new(proto::SetDrainResponse {
            draining: drain.drain,
            running_sessions: u32::try_from(open.len()).unwrap_or(u32::MAX),
        }))
    }

    async fn get_usage(
        &self,
        request: Request<proto::GetUsageRequest>,
    ) -> Result<Response<proto::UsageReport>, Status> {
        let caller = caller(&request, request.get_ref().principal.clone())?;
        let usage = request.into_inner();
        let sessions = self.agent.sessions();
        let from = convert::request_time(usage.from, UnixNanos(0));
        let to = convert::request_time(usage.to, sessions.now());
        let report = sessions.usage(&caller, &usage.account_id, from, to).await?;
        Ok(Response::new(convert::usage_report(&report)))
    }

    async fn watch_events(
        &self,
        request: Request<proto::WatchEventsRequest>,
    ) -> Result<Response<EventStream>, Status> {
        let caller = caller(&request, request.get_ref().principal.clone())?;
        let watch = request.into_inner();
        let account = (!watch.account_id.is_empty()).then_some(watch.account_id);
        let sessions = Arc::clone(self.agent.sessions());
        let filter = sessions.event_filter(&caller, account)?;
        let mut events = sessions.events().subscribe();
        let shutdown = self.shutdown.clone();
        let stream = async_stream_events(move |sender| async move {
            loop {
                let received = tokio::select! {
                    _ = shutdown.cancelled() => return,
                    received = events.recv() => received,
                };
                let event = match received {
                    Ok(event) => event,
                    Err(RecvError::Lagged(missed)) => {
                        let status = Status::data_loss(format!(
                            "this watcher fell {missed} events behind and lost them; watch again"
                        ));
                        let _ = sender.send(Err(status)).await;
                        return;
                    }
                    Err(RecvError::Closed) => return,
                };
                if !filter.admits(&event.kind) {
                    continue;
                }
                if sender
                    .send(Ok(convert::event(&event, sessions.now())))
                    .await
                    .is_err()
                {
                    return;
                }
            }
        });
        Ok(Response::new(stream))
    }

    async fn adjust_balance(
        &self,
        request: Request<proto::AdjustBalanceRequest>,
    ) -> Result<Response<proto::AdjustBalanceResponse>, Status> {
        let caller = caller(&request, None)?;
        let adjust = request.into_inner();
        let delta = Credits(adjust.delta.map(|d| d.nano_credits).unwrap_or_default());
        let (adjustment_id, balance) = self
            .agent
            .sessions()
            .adjust_balance(&caller, &adjust.account_id, delta, &adjust.reason)
            .await?;
        Ok(Response::new(proto::AdjustBalanceResponse {
            account_id: adjust.account_id,
            balance: convert::credits(balance),
            adjustment_id,
        }))
    }

    async fn list_audit(
        &self,
        request: Request<proto::ListAuditRequest>,
    ) -> Result<Response<proto::ListAuditResponse>, Status> {
        let caller = caller(&request, None)?;
        let list = request.into_inner();
        let filter = AuditFilter {
            account_id: (!list.account_id.is_empty()).then_some(list.account_id),
            since: list
                .since
                .map(|t| convert::request_time(Some(t), UnixNanos(0))),
            limit: match list.limit {
                0 => 100,
                limit => limit.min(10_000),
            },
        };
        let entries = self.agent.sessions().audit_trail(&caller, filter).await?;
        Ok(Response::new(proto::ListAuditResponse {
            entries: entries.iter().map(convert::audit_entry).collect(),
        }))
    }
}

/// The stream type tonic's default-stub service trait fixes for
/// server-streaming RPCs.
type EventStream = Pin<Box<dyn Stream<Item = Result<proto::Event, Status>> + Send + 'static>>;

/// A stream fed by `produce` through a small channel: the producer stops
/// when the client goes away (its sends fail).
fn async_stream_events<F, Fut>(produce: F) -> EventStream
where
    F: FnOnce(mpsc::Sender<Result<proto::Event, Status>>) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    let (sender, receiver) = mpsc::channel(64);
    tokio::spawn(produce(sender).instrument(tracing::info_span!("watch_events")));
    Box::pin(ReceiverStream::new(receiver))
}
