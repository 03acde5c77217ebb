//! Sessions against the real Docker engine: the container gets exactly its
//! devices, concurrent launches never share a device, request ids are
//! idempotent, forbidden options are refused, and the ledger survives kill -9
//! (adopting running containers, closing finished ones at Docker's times).

#![allow(clippy::unwrap_used)]

mod common;

use std::collections::HashSet;
use std::time::{Duration, Instant};

use common::launch::{SLEEP, alice, exact, gpus, launch_request, stop_request};
use common::operator::{all_sessions, open_sessions, stop};
use common::{Daemon, docker, docker_time, test_image, wait_for_session};
use gpuwarden::api::status::reason_of;
use gpuwarden::clock::UnixNanos;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use nix::sys::signal::Signal;
use tonic::Code;
use tonic::transport::Channel;

const MIG_3G: &str = "MIG-9346009d-10be-482f-b6aa-079b9d66247a";
const GPU7: &str = "GPU-6a5da790-0728-45bf-9407-3e280f594b6d";

async fn get(client: &mut NodeAgentClient<Channel>, id: &str) -> proto::Session {
    client
        .get_session(proto::GetSessionRequest {
            session_id: id.into(),
            principal: alice(),
        })
        .await
        .unwrap()
        .into_inner()
}

fn nanos(at: &Option<prost_types::Timestamp>) -> UnixNanos {
    UnixNanos::from_system_time(std::time::SystemTime::try_from(at.unwrap()).unwrap())
}

fn ended(session: &proto::Session) -> bool {
    session.state() == proto::SessionState::Ended
}

#[tokio::test]
async fn the_container_sees_exactly_its_devices_and_carries_the_session_labels() {
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    let mut client = daemon.client().await;
    let mig = proto::DeviceSelector {
        mig_profile: "3g.40gb".into(),
        mig_count: 1,
        ..Default::default()
    };
    let session = client
        .launch(launch_request(
            "env-1",
            mig,
            &[
                "sh",
                "-c",
                "echo \"$NVIDIA_VISIBLE_DEVICES|$CUDA_VISIBLE_DEVICES\"; sleep 300",
            ],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.state(), proto::SessionState::Running);
    assert_eq!(session.device_uuids, [MIG_3G]);
    assert_eq!(session.account_id, "u-alice");
    let container = session.container_id.clone();

    let deadline = Instant::now() + Duration::from_secs(20);
    let logs = loop {
        let logs = docker(&["logs", &container]);
        if !logs.is_empty() || Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    assert_eq!(logs, format!("{MIG_3G}|{MIG_3G}"));

    let labels = docker(&["inspect", "-f", "{{json .Config.Labels}}", &container]);
    let labels: serde_json::Value = serde_json::from_str(&labels).unwrap();
    assert_eq!(labels["dev.gpuwarden.session"], session.id);
    assert_eq!(labels["dev.gpuwarden.node"], daemon.node_id);
    assert_eq!(labels["dev.gpuwarden.account"], "u-alice");
    assert_eq!(labels["dev.gpuwarden.scope"], "personal");
    assert_eq!(labels["dev.gpuwarden.owner"], "u-alice");
    let host = docker(&[
        "inspect",
        "-f",
        "{{.HostConfig.Privileged}} {{.HostConfig.PidsLimit}} {{json .HostConfig.SecurityOpt}}",
        &container,
    ]);
    assert!(host.starts_with("false 4096"), "{host}");
    assert!(host.contains("no-new-privileges"), "{host}");
    assert_eq!(session.started_at.map(|_| ()), Some(()));
    assert_eq!(
        nanos(&session.started_at),
        docker_time(&container, "StartedAt")
    );

    // The inventory shows the device taken by this session.
    let inventory = client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let device = inventory.devices.iter().find(|d| d.uuid == MIG_3G).unwrap();
    assert_eq!(device.session_id, session.id);

    let stopped = client
        .stop(stop_request(&session.id, alice()))
        .await
        .unwrap()
        .into_inner();
    assert!(ended(&stopped));
    assert_eq!(stopped.end_reason(), proto::EndReason::Stopped);
    // Metered from Docker's StartedAt to its FinishedAt, to the millisecond.
    let docker_ms = docker_time(&container, "FinishedAt").millis()
        - docker_time(&container, "StartedAt").millis();
    assert_eq!((stopped.device_seconds * 1000.0).round() as i64, docker_ms);
    assert!((stopped.gpu_seconds - stopped.device_seconds * 3.0 / 7.0).abs() < 1e-6);
    let inventory = client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    let device = inventory.devices.iter().find(|d| d.uuid == MIG_3G).unwrap();
    assert!(device.session_id.is_empty(), "the device was not freed");
}

#[tokio::test]
async fn concurrent_launches_never_share_a_device() {
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    let client = daemon.client().await;
    // 30 launches at once for the 6 full GPUs of the DGX fixture.
    let launches = (0..30).map(|i| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .launch(launch_request(&format!("race-{i}"), gpus(1), SLEEP))
                .await
        })
    });
    let results = futures_util::future::join_all(launches).await;
    let mut devices = HashSet::new();
    let mut started = 0;
    for result in results {
        match result.unwrap() {
            Ok(session) => {
                started += 1;
                let session = session.into_inner();
                assert_eq!(session.device_uuids.len(), 1);
                assert!(
                    devices.insert(session.device_uuids[0].clone()),
                    "a device was given twice"
                );
            }
            Err(status) => {
                assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
                assert_eq!(reason_of(&status).as_deref(), Some("NO_FREE_DEVICES"));
            }
        }
    }
    assert_eq!(started, 6);
    let running = daemon.running_containers();
    assert_eq!(running.lines().count(), 6);
}

