//! The tonic `NodeAgent` service. It only converts requests to domain calls
//! and results back; decisions live in the agent. RPCs whose behaviour has
//! not landed answer UNIMPLEMENTED through the generated default methods.

use std::sync::Arc;
use std::time::Duration;

use tonic::transport::server::UdsConnectInfo;
use tonic::{Request, Response, Status};

use super::convert;
use crate::agent::Agent;
use crate::error::{Reason, Refusal};
use crate::proto;
use crate::proto::node_agent_server::NodeAgent;
use crate::session::manager::DEFAULT_STOP_GRACE;
use crate::session::request::LaunchRequest;
use crate::session::{Caller, SessionId};

#[derive(Debug, Clone)]
pub struct NodeAgentService {
    agent: Arc<Agent>,
}

impl NodeAgentService {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
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
        let account = (!list.account_id.is_empty()).then_some(list.account_id);
        let records = self
            .agent
            .sessions()
            .list(&caller, account, list.include_ended)
            .await?;
        Ok(Response::new(proto::ListSessionsResponse {
            sessions: records.iter().map(|r| self.session(r)).collect(),
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
        sessions.set_draining(drain.drain);
        tracing::info!(draining = drain.drain, reason = %drain.reason, "drain changed");
        let open = sessions.list(&caller, None, false).await?;
        Ok(Response::new(proto::SetDrainResponse {
            draining: drain.drain,
            running_sessions: u32::try_from(open.len()).unwrap_or(u32::MAX),
        }))
    }
}
