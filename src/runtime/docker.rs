//! [`ContainerRuntime`] on the local Docker engine through bollard.
//!
//! Every container gets the same hardening whatever the spec says: not
//! privileged, no added capabilities, `no-new-privileges`, a pids limit, no
//! bind mounts (named volumes only). Images are never pulled: a missing image
//! is [`RuntimeError::NoSuchImage`].

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::time::{Duration, SystemTime};

use bollard::Docker;
use bollard::errors::Error as DockerError;
use bollard::models::{
    ContainerCreateBody, ContainerInspectResponse, DeviceRequest as DockerDeviceRequest,
    EventMessage, EventMessageTypeEnum, HostConfig, Mount, MountType, VolumeCreateRequest,
};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, EventsOptionsBuilder, ListContainersOptionsBuilder,
    RemoveContainerOptionsBuilder, StopContainerOptionsBuilder,
};
use futures_util::StreamExt;
use futures_util::stream::BoxStream;

use super::{
    ContainerEvent, ContainerEventKind, ContainerId, ContainerRuntime, ContainerSpec,
    ContainerState, DeviceRequest, Network, RuntimeError,
};
use crate::clock::UnixNanos;

/// How long one ordinary engine call may take before it counts as
/// unanswered. `stop` gets its grace period on top.
const CALL_TIMEOUT_SECS: u64 = 60;

/// What the engine needs to hear to forbid privilege gains (setuid, file
/// capabilities) inside the container.
pub const NO_NEW_PRIVILEGES: &str = "no-new-privileges:true";

/// Keys Docker adds to a container event's attributes besides the
/// container's own labels.
const ENGINE_EVENT_ATTRIBUTES: [&str; 4] = ["image", "name", "exitCode", "signal"];

/// The Docker engine behind a unix socket.
#[derive(Debug, Clone)]
pub struct DockerRuntime {
    docker: Docker,
    /// For error messages.
    socket: String,
}

impl DockerRuntime {
    /// Connects to the engine at `socket`, agrees on the API version (the
    /// lower of bollard's and the engine's) and pings it.
    pub async fn connect(socket: &Path) -> Result<Self, RuntimeError> {
        let socket_text = socket.display().to_string();
        let unreachable = |detail: String| RuntimeError::Unreachable {
            socket: socket_text.clone(),
            detail,
        };
        let path = socket
            .to_str()
            .ok_or_else(|| unreachable("the socket path is not UTF-8".to_owned()))?;
        let docker =
            Docker::connect_with_unix(path, CALL_TIMEOUT_SECS, bollard::API_DEFAULT_VERSION)
                .map_err(|error| unreachable(error.to_string()))?
                .negotiate_version()
                .await
                .map_err(|error| unreachable(error.to_string()))?;
        docker
            .ping()
            .await
            .map_err(|error| unreachable(error.to_string()))?;
        Ok(Self {
            docker,
            socket: socket_text,
        })
    }

    /// The bollard handle, for what the trait does not cover.
    pub fn docker(&self) -> &Docker {
        &self.docker
    }

    /// The socket this runtime talks to.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    fn error(&self, call: &'static str, error: DockerError) -> RuntimeError {
        map_error(&self.socket, call, error)
    }

    async fn inspect_raw(
        &self,
        id: &str,
    ) -> Result<Option<ContainerInspectResponse>, RuntimeError> {
        match self.docker.inspect_container(id, None).await {
            Ok(response) => Ok(Some(response)),
            Err(error) if status(&error) == Some(404) => Ok(None),
            Err(error) => Err(self.error("inspect", error)),
        }
    }
}

