//! The tonic `NodeAgent` service. It only converts requests to domain calls
//! and results back; decisions live in the agent. RPCs whose behaviour has
//! not landed answer UNIMPLEMENTED through the generated default methods.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use crate::agent::Agent;
use crate::proto;
use crate::proto::node_agent_server::NodeAgent;

#[derive(Debug, Clone)]
pub struct NodeAgentService {
    agent: Arc<Agent>,
}

impl NodeAgentService {
    pub fn new(agent: Arc<Agent>) -> Self {
        Self { agent }
    }
}

#[tonic::async_trait]
impl NodeAgent for NodeAgentService {
    async fn get_inventory(
        &self,
        _request: Request<proto::GetInventoryRequest>,
    ) -> Result<Response<proto::Inventory>, Status> {
        Ok(Response::new((&self.agent.inventory()).into()))
    }
}