#[tokio::test]
async fn a_repeated_request_id_returns_the_first_session_and_never_a_second_container() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let client = daemon.client().await;
    let launches = (0..8).map(|_| {
        let mut client = client.clone();
        tokio::spawn(async move {
            client
                .launch(launch_request("same-key", gpus(1), SLEEP))
                .await
        })
    });
    let ids: HashSet<String> = futures_util::future::join_all(launches)
        .await
        .into_iter()
        .map(|r| r.unwrap().unwrap().into_inner().id)
        .collect();
    assert_eq!(ids.len(), 1, "{ids:?}");
    let mut client = client;
    let again = client
        .launch(launch_request("same-key", gpus(1), SLEEP))
        .await
        .unwrap()
        .into_inner();
    assert!(ids.contains(&again.id));
    let containers = daemon.all_containers();
    assert_eq!(containers.lines().count(), 1);
}

#[tokio::test]
async fn forbidden_options_are_refused_naming_the_option_and_create_nothing() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    type Change = Box<dyn Fn(&mut proto::ContainerSpec)>;
    let cases: Vec<(&str, Change)> = vec![
        ("privileged", Box::new(|c| c.privileged = true)),
        ("network_mode", Box::new(|c| c.network_mode = "host".into())),
        ("pid_mode", Box::new(|c| c.pid_mode = "host".into())),
        ("ipc_mode", Box::new(|c| c.ipc_mode = "host".into())),
        (
            "cap_add",
            Box::new(|c| c.cap_add = vec!["SYS_ADMIN".into()]),
        ),
        (
            "devices",
            Box::new(|c| c.devices = vec!["/dev/nvidia0".into()]),
        ),
        (
            "binds",
            Box::new(|c| c.binds = vec!["/etc:/host-etc".into()]),
        ),
        (
            "volumes",
            Box::new(|c| {
                c.volumes = vec![proto::VolumeMount {
                    name: "/var/run".into(),
                    target: "/x".into(),
                    read_only: false,
                }]
            }),
        ),
        (
            "env",
            Box::new(|c| {
                c.env.insert("NVIDIA_VISIBLE_DEVICES".into(), "all".into());
            }),
        ),
    ];
    for (option, change) in cases {
        let mut request = launch_request(&format!("bad-{option}"), gpus(1), SLEEP);
        change(request.container.as_mut().unwrap());
        let status = client.launch(request).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{option}: {status:?}");
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("FORBIDDEN_CONTAINER_OPTION"),
            "{option}"
        );
        use tonic_types::StatusExt;
        let info = status.get_details_error_info().unwrap();
        assert_eq!(
            info.metadata.get("option").map(String::as_str),
            Some(option)
        );
    }
    let containers = daemon.all_containers();
    assert!(containers.is_empty(), "{containers}");
}

