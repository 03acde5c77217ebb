//! The agent's domain core: what this node has and what runs on it. The
//! gRPC layer (`api`) only converts to and from it.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio_util::sync::CancellationToken;

use crate::error::Refusal;
use crate::events::EventKind;
use crate::gpu::{
    self, AssignableDevice, DeviceHealth, DeviceHealthTracker, DeviceTelemetry, DeviceUuid,
    GpuBackend, GpuError, HealthChange, HealthEvent, HostInventory,
};
use crate::inventory::{DeviceView, Health, InventoryView, LinkView};
use crate::metrics::Metrics;
use crate::policy::Policy;
use crate::session::manager::{Holder, SessionManager};
use crate::session::request::LaunchRequest;
use crate::session::{Caller, Scope, SessionRecord};
use crate::toml_file::FileError;

/// How often the backend's health events are read.
const HEALTH_POLL: Duration = Duration::from_secs(1);

fn health_of(health: DeviceHealth) -> Health {
    match health {
        DeviceHealth::Healthy => Health::Healthy,
        DeviceHealth::Unhealthy { .. } => Health::Unhealthy,
        DeviceHealth::Lost => Health::Lost,
    }
}

/// Marks the GPUs a scan found lost; returns the changes to announce.
fn record_lost(health: &mut DeviceHealthTracker, inventory: &HostInventory) -> Vec<HealthChange> {
    let now = Instant::now();
    inventory
        .lost
        .iter()
        .filter_map(|lost| lost.uuid.clone())
        .filter_map(|device| health.record(&HealthEvent::Lost { device }, now))
        .collect()
}

#[derive(Debug)]
pub struct Agent {
    node_id: String,
    gpus: Arc<dyn GpuBackend>,
    last_scan: RwLock<Scan>,
    /// Devices made unhealthy by critical XIDs, or lost.
    health: Mutex<DeviceHealthTracker>,
    sessions: Arc<SessionManager>,
    metrics: Arc<Metrics>,
}

#[derive(Debug, Clone)]
struct Scan {
    inventory: HostInventory,
    at: SystemTime,
}

impl Agent {
    /// Scans the GPUs once; an agent that cannot see its GPUs does not start.
    pub async fn start(
        node_id: String,
        gpus: Arc<dyn GpuBackend>,
        sessions: Arc<SessionManager>,
        metrics: Arc<Metrics>,
    ) -> Result<Self, GpuError> {
        let inventory = gpu::blocking(&gpus, |backend| backend.discover()).await?;
        tracing::info!(
            backend = gpus.kind().as_str(),
            gpus = inventory.gpus.len(),
            mig_instances = inventory.mig_instance_count(),
            assignable = inventory.assignable().len(),
            driver = %inventory.driver_version,
            "discovered GPUs"
        );
        let mut health = DeviceHealthTracker::new();
        record_lost(&mut health, &inventory);
        Ok(Self {
            node_id,
            gpus,
            last_scan: RwLock::new(Scan {
                inventory,
                at: SystemTime::now(),
            }),
            health: Mutex::new(health),
            sessions,
            metrics,
        })
    }

    pub fn metrics(&self) -> &Arc<Metrics> {
        &self.metrics
    }

    fn health(&self) -> std::sync::MutexGuard<'_, DeviceHealthTracker> {
        self.health.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Live readings of the GPUs; none when the backend cannot sample.
    pub async fn telemetry(&self) -> Vec<DeviceTelemetry> {
        match gpu::blocking(&self.gpus, |backend| backend.telemetry()).await {
            Ok(readings) => readings,
            Err(error) => {
                tracing::debug!(error = %error, "no GPU telemetry");
                Vec::new()
            }
        }
    }

    /// Those of `devices` that may not take sessions: unhealthy or lost
    /// ones and the MIG instances of such GPUs.
    fn unhealthy_among(&self, devices: &[AssignableDevice]) -> Vec<DeviceUuid> {
        let health = self.health();
        devices
            .iter()
            .filter(|d| !health.effective(&d.uuid, d.parent.as_ref()).is_healthy())
            .map(|d| d.uuid.clone())
            .collect()
    }

