//! Following the engine: Docker's events, and the reconcile that brings
//! the ledger in line with what Docker reports, at start-up (and until it
//! first succeeds) and at every checkpoint.

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, PoisonError};
use std::time::Duration;

use futures_util::StreamExt as _;
use tokio_util::sync::CancellationToken;

use crate::clock::UnixNanos;
use crate::error::Refusal;
use crate::gpu::DeviceUuid;
use crate::ledger::{Actor, AuditAction, AuditRecord, SessionFilter};
use crate::runtime::{ContainerEvent, ContainerEventKind, ContainerId, ContainerState, labels};
use crate::session::{EndReason, SessionId, SessionRecord, SessionState};

use super::{
    DEFAULT_STOP_GRACE, RECOVERY_RETRY, SessionManager, engine, exit_detail, release_stop,
};

impl SessionManager {
    /// Acts on one engine event of a container of this node.
    pub async fn on_event(&self, event: ContainerEvent) {
        let Some(id) = event.labels.get(labels::SESSION).cloned().map(SessionId) else {
            return;
        };
        let result = match event.kind {
            ContainerEventKind::Start => self.on_start(&id, &event).await,
            ContainerEventKind::Die => {
                self.release_foreign(&event.id);
                self.on_exit(&id, &event).await
            }
            ContainerEventKind::Destroy => {
                self.release_foreign(&event.id);
                self.close_if_started(
                    &id,
                    Some(event.at),
                    EndReason::Removed,
                    "container removed".into(),
                )
                .await
            }
        };
        if let Err(error) = result {
            tracing::error!(session = %id, event = ?event.kind, error = %error, "could not record a container event; the next reconcile retries");
        }
    }

    /// A container with our labels started: ours when the ledger holds its
    /// session open (a launch records the session before creating the
    /// container), otherwise foreign, and its devices are withheld at once
    /// rather than at the next reconcile.
    async fn on_start(&self, id: &SessionId, event: &ContainerEvent) -> Result<(), Refusal> {
        let open = self
            .ledger
            .get(id)
            .await?
            .is_some_and(|session| session.state != SessionState::Ended);
        if open {
            return Ok(());
        }
        // A container known to have exited claims nothing: one that ran for
        // an instant, its session closed by its launch before this event.
        let exited = matches!(
            self.runtime.inspect(&event.id).await,
            Ok(Some(state)) if !state.running
        );
        if !exited {
            let mut foreign = self.foreign.lock().unwrap_or_else(PoisonError::into_inner);
            let seen_before = foreign.values().any(|holder| *holder == event.id);
            withhold_devices(&mut foreign, &event.id, &event.labels, &id.0, seen_before);
        }
        Ok(())
    }

    fn release_foreign(&self, container: &ContainerId) {
        self.foreign
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .retain(|_, holder| holder != container);
    }

    async fn on_exit(&self, id: &SessionId, event: &ContainerEvent) -> Result<(), Refusal> {
        let state = self.runtime.inspect(&event.id).await.map_err(engine)?;
        let finished_at = state
            .as_ref()
            .and_then(|s| s.finished_at)
            .or(Some(event.at));
        let detail = state.as_ref().map(exit_detail).unwrap_or_default();
        self.close_if_started(id, finished_at, EndReason::Exited, detail)
            .await
    }

    /// Closes a running (or stopping) session; STARTING ones belong to their
    /// launch, ended ones stay as they are.
    async fn close_if_started(
        &self,
        id: &SessionId,
        at: Option<UnixNanos>,
        reason: EndReason,
        detail: String,
    ) -> Result<(), Refusal> {
        let Some(session) = self.ledger.get(id).await? else {
            return Ok(());
        };
        let reason = match (session.state, reason) {
            (SessionState::Running, reason) => reason,
            // A die during a stop is the stop's, with the stop's reason.
            (SessionState::Stopping, _) => session.stop_reason(),
            (SessionState::Starting | SessionState::Ended, _) => return Ok(()),
        };
        if let Some(closed) = self.close(id, at, reason, detail).await? {
            tracing::info!(session = %closed.id, reason = %reason, ended_at = ?closed.ended_at.map(|t| t.to_string()), "session ended");
        }
        Ok(())
    }