#[tokio::test]
async fn a_failed_launch_leaks_neither_devices_nor_containers() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let mut request = launch_request("no-image", gpus(2), SLEEP);
    request.container.as_mut().unwrap().image = "gpuwarden-test/not-there:latest".into();
    let status = client.launch(request).await.unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument);
    assert!(
        status.message().contains("not present on this node"),
        "{}",
        status.message()
    );
    // Both GPUs are free again: a launch of both succeeds.
    let session = client
        .launch(launch_request("after", gpus(2), SLEEP))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(session.device_uuids.len(), 2);
    let containers = daemon.all_containers();
    assert_eq!(containers.lines().count(), 1);
}

#[tokio::test]
async fn a_container_that_exits_ends_its_session_at_dockers_finish_time() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let session = client
        .launch(launch_request(
            "short",
            gpus(1),
            &["sh", "-c", "sleep 1; exit 3"],
        ))
        .await
        .unwrap()
        .into_inner();
    let done = wait_for_session(&mut client, &session.id, ended).await;
    assert_eq!(done.end_reason(), proto::EndReason::Exited);
    assert!(
        done.end_detail.contains("exit code 3"),
        "{}",
        done.end_detail
    );
    assert_eq!(
        nanos(&done.ended_at),
        docker_time(&session.container_id, "FinishedAt")
    );
    let inventory = client
        .get_inventory(proto::GetInventoryRequest {})
        .await
        .unwrap()
        .into_inner();
    assert!(inventory.devices.iter().all(|d| d.session_id.is_empty()));
}

#[tokio::test]
async fn kill_9_then_restart_adopts_running_containers_and_closes_finished_ones() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let keeps = client
        .launch(launch_request("keeps", exact(&[GPU_A]), SLEEP))
        .await
        .unwrap()
        .into_inner();
    let dies = client
        .launch(launch_request("dies", exact(&[GPU_B]), SLEEP))
        .await
        .unwrap()
        .into_inner();

    daemon.kill9().await;
    // While the agent is down: one container keeps running, one is stopped.
    docker(&["stop", "-t", "0", &dies.container_id]);
    let running = docker(&["inspect", "-f", "{{.State.Running}}", &keeps.container_id]);
    assert_eq!(running, "true", "kill -9 of the agent stopped a container");
    daemon.restart();
    let mut client = daemon.client().await;

    let adopted = get(&mut client, &keeps.id).await;
    assert_eq!(adopted.state(), proto::SessionState::Running);
    assert_eq!(adopted.container_id, keeps.container_id);
    let closed = get(&mut client, &dies.id).await;
    assert!(ended(&closed));
    assert_eq!(closed.end_reason(), proto::EndReason::Exited);
    assert_eq!(
        nanos(&closed.ended_at),
        docker_time(&dies.container_id, "FinishedAt")
    );
    let docker_ms = docker_time(&dies.container_id, "FinishedAt").millis()
        - docker_time(&dies.container_id, "StartedAt").millis();
    assert_eq!((closed.device_seconds * 1000.0).round() as i64, docker_ms);

    // The adopted session's device stays taken; the closed one's is free.
    let status = client
        .launch(launch_request("steal", exact(&[GPU_A]), SLEEP))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("NO_FREE_DEVICES"));
    client
        .launch(launch_request("reuse", exact(&[GPU_B]), SLEEP))
        .await
        .unwrap();
}

const GPU_A: &str = "GPU-9b12b00c-6d0c-490a-b0b2-879ea7657096";
const GPU_B: &str = "GPU-c273bec9-e03a-483e-a0c6-df38aac9f7eb";

