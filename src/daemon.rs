//! `gpuwarden run`: build everything the agent needs (failing before it
//! serves anything if a part is missing), serve, and on SIGTERM or SIGINT
//! stop accepting, let in-flight requests finish within a bound, and exit.
//! Containers are never stopped by a shutdown.

use std::sync::Arc;
use std::time::Duration;

use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use tracing::Instrument as _;

use crate::agent::Agent;
use crate::api::server::{self, ApiError};
use crate::clock::Clock as _;
use crate::clock::SystemClock;
use crate::config::{Config, Mode};
use crate::control_plane::client::{ClientSetupError, GrpcControlPlane};
use crate::control_plane::link::Link;
use crate::control_plane::{ControlPlane, LinkState, Observed};
use crate::events::EventBus;
use crate::gpu::{self, GpuError};
use crate::ledger::{Ledger, LedgerError};
use crate::metrics::{self, Metrics};
use crate::policy::Policy;
use crate::runtime::RuntimeError;
use crate::runtime::docker::DockerRuntime;
use crate::session::manager::{CreditControl, SessionManager, SessionSettings};
use crate::toml_file::FileError;

/// How often grants are checked in control-plane mode.
const CREDIT_TICK: Duration = Duration::from_secs(1);

/// How long in-flight requests get to finish after a stop signal.
const DRAIN_TIMEOUT: Duration = Duration::from_secs(10);