    /// Brings the ledger in line with the engine. `at_start` (the daemon's
    /// first reconcile, before it serves): no launch is in flight, so
    /// STARTING sessions are settled too. Until one such reconcile has
    /// succeeded, every reconcile is one, and launches are refused.
    pub async fn reconcile(&self, at_start: bool) -> Result<(), Refusal> {
        if !at_start && self.recovery.read().await.is_none() {
            return self.bring_in_line(false).await;
        }
        let mut recovery = self.recovery.write().await;
        if !at_start && recovery.is_none() {
            // Another reconcile recovered while this one waited.
            drop(recovery);
            return self.bring_in_line(false).await;
        }
        let result = self.bring_in_line(true).await;
        match &result {
            Ok(()) => {
                if recovery.take().is_some() {
                    tracing::info!(
                        "the ledger is in line with the container engine again; launches resume"
                    );
                }
            }
            Err(cause) => *recovery = Some(cause.clone()),
        }
        result
    }

    /// Why launches are refused until a reconcile succeeds, if they are.
    pub async fn recovering(&self) -> Option<Refusal> {
        self.recovery.read().await.clone()
    }

    async fn bring_in_line(&self, at_start: bool) -> Result<(), Refusal> {
        let containers = self
            .runtime
            .list_labelled(labels::NODE, &self.settings.node_id)
            .await
            .map_err(engine)?;
        let mut by_session: HashMap<String, ContainerState> = HashMap::new();
        for container in containers {
            if let Some(session) = container.labels.get(labels::SESSION) {
                by_session.insert(session.clone(), container);
            }
        }
        let open = self.ledger.list(SessionFilter::open()).await?.sessions;
        for session in open {
            // Taken before asking the engine: a container that answers
            // "running" was running at this instant too.
            let now = self.clock.now();
            let container = match &session.container_id {
                Some(id) => self
                    .runtime
                    .inspect(&ContainerId(id.clone()))
                    .await
                    .map_err(engine)?,
                None => by_session.get(&session.id.0).cloned(),
            };
            self.settle(&session, container, now, at_start).await?;
            by_session.remove(&session.id.0);
        }
        // The list is older than the ledger's view: a session that ended in
        // between (a stop, an exit) left its container in it as running.
        // Unknown are only those that still run now.
        let mut unknown = Vec::new();
        for container in by_session.into_values().filter(|c| c.running) {
            match self.runtime.inspect(&container.id).await {
                Ok(Some(state)) if state.running => unknown.push(state),
                Ok(_) => {}
                Err(_) => unknown.push(container),
            }
        }
        self.report_unknown(unknown);
        Ok(())
    }