    /// Takes the backend's health events and the recovery clock into the
    /// device health, announcing each change.
    pub async fn check_health(&self, recovery: Duration) {
        let events = match gpu::blocking(&self.gpus, |backend| backend.health_events()).await {
            Ok(events) => events,
            Err(error) => {
                tracing::warn!(error = %error, "cannot read GPU health events");
                Vec::new()
            }
        };
        let now = Instant::now();
        let mut changes = Vec::new();
        {
            let mut health = self.health();
            for event in &events {
                if let HealthEvent::Xid { device, xid } = event {
                    self.metrics
                        .xid_errors
                        .get_or_create(&vec![
                            ("uuid", device.to_string()),
                            ("xid", xid.to_string()),
                        ])
                        .inc();
                    tracing::warn!(device = %device, xid, application = gpu::is_application_xid(*xid), "XID error");
                }
                changes.extend(health.record(event, now));
            }
            changes.extend(health.tick(now, recovery));
        }
        for change in changes {
            self.announce(change);
        }
    }

    fn announce(&self, change: HealthChange) {
        tracing::warn!(device = %change.device, from = change.from.as_str(), to = change.to.as_str(), cause = ?change.cause, "device health changed");
        self.sessions.events().publish(
            self.sessions.now(),
            EventKind::DeviceHealthChanged {
                device: change.device,
                health: health_of(change.to),
                cause: format!("{:?}", change.cause),
            },
        );
    }

    /// The operator's reset of a device's health.
    pub fn reset_health(&self, device: &DeviceUuid) -> Result<(), Refusal> {
        let known = self
            .scan()
            .inventory
            .gpus
            .iter()
            .any(|g| &g.uuid == device || g.mig_instances.iter().any(|m| &m.uuid == device));
        let change = self.health().reset(device);
        if !known && change.is_none() {
            return Err(Refusal::new(
                crate::error::Reason::UnknownDevice,
                format!("no device {device} on this node; GetInventory lists them"),
            ));
        }
        if let Some(change) = change {
            self.announce(change);
        }
        Ok(())
    }

    /// Scans the GPUs again (a MIG repartition shows without a restart);
    /// devices that appeared or went are announced.
    pub async fn rescan(&self) -> Result<(), GpuError> {
        let inventory = gpu::blocking(&self.gpus, |backend| backend.discover()).await?;
        // Sorted, so the event lists its devices in order.
        let before: BTreeSet<DeviceUuid> = self.scan().inventory.assignable_uuids();
        let after: BTreeSet<DeviceUuid> = inventory.assignable_uuids();
        let changes = record_lost(&mut self.health(), &inventory);
        for change in changes {
            self.announce(change);
        }
        *self
            .last_scan
            .write()
            .unwrap_or_else(PoisonError::into_inner) = Scan {
            inventory,
            at: SystemTime::now(),
        };
        let added: Vec<DeviceUuid> = after.difference(&before).cloned().collect();
        let removed: Vec<DeviceUuid> = before.difference(&after).cloned().collect();
        if !added.is_empty() || !removed.is_empty() {
            tracing::info!(
                added = added.len(),
                removed = removed.len(),
                "inventory changed"
            );
            self.sessions.events().publish(
                self.sessions.now(),
                EventKind::InventoryChanged { added, removed },
            );
        }
        Ok(())
    }

