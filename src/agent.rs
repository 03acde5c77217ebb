//! The agent's domain core: what this node has and what runs on it. The
//! gRPC layer (`api`) only converts to and from it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::error::Refusal;
use crate::gpu::{self, DeviceUuid, GpuBackend, GpuError, HostInventory};
use crate::inventory::{InventoryView, LinkView};
use crate::policy::Policy;
use crate::session::manager::SessionManager;
use crate::session::request::LaunchRequest;
use crate::session::{Caller, Scope, SessionRecord};
use crate::toml_file::FileError;

#[derive(Debug)]
pub struct Agent {
    node_id: String,
    last_scan: RwLock<Scan>,
    sessions: Arc<SessionManager>,
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
        Ok(Self {
            node_id,
            last_scan: RwLock::new(Scan {
                inventory,
                at: SystemTime::now(),
            }),
            sessions,
        })
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
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// The devices as of the last scan, with the sessions holding them.
    pub async fn inventory(&self) -> Result<InventoryView, Refusal> {
        let scan = self.scan();
        let mut view = InventoryView::from_scan(&self.node_id, &scan.inventory, scan.at);
        let busy: HashMap<_, _> = self.sessions.busy_devices().await?;
        for device in &mut view.devices {
            device.session_id = busy.get(&device.uuid).cloned();
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
        let result = match request.validate() {
            Ok(plan) => {
                let devices = self.scan().inventory.assignable();
                self.sessions.launch(plan, devices, Vec::new()).await
            }
            Err(refusal) => Err(refusal),
        };
        if let Err(refusal) = &result {
            self.sessions
                .launch_refused(&request_id, principal.as_ref(), &account_id, refusal)
                .await;
        }
        result
    }

    /// The UUIDs of the devices found by the last scan.
    pub fn device_uuids(&self) -> HashSet<DeviceUuid> {
        self.scan()
            .inventory
            .assignable()
            .into_iter()
            .map(|d| d.uuid)
            .collect()
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