    async fn settle(
        &self,
        session: &SessionRecord,
        container: Option<ContainerState>,
        now: UnixNanos,
        at_start: bool,
    ) -> Result<(), Refusal> {
        let id = &session.id;
        if session.state == SessionState::Starting {
            // Its launch is under way in this process: the launch decides,
            // however long the engine takes or the clock jumps.
            if self.is_launching(id) {
                return Ok(());
            }
            // The launch is over (or was another process's). It may have
            // finished since the lists were read: read afresh what it left.
            match self.ledger.get(id).await? {
                Some(current) if current.state == SessionState::Starting => {}
                _ => return Ok(()),
            }
            // The engine is asked again by the session's label too: a
            // launch dropped by its caller may have made its container
            // after the list was read.
            let container = match container {
                Some(listed) => self.runtime.inspect(&listed.id).await.map_err(engine)?,
                None => self
                    .runtime
                    .list_labelled(labels::SESSION, &id.0)
                    .await
                    .map_err(engine)?
                    .into_iter()
                    .next(),
            };
            return match container {
                Some(state) if state.running && state.started_at.is_some() => {
                    let started_at = state.started_at.unwrap_or(now);
                    if self
                        .ledger
                        .mark_running(id, &state.id.0, started_at)
                        .await?
                        .is_some()
                    {
                        tracing::info!(session = %id, container = %state.id, "adopted a container whose launch was cut short");
                    }
                    Ok(())
                }
                Some(state) => {
                    // Created (and maybe started and finished) by a launch
                    // that never recorded it: bill what Docker says it ran.
                    if let Some(started_at) = state.started_at {
                        self.ledger
                            .mark_running(id, &state.id.0, started_at)
                            .await?;
                        self.close(
                            id,
                            state.finished_at,
                            EndReason::Exited,
                            exit_detail(&state),
                        )
                        .await?;
                    } else {
                        self.runtime.remove(&state.id).await.map_err(engine)?;
                        self.close(
                            id,
                            None,
                            EndReason::LaunchFailed,
                            "the agent stopped before this launch finished; the container \
                             never started and nothing was billed: launch again with a new \
                             request_id"
                                .into(),
                        )
                        .await?;
                    }
                    Ok(())
                }
                None => {
                    self.close(
                        id,
                        None,
                        EndReason::LaunchFailed,
                        "the agent stopped before this launch made its container; nothing \
                         ran and nothing was billed: launch again with a new request_id"
                            .into(),
                    )
                    .await?;
                    Ok(())
                }
            };
        }
        match container {
            Some(state) if state.running => {
                self.ledger.checkpoint(id, now).await?;
                if session.state == SessionState::Stopping && self.claim_stop(id) {
                    // A stop recorded but that Docker never carried out: the
                    // agent died first, or the engine was away. Carried out
                    // now, in the background so that a start does not wait
                    // out the grace; Docker's die event (or the next
                    // reconcile) closes the session with the stop's reason.
                    let reason = session.stop_reason();
                    tracing::info!(session = %id, container = %state.id, reason = %reason, "resuming a stop cut short");
                    self.audit(AuditRecord {
                        at: now,
                        action: AuditAction::Stop,
                        actor: Actor::Agent,
                        account_id: session.account_id.clone(),
                        session_id: id.0.clone(),
                        reason: reason.as_str().to_owned(),
                        detail: "resumed a stop cut short by an agent restart or an engine outage"
                            .into(),
                    })
                    .await;
                    let (runtime, in_flight) =
                        (Arc::clone(&self.runtime), Arc::clone(&self.stops_in_flight));
                    let (container, id) = (state.id.clone(), id.clone());
                    tokio::spawn(async move {
                        if let Err(error) = runtime.stop(&container, DEFAULT_STOP_GRACE).await {
                            tracing::warn!(session = %id, container = %container, error = %error, "could not resume a stop; the next reconcile retries");
                        }
                        release_stop(&in_flight, &id);
                    });
                } else if at_start {
                    tracing::info!(session = %id, container = %state.id, "adopted a running container");
                }
            }
            Some(state) => {
                let reason = if session.state == SessionState::Stopping {
                    session.stop_reason()
                } else {
                    EndReason::Exited
                };
                self.close(id, state.finished_at, reason, exit_detail(&state))
                    .await?;
                tracing::info!(session = %id, reason = %reason, "closed a session whose container finished");
            }
            None => {
                // Gone without a trace: billed up to the last instant it was
                // known to run (its last checkpoint), not a second more.
                self.close(id, None, EndReason::Removed, "container vanished".into())
                    .await?;
                tracing::warn!(session = %id, "closed a session whose container vanished");
            }
        }
        Ok(())
    }

    /// Running containers with our node's labels that the ledger has no
    /// open session for: never billed or killed, reported, and their
    /// devices kept from other sessions while they run.
    fn report_unknown(&self, containers: Vec<ContainerState>) {
        let previous = self.foreign_devices();
        let mut foreign = HashMap::new();
        for container in containers {
            let session = container
                .labels
                .get(labels::SESSION)
                .map(String::as_str)
                .unwrap_or("");
            let seen_before = previous.values().any(|holder| *holder == container.id);
            withhold_devices(
                &mut foreign,
                &container.id,
                &container.labels,
                session,
                seen_before,
            );
        }
        *self.foreign.lock().unwrap_or_else(PoisonError::into_inner) = foreign;
    }

