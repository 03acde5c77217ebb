//! The long-lived tasks of control-plane mode:
//!
//! - the link: register, follow `WatchPolicy`, and send `ReportStatus` on
//!   every session or drain change and periodically; a failed or ended
//!   policy stream reconnects with exponential backoff and jitter. Whether
//!   the link is up is judged from every call's result (`health`);
//! - usage delivery: batches from the ledger's outbox through
//!   `ReportUsage`, each record retried until acknowledged (record ids are
//!   stable, so the control plane deduplicates); acknowledged records are
//!   folded after the retention period by the session manager.

use std::sync::Arc;
use std::time::Duration;

use futures_util::{StreamExt as _, TryStreamExt as _};
use tokio_util::sync::CancellationToken;

use super::{ControlPlane, LinkError, LinkState, policy};
use crate::agent::Agent;
use crate::api::convert;
use crate::clock::UnixNanos;
use crate::events::EventKind;
use crate::inventory::InventoryView;
use crate::ledger::OutboxRecord;
use crate::proto;

/// Status is reported at least this often when the control plane names no
/// interval.
const DEFAULT_STATUS_INTERVAL: Duration = Duration::from_secs(30);
const BACKOFF_START: Duration = Duration::from_millis(250);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// While the policy stream holds but calls fail, status reports probe the
/// control plane at most this far apart, so launches resume within seconds
/// of it answering again.
const PROBE_MAX: Duration = Duration::from_secs(5);
/// Records per `ReportUsage` call.
const USAGE_BATCH: u32 = 500;

/// The next backoff: doubled, capped, with up to a quarter of jitter so a
/// fleet does not reconnect in step.
fn next_backoff(current: Duration) -> Duration {
    let doubled = (current * 2).min(BACKOFF_MAX);
    let jitter_range = doubled.as_millis() as u64 / 4;
    let jitter = if jitter_range == 0 {
        0
    } else {
        // Random enough for spreading reconnects; no extra dependency.
        (uuid::Uuid::new_v4().as_u128() as u64) % jitter_range
    };
    doubled.saturating_sub(Duration::from_millis(jitter))
}

#[derive(Debug)]
pub struct Link {
    plane: Arc<dyn ControlPlane>,
    state: Arc<LinkState>,
    agent: Arc<Agent>,
}

impl Link {
    pub fn new(plane: Arc<dyn ControlPlane>, state: Arc<LinkState>, agent: Arc<Agent>) -> Self {
        Self {
            plane,
            state,
            agent,
        }
    }

    fn now(&self) -> UnixNanos {
        self.agent.sessions().now()
    }

    /// Keeps the link up until `shutdown`.
    pub async fn run(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_START;
        loop {
            let began = tokio::time::Instant::now();
            let error = tokio::select! {
                _ = shutdown.cancelled() => return,
                error = self.connected() => error,
            };
            if began.elapsed() >= BACKOFF_MAX {
                // It held a while: start the backoff over. (A control plane
                // that registers the node but fails its stream at once is
                // not dialled in a tight loop.)
                backoff = BACKOFF_START;
            }
            // The link's state (and its log) follows each call's result in
            // `health`; this only says why the connection is made again.
            tracing::debug!(error = %error, ?backoff, "reconnecting to the control plane");
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = next_backoff(backoff);
        }
    }