#[derive(Debug, thiserror::Error)]
pub enum DaemonError {
    #[error(transparent)]
    Gpu(#[from] GpuError),
    #[error(transparent)]
    Api(#[from] ApiError),
    #[error(transparent)]
    Ledger(#[from] LedgerError),
    #[error(transparent)]
    Runtime(#[from] RuntimeError),
    /// The policy file cannot be used.
    #[error(transparent)]
    Policy(#[from] FileError),
    /// The control plane's client cannot be set up from the config.
    #[error(transparent)]
    ControlPlane(#[from] ClientSetupError),
    /// The metrics listener could not be bound.
    #[error("cannot listen on metrics.listen {listen}: {source}")]
    MetricsBind {
        listen: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    /// The signal handlers could not be installed.
    #[error("cannot install signal handlers: {0}")]
    Signals(#[source] std::io::Error),
}

impl DaemonError {
    /// Whether the operator must change the config or the files it names
    /// (a restart alone will not help).
    pub fn is_config_problem(&self) -> bool {
        match self {
            Self::Gpu(GpuError::Fixture(_)) | Self::Policy(_) | Self::ControlPlane(_) => true,
            Self::Api(api) => api.is_config_problem(),
            _ => false,
        }
    }
}

pub async fn run(config: Config) -> Result<(), DaemonError> {
    // Build: every part is opened or bound before anything is served.
    let backend = gpu::open(&config.gpu.source)?;
    let metrics = Arc::new(Metrics::new());
    let ledger = Ledger::open(&config.state_dir)?.observed_by(metrics.ledger_write.clone());
    tracing::info!(path = %ledger.path().display(), "ledger open");
    let runtime = Arc::new(DockerRuntime::connect(&config.docker.socket).await?);
    // Control-plane mode: the client is prepared (TLS files read) now; it
    // dials once everything else serves.
    let credit = match &config.mode {
        Mode::ControlPlane(cp) => {
            let link = Arc::new(LinkState::down_from(SystemClock.now()));
            let grpc: Arc<dyn ControlPlane> = Arc::new(GrpcControlPlane::new(cp).await?);
            Some(CreditControl {
                // Every call's answer or failure tells the link's state.
                plane: Arc::new(Observed::new(
                    grpc,
                    Arc::clone(&link),
                    Arc::new(SystemClock),
                )),
                link,
                retries: Arc::default(),
                offline_grace: cp.offline_grace,
                node_id: config.node_id.clone(),
            })
        }
        Mode::Standalone { .. } => None,
    };
    let mut sessions = SessionManager::new(
        SessionSettings {
            node_id: config.node_id.clone(),
            injection: config.docker.device_injection,
            usage_retention: config.usage_retention,
        },
        ledger,
        runtime,
        Arc::new(SystemClock),
        // Until the file is read against the discovered devices below.
        Arc::new(Policy::empty()),
        Arc::new(EventBus::new()),
    );
    if let Some(credit) = credit.clone() {
        sessions = sessions.with_credit_control(credit);
    }
    let sessions = Arc::new(sessions);
    // Adopt what kept running while the agent was away, close what ended.
    // When that cannot be done (the state directory is full or read-only,
    // the engine does not answer) the agent serves all the same: reads,
    // inventory and metrics work, launches are refused with the reason, and
    // every checkpoint tries again. Containers run on meanwhile and are
    // billed from Docker's timestamps once it succeeds.
    if let Err(cause) = sessions.reconcile(true).await {
        tracing::error!(error = %cause, "cannot bring the ledger in line with the container engine; serving with launches refused until a reconcile succeeds");
    }
    let agent = Arc::new(
        Agent::start(
            config.node_id.clone(),
            backend,
            Arc::clone(&sessions),
            Arc::clone(&metrics),
        )
        .await?,
    );
    let policy_file = match &config.mode {
        Mode::Standalone { policy_file } => policy_file.clone(),
        Mode::ControlPlane(_) => None,
    };
    match &policy_file {
        Some(path) => agent.load_policy(path)?,
        None if credit.is_some() => {}
        None => tracing::warn!(
            "no policy file ([policy] file): no account is known, so every launch is refused with UNKNOWN_ACCOUNT"
        ),
    }
    let api = server::bind(&config.api).await?;
    let metrics_listener = metrics::bind(config.metrics_listen)
        .await
        .map_err(|source| DaemonError::MetricsBind {
            listen: config.metrics_listen,
            source,
        })?;
    let mut sigterm = signal(SignalKind::terminate()).map_err(DaemonError::Signals)?;
    let mut sigint = signal(SignalKind::interrupt()).map_err(DaemonError::Signals)?;
    let mut sighup = signal(SignalKind::hangup()).map_err(DaemonError::Signals)?;

    // Spawn.
    let shutdown = CancellationToken::new();
    let tasks = TaskTracker::new();
    api.serve(Arc::clone(&agent), &shutdown, &tasks).await?;
    tasks.spawn(
        metrics::serve(metrics_listener, Arc::clone(&agent), shutdown.clone())
            .instrument(tracing::info_span!("metrics")),
    );
    tasks.spawn(
        Arc::clone(&agent)
            .watch_devices(
                config.gpu.rescan_interval,
                config.health_recovery,
                shutdown.clone(),
            )
            .instrument(tracing::info_span!("devices")),
    );
    tasks.spawn(
        Arc::clone(&sessions)
            .follow_events(shutdown.clone())
            .instrument(tracing::info_span!("engine_events")),
    );
    tasks.spawn(
        Arc::clone(&sessions)
            .checkpoint_loop(config.checkpoint_interval, shutdown.clone())
            .instrument(tracing::info_span!("checkpoints")),
    );
    if let Some(credit) = &credit {
        let link = Arc::new(Link::new(
            Arc::clone(&credit.plane),
            Arc::clone(&credit.link),
            Arc::clone(&agent),
        ));
        tasks.spawn(
            Arc::clone(&link)
                .run(shutdown.clone())
                .instrument(tracing::info_span!("control_plane")),
        );
        tasks.spawn(
            link.deliver_usage(shutdown.clone())
                .instrument(tracing::info_span!("usage_delivery")),
        );
        tasks.spawn(
            Arc::clone(&sessions)
                .credit_loop(CREDIT_TICK, shutdown.clone())
                .instrument(tracing::info_span!("credit_control")),
        );
    }
    tracing::info!(node_id = %config.node_id, "gpuwarden is ready");
    // systemd: READY=1 only now that the API serves (see crate::systemd).
    let notifier = crate::systemd::Notifier::from_env();
    notifier.ready_serving(&agent).await;
    let mut heartbeat = notifier.heartbeat();

    // Reload on SIGHUP until the one stop signal, then drain within a bound.
    let signal_name = loop {
        tokio::select! {
            _ = sigterm.recv() => break "SIGTERM",
            _ = sigint.recv() => break "SIGINT",
            _ = sighup.recv() => {
                notifier.reloading(); // systemd: RELOADING=1 ... READY=1
                match &policy_file {
                    Some(path) => agent.reload_policy(path).await,
                    None => tracing::info!("SIGHUP: no policy file to reload"),
                }
                notifier.ready_serving(&agent).await;
            }
            // systemd: WATCHDOG=1 from this loop, so a hung loop gets restarted.
            _ = heartbeat.tick() => notifier.beat(&agent).await,
        }
    };
    notifier.stopping(); // systemd: STOPPING=1
    tracing::info!(
        signal = signal_name,
        "stopping: finishing in-flight requests"
    );
    shutdown.cancel();
    tasks.close();
    if tokio::time::timeout(DRAIN_TIMEOUT, tasks.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            timeout_seconds = DRAIN_TIMEOUT.as_secs(),
            "in-flight requests did not finish in time; exiting anyway"
        );
    }
    // Clients then get "no such file" rather than a refused connection.
    let _ = tokio::fs::remove_file(&config.api.unix_socket).await;
    tracing::info!("stopped; containers were left running");
    Ok(())
}