    /// Follows the engine's events until `shutdown`, re-subscribing with
    /// backoff when the stream breaks and reconciling after each
    /// (re)subscription so nothing missed meanwhile is lost.
    pub async fn follow_events(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = Duration::from_millis(500);
        loop {
            let mut events = self.runtime.events(labels::NODE, &self.settings.node_id);
            if let Err(refusal) = self.reconcile(false).await {
                tracing::warn!(error = %refusal, "reconcile after subscribing to engine events failed");
            } else {
                backoff = Duration::from_millis(500);
            }
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    event = events.next() => match event {
                        Some(Ok(event)) => self.on_event(event).await,
                        Some(Err(error)) => {
                            tracing::warn!(error = %error, "engine event stream failed; resubscribing");
                            break;
                        }
                        None => {
                            tracing::warn!("engine event stream ended; resubscribing");
                            break;
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(30));
        }
    }

    /// Reconciles (and so cuts checkpoint usage and debits balances) every
    /// `interval` until `shutdown`, then enforces balances and
    /// reservations; wakes early when a scheduled stop falls due.
    pub async fn checkpoint_loop(self: Arc<Self>, interval: Duration, shutdown: CancellationToken) {
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        ticks.tick().await;
        let mut folded_at: Option<tokio::time::Instant> = None;
        loop {
            if folded_at.is_none_or(|at| at.elapsed() >= FOLD_EVERY) {
                folded_at = Some(tokio::time::Instant::now());
                self.fold_old_usage().await;
            }
            let next_stop = self.next_scheduled_stop().unwrap_or(interval);
            // Launches wait on a recovery: it is retried sooner than a checkpoint.
            let recovering = self.recovering().await.is_some();
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticks.tick() => {
                    if let Err(refusal) = self.reconcile(false).await {
                        tracing::warn!(error = %refusal, "checkpoint failed; usage stays measured from Docker's times and is cut at the next one");
                    }
                }
                _ = tokio::time::sleep(RECOVERY_RETRY.min(interval)), if recovering => {
                    if let Err(refusal) = self.reconcile(false).await {
                        tracing::warn!(error = %refusal, "reconcile failed again; launches stay refused");
                    }
                }
                _ = tokio::time::sleep(next_stop) => {}
            }
            if let Err(refusal) = self.enforce().await {
                tracing::warn!(error = %refusal, "enforcing balances and reservations failed; retried at the next checkpoint");
            }
        }
    }
}

/// How often raw usage records past the retention are folded.
const FOLD_EVERY: Duration = Duration::from_secs(3600);

impl SessionManager {
    /// Folds raw usage records past the retention into the sums that hold
    /// them: every record in standalone mode, acknowledged ones with a
    /// control plane (the others wait for their delivery).
    async fn fold_old_usage(&self) {
        let Some(retention) = self.settings.usage_retention else {
            return;
        };
        let before = UnixNanos(
            self.clock
                .now()
                .0
                .saturating_sub(i64::try_from(retention.as_nanos()).unwrap_or(i64::MAX)),
        );
        match self.ledger.fold_usage(before, self.credit.is_some()).await {
            Ok(0) => {}
            Ok(folded) => {
                tracing::info!(folded, before = %before, "folded raw usage records past the retention; their sums stay")
            }
            Err(error) => {
                tracing::warn!(error = %error, "folding raw usage records failed; retried in an hour")
            }
        }
    }
}

/// Records the devices a foreign container's labels claim; warns when the
/// container was not seen before, so the operator hears of it once.
fn withhold_devices(
    foreign: &mut HashMap<DeviceUuid, ContainerId>,
    container: &ContainerId,
    container_labels: &BTreeMap<String, String>,
    session: &str,
    seen_before: bool,
) {
    let devices = container_labels
        .get(labels::DEVICES)
        .map(String::as_str)
        .unwrap_or("");
    if !seen_before {
        tracing::warn!(
            container = %container,
            session,
            devices,
            "a running container with gpuwarden labels has no open session here: not billed, not stopped; its devices are withheld"
        );
    }
    for device in devices.split(',').filter(|d| !d.is_empty()) {
        foreign.insert(DeviceUuid::new(device), container.clone());
    }
}
