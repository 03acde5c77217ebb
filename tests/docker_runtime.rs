#![allow(clippy::unwrap_used)]
//! `DockerRuntime` against the real Docker engine at /var/run/docker.sock,
//! with the busybox image named by `GPUWARDEN_TEST_IMAGE`.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime};

use bollard::query_parameters::RemoveVolumeOptionsBuilder;
use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use gpuwarden::clock::UnixNanos;
use gpuwarden::runtime::docker::DockerRuntime;
use gpuwarden::runtime::{
    ContainerEvent, ContainerEventKind, ContainerId, ContainerRuntime, ContainerSpec,
    ContainerState, DeviceRequest, Network, RuntimeError, VolumeMount, labels,
};

const SOCKET: &str = "/var/run/docker.sock";
const DEADLINE: Duration = Duration::from_secs(20);
const DEVICES: &str = "GPU-x,MIG-y";

fn image() -> String {
    std::env::var("GPUWARDEN_TEST_IMAGE")
        .unwrap_or_else(|_| "gpuwarden-test/busybox:latest".to_owned())
}

async fn runtime() -> DockerRuntime {
    DockerRuntime::connect(Path::new(SOCKET)).await.unwrap()
}

fn unique(prefix: &str) -> String {
    format!("gpuwarden-test-{prefix}-{}", uuid::Uuid::new_v4())
}

fn shell(script: &str) -> Vec<String> {
    vec!["sh".to_owned(), "-c".to_owned(), script.to_owned()]
}

fn spec(prefix: &str, command: Vec<String>, session: &str) -> ContainerSpec {
    ContainerSpec {
        name: unique(prefix),
        image: image(),
        command,
        env: BTreeMap::from([("NVIDIA_VISIBLE_DEVICES".to_owned(), DEVICES.to_owned())]),
        labels: BTreeMap::from([
            (labels::SESSION.to_owned(), session.to_owned()),
            (labels::NODE.to_owned(), "test-node".to_owned()),
        ]),
        volumes: Vec::new(),
        devices: DeviceRequest::None,
        network: Network::None,
        pids_limit: 128,
    }
}

/// What a test created; whatever is left when it is dropped (a failed
/// assertion) is removed with the docker CLI.
#[derive(Default)]
struct Cleanup {
    containers: Vec<ContainerId>,
    volumes: Vec<String>,
}

impl Cleanup {
    async fn create(&mut self, runtime: &DockerRuntime, spec: &ContainerSpec) -> ContainerId {
        let id = runtime.create(spec).await.unwrap();
        self.containers.push(id.clone());
        id
    }

    /// Removes everything through the runtime, asserting it worked.
    async fn finish(mut self, runtime: &DockerRuntime) {
        for id in std::mem::take(&mut self.containers) {
            runtime.remove(&id).await.unwrap();
            assert_eq!(runtime.inspect(&id).await.unwrap(), None);
        }
        for volume in std::mem::take(&mut self.volumes) {
            let options = RemoveVolumeOptionsBuilder::default().force(true).build();
            runtime
                .docker()
                .remove_volume(&volume, Some(options))
                .await
                .unwrap();
        }
    }
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        for id in &self.containers {
            let _ = Command::new("docker").args(["rm", "-f", &id.0]).output();
        }
        for volume in &self.volumes {
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f", volume])
                .output();
        }
    }
}

