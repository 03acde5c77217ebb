//! An in-memory [`ContainerRuntime`] for unit tests of the session code: it
//! records every call, answers like Docker does (ids `fake-1`, `fake-2`, ...,
//! idempotent stop and remove, `None` for a missing container), lets a test
//! script failures, drive time, make containers exit or vanish, and emits
//! start, die and destroy events to the streams from
//! [`ContainerRuntime::events`].

use std::collections::{BTreeMap, BTreeSet, HashMap, VecDeque};
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use futures_util::StreamExt;
use futures_util::stream::BoxStream;
use tokio::sync::broadcast;

use super::{
    ContainerEvent, ContainerEventKind, ContainerId, ContainerRuntime, ContainerSpec,
    ContainerState, RuntimeError,
};
use crate::clock::UnixNanos;

/// Where the fake's clock starts: 2023-11-14T22:13:20Z.
const START: UnixNanos = UnixNanos(1_700_000_000_000_000_000);

/// How many events a slow subscriber may fall behind before it gets an
/// error.
const EVENT_BUFFER: usize = 1024;

/// One call to the fake, in the order they came.
// Unboxed, so tests can match `FakeCall::Create(spec)` directly.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    EnsureVolume(String),
    Create(Box<ContainerSpec>),
    Start(ContainerId),
    Inspect(ContainerId),
    Stop(ContainerId),
    Remove(ContainerId),
    List,
}

impl FakeCall {
    pub fn kind(&self) -> FakeCallKind {
        match self {
            Self::EnsureVolume(_) => FakeCallKind::EnsureVolume,
            Self::Create(_) => FakeCallKind::Create,
            Self::Start(_) => FakeCallKind::Start,
            Self::Inspect(_) => FakeCallKind::Inspect,
            Self::Stop(_) => FakeCallKind::Stop,
            Self::Remove(_) => FakeCallKind::Remove,
            Self::List => FakeCallKind::List,
        }
    }
}

/// Which call a scripted failure applies to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum FakeCallKind {
    EnsureVolume,
    Create,
    Start,
    Inspect,
    Stop,
    Remove,
    List,
}

#[derive(Debug)]
struct Container {
    spec: ContainerSpec,
    state: ContainerState,
}

#[derive(Debug)]
struct Inner {
    next_id: u64,
    now: UnixNanos,
    stop_exit_code: i64,
    /// The exit code of a container whose main process ends as soon as it
    /// starts, for the next start only.
    exit_on_start: Option<i64>,
    containers: BTreeMap<ContainerId, Container>,
    volumes: BTreeMap<String, BTreeMap<String, String>>,
    missing_images: BTreeSet<String>,
    calls: Vec<FakeCall>,
    failures: HashMap<FakeCallKind, VecDeque<RuntimeError>>,
    /// The next start waits for this before it does anything (recorded
    /// already), as a slow engine would.
    held_start: Option<tokio::sync::oneshot::Receiver<()>>,
    events: broadcast::Sender<ContainerEvent>,
}

