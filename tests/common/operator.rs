//! Calls as the local operator (no principal: the Unix socket is the
//! operator's), each expected to succeed.

use std::time::{Duration, Instant};

use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

use super::launch::stop_request;

/// The session `id`, as the operator sees it.
pub async fn get(client: &mut NodeAgentClient<Channel>, id: &str) -> proto::Session {
    client
        .get_session(proto::GetSessionRequest {
            session_id: id.into(),
            principal: None,
        })
        .await
        .unwrap()
        .into_inner()
}

/// Stops the session `id` (one-second grace) and returns it.
pub async fn stop(client: &mut NodeAgentClient<Channel>, id: &str) -> proto::Session {
    client
        .stop(stop_request(id, None))
        .await
        .unwrap()
        .into_inner()
}

/// Every session on the node that has not ended.
pub async fn open_sessions(client: &mut NodeAgentClient<Channel>) -> Vec<proto::Session> {
    list_sessions(client, false).await
}

/// Every session on the node, ended ones included.
pub async fn all_sessions(client: &mut NodeAgentClient<Channel>) -> Vec<proto::Session> {
    list_sessions(client, true).await
}

/// ListSessions over every account, every page.
async fn list_sessions(
    client: &mut NodeAgentClient<Channel>,
    include_ended: bool,
) -> Vec<proto::Session> {
    let mut sessions = Vec::new();
    let mut page_token = String::new();
    loop {
        let page = client
            .list_sessions(proto::ListSessionsRequest {
                include_ended,
                page_token,
                ..Default::default()
            })
            .await
            .unwrap()
            .into_inner();
        sessions.extend(page.sessions);
        if page.next_page_token.is_empty() {
            return sessions;
        }
        page_token = page.next_page_token;
    }
}

/// Polls the session `id` until it has ended, bounded by `within`.
pub async fn until_ended(
    client: &mut NodeAgentClient<Channel>,
    id: &str,
    within: Duration,
) -> proto::Session {
    let deadline = Instant::now() + within;
    loop {
        let session = get(client, id).await;
        if session.state() == proto::SessionState::Ended {
            return session;
        }
        assert!(
            Instant::now() < deadline,
            "session {id} did not end within {within:?}: {session:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
