//! The container engine, as the session code needs it: create and start a
//! container with exactly the given devices, inspect it, stop it, list the
//! containers of this node, and follow their lifecycle events. The real
//! engine is Docker through bollard ([`docker`]); [`fake`] records calls and
//! replays scripted answers for unit tests.

pub mod docker;
pub mod fake;

use std::collections::BTreeMap;
use std::fmt;
use std::time::Duration;

use futures_util::stream::BoxStream;

use crate::clock::UnixNanos;

/// Docker's id of a container.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContainerId(pub String);

impl fmt::Display for ContainerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Labels every gpuwarden container carries, so Docker alone can tell which
/// session a container is.
pub mod labels {
    pub const SESSION: &str = "dev.gpuwarden.session";
    pub const NODE: &str = "dev.gpuwarden.node";
    pub const ACCOUNT: &str = "dev.gpuwarden.account";
    pub const BILLED_ACCOUNT: &str = "dev.gpuwarden.billed-account";
    pub const SCOPE: &str = "dev.gpuwarden.scope";
    pub const OWNER: &str = "dev.gpuwarden.owner";
    pub const DEVICES: &str = "dev.gpuwarden.devices";
    /// On volumes: the account that owns them.
    pub const VOLUME_OWNER: &str = "dev.gpuwarden.volume-owner";
}

/// How the assigned devices reach the container, besides the
/// `NVIDIA_VISIBLE_DEVICES` / `CUDA_VISIBLE_DEVICES` variables the agent
/// always sets.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRequest {
    /// Variables only (simulated hosts, tests).
    None,
    /// A Docker device request: `driver` (`nvidia` or `cdi`), the device ids
    /// (UUIDs, or `nvidia.com/gpu=<uuid>` for CDI) and, for `nvidia`, the
    /// `gpu` capability.
    Devices {
        driver: String,
        device_ids: Vec<String>,
        capabilities: Vec<String>,
    },
}

/// A named volume mounted into the container.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct VolumeMount {
    /// The Docker volume's name (already namespaced by owner).
    pub volume: String,
    /// Absolute path inside the container.
    pub target: String,
    pub read_only: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Network {
    /// Docker's default bridge.
    Bridge,
    None,
}

/// Everything the engine needs to create one session's container. Built by
/// the session code after validation; the runtime adds nothing of its own
/// beyond the hardening every container gets (no privileges, no extra
/// capabilities, `no-new-privileges`, the pids limit).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSpec {
    /// The container's name, e.g. `gpuwarden-<session id>`.
    pub name: String,
    pub image: String,
    /// Empty: the image's own command.
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub labels: BTreeMap<String, String>,
    pub volumes: Vec<VolumeMount>,
    pub devices: DeviceRequest,
    pub network: Network,
    pub pids_limit: i64,
}

/// What the engine says about a container now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerState {
    pub id: ContainerId,
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub running: bool,
    /// Docker's StartedAt; `None` before the first start.
    pub started_at: Option<UnixNanos>,
    /// Docker's FinishedAt; `None` while running or never started.
    pub finished_at: Option<UnixNanos>,
    pub exit_code: Option<i64>,
}

/// A lifecycle event of a container with gpuwarden labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerEvent {
    pub id: ContainerId,
    pub kind: ContainerEventKind,
    /// The engine's time of the event.
    pub at: UnixNanos,
    pub labels: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContainerEventKind {
    Start,
    /// The main process exited (or was killed).
    Die,
    /// The container was removed.
    Destroy,
}

#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// The engine could not be reached at all.
    #[error("the Docker engine at {socket} does not answer: {detail}")]
    Unreachable { socket: String, detail: String },
    /// The image is not on this host (no registry is pulled from).
    #[error("image `{0}` is not present on this host")]
    NoSuchImage(String),
    /// The container does not exist (any more).
    #[error("container {0} does not exist")]
    NoSuchContainer(String),
    /// The engine refused or failed a call.
    #[error("Docker {call} failed: {detail}")]
    Engine { call: &'static str, detail: String },
}

/// The container engine. Implementations must be safe to call concurrently.
#[async_trait::async_trait]
pub trait ContainerRuntime: Send + Sync + fmt::Debug + 'static {
    /// Creates the named volume if it does not exist, with `labels`.
    async fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError>;

    /// Creates (does not start) a container.
    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError>;

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError>;

    /// The container's state, or `None` when it does not exist.
    async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerState>, RuntimeError>;

    /// SIGTERM, then SIGKILL after `grace`. Stopping a stopped container is
    /// not an error.
    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError>;

    /// Removes the container, running or not. Removing a missing one is not
    /// an error.
    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError>;

    /// Every container, running or not, that has the label `key=value`.
    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerState>, RuntimeError>;

    /// Start, die and destroy events of containers labelled `key=value`,
    /// from now on. The stream ends (or yields an error) when the engine
    /// goes away; the caller re-subscribes and reconciles.
    fn events(
        &self,
        key: &str,
        value: &str,
    ) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>>;
}