impl Inner {
    /// Records `call` and hands out the failure scripted for it, if any.
    fn call(&mut self, call: FakeCall) -> Result<(), RuntimeError> {
        let kind = call.kind();
        self.calls.push(call);
        match self.failures.get_mut(&kind).and_then(VecDeque::pop_front) {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    fn emit(&self, id: &ContainerId, kind: ContainerEventKind, at: UnixNanos) {
        let Some(container) = self.containers.get(id) else {
            return;
        };
        // No subscriber is not an error.
        let _ = self.events.send(ContainerEvent {
            id: id.clone(),
            kind,
            at,
            labels: container.state.labels.clone(),
        });
    }

    /// Ends a running container's main process at `at`; false when it was
    /// not running.
    fn finish(&mut self, id: &ContainerId, code: i64, at: UnixNanos) -> bool {
        let Some(container) = self.containers.get_mut(id) else {
            return false;
        };
        if !container.state.running {
            return false;
        }
        container.state.running = false;
        container.state.finished_at = Some(at);
        container.state.exit_code = Some(code);
        self.emit(id, ContainerEventKind::Die, at);
        true
    }
}

/// The in-memory container engine. Safe to share between tasks; its lock is
/// never held across an await.
#[derive(Debug)]
pub struct FakeRuntime {
    inner: Mutex<Inner>,
}

impl Default for FakeRuntime {
    fn default() -> Self {
        Self::new()
    }
}

impl FakeRuntime {
    pub fn new() -> Self {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        Self {
            inner: Mutex::new(Inner {
                next_id: 1,
                now: START,
                stop_exit_code: 137,
                exit_on_start: None,
                containers: BTreeMap::new(),
                volumes: BTreeMap::new(),
                missing_images: BTreeSet::new(),
                calls: Vec::new(),
                failures: HashMap::new(),
                held_start: None,
                events,
            }),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Every call so far, oldest first.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// Forgets the calls recorded so far.
    pub fn clear_calls(&self) {
        self.lock().calls.clear();
    }

    /// The next call of `call`'s kind is recorded and answers `error`, doing
    /// nothing. Several failures for one kind are handed out in order.
    pub fn fail_next(&self, call: FakeCallKind, error: RuntimeError) {
        self.lock()
            .failures
            .entry(call)
            .or_default()
            .push_back(error);
    }

    pub fn fail_next_create(&self, error: RuntimeError) {
        self.fail_next(FakeCallKind::Create, error);
    }

    pub fn fail_next_start(&self, error: RuntimeError) {
        self.fail_next(FakeCallKind::Start, error);
    }

    /// The next start is recorded, then waits until the returned sender
    /// is used (or dropped) before it starts the container: an engine call
    /// that takes as long as the test wants.
    pub fn hold_next_start(&self) -> tokio::sync::oneshot::Sender<()> {
        let (release, held) = tokio::sync::oneshot::channel();
        self.lock().held_start = Some(held);
        release
    }

    /// The fake's "now": what start and stop record.
    pub fn now(&self) -> UnixNanos {
        self.lock().now
    }

    pub fn set_now(&self, now: UnixNanos) {
        self.lock().now = now;
    }

    /// Moves "now" forward by `by`.
    pub fn advance(&self, by: Duration) {
        let by = i64::try_from(by.as_nanos()).unwrap_or(i64::MAX);
        let mut inner = self.lock();
        inner.now = UnixNanos(inner.now.0.saturating_add(by));
    }

    /// The exit code `stop` gives a running container (137 unless set:
    /// killed after the grace period).
    pub fn set_stop_exit_code(&self, code: i64) {
        self.lock().stop_exit_code = code;
    }

    /// The next container started exits with `code` at the instant it
    /// starts (a command that fails at once): a start and a die event.
    pub fn exit_next_on_start(&self, code: i64) {
        self.lock().exit_on_start = Some(code);
    }

    /// Creating a container from `image` fails with
    /// [`RuntimeError::NoSuchImage`] from now on.
    pub fn remove_image(&self, image: &str) {
        self.lock().missing_images.insert(image.to_owned());
    }

    /// The container's main process exits by itself with `code` at `at`: a
    /// die event follows. False when the container is not running.
    pub fn exit(&self, id: &ContainerId, code: i64, at: UnixNanos) -> bool {
        self.lock().finish(id, code, at)
    }

    /// The container disappears without any event, as when it is removed
    /// while nobody listens. False when there was none.
    pub fn vanish(&self, id: &ContainerId) -> bool {
        self.lock().containers.remove(id).is_some()
    }

    /// Ends every event stream handed out so far, as when the engine
    /// restarts; later `events` calls get a working stream again.
    pub fn disconnect_events(&self) {
        let (events, _) = broadcast::channel(EVENT_BUFFER);
        self.lock().events = events;
    }

    /// Every container that exists, by id.
    pub fn containers(&self) -> Vec<ContainerState> {
        self.lock()
            .containers
            .values()
            .map(|container| container.state.clone())
            .collect()
    }

    /// The spec a container was created from.
    pub fn spec(&self, id: &ContainerId) -> Option<ContainerSpec> {
        self.lock()
            .containers
            .get(id)
            .map(|container| container.spec.clone())
    }

    /// The volumes ensured so far, with the labels they were created with.
    pub fn volumes(&self) -> BTreeMap<String, BTreeMap<String, String>> {
        self.lock().volumes.clone()
    }
}

#[async_trait::async_trait]
impl ContainerRuntime for FakeRuntime {
    async fn ensure_volume(
        &self,
        name: &str,
        labels: &BTreeMap<String, String>,
    ) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.call(FakeCall::EnsureVolume(name.to_owned()))?;
        inner
            .volumes
            .entry(name.to_owned())
            .or_insert_with(|| labels.clone());
        Ok(())
    }

    async fn create(&self, spec: &ContainerSpec) -> Result<ContainerId, RuntimeError> {
        let mut inner = self.lock();
        inner.call(FakeCall::Create(Box::new(spec.clone())))?;
        if inner.missing_images.contains(&spec.image) {
            return Err(RuntimeError::NoSuchImage(spec.image.clone()));
        }
        if inner
            .containers
            .values()
            .any(|container| container.state.name == spec.name)
        {
            return Err(RuntimeError::Engine {
                call: "create",
                detail: format!(
                    "409: Conflict. The container name \"/{}\" is already in use",
                    spec.name
                ),
            });
        }
        let id = ContainerId(format!("fake-{}", inner.next_id));
        inner.next_id += 1;
        let state = ContainerState {
            id: id.clone(),
            name: spec.name.clone(),
            labels: spec.labels.clone(),
            running: false,
            started_at: None,
            finished_at: None,
            exit_code: None,
        };
        inner.containers.insert(
            id.clone(),
            Container {
                spec: spec.clone(),
                state,
            },
        );
        Ok(id)
    }

    async fn start(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let held = {
            let mut inner = self.lock();
            inner.call(FakeCall::Start(id.clone()))?;
            inner.held_start.take()
        };
        if let Some(held) = held {
            let _ = held.await;
        }
        let mut inner = self.lock();
        let now = inner.now;
        let container = inner
            .containers
            .get_mut(id)
            .ok_or_else(|| RuntimeError::NoSuchContainer(id.0.clone()))?;
        if container.state.running {
            return Ok(());
        }
        container.state.running = true;
        container.state.started_at = Some(now);
        container.state.finished_at = None;
        container.state.exit_code = None;
        inner.emit(id, ContainerEventKind::Start, now);
        if let Some(code) = inner.exit_on_start.take() {
            inner.finish(id, code, now);
        }
        Ok(())
    }

    async fn inspect(&self, id: &ContainerId) -> Result<Option<ContainerState>, RuntimeError> {
        let mut inner = self.lock();
        inner.call(FakeCall::Inspect(id.clone()))?;
        Ok(inner
            .containers
            .get(id)
            .map(|container| container.state.clone()))
    }

    async fn stop(&self, id: &ContainerId, _grace: Duration) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.call(FakeCall::Stop(id.clone()))?;
        if !inner.containers.contains_key(id) {
            return Err(RuntimeError::NoSuchContainer(id.0.clone()));
        }
        let (code, now) = (inner.stop_exit_code, inner.now);
        inner.finish(id, code, now);
        Ok(())
    }

    async fn remove(&self, id: &ContainerId) -> Result<(), RuntimeError> {
        let mut inner = self.lock();
        inner.call(FakeCall::Remove(id.clone()))?;
        let now = inner.now;
        // A forced remove kills a running container first.
        inner.finish(id, 137, now);
        inner.emit(id, ContainerEventKind::Destroy, now);
        inner.containers.remove(id);
        Ok(())
    }

    async fn list_labelled(
        &self,
        key: &str,
        value: &str,
    ) -> Result<Vec<ContainerState>, RuntimeError> {
        let mut inner = self.lock();
        inner.call(FakeCall::List)?;
        Ok(inner
            .containers
            .values()
            .filter(|container| container.state.labels.get(key).map(String::as_str) == Some(value))
            .map(|container| container.state.clone())
            .collect())
    }

    fn events(
        &self,
        key: &str,
        value: &str,
    ) -> BoxStream<'static, Result<ContainerEvent, RuntimeError>> {
        let receiver = self.lock().events.subscribe();
        let (key, value) = (key.to_owned(), value.to_owned());
        futures_util::stream::unfold(receiver, move |mut receiver| {
            let (key, value) = (key.clone(), value.clone());
            async move {
                loop {
                    match receiver.recv().await {
                        Ok(event) => {
                            if event.labels.get(&key) == Some(&value) {
                                return Some((Ok(event), receiver));
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(missed)) => {
                            let error = RuntimeError::Engine {
                                call: "events",
                                detail: format!("the subscriber fell {missed} events behind"),
                            };
                            return Some((Err(error), receiver));
                        }
                        Err(broadcast::error::RecvError::Closed) => return None,
                    }
                }
            }
        })
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    use futures_util::FutureExt;

    use super::*;
    use crate::runtime::{DeviceRequest, Network};

    fn spec(name: &str, session: &str) -> ContainerSpec {
        ContainerSpec {
            name: name.to_owned(),
            image: "busybox".to_owned(),
            command: Vec::new(),
            env: BTreeMap::new(),
            labels: BTreeMap::from([(
                crate::runtime::labels::SESSION.to_owned(),
                session.to_owned(),
            )]),
            volumes: Vec::new(),
            devices: DeviceRequest::None,
            network: Network::None,
            pids_limit: 64,
        }
    }

    const SESSION: &str = crate::runtime::labels::SESSION;

    #[tokio::test]
    async fn a_container_lives_and_dies_with_events_and_recorded_calls() {
        let fake = FakeRuntime::default();
        let mut events = fake.events(SESSION, "s1");
        let mut others = fake.events(SESSION, "s2");

        let id = fake.create(&spec("a", "s1")).await.unwrap();
        assert_eq!(id, ContainerId("fake-1".to_owned()));
        fake.set_now(UnixNanos(10));
        fake.start(&id).await.unwrap();
        let state = fake.inspect(&id).await.unwrap().unwrap();
        assert!(state.running);
        assert_eq!(state.started_at, Some(UnixNanos(10)));

        fake.advance(Duration::from_nanos(5));
        fake.stop(&id, Duration::from_secs(1)).await.unwrap();
        fake.stop(&id, Duration::from_secs(1)).await.unwrap();
        let state = fake.inspect(&id).await.unwrap().unwrap();
        assert!(!state.running);
        assert_eq!(state.finished_at, Some(UnixNanos(15)));
        assert_eq!(state.exit_code, Some(137));

        fake.remove(&id).await.unwrap();
        fake.remove(&id).await.unwrap();
        assert_eq!(fake.inspect(&id).await.unwrap(), None);

        let kinds: Vec<_> = [0, 1, 2]
            .iter()
            .map(|_| events.next().now_or_never().unwrap().unwrap().unwrap())
            .map(|event| (event.kind, event.at))
            .collect();
        assert_eq!(
            kinds,
            [
                (ContainerEventKind::Start, UnixNanos(10)),
                (ContainerEventKind::Die, UnixNanos(15)),
                (ContainerEventKind::Destroy, UnixNanos(15)),
            ]
        );
        assert!(events.next().now_or_never().is_none());
        assert!(others.next().now_or_never().is_none());

        assert_eq!(
            fake.calls(),
            [
                FakeCall::Create(Box::new(spec("a", "s1"))),
                FakeCall::Start(id.clone()),
                FakeCall::Inspect(id.clone()),
                FakeCall::Stop(id.clone()),
                FakeCall::Stop(id.clone()),
                FakeCall::Inspect(id.clone()),
                FakeCall::Remove(id.clone()),
                FakeCall::Remove(id.clone()),
                FakeCall::Inspect(id),
            ]
        );
    }

    #[tokio::test]
    async fn scripted_failures_come_once_and_in_order() {
        let fake = FakeRuntime::new();
        fake.fail_next_create(RuntimeError::NoSuchImage("busybox".to_owned()));
        fake.fail_next_start(RuntimeError::Engine {
            call: "start",
            detail: "boom".to_owned(),
        });
        assert!(matches!(
            fake.create(&spec("a", "s1")).await,
            Err(RuntimeError::NoSuchImage(_))
        ));
        assert!(fake.containers().is_empty());
        let id = fake.create(&spec("a", "s1")).await.unwrap();
        assert!(matches!(
            fake.start(&id).await,
            Err(RuntimeError::Engine { call: "start", .. })
        ));
        fake.start(&id).await.unwrap();
        assert!(matches!(
            fake.create(&spec("a", "s1")).await,
            Err(RuntimeError::Engine { call: "create", .. })
        ));
        fake.remove_image("busybox");
        assert!(matches!(
            fake.create(&spec("b", "s1")).await,
            Err(RuntimeError::NoSuchImage(image)) if image == "busybox"
        ));
        assert!(matches!(
            fake.stop(&ContainerId("nope".to_owned()), Duration::ZERO)
                .await,
            Err(RuntimeError::NoSuchContainer(_))
        ));
    }

    #[tokio::test]
    async fn exits_and_vanishings_show_in_listing_and_events() {
        let fake = FakeRuntime::new();
        let mut events = fake.events(SESSION, "s1");
        let a = fake.create(&spec("a", "s1")).await.unwrap();
        let b = fake.create(&spec("b", "s1")).await.unwrap();
        let c = fake.create(&spec("c", "s2")).await.unwrap();
        for id in [&a, &b, &c] {
            fake.start(id).await.unwrap();
        }
        assert_eq!(fake.list_labelled(SESSION, "s1").await.unwrap().len(), 2);

        assert!(fake.exit(&a, 3, UnixNanos(START.0 + 99)));
        assert!(!fake.exit(&a, 4, UnixNanos(START.0 + 100)));
        let state = fake.inspect(&a).await.unwrap().unwrap();
        assert_eq!(state.exit_code, Some(3));
        assert_eq!(state.finished_at, Some(UnixNanos(START.0 + 99)));

        assert!(fake.vanish(&b));
        let listed = fake.list_labelled(SESSION, "s1").await.unwrap();
        assert_eq!(listed.iter().map(|s| &s.id).collect::<Vec<_>>(), [&a]);
        assert_eq!(fake.containers().len(), 2);

        let seen: Vec<_> = std::iter::from_fn(|| events.next().now_or_never().flatten())
            .map(|event| {
                let event = event.unwrap();
                (event.id, event.kind)
            })
            .collect();
        assert_eq!(
            seen,
            [
                (a.clone(), ContainerEventKind::Start),
                (b, ContainerEventKind::Start),
                (a, ContainerEventKind::Die),
            ]
        );

        fake.disconnect_events();
        assert!(events.next().await.is_none());
    }

    #[tokio::test]
    async fn volumes_keep_their_first_labels() {
        let fake = FakeRuntime::new();
        let labels = BTreeMap::from([("owner".to_owned(), "acct".to_owned())]);
        fake.ensure_volume("v", &labels).await.unwrap();
        fake.ensure_volume("v", &BTreeMap::new()).await.unwrap();
        assert_eq!(fake.volumes(), BTreeMap::from([("v".to_owned(), labels)]));
        assert_eq!(
            fake.calls(),
            [
                FakeCall::EnsureVolume("v".to_owned()),
                FakeCall::EnsureVolume("v".to_owned())
            ]
        );
    }
}
