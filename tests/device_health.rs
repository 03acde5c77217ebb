//! Device health on the real daemon, driven through the simulated host's
//! runtime events file: critical XIDs make a device unhealthy (application
//! XIDs do not), it recovers after `health.recovery_seconds` or by the
//! operator's reset, a lost GPU under a session stays reported, and a rescan
//! shows a changed host without a restart.
#![allow(clippy::unwrap_used)]

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::launch::{SLEEP, exact, gpus, launch_request};
use common::{Daemon, fixture};
use gpuwarden::api::status::reason_of;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use tonic::transport::Channel;

const GPU_A: &str = "GPU-9b12b00c-6d0c-490a-b0b2-879ea7657096";
const GPU_B: &str = "GPU-c273bec9-e03a-483e-a0c6-df38aac9f7eb";

/// A private copy of the H100 pair, so its events file is this test's.
fn private_host(dir: &Path) -> PathBuf {
    let host = dir.join("host.toml");
    std::fs::copy(fixture("sim-h100-pair.toml"), &host).unwrap();
    host
}

fn write_events(dir: &Path, events: &str) {
    // Written whole and renamed, so the daemon never reads half a file.
    let temporary = dir.join("host.events.toml.new");
    std::fs::write(&temporary, events).unwrap();
    std::fs::rename(temporary, dir.join("host.events.toml")).unwrap();
}

async fn health(client: &mut NodeAgentClient<Channel>, uuid: &str) -> Option<proto::DeviceHealth> {
    client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner()
        .devices
        .into_iter()
        .find(|d| d.uuid == uuid)
        .map(|d| d.health.unwrap().state())
}

async fn wait_health(
    client: &mut NodeAgentClient<Channel>,
    uuid: &str,
    wanted: proto::DeviceHealth,
) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let now = health(client, uuid).await;
        if now == Some(wanted) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{uuid} stayed {now:?}, wanted {wanted:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn critical_xids_make_a_device_unhealthy_until_it_recovers_or_is_reset() {
    let dir = tempfile::tempdir().unwrap();
    let host = private_host(dir.path());
    let mut daemon = Daemon::start(host.to_str().unwrap(), "[health]\nrecovery_seconds = 2\n");
    let mut client = daemon.client().await;

    // An application XID on B first, then a critical one on A.
    write_events(
        dir.path(),
        &format!(
            "[[xid]]\nseq = 1\nuuid = \"{GPU_B}\"\nxid = 13\n[[xid]]\nseq = 2\nuuid = \"{GPU_A}\"\nxid = 79\n"
        ),
    );
    wait_health(&mut client, GPU_A, proto::DeviceHealth::Unhealthy).await;
    assert_eq!(
        health(&mut client, GPU_B).await,
        Some(proto::DeviceHealth::Healthy)
    );
    let status = client
        .launch(launch_request("on-a", exact(&[GPU_A]), SLEEP))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("DEVICE_UNHEALTHY"));
    let any = client
        .launch(launch_request("any", gpus(1), SLEEP))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(any.device_uuids, vec![GPU_B.to_owned()]);

    // Quiet for recovery_seconds: healthy again.
    wait_health(&mut client, GPU_A, proto::DeviceHealth::Healthy).await;

    // Unhealthy again, then the operator resets it at once.
    write_events(
        dir.path(),
        &format!("[[xid]]\nseq = 3\nuuid = \"{GPU_A}\"\nxid = 48\n"),
    );
    wait_health(&mut client, GPU_A, proto::DeviceHealth::Unhealthy).await;
    let device = client
        .reset_device_health(proto::ResetDeviceHealthRequest {
            device_uuid: GPU_A.into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(device.health.unwrap().state(), proto::DeviceHealth::Healthy);
    let status = client
        .reset_device_health(proto::ResetDeviceHealthRequest {
            device_uuid: "GPU-no-such".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("UNKNOWN_DEVICE"));
}

#[tokio::test]
async fn a_gpu_lost_under_a_session_stays_reported_and_a_rescan_shows_a_changed_host() {
    let dir = tempfile::tempdir().unwrap();
    let host = private_host(dir.path());
    let mut daemon = Daemon::start(host.to_str().unwrap(), "");
    let mut client = daemon.client().await;
    let session = client
        .launch(launch_request("held", exact(&[GPU_A]), SLEEP))
        .await
        .unwrap()
        .into_inner();

    write_events(dir.path(), &format!("lost = [\"{GPU_A}\"]\n"));
    wait_health(&mut client, GPU_A, proto::DeviceHealth::Lost).await;
    let inventory = client
        .rescan_inventory(proto::RescanInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let lost = inventory
        .devices
        .iter()
        .find(|d| d.uuid == GPU_A)
        .expect("a lost device held by a session is not forgotten");
    assert_eq!(
        lost.health.as_ref().unwrap().state(),
        proto::DeviceHealth::Lost
    );
    assert_eq!(lost.session_id, session.id);
    assert!(!lost.assignable);

    // The host changes (a GPU added, as a repartition would change MIG
    // instances): a rescan shows it without a restart.
    let mut text = std::fs::read_to_string(&host).unwrap();
    text.push_str(
        "\n[[gpus]]\nindex = 2\nuuid = \"GPU-00000000-0000-0000-0000-0000000000c3\"\nname = \"NVIDIA H100 80GB HBM3\"\nmemory_mib = 81559\npci_bus_id = \"00000000:C3:00.0\"\nmig_mode = false\n",
    );
    std::fs::write(&host, text).unwrap();
    let inventory = client
        .rescan_inventory(proto::RescanInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(
        inventory
            .devices
            .iter()
            .any(|d| d.uuid == "GPU-00000000-0000-0000-0000-0000000000c3" && d.assignable),
        "{inventory:?}"
    );
}
