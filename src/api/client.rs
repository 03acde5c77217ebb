//! Reaching a running agent over its Unix socket, for `gpuwarden ctl` and
//! tests.

use std::path::{Path, PathBuf};

use hyper_util::rt::TokioIo;
use tokio::net::UnixStream;
use tonic::transport::{Channel, Endpoint, Uri};

use crate::proto::node_agent_client::NodeAgentClient;

#[derive(Debug, thiserror::Error)]
/// The agent's socket did not answer.
#[error("cannot reach gpuwarden at {}: {detail}; is the daemon running, and may this user open its socket?", path.display())]
pub struct ConnectError {
    path: PathBuf,
    detail: String,
}

/// Connects to the agent listening on the Unix socket at `path`.
pub async fn connect_unix(path: &Path) -> Result<NodeAgentClient<Channel>, ConnectError> {
    Ok(NodeAgentClient::new(unix_channel(path).await?))
}

/// A gRPC channel over the Unix socket at `path`, for any of the services
/// the agent serves there (NodeAgent, health, reflection).
pub async fn unix_channel(path: &Path) -> Result<Channel, ConnectError> {
    let socket = path.to_path_buf();
    // The URI is required by the API but unused: the connector below decides
    // where the bytes go.
    let channel = Endpoint::from_static("http://gpuwarden.local")
        .connect_with_connector(tower::service_fn(move |_: Uri| {
            let socket = socket.clone();
            async move { Ok::<_, std::io::Error>(TokioIo::new(UnixStream::connect(socket).await?)) }
        }))
        .await
        .map_err(|e| ConnectError {
            path: path.to_path_buf(),
            detail: crate::error::chain(&e),
        })?;
    Ok(channel)
}