#[tokio::test]
async fn sigterm_leaves_containers_running() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let session = client
        .launch(launch_request("stays", gpus(1), SLEEP))
        .await
        .unwrap()
        .into_inner();
    drop(client);
    daemon.signal(Signal::SIGTERM);
    assert!(daemon.wait(Duration::from_secs(15)).await.success());
    let running = docker(&["inspect", "-f", "{{.State.Running}}", &session.container_id]);
    assert_eq!(running, "true");
}

/// Starts a container with this node's labels that no ledger ever saw.
fn stray_container(daemon: &Daemon, name: &str, device: &str) -> String {
    docker(&[
        "run",
        "-d",
        "--name",
        &format!("{name}-{}", daemon.node_id),
        "--label",
        &format!("dev.gpuwarden.node={}", daemon.node_id),
        "--label",
        &format!("dev.gpuwarden.session=s-unknown-{name}"),
        "--label",
        &format!("dev.gpuwarden.devices={device}"),
        &test_image(),
        "sleep",
        "300",
    ])
}

/// Polls the inventory until `device` shows as held (by anything), bounded.
async fn await_device_held(client: &mut NodeAgentClient<Channel>, device: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let inventory = client
            .get_inventory(proto::GetInventoryRequest {})
            .await
            .unwrap()
            .into_inner();
        let holder = inventory
            .devices
            .iter()
            .find(|d| d.uuid == device)
            .map(|d| d.session_id.clone())
            .unwrap_or_default();
        if !holder.is_empty() {
            return holder;
        }
        assert!(Instant::now() < deadline, "{device} never showed as held");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn an_unknown_labelled_container_is_reported_not_billed_or_killed_and_keeps_its_devices() {
    const GPU6: &str = "GPU-3f4965c6-61dd-4e88-851b-d575a5ca9321";
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    daemon.client().await;
    // One appears while the agent is down: the start-up reconcile finds it
    // before the socket serves.
    daemon.kill9().await;
    let while_down = stray_container(&daemon, "while-down", GPU7);
    daemon.restart();
    let mut client = daemon.client().await;
    let status = client
        .launch(launch_request("wants-7", exact(&[GPU7]), SLEEP))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("NO_FREE_DEVICES"));

    // One appears while the agent runs: Docker's start event reports it.
    let while_up = stray_container(&daemon, "while-up", GPU6);
    let holder = await_device_held(&mut client, GPU6).await;
    assert!(holder.contains(&while_up), "held by {holder}");
    let status = client
        .launch(launch_request("wants-6", exact(&[GPU6]), SLEEP))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("NO_FREE_DEVICES"));

    for stray in [&while_down, &while_up] {
        assert_eq!(
            docker(&["inspect", "-f", "{{.State.Running}}", stray]),
            "true"
        );
    }
    let sessions = all_sessions(&mut client).await;
    assert!(
        sessions.is_empty(),
        "a stray container was taken for a session"
    );

    // Once the stray is gone its device is free again.
    docker(&["rm", "-f", &while_up]);
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match client
            .launch(launch_request("wants-6-again", exact(&[GPU6]), SLEEP))
            .await
        {
            Ok(session) => {
                assert_eq!(session.into_inner().device_uuids, vec![GPU6.to_owned()]);
                break;
            }
            Err(status) => {
                assert_eq!(reason_of(&status).as_deref(), Some("NO_FREE_DEVICES"));
                assert!(Instant::now() < deadline, "{GPU6} stayed withheld");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

#[tokio::test]
async fn the_operator_sees_and_stops_any_session_and_unknown_ids_are_not_found() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let session = client
        .launch(launch_request("mine", gpus(1), SLEEP))
        .await
        .unwrap()
        .into_inner();
    // The Unix socket is the operator's: it may see everything...
    let listed = open_sessions(&mut client).await;
    assert_eq!(listed.len(), 1);
    let stopped = stop(&mut client, &session.id).await;
    assert!(ended(&stopped));
    let missing = client
        .get_session(proto::GetSessionRequest {
            session_id: "s-nope".into(),
            principal: None,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), Code::NotFound);
    assert_eq!(reason_of(&missing).as_deref(), Some("UNKNOWN_SESSION"));
}