/// The engine's HTTP status, when the engine answered.
fn status(error: &DockerError) -> Option<u16> {
    match error {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn map_error(socket: &str, call: &'static str, error: DockerError) -> RuntimeError {
    match error {
        DockerError::DockerResponseServerError {
            status_code,
            message,
        } => RuntimeError::Engine {
            call,
            detail: format!("{status_code}: {message}"),
        },
        DockerError::SocketNotFoundError(_)
        | DockerError::RequestTimeoutError
        | DockerError::HyperResponseError { .. }
        | DockerError::HyperLegacyError { .. }
        | DockerError::IOError { .. } => RuntimeError::Unreachable {
            socket: socket.to_owned(),
            detail: format!("{call}: {error}"),
        },
        other => RuntimeError::Engine {
            call,
            detail: other.to_string(),
        },
    }
}

/// The create request for `spec`: the spec's own settings plus the
/// hardening every container gets.
fn create_body(spec: &ContainerSpec) -> ContainerCreateBody {
    let mounts = spec
        .volumes
        .iter()
        .map(|volume| Mount {
            typ: Some(MountType::VOLUME),
            source: Some(volume.volume.clone()),
            target: Some(volume.target.clone()),
            read_only: Some(volume.read_only),
            ..Default::default()
        })
        .collect();
    let device_requests = match &spec.devices {
        DeviceRequest::None => None,
        DeviceRequest::Devices {
            driver,
            device_ids,
            capabilities,
        } => Some(vec![DockerDeviceRequest {
            driver: Some(driver.clone()),
            count: None,
            device_ids: Some(device_ids.clone()),
            capabilities: Some(vec![capabilities.clone()]),
            options: None,
        }]),
    };
    let host_config = HostConfig {
        privileged: Some(false),
        network_mode: Some(
            match spec.network {
                Network::Bridge => "bridge",
                Network::None => "none",
            }
            .to_owned(),
        ),
        mounts: Some(mounts),
        binds: None,
        security_opt: Some(vec![NO_NEW_PRIVILEGES.to_owned()]),
        pids_limit: Some(spec.pids_limit),
        cap_add: None,
        cap_drop: None,
        init: None,
        device_requests,
        ..Default::default()
    };
    ContainerCreateBody {
        image: Some(spec.image.clone()),
        cmd: (!spec.command.is_empty()).then(|| spec.command.clone()),
        env: Some(
            spec.env
                .iter()
                .map(|(key, value)| format!("{key}={value}"))
                .collect(),
        ),
        labels: Some(
            spec.labels
                .iter()
                .map(|(key, value)| (key.clone(), value.clone()))
                .collect(),
        ),
        host_config: Some(host_config),
        ..Default::default()
    }
}

/// The trait's view of an inspect answer.
fn container_state(response: ContainerInspectResponse) -> ContainerState {
    let state = response.state.unwrap_or_default();
    let running = state.running.unwrap_or(false);
    let started_at = state
        .started_at
        .as_deref()
        .and_then(UnixNanos::parse_rfc3339);
    // Docker keeps the previous FinishedAt while a restarted container runs.
    // For a process that exits at once, Docker 20.10 records FinishedAt (the
    // exit as containerd saw it) up to a few milliseconds before StartedAt
    // (taken after containerd's start returned): clamp, so a run never lasts
    // less than nothing.
    let finished_at = if running {
        None
    } else {
        state
            .finished_at
            .as_deref()
            .and_then(UnixNanos::parse_rfc3339)
            .map(|finished| started_at.map_or(finished, |started| finished.max(started)))
    };
    let exit_code = finished_at.and(state.exit_code);
    let labels = response
        .config
        .and_then(|config| config.labels)
        .unwrap_or_default()
        .into_iter()
        .collect();
    let name = response.name.unwrap_or_default();
    ContainerState {
        id: ContainerId(response.id.unwrap_or_default()),
        name: name.strip_prefix('/').unwrap_or(&name).to_owned(),
        labels,
        running,
        started_at,
        finished_at,
        exit_code,
    }
}

/// A container event as the trait reports it; `None` for actions other
/// than start, die and destroy.
fn container_event(message: EventMessage) -> Option<ContainerEvent> {
    if message
        .typ
        .is_some_and(|typ| typ != EventMessageTypeEnum::CONTAINER)
    {
        return None;
    }
    let kind = match message.action.as_deref()? {
        "start" => ContainerEventKind::Start,
        "die" => ContainerEventKind::Die,
        "destroy" => ContainerEventKind::Destroy,
        _ => return None,
    };
    let actor = message.actor?;
    let id = actor.id?;
    let at = match (message.time_nano, message.time) {
        (Some(nanos), _) => UnixNanos(nanos),
        (None, Some(seconds)) => UnixNanos(seconds.saturating_mul(1_000_000_000)),
        (None, None) => return None,
    };
    let labels = actor
        .attributes
        .unwrap_or_default()
        .into_iter()
        .filter(|(key, _)| !ENGINE_EVENT_ATTRIBUTES.contains(&key.as_str()))
        .collect();
    Some(ContainerEvent {
        id: ContainerId(id),
        kind,
        at,
        labels,
    })
}

/// Docker's `since` for "from this instant": seconds with nanoseconds.
fn since_now() -> String {
    let now = UnixNanos::from_system_time(SystemTime::now());
    let seconds = now.0.div_euclid(1_000_000_000);
    let nanos = now.0.rem_euclid(1_000_000_000);
    format!("{seconds}.{nanos:09}")
}

/// Docker's `t`: whole seconds, rounded up.
fn grace_seconds(grace: Duration) -> i32 {
    let seconds = grace.as_secs() + u64::from(grace.subsec_nanos() > 0);
    i32::try_from(seconds).unwrap_or(i32::MAX)
}

#[async_trait::async_trait]
impl ContainerRuntime for DockerRuntime {
    async fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let request = VolumeCreateRequest {
            name: Some(name.to_owned()),
            labels: Some(
                labels
                    .iter()
                    .map(|(key, value)| (key.clone(), value.clone()))
                    .collect(),
            ),
            ..Default::default()
        };
        self.docker
            .create_volume(request)
            .await
            .map(drop)
            .map_err(|error| self.error("volume create", error))
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        let options = CreateContainerOptionsBuilder::default()
            .name(&spec.name)
            .build();
        match self
            .docker
            .create_container(Some(options), create_body(spec))
            .await
        {
            Ok(response) => Ok(ContainerId(response.id)),
            Err(error) if status(&error) == Some(404) => {
                Err(RuntimeError::NoSuchImage(spec.image.clone()))
            }
            Err(error) => Err(self.error("create", error)),
        }
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        match self.docker.start_container(&id.0, None).await {
            Ok(()) => Ok(()),
            Err(error) if status(&error) == Some(404) => {
                Err(RuntimeError::NoSuchContainer(id.0.clone()))
            }
            Err(error) => Err(self.error("start", error)),
        }
    }

    async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerState>, RuntimeError> {
        Ok(self.inspect_raw(&id.0).await?.map(container_state))
    }

    async fn stop(&self, id: &ContainerId, grace: Duration) -> Result<(), RuntimeError> {
        let options = StopContainerOptionsBuilder::default()
            .t(grace_seconds(grace))
            .build();
        // The engine answers once the container is gone, after up to `grace`.
        let docker = self
            .docker
            .clone()
            .with_timeout(grace + Duration::from_secs(CALL_TIMEOUT_SECS));
        // bollard takes 304 (already stopped) for success.
        match docker.stop_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            Err(error) if status(&error) == Some(404) => {
                Err(RuntimeError::NoSuchContainer(id.0.clone()))
            }
            Err(error) => Err(self.error("stop", error)),
        }
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let options = RemoveContainerOptionsBuilder::default()
            .force(true)
            .v(false)
            .build();
        match self.docker.remove_container(&id.0, Some(options)).await {
            Ok(()) => Ok(()),
            Err(error) if status(&error) == Some(404) => Ok(()),
            // Someone else is removing it already.
            Err(DockerError::DockerResponseServerError {
                status_code: 409,
                message,
            }) if message.contains("already in progress") => Ok(()),
            Err(error) => Err(self.error("remove", error)),
        }
    }

    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerState>, RuntimeError> {
        let filters = HashMap::from([("label", vec![format!("{key}={value}")])]);
        let options = ListContainersOptionsBuilder::default()
            .all(true)
            .filters(&filters)
            .build();
        let summaries = self
            .docker
            .list_containers(Some(options))
            .await
            .map_err(|error| self.error("list", error))?;
        let mut states = Vec::with_capacity(summaries.len());
        for summary in summaries {
            let Some(id) = summary.id else { continue };
            // Gone between the list and now: not ours to report.
            if let Some(response) = self.inspect_raw(&id).await? {
                states.push(container_state(response));
            }
        }
        Ok(states)
    }

    fn events(
        &self,
        key: &str,
        value: &str,
    ) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let filters = HashMap::from([
            ("type", vec!["container".to_owned()]),
            ("label", vec![format!("{key}={value}")]),
            (
                "event",
                vec!["start".to_owned(), "die".to_owned(), "destroy".to_owned()],
            ),
        ]);
        // The request goes out on the first poll; `since` makes the engine
        // replay what happened between this call and then.
        let options = EventsOptionsBuilder::default()
            .since(&since_now())
            .filters(&filters)
            .build();
        let docker = self.docker.clone();
        let socket = self.socket.clone();
        docker
            .events(Some(options))
            .filter_map(move |item| {
                let mapped = match item {
                    Ok(message) => container_event(message).map(Ok),
                    Err(error) => Some(Err(map_error(&socket, "events", error))),
                };
                futures_util::future::ready(mapped)
            })
            .boxed()
    }
}

