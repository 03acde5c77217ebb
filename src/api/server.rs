//! Binding and serving the API: the Unix socket always, the TCP listener
//! (mutual TLS only) when configured. Binding is separate from serving so the
//! daemon fails before it announces readiness when a socket cannot be had.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Instant;

use tokio::net::{TcpListener, UnixListener, UnixStream};
use tokio_stream::StreamExt as _;
use tokio_stream::wrappers::{TcpListenerStream, UnixListenerStream};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tonic::codegen::http;
use tonic::transport::{Certificate, Identity, Server, ServerTlsConfig};
use tracing::Instrument as _;

use super::service::NodeAgentService;
use crate::agent::Agent;
use crate::config::{ApiConfig, MtlsFiles};
use crate::metrics::Metrics;
use crate::proto;
use crate::proto::node_agent_server::NodeAgentServer;

/// Owner and group may connect; the group is how operators other than root
/// are let in.
const SOCKET_MODE: u32 = 0o660;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// The socket's folder could not be made.
    #[error("cannot create {}: {source}", path.display())]
    SocketDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// Another process already serves the socket.
    #[error("{} is in use by another running gpuwarden; stop it or set api.unix_socket", path.display())]
    SocketInUse { path: PathBuf },
    /// Binding a listener failed.
    #[error("cannot listen on {what}: {source}")]
    Bind {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A TLS file named in the config could not be read.
    #[error("cannot read {key} {}: {source}", path.display())]
    TlsFile {
        key: &'static str,
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The certificate and key were read but do not make a TLS server.
    #[error("api.tls_cert / api.tls_key / api.client_ca do not form a usable TLS setup: {0}")]
    Tls(#[source] tonic::transport::Error),
    #[error("cannot build the reflection service: {0}")]
    Reflection(#[from] tonic_reflection::server::Error),
}

impl ApiError {
    /// Whether the operator must change the config or its files to fix it.
    pub fn is_config_problem(&self) -> bool {
        matches!(
            self,
            Self::TlsFile { .. } | Self::Tls(_) | Self::SocketInUse { .. }
        )
    }
}

/// Who may use the Unix socket: root, the agent's own user, and members
/// of `api.unix_socket_group`. The socket file's mode (0660, owner and
/// group) already keeps others out; the peer's credentials are checked on
/// every connection as well, so a socket file with the wrong mode or a
/// descriptor passed on does not let anyone else in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SocketAccess {
    pub own_uid: u32,
    pub group: Option<u32>,
}

impl SocketAccess {
    /// Whether a peer with `uid` and primary `gid` is admitted;
    /// `supplementary` gives its other groups, asked only when needed.
    pub fn admits(&self, uid: u32, gid: u32, supplementary: impl FnOnce() -> Vec<u32>) -> bool {
        if uid == 0 || uid == self.own_uid {
            return true;
        }
        match self.group {
            Some(group) => gid == group || supplementary().contains(&group),
            None => false,
        }
    }
}

/// The groups of the user `uid` (its primary `gid` included), from the
/// host's user database.
fn groups_of(uid: u32, gid: u32) -> Vec<u32> {
    let Ok(Some(user)) = nix::unistd::User::from_uid(nix::unistd::Uid::from_raw(uid)) else {
        return Vec::new();
    };
    let Ok(name) = std::ffi::CString::new(user.name) else {
        return Vec::new();
    };
    nix::unistd::getgrouplist(&name, nix::unistd::Gid::from_raw(gid))
        .map(|groups| groups.into_iter().map(|g| g.as_raw()).collect())
        .unwrap_or_default()
}

/// Listeners bound and ready to serve.
#[derive(Debug)]
pub struct BoundApi {
    unix: UnixListener,
    access: SocketAccess,
    /// Removed by the daemon once it has stopped serving.
    unix_path: PathBuf,
    tcp: Option<(TcpListener, ServerTlsConfig)>,
}

/// Binds the Unix socket and, when configured, the TCP listener.
pub async fn bind(config: &ApiConfig) -> Result<BoundApi, ApiError> {
    let group = config.unix_socket_gid;
    let unix = bind_unix(&config.unix_socket, group).await?;
    let tcp = match &config.tcp {
        Some(tcp) => {
            let tls = server_tls(&tcp.tls).await?;
            let listener =
                TcpListener::bind(tcp.listen)
                    .await
                    .map_err(|source| ApiError::Bind {
                        what: format!("api.listen {}", tcp.listen),
                        source,
                    })?;
            Some((listener, tls))
        }
        None => None,
    };
    Ok(BoundApi {
        unix,
        access: SocketAccess {
            own_uid: nix::unistd::geteuid().as_raw(),
            group,
        },
        unix_path: config.unix_socket.clone(),
        tcp,
    })
}

async fn bind_unix(path: &Path, group: Option<u32>) -> Result<UnixListener, ApiError> {
    if let Some(dir) = path.parent() {
        tokio::fs::create_dir_all(dir)
            .await
            .map_err(|source| ApiError::SocketDir {
                path: dir.to_path_buf(),
                source,
            })?;
    }
    // A socket file left by a killed agent is removed; one that answers
    // belongs to a live agent and is left alone.
    if tokio::fs::symlink_metadata(path).await.is_ok() {
        if UnixStream::connect(path).await.is_ok() {
            return Err(ApiError::SocketInUse {
                path: path.to_path_buf(),
            });
        }
        let _ = tokio::fs::remove_file(path).await;
    }
    let bind_error = |source| ApiError::Bind {
        what: format!("api.unix_socket {}", path.display()),
        source,
    };
    let listener = UnixListener::bind(path).map_err(bind_error)?;
    tokio::fs::set_permissions(path, std::fs::Permissions::from_mode(SOCKET_MODE))
        .await
        .map_err(bind_error)?;
    if let Some(gid) = group {
        nix::unistd::chown(path, None, Some(nix::unistd::Gid::from_raw(gid)))
            .map_err(|errno| bind_error(std::io::Error::from(errno)))?;
    }
    Ok(listener)
}

async fn server_tls(files: &MtlsFiles) -> Result<ServerTlsConfig, ApiError> {
    let read = |key: &'static str, path: &Path| {
        let path = path.to_path_buf();
        async move {
            tokio::fs::read(&path)
                .await
                .map_err(|source| ApiError::TlsFile { key, path, source })
        }
    };
    let cert = read("api.tls_cert", &files.cert).await?;
    let key = read("api.tls_key", &files.key).await?;
    let ca = read("api.client_ca", &files.ca).await?;
    Ok(ServerTlsConfig::new()
        .identity(Identity::from_pem(cert, key))
        .client_ca_root(Certificate::from_pem(ca))
        .client_auth_optional(false))
}

/// Reads the TLS files of the TCP listener and checks they make a server,
/// as `bind` would, without binding anything: for `check-config`.
pub async fn check_tls(files: &MtlsFiles) -> Result<(), ApiError> {
    Server::builder()
        .tls_config(server_tls(files).await?)
        .map_err(ApiError::Tls)?;
    Ok(())
}

/// The path of Launch: a request to it that cannot be read still counts
/// as a refused launch in the metrics.
fn launch_path() -> String {
    format!("/{}/Launch", proto::node_agent_server::SERVICE_NAME)
}

/// Rewrites tonic's answer to a request it could not read into the agent's
/// INVALID_REQUEST refusal (see `status::unreadable_request`), and counts
/// such a Launch as a refused launch. Such an answer is trailers-only: tonic
/// puts the status in the headers and keeps it as an extension, which no
/// successful or streamed response has, so handlers' answers pass through
/// untouched.
#[derive(Debug, Clone)]
struct RefuseUnreadable<S> {
    inner: S,
    metrics: Arc<Metrics>,
    launch_path: Arc<str>,
}

#[derive(Debug, Clone)]
struct RefuseUnreadableLayer {
    metrics: Arc<Metrics>,
}

impl<S> tower::Layer<S> for RefuseUnreadableLayer {
    type Service = RefuseUnreadable<S>;

    fn layer(&self, inner: S) -> Self::Service {
        RefuseUnreadable {
            inner,
            metrics: Arc::clone(&self.metrics),
            launch_path: launch_path().into(),
        }
    }
}

impl<S, B> tower::Service<http::Request<B>> for RefuseUnreadable<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<tonic::body::Body>>,
    S::Future: Send + 'static,
    S::Error: 'static,
{
    type Response = http::Response<tonic::body::Body>;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<Self::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let launch = request.uri().path() == &*self.launch_path;
        let metrics = Arc::clone(&self.metrics);
        let began = Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            let Some(refusal) = response
                .extensions()
                .get::<tonic::Status>()
                .and_then(super::status::unreadable_request)
            else {
                return Ok(response);
            };
            tracing::info!(reason = %refusal.reason, message = %refusal.message, "refused a request that could not be read");
            if launch {
                metrics.launch(Err(refusal.reason.as_str()), began.elapsed());
            }
            Ok(tonic::Status::from(refusal).into_http())
        })
    }
}