    /// Health every second, a rescan every `rescan`, until `shutdown`.
    pub async fn watch_devices(
        self: Arc<Self>,
        rescan: Duration,
        recovery: Duration,
        shutdown: CancellationToken,
    ) {
        let mut health_ticks = tokio::time::interval(HEALTH_POLL);
        health_ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut rescans = tokio::time::interval(rescan);
        rescans.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        rescans.tick().await;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = health_ticks.tick() => self.check_health(recovery).await,
                _ = rescans.tick() => {
                    if let Err(error) = self.rescan().await {
                        tracing::warn!(error = %error, "rescan failed; the last inventory stays");
                    }
                }
            }
        }
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    pub fn sessions(&self) -> &Arc<SessionManager> {
        &self.sessions
    }

    fn scan(&self) -> Scan {
        // A poisoned lock only means a panic elsewhere mid-write of a plain
        // value; the scan in it is still whole.
        self.last_scan
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The devices as of the last scan, with the sessions holding them.
    pub async fn inventory(&self) -> Result<InventoryView, Refusal> {
        let scan = self.scan();
        let mut view = InventoryView::from_scan(&self.node_id, &scan.inventory, scan.at);
        let busy: HashMap<_, _> = self.sessions.busy_devices().await?;
        {
            let health = self.health();
            for device in &mut view.devices {
                device.session_id = busy.get(&device.uuid).map(ToString::to_string);
                device.health =
                    health_of(health.effective(&device.uuid, device.parent_uuid.as_ref()));
            }
        }
        // A device held by a session but gone from the scan (a lost GPU, a
        // repartition under a session) stays listed until the session ends.
        let listed: HashSet<DeviceUuid> = view.devices.iter().map(|d| d.uuid.clone()).collect();
        for (uuid, holder) in busy {
            if let Holder::Session(session) = holder
                && !listed.contains(&uuid)
            {
                view.devices.push(DeviceView::vanished(uuid, session.0));
            }
        }
        view.draining = self.sessions.is_draining();
        if let Some(link) = self.sessions.link_state() {
            view.control_plane = Some(LinkView {
                up: link.is_up(),
                since: link.changed_at().to_system_time(),
                policy_version: link.policy_version(),
                outbox_backlog: self.sessions.ledger().outbox_backlog().await?,
            });
        }
        Ok(view)
    }

    /// Where a launch is decided: the request is checked, then the session
    /// manager admits it and reserves devices among this node's assignable
    /// ones. Every refusal is audited and announced.
    pub async fn launch(
        &self,
        caller: &Caller,
        request: LaunchRequest,
    ) -> Result<SessionRecord, Refusal> {
        let mut request = request;
        if request.principal.is_none() {
            request.principal = caller.principal.clone();
        }
        let request_id = request.request_id.clone();
        let principal = request.principal.clone();
        let account_id = match request.scope {
            Some(Scope::Org) => request.org_id.clone(),
            _ => principal
                .as_ref()
                .map(|p| p.subject.clone())
                .unwrap_or_default(),
        };
        let began = Instant::now();
        let result = match request.validate() {
            Ok(plan) => {
                let devices = self.scan().inventory.assignable();
                let unhealthy = self.unhealthy_among(&devices);
                self.sessions.launch(plan, devices, unhealthy).await
            }
            Err(refusal) => Err(refusal),
        };
        self.metrics.launch(
            result.as_ref().map(|_| ()).map_err(|r| r.reason.as_str()),
            began.elapsed(),
        );
        if let Err(refusal) = &result {
            self.sessions
                .launch_refused(&request_id, principal.as_ref(), &account_id, refusal)
                .await;
        }
        result
    }

    /// The UUIDs of the devices found by the last scan.
    pub fn device_uuids(&self) -> HashSet<DeviceUuid> {
        self.scan().inventory.assignable_uuids()
    }

    /// Reads and validates the policy file against this host's devices and
    /// puts it in force.
    pub fn load_policy(&self, path: &Path) -> Result<(), FileError> {
        let loaded = Policy::load(path, Some(&self.device_uuids()))?;
        for warning in &loaded.warnings {
            tracing::warn!(file = %path.display(), "policy: {warning}");
        }
        tracing::info!(file = %path.display(), accounts = loaded.policy.accounts().count(), "policy in force");
        self.sessions.set_policy(Arc::new(loaded.policy));
        Ok(())
    }

    /// SIGHUP: a policy that fails validation leaves the one in force, and
    /// says why.
    pub async fn reload_policy(&self, path: &Path) {
        match self.load_policy(path) {
            Ok(()) => {
                self.sessions.policy_reloaded(path).await;
            }
            Err(error) => {
                let error = crate::error::chain(&error);
                tracing::error!(error = %error, "policy reload refused; the previous policy stays in force");
                self.sessions.policy_reload_refused(error).await;
            }
        }
    }
}