#[cfg(test)]
mod tests {
    use bollard::models::{ContainerConfig, ContainerState as DockerState, EventActor};

    use super::*;
    use crate::runtime::VolumeMount;

    fn spec() -> ContainerSpec {
        ContainerSpec {
            name: "gpuwarden-s1".to_owned(),
            image: "busybox".to_owned(),
            command: Vec::new(),
            env: BTreeMap::from([("NVIDIA_VISIBLE_DEVICES".to_owned(), "GPU-x".to_owned())]),
            labels: BTreeMap::from([("dev.gpuwarden.session".to_owned(), "s1".to_owned())]),
            volumes: vec![VolumeMount {
                volume: "acct-data".to_owned(),
                target: "/data".to_owned(),
                read_only: true,
            }],
            devices: DeviceRequest::Devices {
                driver: "nvidia".to_owned(),
                device_ids: vec!["GPU-x".to_owned()],
                capabilities: vec!["gpu".to_owned()],
            },
            network: Network::None,
            pids_limit: 256,
        }
    }

    #[test]
    fn the_create_body_carries_the_spec_and_the_hardening() {
        let body = create_body(&spec());
        assert_eq!(body.cmd, None);
        assert_eq!(body.env.unwrap(), ["NVIDIA_VISIBLE_DEVICES=GPU-x"]);
        let host = body.host_config.unwrap();
        assert_eq!(host.privileged, Some(false));
        assert_eq!(host.network_mode.as_deref(), Some("none"));
        assert_eq!(host.security_opt.unwrap(), [NO_NEW_PRIVILEGES]);
        assert_eq!(host.pids_limit, Some(256));
        assert_eq!(host.binds, None);
        assert_eq!(host.cap_add, None);
        let mounts = host.mounts.unwrap();
        assert_eq!(mounts[0].typ, Some(MountType::VOLUME));
        assert_eq!(mounts[0].source.as_deref(), Some("acct-data"));
        assert_eq!(mounts[0].read_only, Some(true));
        let requests = host.device_requests.unwrap();
        assert_eq!(requests[0].capabilities, Some(vec![vec!["gpu".to_owned()]]));
        assert_eq!(requests[0].count, None);

        let mut plain = spec();
        plain.devices = DeviceRequest::None;
        plain.command = vec!["true".to_owned()];
        let body = create_body(&plain);
        assert_eq!(body.cmd.unwrap(), ["true"]);
        assert_eq!(body.host_config.unwrap().device_requests, None);
    }

