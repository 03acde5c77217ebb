//! The agent's domain core: what this node has and (as the product grows)
//! what runs on it. The gRPC layer (`api`) only converts to and from it.

use std::sync::{Arc, RwLock};
use std::time::SystemTime;

use crate::gpu::{self, GpuBackend, GpuError, HostInventory};
use crate::inventory::InventoryView;

#[derive(Debug)]
pub struct Agent {
    node_id: String,
    last_scan: RwLock<Scan>,
}

#[derive(Debug, Clone)]
struct Scan {
    inventory: HostInventory,
    at: SystemTime,
}

impl Agent {
    /// Scans the GPUs once; an agent that cannot see its GPUs does not start.
    pub async fn start(node_id: String, gpus: Arc<dyn GpuBackend>) -> Result<Self, GpuError> {
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
        })
    }

    pub fn node_id(&self) -> &str {
        &self.node_id
    }

    /// The devices as of the last scan.
    pub fn inventory(&self) -> InventoryView {
        // A poisoned lock only means a panic elsewhere mid-write of a plain
        // value; the scan in it is still whole.
        let scan = self
            .last_scan
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone();
        InventoryView::from_scan(&self.node_id, &scan.inventory, scan.at)
    }
}
