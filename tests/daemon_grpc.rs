//! The real daemon on a simulated host, reached over its Unix socket with the
//! generated client: inventory, health, reflection, UNIMPLEMENTED stubs,
//! clean shutdown.

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::BTreeSet;
use std::time::Duration;

use common::{Daemon, gpuwarden};
use gpuwarden::proto;
use nix::sys::signal::Signal;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
use tonic_reflection::pb::v1::ServerReflectionRequest;
use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

#[tokio::test]
async fn get_inventory_over_the_unix_socket_shows_the_simulated_dgx() {
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    let mut client = daemon.client().await;
    let inventory = client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner();

    assert_eq!(inventory.node_id, daemon.node_id);
    assert_eq!(inventory.driver_version, "550.54.15");
    assert_eq!(inventory.cuda_version, "12.4");
    assert_eq!(inventory.backend, "simulated");
    let of_kind = |kind: proto::DeviceKind| {
        inventory
            .devices
            .iter()
            .filter(|d| d.kind() == kind)
            .count()
    };
    assert_eq!(of_kind(proto::DeviceKind::Gpu), 8);
    assert_eq!(of_kind(proto::DeviceKind::Mig), 11);
    let assignable: BTreeSet<&str> = inventory
        .devices
        .iter()
        .filter(|d| d.assignable)
        .map(|d| d.uuid.as_str())
        .collect();
    assert_eq!(assignable.len(), 17);
    // The parents of MIG instances are never assignable; GPU 7 (no MIG) is.
    assert!(!assignable.contains("GPU-b644960d-a808-45b0-b4e1-f6add005db2d"));
    assert!(assignable.contains("GPU-6a5da790-0728-45bf-9407-3e280f594b6d"));

    let mig = inventory
        .devices
        .iter()
        .find(|d| d.uuid == "MIG-9346009d-10be-482f-b6aa-079b9d66247a")
        .unwrap();
    assert_eq!(mig.mig_profile, "3g.40gb");
    assert_eq!(mig.parent_uuid, "GPU-116bf74a-3c17-4839-a37a-c5835ed8645b");
    assert_eq!(mig.device_class, "NVIDIA A100-SXM4-80GB MIG 3g.40gb");
    assert_eq!((mig.compute_slices, mig.gpu_compute_slices), (3, 7));
    assert_eq!(
        mig.health.as_ref().unwrap().state(),
        proto::DeviceHealth::Healthy
    );
    assert!(mig.session_id.is_empty());
}

#[tokio::test]
async fn health_and_reflection_are_served_beside_the_agent() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let channel = daemon.channel().await;

    let mut health = HealthClient::new(channel.clone());
    for service in ["", "gpuwarden.v1.NodeAgent"] {
        let status = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner()
            .status();
        assert_eq!(status, ServingStatus::Serving, "service {service:?}");
    }

    let mut reflection = ServerReflectionClient::new(channel);
    let request = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut responses = reflection
        .server_reflection_info(tokio_stream::iter([request]))
        .await
        .unwrap()
        .into_inner();
    let response = responses.message().await.unwrap().unwrap();
    let Some(MessageResponse::ListServicesResponse(list)) = response.message_response else {
        panic!("expected a service list, got {response:?}");
    };
    let names: BTreeSet<String> = list.service.into_iter().map(|s| s.name).collect();
    assert!(names.contains("gpuwarden.v1.NodeAgent"), "{names:?}");
    assert!(names.contains("grpc.health.v1.Health"), "{names:?}");
}

#[tokio::test]
async fn ctl_inventory_prints_what_the_one_shot_inventory_prints() {
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    daemon.channel().await;
    let socket = daemon.socket.to_str().unwrap().to_owned();

    let ctl = gpuwarden(&["ctl", "--socket", &socket, "inventory", "--json"]);
    assert!(
        ctl.status.success(),
        "{}",
        String::from_utf8_lossy(&ctl.stderr)
    );
    let mut from_daemon: serde_json::Value = serde_json::from_slice(&ctl.stdout).unwrap();

    let fixture = common::fixture("sim-dgx-a100.toml");
    let one_shot = gpuwarden(&[
        "inventory",
        "--simulate",
        fixture.to_str().unwrap(),
        "--json",
    ]);
    assert!(one_shot.status.success());
    let mut direct: serde_json::Value = serde_json::from_slice(&one_shot.stdout).unwrap();

    for view in [&mut from_daemon, &mut direct] {
        view["scanned_at"] = serde_json::Value::Null;
        view["node_id"] = serde_json::Value::Null;
    }
    assert_eq!(from_daemon, direct);
    assert_eq!(from_daemon["assignable"], 17);

    let table = gpuwarden(&["ctl", "--socket", &socket, "inventory"]);
    let table = String::from_utf8(table.stdout).unwrap();
    assert!(
        table.contains("8 GPUs, 11 MIG instances, 17 assignable devices"),
        "{table}"
    );
}

#[tokio::test]
async fn ctl_without_a_daemon_says_how_to_reach_one() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("none.sock");
    let out = gpuwarden(&["ctl", "--socket", socket.to_str().unwrap(), "inventory"]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("cannot reach gpuwarden at"), "{stderr}");
    assert!(stderr.contains("is the daemon running"), "{stderr}");
}

#[tokio::test]
async fn sigterm_stops_the_daemon_cleanly_and_frees_the_socket() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    // A client connected at the stop is told to go away, not waited out.
    let mut client = daemon.client().await;
    client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap();
    daemon.signal(Signal::SIGTERM);
    let status = daemon.wait(Duration::from_secs(15)).await;
    assert!(status.success(), "{status}");
    assert!(!daemon.socket.exists(), "the socket file was left behind");
}

#[tokio::test]
async fn a_second_daemon_on_a_live_socket_refuses_to_start() {
    let mut first = Daemon::start("sim-h100-pair.toml", "");
    first.channel().await;
    let out = gpuwarden(&["run", "--config", first.config.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(64));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("in use by another running gpuwarden"),
        "{stderr}"
    );
    // The first one still serves.
    let mut client = first.client().await;
    client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap();
}

#[tokio::test]
async fn a_socket_left_by_a_killed_daemon_is_taken_over() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    daemon.channel().await;
    daemon.kill_and_restart().await;
    let mut client = daemon.client().await;
    let inventory = client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(inventory.devices.len(), 2);
}

#[tokio::test]
async fn a_page_token_the_agent_never_gave_is_refused_naming_the_field() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let status = client
        .list_sessions(proto::ListSessionsRequest {
            include_ended: true,
            page_token: "page-7".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert_eq!(
        gpuwarden::api::status::reason_of(&status).as_deref(),
        Some("INVALID_REQUEST")
    );
    assert!(status.message().contains("page_token"), "{status:?}");
    // The first page of nothing: no sessions, no next page.
    let page = client
        .list_sessions(proto::ListSessionsRequest {
            include_ended: true,
            page_size: 100_000,
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(page.sessions.is_empty());
    assert!(page.next_page_token.is_empty());
}