    #[test]
    fn a_finished_container_reports_its_exit_code_and_a_running_one_does_not() {
        let response = |running: bool| ContainerInspectResponse {
            id: Some("abc".to_owned()),
            name: Some("/gpuwarden-s1".to_owned()),
            state: Some(DockerState {
                running: Some(running),
                started_at: Some("2026-01-01T00:00:00.5Z".to_owned()),
                finished_at: Some("2026-01-01T00:01:00Z".to_owned()),
                exit_code: Some(3),
                ..Default::default()
            }),
            config: Some(ContainerConfig {
                labels: Some(HashMap::from([("k".to_owned(), "v".to_owned())])),
                ..Default::default()
            }),
            ..Default::default()
        };
        let done = container_state(response(false));
        assert_eq!(done.name, "gpuwarden-s1");
        assert_eq!(done.exit_code, Some(3));
        assert!(done.finished_at > done.started_at);
        assert_eq!(done.labels["k"], "v");
        let mut early = response(false);
        if let Some(state) = early.state.as_mut() {
            state.started_at = Some("2026-01-01T00:00:00.002Z".to_owned());
            state.finished_at = Some("2026-01-01T00:00:00.001Z".to_owned());
        }
        let early = container_state(early);
        assert_eq!(early.finished_at, early.started_at);
        assert!(early.finished_at.is_some());
        let running = container_state(response(true));
        assert_eq!(running.finished_at, None);
        assert_eq!(running.exit_code, None);

        let never = container_state(ContainerInspectResponse {
            state: Some(DockerState {
                running: Some(false),
                started_at: Some("0001-01-01T00:00:00Z".to_owned()),
                finished_at: Some("0001-01-01T00:00:00Z".to_owned()),
                exit_code: Some(0),
                ..Default::default()
            }),
            ..Default::default()
        });
        assert_eq!((never.started_at, never.exit_code), (None, None));
    }