/// Polls inspect until the container has finished, for at most
/// [`DEADLINE`].
async fn wait_finished(runtime: &DockerRuntime, id: &ContainerId) -> ContainerState {
    let deadline = Instant::now() + DEADLINE;
    loop {
        let state = runtime.inspect(id).await.unwrap().unwrap();
        if state.finished_at.is_some() {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "{id} still running after {DEADLINE:?}: {state:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn next_event(
    events: &mut BoxStream<'static, Result<ContainerEvent, RuntimeError>>,
) -> ContainerEvent {
    tokio::time::timeout(DEADLINE, events.next())
        .await
        .expect("no event within the deadline")
        .expect("the event stream ended")
        .unwrap()
}

#[tokio::test]
async fn a_started_container_is_running_labelled_and_hardened() {
    let runtime = runtime().await;
    let mut cleanup = Cleanup::default();
    let session = uuid::Uuid::new_v4().to_string();
    let mut spec = spec(
        "run",
        shell("echo \"$NVIDIA_VISIBLE_DEVICES\"; sleep 30"),
        &session,
    );
    spec.network = Network::Bridge;
    let created_at = UnixNanos::from_system_time(SystemTime::now());
    let id = cleanup.create(&runtime, &spec).await;

    let created = runtime.inspect(&id).await.unwrap().unwrap();
    assert!(!created.running);
    assert_eq!(
        (created.started_at, created.finished_at, created.exit_code),
        (None, None, None)
    );

    runtime.start(&id).await.unwrap();
    let state = runtime.inspect(&id).await.unwrap().unwrap();
    assert_eq!(state.id, id);
    assert_eq!(state.name, spec.name);
    assert!(state.running);
    let started_at = state.started_at.unwrap();
    // Docker's clock is this host's: allow for a little skew in rounding.
    assert!(started_at.0 > created_at.0 - 1_000_000_000);
    assert_eq!(state.finished_at, None);
    assert_eq!(state.exit_code, None);
    assert_eq!(state.labels[labels::SESSION], session);
    assert_eq!(state.labels[labels::NODE], "test-node");

    let raw = runtime
        .docker()
        .inspect_container(&id.0, None)
        .await
        .unwrap();
    let host = raw.host_config.unwrap();
    assert_eq!(host.privileged, Some(false));
    assert!(
        host.security_opt
            .unwrap_or_default()
            .iter()
            .any(|opt| opt.starts_with("no-new-privileges")),
    );
    assert_eq!(host.pids_limit, Some(128));
    assert!(host.cap_add.unwrap_or_default().is_empty());
    assert!(host.binds.unwrap_or_default().is_empty());
    assert_eq!(host.network_mode.as_deref(), Some("bridge"));
    assert!(host.device_requests.unwrap_or_default().is_empty());
    let config = raw.config.unwrap();
    assert!(
        config
            .env
            .unwrap()
            .contains(&format!("NVIDIA_VISIBLE_DEVICES={DEVICES}"))
    );
    assert_eq!(config.cmd.unwrap(), spec.command);

    cleanup.finish(&runtime).await;
}

#[tokio::test]
async fn the_container_sees_its_devices_variable() {
    let runtime = runtime().await;
    let mut cleanup = Cleanup::default();
    let session = uuid::Uuid::new_v4().to_string();
    let check = shell(&format!("test \"$NVIDIA_VISIBLE_DEVICES\" = \"{DEVICES}\""));

    let right = cleanup
        .create(&runtime, &spec("env-right", check.clone(), &session))
        .await;
    let mut wrong_spec = spec("env-wrong", check, &session);
    wrong_spec
        .env
        .insert("NVIDIA_VISIBLE_DEVICES".to_owned(), "GPU-z".to_owned());
    let wrong = cleanup.create(&runtime, &wrong_spec).await;
    runtime.start(&right).await.unwrap();
    runtime.start(&wrong).await.unwrap();

    let right = wait_finished(&runtime, &right).await;
    let wrong = wait_finished(&runtime, &wrong).await;
    assert_eq!(right.exit_code, Some(0));
    assert_eq!(wrong.exit_code, Some(1));
    assert!(!right.running);
    assert!(right.finished_at >= right.started_at);

    cleanup.finish(&runtime).await;
}

#[tokio::test]
async fn stop_and_remove_are_idempotent() {
    let runtime = runtime().await;
    let mut cleanup = Cleanup::default();
    let session = uuid::Uuid::new_v4().to_string();
    // `sleep` as pid 1 ignores SIGTERM: stop has to kill it after the grace.
    let id = cleanup
        .create(
            &runtime,
            &spec("stop", vec!["sleep".to_owned(), "30".to_owned()], &session),
        )
        .await;
    runtime.start(&id).await.unwrap();

    let asked = Instant::now();
    runtime.stop(&id, Duration::from_secs(1)).await.unwrap();
    assert!(asked.elapsed() < Duration::from_secs(15));
    let state = runtime.inspect(&id).await.unwrap().unwrap();
    assert!(!state.running);
    let (started, finished) = (state.started_at.unwrap(), state.finished_at.unwrap());
    assert!(finished >= started, "{state:?}");
    assert_eq!(state.exit_code, Some(137));

    runtime.stop(&id, Duration::from_secs(1)).await.unwrap();
    assert_eq!(runtime.inspect(&id).await.unwrap().unwrap(), state);

    runtime.remove(&id).await.unwrap();
    assert_eq!(runtime.inspect(&id).await.unwrap(), None);
    runtime.remove(&id).await.unwrap();
    assert!(matches!(
        runtime.stop(&id, Duration::ZERO).await,
        Err(RuntimeError::NoSuchContainer(missing)) if missing == id.0
    ));
    assert!(matches!(
        runtime.start(&id).await,
        Err(RuntimeError::NoSuchContainer(_))
    ));

    cleanup.finish(&runtime).await;
}

#[tokio::test]
async fn a_missing_image_is_reported_and_not_pulled() {
    let runtime = runtime().await;
    let mut spec = spec("noimage", Vec::new(), "none");
    spec.image = format!("gpuwarden-test/missing-{}:latest", uuid::Uuid::new_v4());
    match runtime.create(&spec).await {
        Err(RuntimeError::NoSuchImage(image)) => assert_eq!(image, spec.image),
        other => panic!("expected NoSuchImage, got {other:?}"),
    }
    assert!(
        runtime
            .list_labelled(labels::SESSION, "none")
            .await
            .unwrap()
            .iter()
            .all(|state| state.name != spec.name)
    );
}

#[tokio::test]
async fn an_unreachable_engine_is_reported() {
    let socket = std::env::temp_dir().join(format!("no-docker-{}.sock", uuid::Uuid::new_v4()));
    assert!(matches!(
        DockerRuntime::connect(&socket).await,
        Err(RuntimeError::Unreachable { .. })
    ));
}

#[tokio::test]
async fn events_follow_start_die_and_destroy_of_labelled_containers_only() {
    let runtime = runtime().await;
    let mut cleanup = Cleanup::default();
    let session = uuid::Uuid::new_v4().to_string();
    // Not polled before the containers start: events from the subscription
    // on must still arrive.
    let mut events = runtime.events(labels::SESSION, &session);

    let other = cleanup
        .create(
            &runtime,
            &spec("events-other", vec!["true".to_owned()], "someone-else"),
        )
        .await;
    runtime.start(&other).await.unwrap();
    let ours = spec("events", vec!["true".to_owned()], &session);
    let id = cleanup.create(&runtime, &ours).await;
    runtime.start(&id).await.unwrap();

    let start = next_event(&mut events).await;
    assert_eq!((&start.id, start.kind), (&id, ContainerEventKind::Start));
    assert_eq!(start.labels, ours.labels);
    let die = next_event(&mut events).await;
    assert_eq!((&die.id, die.kind), (&id, ContainerEventKind::Die));
    assert!(die.at >= start.at);

    let state = wait_finished(&runtime, &id).await;
    assert_eq!(state.exit_code, Some(0));
    // The engine stamps the start event as it records StartedAt.
    let skew = start.at.0 - state.started_at.unwrap().0;
    assert!(skew.abs() < 1_000_000_000, "{start:?} vs {state:?}");

    runtime.remove(&id).await.unwrap();
    let destroy = next_event(&mut events).await;
    assert_eq!(
        (&destroy.id, destroy.kind),
        (&id, ContainerEventKind::Destroy)
    );
    assert_eq!(destroy.labels, ours.labels);

    cleanup.finish(&runtime).await;
}

#[tokio::test]
async fn list_labelled_finds_exactly_the_labelled_containers() {
    let runtime = runtime().await;
    let mut cleanup = Cleanup::default();
    let (mine, theirs) = (
        uuid::Uuid::new_v4().to_string(),
        uuid::Uuid::new_v4().to_string(),
    );
    let a = cleanup
        .create(&runtime, &spec("list-a", vec!["true".to_owned()], &mine))
        .await;
    let b = cleanup
        .create(&runtime, &spec("list-b", vec!["true".to_owned()], &mine))
        .await;
    let c = cleanup
        .create(&runtime, &spec("list-c", vec!["true".to_owned()], &theirs))
        .await;
    runtime.start(&a).await.unwrap();
    let a_state = wait_finished(&runtime, &a).await;

    let listed = runtime.list_labelled(labels::SESSION, &mine).await.unwrap();
    let ids: BTreeSet<_> = listed.iter().map(|state| state.id.clone()).collect();
    assert_eq!(ids, BTreeSet::from([a.clone(), b.clone()]));
    for state in &listed {
        if state.id == a {
            assert_eq!(state, &a_state);
        } else {
            assert_eq!((state.running, state.started_at), (false, None));
        }
    }
    let listed = runtime
        .list_labelled(labels::SESSION, &theirs)
        .await
        .unwrap();
    assert_eq!(
        listed.iter().map(|state| &state.id).collect::<Vec<_>>(),
        [&c]
    );
    let nobody = uuid::Uuid::new_v4().to_string();
    assert!(
        runtime
            .list_labelled(labels::SESSION, &nobody)
            .await
            .unwrap()
            .is_empty()
    );

    cleanup.finish(&runtime).await;
}

#[tokio::test]
async fn a_named_volume_outlives_its_containers() {
    let runtime = runtime().await;
    let mut cleanup = Cleanup::default();
    let session = uuid::Uuid::new_v4().to_string();
    let volume = unique("vol");
    let volume_labels = BTreeMap::from([(labels::VOLUME_OWNER.to_owned(), "acct-1".to_owned())]);
    cleanup.volumes.push(volume.clone());
    runtime
        .ensure_volume(&volume, &volume_labels)
        .await
        .unwrap();
    runtime
        .ensure_volume(&volume, &volume_labels)
        .await
        .unwrap();
    let inspected = runtime.docker().inspect_volume(&volume).await.unwrap();
    assert_eq!(inspected.labels[labels::VOLUME_OWNER], "acct-1");

    let mount = |read_only| VolumeMount {
        volume: volume.clone(),
        target: "/data".to_owned(),
        read_only,
    };
    let mut writer = spec("vol-write", shell("echo hello > /data/file"), &session);
    writer.volumes = vec![mount(false)];
    let writer = cleanup.create(&runtime, &writer).await;
    runtime.start(&writer).await.unwrap();
    assert_eq!(wait_finished(&runtime, &writer).await.exit_code, Some(0));
    runtime.remove(&writer).await.unwrap();

    let mut reader = spec(
        "vol-read",
        shell("test \"$(cat /data/file)\" = hello && ! touch /data/other 2>/dev/null"),
        &session,
    );
    reader.volumes = vec![mount(true)];
    let reader = cleanup.create(&runtime, &reader).await;
    runtime.start(&reader).await.unwrap();
    assert_eq!(wait_finished(&runtime, &reader).await.exit_code, Some(0));

    cleanup.finish(&runtime).await;
}