    /// One connection: register, then follow the policy and report status
    /// until the policy stream fails or ends; returns why it ended.
    ///
    /// The node counts as registered (and the link as up) once RegisterNode
    /// is answered: the policy stream is opened alongside, since a server
    /// may send its response headers only with the first policy (stock
    /// grpcio servers do). A failed status report does not end the
    /// connection: while the link is down, status reports probe the control
    /// plane with backoff, and the first answer brings the link back up.
    async fn connected(&self) -> LinkError {
        let mut events = self.agent.sessions().events().subscribe();
        let mut link_up = self.state.subscribe();
        let registered = match self
            .plane
            .register_node(proto::RegisterNodeRequest {
                node_id: self.agent.node_id().to_owned(),
                agent_version: env!("CARGO_PKG_VERSION").to_owned(),
                inventory: self.inventory().await.as_ref().map(Into::into),
            })
            .await
        {
            Ok(registered) => registered,
            Err(error) => return error,
        };
        let interval = match registered.status_interval_seconds {
            0 => DEFAULT_STATUS_INTERVAL,
            seconds => Duration::from_secs(u64::from(seconds)),
        };
        let watch = self.plane.watch_policy(proto::WatchPolicyRequest {
            node_id: self.agent.node_id().to_owned(),
            known_version: self.state.policy_version(),
        });
        let mut policies = std::pin::pin!(futures_util::stream::once(watch).try_flatten());
        let _ = self.report_status().await;
        let mut ticks = tokio::time::interval(interval);
        ticks.tick().await;
        let mut probe_backoff = BACKOFF_START;
        let probe = tokio::time::sleep(probe_backoff);
        tokio::pin!(probe);
        // When the link last came up: one that goes down again soon after
        // keeps its probe backoff, so a flapping link is not probed (and
        // its owed calls sent again) every second.
        let mut up_since = tokio::time::Instant::now();
        loop {
            tokio::select! {
                update = policies.next() => match update {
                    Some(Ok(update)) => self.apply_policy(update),
                    Some(Err(error)) => return error,
                    None => return LinkError::Unreachable("the policy stream ended".into()),
                },
                event = events.recv() => {
                    let changed = match event {
                        Ok(event) => matches!(
                            event.kind,
                            EventKind::SessionStarted(_) | EventKind::SessionEnded(_) | EventKind::DrainChanged { .. }
                        ),
                        // Missed some: report to be sure.
                        Err(_) => true,
                    };
                    if changed {
                        let _ = self.report_status().await;
                    }
                }
                _ = ticks.tick() => {
                    let _ = self.report_status().await;
                }
                changed = link_up.changed() => {
                    if changed.is_err() {
                        return LinkError::Unreachable("the link's state is gone".into());
                    }
                    if *link_up.borrow_and_update() {
                        up_since = tokio::time::Instant::now();
                    } else {
                        // Down while connected: probe from now on.
                        probe_backoff = if up_since.elapsed() >= BACKOFF_MAX {
                            BACKOFF_START
                        } else {
                            next_backoff(probe_backoff).min(PROBE_MAX)
                        };
                        probe.as_mut().reset(tokio::time::Instant::now() + probe_backoff);
                    }
                }
                () = &mut probe, if !self.state.is_up() => {
                    if self.report_status().await.is_err() {
                        probe_backoff = next_backoff(probe_backoff).min(PROBE_MAX);
                    }
                    probe.as_mut().reset(tokio::time::Instant::now() + probe_backoff);
                }
            }
        }
    }

    fn apply_policy(&self, update: proto::PolicyUpdate) {
        let version = update.version;
        let Some(snapshot) = update.policy else {
            tracing::warn!(
                version,
                "policy update without a policy; the one in force stays"
            );
            return;
        };
        match policy::from_snapshot(version, snapshot, Some(&self.agent.device_uuids())) {
            Ok(loaded) => {
                for warning in &loaded.warnings {
                    tracing::warn!(version, "policy: {warning}");
                }
                self.agent.sessions().set_policy(Arc::new(loaded.policy));
                self.state.set_policy_version(version);
                tracing::info!(version, "control-plane policy in force");
            }
            Err(error) => tracing::error!(
                version,
                error = %crate::error::chain(&error),
                "control-plane policy refused; the one in force stays"
            ),
        }
    }

    async fn inventory(&self) -> Option<InventoryView> {
        match self.agent.inventory().await {
            Ok(view) => Some(view),
            Err(refusal) => {
                tracing::warn!(error = %refusal, "inventory unavailable for the control plane");
                None
            }
        }
    }

