//! [`ControlPlane`] over gRPC with mutual TLS (tonic on rustls). The
//! channel connects lazily and reconnects by itself; each unary call has a
//! deadline, kept on this side too, so a control plane that hangs reads as
//! unreachable.

use std::time::Duration;

use futures_util::StreamExt as _;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity};

use super::{ControlPlane, LinkError, PolicyStream};
use crate::config::ControlPlaneConfig;
use crate::proto;
use crate::proto::control_plane_client::ControlPlaneClient;

/// How long one unary call may take.
const CALL_TIMEOUT: Duration = Duration::from_secs(10);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// The client's TLS files or endpoint cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum ClientSetupError {
    #[error("cannot read control_plane.{key} {path}: {source}")]
    File {
        key: &'static str,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error(
        "control_plane.endpoint `{endpoint}` with its TLS files does not make a client: {source}"
    )]
    Endpoint {
        endpoint: String,
        #[source]
        source: tonic::transport::Error,
    },
}

#[derive(Debug, Clone)]
pub struct GrpcControlPlane {
    client: ControlPlaneClient<Channel>,
}

impl GrpcControlPlane {
    /// Reads the TLS files and prepares the channel; nothing is dialled yet.
    pub async fn new(config: &ControlPlaneConfig) -> Result<Self, ClientSetupError> {
        let read = |key: &'static str, path: &std::path::Path| {
            let path = path.to_path_buf();
            async move {
                tokio::fs::read(&path)
                    .await
                    .map_err(|source| ClientSetupError::File {
                        key,
                        path: path.display().to_string(),
                        source,
                    })
            }
        };
        let cert = read("tls_cert", &config.tls.cert).await?;
        let key = read("tls_key", &config.tls.key).await?;
        let ca = read("ca", &config.tls.ca).await?;
        let tls = ClientTlsConfig::new()
            .ca_certificate(Certificate::from_pem(ca))
            .identity(Identity::from_pem(cert, key));
        let setup = |source| ClientSetupError::Endpoint {
            endpoint: config.endpoint.clone(),
            source,
        };
        let channel = Endpoint::from_shared(config.endpoint.clone())
            .map_err(setup)?
            .tls_config(tls)
            .map_err(setup)?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_timeout(Duration::from_secs(10))
            .connect_lazy();
        Ok(Self {
            client: ControlPlaneClient::new(channel),
        })
    }

    fn client(&self) -> ControlPlaneClient<Channel> {
        self.client.clone()
    }
}

fn with_deadline<T>(message: T) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    request.set_timeout(CALL_TIMEOUT);
    request
}

/// A unary call, cut at the deadline on this side too: `grpc-timeout`
/// only asks the server to give up, and a stuck server (or a path that
/// drops packets) never answers.
async fn unary<T>(
    call: impl Future<Output = Result<tonic::Response<T>, tonic::Status>>,
) -> Result<T, LinkError> {
    match tokio::time::timeout(CALL_TIMEOUT, call).await {
        Ok(answer) => Ok(answer?.into_inner()),
        Err(_) => Err(LinkError::Unreachable(format!(
            "no answer within {} s",
            CALL_TIMEOUT.as_secs()
        ))),
    }
}

#[async_trait::async_trait]
impl ControlPlane for GrpcControlPlane {
    async fn register_node(
        &self,
        request: proto::RegisterNodeRequest,
    ) -> Result<proto::RegisterNodeResponse, LinkError> {
        unary(self.client().register_node(with_deadline(request))).await
    }

    async fn report_status(&self, status: proto::NodeStatus) -> Result<(), LinkError> {
        unary(self.client().report_status(with_deadline(status)))
            .await
            .map(drop)
    }

    async fn watch_policy(
        &self,
        request: proto::WatchPolicyRequest,
    ) -> Result<PolicyStream, LinkError> {
        // No deadline: the stream lives as long as the link.
        let stream = self.client().watch_policy(request).await?.into_inner();
        Ok(Box::pin(stream.map(|item| item.map_err(LinkError::from))))
    }

    async fn authorize_session(
        &self,
        request: proto::AuthorizeSessionRequest,
    ) -> Result<proto::CreditControlAnswer, LinkError> {
        unary(self.client().authorize_session(with_deadline(request))).await
    }

    async fn extend_grant(
        &self,
        request: proto::ExtendGrantRequest,
    ) -> Result<proto::CreditControlAnswer, LinkError> {
        unary(self.client().extend_grant(with_deadline(request))).await
    }

    async fn release_session(
        &self,
        request: proto::ReleaseSessionRequest,
    ) -> Result<(), LinkError> {
        unary(self.client().release_session(with_deadline(request)))
            .await
            .map(drop)
    }

    async fn report_usage(&self, batch: proto::UsageBatch) -> Result<proto::UsageAck, LinkError> {
        unary(self.client().report_usage(with_deadline(batch))).await
    }
}