    #[test]
    fn events_keep_labels_and_drop_the_engine_attributes() {
        let message = |action: &str| EventMessage {
            typ: Some(EventMessageTypeEnum::CONTAINER),
            action: Some(action.to_owned()),
            actor: Some(EventActor {
                id: Some("abc".to_owned()),
                attributes: Some(HashMap::from([
                    ("exitCode".to_owned(), "0".to_owned()),
                    ("image".to_owned(), "busybox".to_owned()),
                    ("name".to_owned(), "gpuwarden-s1".to_owned()),
                    ("dev.gpuwarden.session".to_owned(), "s1".to_owned()),
                ])),
            }),
            time: Some(12),
            time_nano: Some(12_000_000_345),
            ..Default::default()
        };
        let event = container_event(message("die")).unwrap();
        assert_eq!(event.kind, ContainerEventKind::Die);
        assert_eq!(event.at, UnixNanos(12_000_000_345));
        assert_eq!(
            event.labels,
            BTreeMap::from([("dev.gpuwarden.session".to_owned(), "s1".to_owned())])
        );
        assert_eq!(container_event(message("create")), None);
        let mut seconds_only = message("start");
        seconds_only.time_nano = None;
        assert_eq!(
            container_event(seconds_only).unwrap().at,
            UnixNanos(12_000_000_000)
        );
    }

    #[test]
    fn grace_rounds_up_to_whole_seconds() {
        assert_eq!(grace_seconds(Duration::ZERO), 0);
        assert_eq!(grace_seconds(Duration::from_millis(1500)), 2);
        assert_eq!(grace_seconds(Duration::from_secs(10)), 10);
        assert!(since_now().contains('.'));
    }
}