    async fn report_status(&self) -> Result<(), LinkError> {
        let sessions = self.agent.sessions();
        let now = sessions.now();
        let open = sessions
            .ledger()
            .list(crate::ledger::SessionFilter::open())
            .await
            .unwrap_or_default()
            .sessions;
        let inventory = self.inventory().await;
        // The inventory read it already, with the link's state.
        let backlog = match inventory.as_ref().and_then(|v| v.control_plane.as_ref()) {
            Some(link) => link.outbox_backlog,
            None => sessions.ledger().outbox_backlog().await.unwrap_or_default(),
        };
        self.plane
            .report_status(proto::NodeStatus {
                node_id: self.agent.node_id().to_owned(),
                at: Some(now.to_timestamp()),
                inventory: inventory.as_ref().map(Into::into),
                sessions: open.iter().map(|s| convert::session(s, now)).collect(),
                draining: sessions.is_draining(),
                outbox_backlog: backlog,
            })
            .await
    }

    /// Delivers the outbox until `shutdown`: every record is sent until the
    /// control plane acknowledges it.
    pub async fn deliver_usage(self: Arc<Self>, shutdown: CancellationToken) {
        let mut backoff = BACKOFF_START;
        let mut link_up = self.state.subscribe();
        loop {
            let delay = match self.deliver_once().await {
                Ok(0) => {
                    backoff = BACKOFF_START;
                    Duration::from_secs(1)
                }
                Ok(_) => {
                    backoff = BACKOFF_START;
                    Duration::ZERO
                }
                Err(error) => {
                    tracing::debug!(error = %error, "usage delivery failed; retrying");
                    backoff = next_backoff(backoff);
                    backoff
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(delay) => {}
                // Back up: what waits goes out now, not after the backoff.
                changed = link_up.wait_for(|up| *up), if !*link_up.borrow() => {
                    if changed.is_err() {
                        return;
                    }
                    backoff = BACKOFF_START;
                }
            }
        }
    }

    /// Sends one batch; returns how many records were newly acknowledged.
    async fn deliver_once(&self) -> Result<usize, LinkError> {
        let ledger = self.agent.sessions().ledger();
        let records = ledger
            .undelivered_usage(USAGE_BATCH)
            .await
            .map_err(|e| LinkError::Malformed(format!("the ledger cannot be read: {e}")))?;
        if records.is_empty() {
            return Ok(0);
        }
        let sent = records.len();
        let ack = self
            .plane
            .report_usage(proto::UsageBatch {
                node_id: self.agent.node_id().to_owned(),
                records: records.iter().map(usage_record).collect(),
            })
            .await?;
        let marked = ledger
            .mark_delivered(ack.acknowledged_ids, self.now())
            .await
            .map_err(|e| LinkError::Malformed(format!("the ledger cannot be written: {e}")))?;
        tracing::debug!(sent, acknowledged = marked, "usage delivered");
        if marked == 0 {
            // Nothing of the batch was taken: wait rather than spin.
            return Err(LinkError::Malformed(
                "the control plane acknowledged none of the batch".into(),
            ));
        }
        Ok(marked)
    }
}

fn usage_record(record: &OutboxRecord) -> proto::UsageRecord {
    proto::UsageRecord {
        id: record.id.clone(),
        session_id: record.session_id.clone(),
        node_id: record.node_id.clone(),
        account_id: record.account_id.clone(),
        billed_account_id: record.billed_account_id.clone(),
        scope: convert::scope_to_proto(record.scope),
        billing_path: convert::billing_path_to_proto(record.billing_path),
        owner: record.owner.clone(),
        device_uuid: record.device_uuid.clone(),
        device_class: record.device_class.clone(),
        period_start: Some(record.period_start.to_timestamp()),
        period_end: Some(record.period_end.to_timestamp()),
        device_milliseconds: record.device_ms,
        gpu_seconds: record.gpu_seconds,
        cost: convert::credits(record.cost),
        r#final: record.last,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap_with_bounded_jitter() {
        let mut backoff = BACKOFF_START;
        for _ in 0..20 {
            let next = next_backoff(backoff);
            assert!(next <= BACKOFF_MAX);
            assert!(next >= (backoff * 2).min(BACKOFF_MAX) * 3 / 4);
            backoff = next;
        }
        assert!(backoff > BACKOFF_MAX / 2);
    }
}