impl BoundApi {
    /// Serves the API on every bound listener until `shutdown`, each
    /// listener in its own tracked task. In-flight calls finish first.
    pub async fn serve(
        self,
        agent: Arc<Agent>,
        shutdown: &CancellationToken,
        tasks: &TaskTracker,
    ) -> Result<(), ApiError> {
        let metrics = Arc::clone(agent.metrics());
        let node_agent = NodeAgentServer::new(NodeAgentService::new(agent, shutdown.clone()));
        let (health, health_service) = tonic_health::server::health_reporter();
        health
            .set_serving::<NodeAgentServer<NodeAgentService>>()
            .await;
        let reflection = tonic_reflection::server::Builder::configure()
            .register_encoded_file_descriptor_set(proto::FILE_DESCRIPTOR_SET)
            .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
            .build_v1()?;
        let with_services = |server: Server| {
            server
                .layer(RefuseUnreadableLayer {
                    metrics: Arc::clone(&metrics),
                })
                .add_service(node_agent.clone())
                .add_service(health_service.clone())
                .add_service(reflection.clone())
        };

        let unix_routes = with_services(Server::builder());
        let stopped = shutdown.clone().cancelled_owned();
        let unix_path = self.unix_path;
        tasks.spawn(
            async move {
                tracing::info!(socket = %unix_path.display(), "serving the API on the Unix socket");
                let access = self.access;
                let incoming = UnixListenerStream::new(self.unix).filter_map(move |connection| {
                    let stream = match connection {
                        Ok(stream) => stream,
                        Err(error) => return Some(Err(error)),
                    };
                    match stream.peer_cred() {
                        Ok(peer) if access.admits(peer.uid(), peer.gid(), || {
                            groups_of(peer.uid(), peer.gid())
                        }) => Some(Ok(stream)),
                        Ok(peer) => {
                            tracing::warn!(uid = peer.uid(), gid = peer.gid(), pid = ?peer.pid(), "refused a Unix socket connection: not root, not this agent's user, not in api.unix_socket_group");
                            None
                        }
                        Err(error) => {
                            tracing::warn!(error = %error, "refused a Unix socket connection whose peer cannot be identified");
                            None
                        }
                    }
                });
                if let Err(error) = unix_routes
                    .serve_with_incoming_shutdown(incoming, stopped)
                    .await
                {
                    tracing::error!(error = %crate::error::chain(&error), "Unix socket server failed");
                }
            }
            .instrument(tracing::info_span!("api_unix")),
        );

        if let Some((listener, tls)) = self.tcp {
            let local = listener.local_addr().ok();
            let tcp_routes =
                with_services(Server::builder().tls_config(tls).map_err(ApiError::Tls)?);
            let stopped = shutdown.clone().cancelled_owned();
            tasks.spawn(
                async move {
                    tracing::info!(listen = ?local, "serving the API over mutual TLS");
                    let incoming = TcpListenerStream::new(listener);
                    if let Err(error) = tcp_routes
                        .serve_with_incoming_shutdown(incoming, stopped)
                        .await
                    {
                        tracing::error!(error = %crate::error::chain(&error), "TCP server failed");
                    }
                }
                .instrument(tracing::info_span!("api_tcp")),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::SocketAccess;

    #[test]
    fn root_the_agents_user_and_the_group_are_admitted_others_not() {
        let access = SocketAccess {
            own_uid: 998,
            group: Some(997),
        };
        let never = || -> Vec<u32> { panic!("no group lookup needed") };
        assert!(access.admits(0, 0, never));
        assert!(access.admits(998, 998, never));
        assert!(access.admits(1000, 997, never));
        assert!(access.admits(1000, 1000, || vec![1000, 997]));
        assert!(!access.admits(1000, 1000, || vec![1000, 27]));
        let no_group = SocketAccess {
            own_uid: 998,
            group: None,
        };
        assert!(!no_group.admits(1000, 997, Vec::new));
    }
}
