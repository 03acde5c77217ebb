//! Isolation: every way a launch request could try to reach beyond its own
//! devices and its own account's volumes, against the real daemon and the
//! real Docker engine. Each escape is refused naming it
//! (`FORBIDDEN_CONTAINER_OPTION` with the option in the ErrorInfo metadata,
//! `DEVICE_RESERVED`), and the container Docker holds for an accepted
//! launch is free of each (`docker inspect`, and from inside the container).
//!
//! `tests/sessions.rs` has the first forbidden value of each option; this
//! file has the variants and what Docker ends up holding.

#![allow(clippy::unwrap_used)]

mod common;

use std::process::Command;

use common::launch::{exact, gpus, launch_as, sh};
use common::{Daemon, docker, test_image, wait_for_session};
use gpuwarden::api::status::reason_of;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use serde_json::Value;
use tonic::Code;
use tonic::transport::Channel;
use tonic_types::StatusExt;

/// GPU 7 of the DGX fixture, reserved for org acme by the example policy.
const GPU7: &str = "GPU-6a5da790-0728-45bf-9407-3e280f594b6d";
const MIG_3G: &str = "MIG-9346009d-10be-482f-b6aa-079b9d66247a";

fn unique(prefix: &str) -> String {
    format!(
        "{prefix}-{}",
        &uuid::Uuid::new_v4().simple().to_string()[..10]
    )
}

fn inspect(container: &str) -> Value {
    let json = docker(&["inspect", container]);
    let mut all: Vec<Value> = serde_json::from_str(&json).unwrap();
    all.remove(0)
}

fn strings(value: &Value) -> Vec<String> {
    value
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| v.as_str().unwrap().to_owned())
                .collect::<Vec<_>>()
        })
        .unwrap_or_default()
}

fn empty(value: &Value) -> bool {
    value.is_null() || value.as_array().is_some_and(Vec::is_empty)
}

/// The container's output once its session has ended.
async fn output_of(client: &mut NodeAgentClient<Channel>, session: &proto::Session) -> String {
    wait_for_session(client, &session.id, |s| {
        s.state() == proto::SessionState::Ended
    })
    .await;
    docker(&["logs", &session.container_id])
}

/// Docker objects a test made outside the agent, removed when dropped.
#[derive(Default)]
struct Leftovers {
    volumes: Vec<String>,
    images: Vec<String>,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        // The daemon's own drop removes its containers first only if it is
        // dropped first; remove whatever still uses the volumes here.
        for volume in &self.volumes {
            if let Ok(out) = Command::new("docker")
                .args(["ps", "-aq", "--filter", &format!("volume={volume}")])
                .output()
            {
                for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                    let _ = Command::new("docker").args(["rm", "-f", id]).output();
                }
            }
            let _ = Command::new("docker")
                .args(["volume", "rm", "-f", volume])
                .output();
        }
        for image in &self.images {
            let _ = Command::new("docker").args(["rmi", "-f", image]).output();
        }
    }
}

#[tokio::test]
async fn every_escape_variant_is_refused_naming_the_option_and_creates_nothing() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    // Another session's container: joining its namespaces would be an
    // escape into another account's session.
    let neighbour = client
        .launch(launch_as(
            "neighbour",
            "u-bob",
            None,
            gpus(1),
            &["sleep", "300"],
        ))
        .await
        .unwrap()
        .into_inner();
    let joined = format!("container:{}", neighbour.container_id);

    type Change = Box<dyn Fn(&mut proto::ContainerSpec)>;
    let env = |name: &'static str, value: &'static str| -> Change {
        Box::new(move |c| {
            c.env.insert(name.into(), value.into());
        })
    };
    let cases: Vec<(&str, Option<&str>, Change)> = vec![
        (
            "network_mode",
            None,
            Box::new({
                let joined = joined.clone();
                move |c| c.network_mode = joined.clone()
            }),
        ),
        (
            "network_mode",
            None,
            Box::new(|c| c.network_mode = "HOST".into()),
        ),
        (
            "network_mode",
            None,
            Box::new(|c| c.network_mode = "default".into()),
        ),
        (
            "pid_mode",
            None,
            Box::new({
                let joined = joined.clone();
                move |c| c.pid_mode = joined.clone()
            }),
        ),
        (
            "ipc_mode",
            None,
            Box::new(move |c| c.ipc_mode = joined.clone()),
        ),
        (
            "ipc_mode",
            None,
            Box::new(|c| c.ipc_mode = "shareable".into()),
        ),
        (
            "cap_add",
            None,
            Box::new(|c| c.cap_add = vec!["ALL".into()]),
        ),
        (
            "cap_add",
            None,
            Box::new(|c| c.cap_add = vec!["sys_admin".into()]),
        ),
        (
            "cap_add",
            None,
            Box::new(|c| c.cap_add = vec!["NET_RAW".into()]),
        ),
        (
            "devices",
            None,
            Box::new(|c| c.devices = vec!["/dev/nvidiactl".into()]),
        ),
        (
            "devices",
            None,
            Box::new(|c| c.devices = vec!["/dev/mem:/dev/mem:rwm".into()]),
        ),
        (
            "binds",
            None,
            Box::new(|c| c.binds = vec!["/var/run/docker.sock:/var/run/docker.sock".into()]),
        ),
        (
            "binds",
            None,
            Box::new(|c| c.binds = vec!["/dev:/dev".into()]),
        ),
        ("binds", None, Box::new(|c| c.binds = vec![String::new()])),
        (
            "volumes",
            None,
            Box::new(|c| {
                c.volumes = vec![proto::VolumeMount {
                    name: "/var/run/docker.sock".into(),
                    target: "/var/run/docker.sock".into(),
                    read_only: false,
                }]
            }),
        ),
        (
            "volumes",
            None,
            Box::new(|c| {
                c.volumes = vec![proto::VolumeMount {
                    name: "/".into(),
                    target: "/host".into(),
                    read_only: true,
                }]
            }),
        ),
        (
            "volumes",
            None,
            Box::new(|c| {
                c.volumes = vec![proto::VolumeMount {
                    name: "..".into(),
                    target: "/x".into(),
                    read_only: false,
                }]
            }),
        ),
        (
            "volumes",
            None,
            Box::new(|c| {
                c.volumes = vec![proto::VolumeMount {
                    name: "~".into(),
                    target: "/x".into(),
                    read_only: false,
                }]
            }),
        ),
        (
            // The toolkit can read device requests from mounts here.
            "volumes",
            None,
            Box::new(|c| {
                c.volumes = vec![proto::VolumeMount {
                    name: "devices".into(),
                    target: "/var/run/nvidia-container-devices/all".into(),
                    read_only: false,
                }]
            }),
        ),
        (
            "env",
            Some("CUDA_VISIBLE_DEVICES"),
            env("CUDA_VISIBLE_DEVICES", "0,1"),
        ),
        (
            "env",
            Some("NVIDIA_VISIBLE_DEVICES"),
            env("Nvidia_Visible_Devices", "all"),
        ),
        (
            "env",
            Some("NVIDIA_MIG_CONFIG_DEVICES"),
            env("NVIDIA_MIG_CONFIG_DEVICES", "all"),
        ),
        (
            "env",
            Some("NVIDIA_MIG_MONITOR_DEVICES"),
            env("NVIDIA_MIG_MONITOR_DEVICES", "all"),
        ),
        (
            "env",
            Some("NVIDIA_IMEX_CHANNELS"),
            env("NVIDIA_IMEX_CHANNELS", "0"),
        ),
        ("env", Some("NVIDIA_GDS"), env("NVIDIA_GDS", "enabled")),
        ("env", Some("NVIDIA_MOFED"), env("NVIDIA_MOFED", "enabled")),
        (
            "env",
            Some("NVIDIA_NVSWITCH"),
            env("NVIDIA_NVSWITCH", "enabled"),
        ),
        (
            "env",
            Some("NVIDIA_GDRCOPY"),
            env("NVIDIA_GDRCOPY", "enabled"),
        ),
    ];
    for (i, (option, variable, change)) in cases.into_iter().enumerate() {
        let mut launch = launch_as(&format!("escape-{i}"), "u-alice", None, gpus(1), &["true"]);
        change(launch.container.as_mut().unwrap());
        let status = client.launch(launch).await.unwrap_err();
        assert_eq!(
            status.code(),
            Code::InvalidArgument,
            "{option} #{i}: {status:?}"
        );
        assert_eq!(
            reason_of(&status).as_deref(),
            Some("FORBIDDEN_CONTAINER_OPTION"),
            "{option} #{i}: {status:?}"
        );
        let info = status.get_details_error_info().unwrap();
        assert_eq!(
            info.metadata.get("option").map(String::as_str),
            Some(option),
            "#{i}: {info:?}"
        );
        assert_eq!(
            info.metadata.get("variable").map(String::as_str),
            variable,
            "#{i}: {info:?}"
        );
        assert!(
            status.message().contains(&format!("container.{option}"))
                || status
                    .message()
                    .contains("host bind mounts are not allowed"),
            "#{i}: the message does not name the option: {}",
            status.message()
        );
    }
    // Only the neighbour's container exists.
    let containers = daemon.all_containers();
    assert_eq!(containers.lines().count(), 1, "{containers}");
}

#[tokio::test]
async fn an_accepted_container_is_held_by_docker_free_of_every_escape() {
    let mut leftovers = Leftovers::default();
    // An image whose own ENV tries to widen the devices and to turn on the
    // toolkit's host devices: the agent's values must win.
    let image = format!("gpuwarden-test/wide-env:{}", unique("t"));
    let base = docker(&["create", &test_image()]);
    docker(&[
        "commit",
        "--change",
        "ENV NVIDIA_VISIBLE_DEVICES=all",
        "--change",
        "ENV CUDA_VISIBLE_DEVICES=0,1,2,3,4,5,6,7",
        "--change",
        "ENV NVIDIA_MOFED=enabled NVIDIA_GDS=enabled NVIDIA_NVSWITCH=enabled \
         NVIDIA_GDRCOPY=enabled NVIDIA_IMEX_CHANNELS=all NVIDIA_MIG_CONFIG_DEVICES=all \
         NVIDIA_MIG_MONITOR_DEVICES=all",
        &base,
        &image,
    ]);
    docker(&["rm", &base]);
    leftovers.images.push(image.clone());
    let volume = unique("iso");

    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    let mut client = daemon.client().await;
    let mut launch = launch_as(
        "clean",
        "u-alice",
        None,
        exact(&[GPU7, MIG_3G]),
        &[
            "sh",
            "-c",
            "grep -E '^(NoNewPrivs|CapEff):' /proc/self/status; ls /dev; \
             echo \"visible=$NVIDIA_VISIBLE_DEVICES cuda=$CUDA_VISIBLE_DEVICES\"; sleep 300",
        ],
    );
    let spec = launch.container.as_mut().unwrap();
    spec.image = image.clone();
    spec.env.insert("HOME".into(), "/tmp".into());
    spec.volumes = vec![proto::VolumeMount {
        name: volume.clone(),
        target: "/data".into(),
        read_only: false,
    }];
    leftovers
        .volumes
        .push(format!("gpuwarden.u-alice.{volume}"));
    let session = client.launch(launch).await.unwrap().into_inner();
    let devices = session.device_uuids.join(",");
    assert_eq!(session.device_uuids, [GPU7, MIG_3G]);

    let container = inspect(&session.container_id);
    let host = &container["HostConfig"];
    assert_eq!(host["Privileged"], false, "{host:#}");
    assert_eq!(host["NetworkMode"], "bridge", "{host:#}");
    for mode in ["PidMode", "UTSMode", "UsernsMode"] {
        assert_eq!(host[mode], "", "{mode}: {host:#}");
    }
    let ipc = host["IpcMode"].as_str().unwrap();
    assert!(matches!(ipc, "" | "private" | "shareable"), "IpcMode {ipc}");
    assert!(empty(&host["Binds"]), "binds: {host:#}");
    assert!(empty(&host["CapAdd"]), "cap_add: {host:#}");
    assert!(empty(&host["Devices"]), "devices: {host:#}");
    assert!(empty(&host["DeviceCgroupRules"]), "{host:#}");
    // Env injection: the variables only, no device request.
    assert!(empty(&host["DeviceRequests"]), "{host:#}");
    let security = strings(&host["SecurityOpt"]);
    assert!(
        security.iter().any(|o| o.starts_with("no-new-privileges")),
        "{security:?}"
    );
    assert!(
        !security
            .iter()
            .any(|o| o.contains("unconfined") || o.contains("disable")),
        "{security:?}"
    );
    assert!(host["PidsLimit"].as_i64().unwrap() > 0, "{host:#}");
    assert!(!empty(&host["MaskedPaths"]), "{host:#}");
    assert!(!empty(&host["ReadonlyPaths"]), "{host:#}");
    // Its one mount is the account's named volume.
    let mounts = container["Mounts"].as_array().unwrap();
    assert_eq!(mounts.len(), 1, "{mounts:#?}");
    assert_eq!(mounts[0]["Type"], "volume");
    assert_eq!(mounts[0]["Name"], format!("gpuwarden.u-alice.{volume}"));
    assert_eq!(mounts[0]["Destination"], "/data");
    // The device variables are exactly the session's devices, once each,
    // whatever the image said.
    let env = strings(&container["Config"]["Env"]);
    for variable in ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"] {
        let values: Vec<&String> = env
            .iter()
            .filter(|e| e.starts_with(&format!("{variable}=")))
            .collect();
        assert_eq!(values, [&format!("{variable}={devices}")], "{env:?}");
    }
    for (variable, neutral) in [
        ("NVIDIA_MOFED", "disabled"),
        ("NVIDIA_GDS", "disabled"),
        ("NVIDIA_NVSWITCH", "disabled"),
        ("NVIDIA_GDRCOPY", "disabled"),
        ("NVIDIA_IMEX_CHANNELS", ""),
        ("NVIDIA_MIG_CONFIG_DEVICES", ""),
        ("NVIDIA_MIG_MONITOR_DEVICES", ""),
    ] {
        let values: Vec<&String> = env
            .iter()
            .filter(|e| e.starts_with(&format!("{variable}=")))
            .collect();
        assert_eq!(values, [&format!("{variable}={neutral}")], "{env:?}");
    }
    assert!(env.contains(&"HOME=/tmp".to_owned()), "{env:?}");

    // From inside: no new privileges, no CAP_SYS_ADMIN, no GPU device
    // nodes, and the variables as set.
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    let logs = loop {
        let logs = docker(&["logs", &session.container_id]);
        if logs.contains("visible=") || std::time::Instant::now() > deadline {
            break logs;
        }
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    };
    assert!(logs.contains("NoNewPrivs:\t1"), "{logs}");
    let cap_eff = logs
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|hex| u64::from_str_radix(hex.trim(), 16).unwrap())
        .unwrap();
    const CAP_SYS_RAWIO: u32 = 17;
    const CAP_SYS_ADMIN: u32 = 21;
    const CAP_SYS_MODULE: u32 = 16;
    for bit in [CAP_SYS_MODULE, CAP_SYS_RAWIO, CAP_SYS_ADMIN] {
        assert_eq!(cap_eff & (1 << bit), 0, "capability {bit} in {cap_eff:#x}");
    }
    assert!(
        !logs.contains("nvidia"),
        "a device node of the host: {logs}"
    );
    assert!(
        logs.contains(&format!("visible={devices} cuda={devices}")),
        "{logs}"
    );
    drop(daemon);
}

#[tokio::test]
async fn a_second_account_cannot_reach_the_first_accounts_volume() {
    let mut leftovers = Leftovers::default();
    let name = unique("secret");
    for account in ["u-alice", "u-bob", "acme"] {
        leftovers
            .volumes
            .push(format!("gpuwarden.{account}.{name}"));
    }
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let with_volume = |id: &str, subject: &str, org: Option<&str>, script: &str| {
        let mut launch = launch_as(id, subject, org, gpus(1), &sh(script));
        launch.container.as_mut().unwrap().volumes = vec![proto::VolumeMount {
            name: name.clone(),
            target: "/data".into(),
            read_only: false,
        }];
        launch
    };
    let show = "cat /data/secret 2>/dev/null || echo nothing";

    // Alice writes to her volume `NAME`.
    let alice = client
        .launch(with_volume(
            "alice-writes",
            "u-alice",
            None,
            "echo alice-personal > /data/secret",
        ))
        .await
        .unwrap()
        .into_inner();
    output_of(&mut client, &alice).await;
    // Bob names the same volume: he gets his own, empty.
    let bob = client
        .launch(with_volume("bob-reads", "u-bob", None, show))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output_of(&mut client, &bob).await, "nothing");
    // Alice's data is still there for her: namespaced, not lost.
    let again = client
        .launch(with_volume("alice-reads", "u-alice", None, show))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output_of(&mut client, &again).await, "alice-personal");
    // An org's volume is shared by its members, and apart from their own.
    let org_write = client
        .launch(with_volume(
            "acme-writes",
            "u-alice",
            Some("acme"),
            "echo acme-shared > /data/secret",
        ))
        .await
        .unwrap()
        .into_inner();
    output_of(&mut client, &org_write).await;
    let org_read = client
        .launch(with_volume("acme-reads", "u-bob", Some("acme"), show))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output_of(&mut client, &org_read).await, "acme-shared");
    let bob_again = client
        .launch(with_volume("bob-reads-again", "u-bob", None, show))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(output_of(&mut client, &bob_again).await, "nothing");

    // What Docker holds: one volume per account, each labelled with its owner.
    for (session, account) in [(&alice, "u-alice"), (&bob, "u-bob"), (&org_read, "acme")] {
        let mounts = inspect(&session.container_id)["Mounts"].clone();
        assert_eq!(mounts[0]["Name"], format!("gpuwarden.{account}.{name}"));
        let owner = docker(&[
            "volume",
            "inspect",
            "-f",
            "{{index .Labels \"dev.gpuwarden.volume-owner\"}}",
            &format!("gpuwarden.{account}.{name}"),
        ]);
        assert_eq!(owner, account);
    }

    // No name reaches another account's: a path, or a dot that would make
    // `gpuwarden.<account>.<a.b>` read as another account's
    // `gpuwarden.<account.a>.<b>`.
    for (i, trick) in [
        format!("../u-alice.{name}"),
        format!("gpuwarden.u-alice.{name}"),
        format!("u-alice.{name}"),
    ]
    .into_iter()
    .enumerate()
    {
        let mut launch = with_volume(&format!("trick-{i}"), "u-bob", None, show);
        launch.container.as_mut().unwrap().volumes[0].name = trick.clone();
        let status = client.launch(launch).await.unwrap_err();
        assert_eq!(status.code(), Code::InvalidArgument, "{trick}: {status:?}");
    }
    drop(daemon);
}

fn example_policy() -> String {
    format!(
        "[policy]\nfile = \"{}\"\n",
        common::fixture("policy-example.toml").display()
    )
}

#[tokio::test]
async fn another_orgs_reserved_device_is_out_of_reach_however_it_is_asked_for() {
    let mut daemon = Daemon::start("sim-dgx-a100.toml", &example_policy());
    let mut client = daemon.client().await;

    // Org tiny (Carol owns it) names acme's reserved GPU: refused, without
    // naming the org it is reserved for.
    let status = client
        .launch(launch_as(
            "tiny-gpu7",
            "u-carol",
            Some("tiny"),
            exact(&[GPU7]),
            &["true"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("DEVICE_RESERVED"));
    let info = status.get_details_error_info().unwrap();
    assert_eq!(
        info.metadata.get("device_uuid").map(String::as_str),
        Some(GPU7)
    );
    assert!(!status.message().contains("acme"), "{}", status.message());
    // Alice owns acme, but her personal session is not acme's.
    let status = client
        .launch(launch_as(
            "alice-gpu7",
            "u-alice",
            None,
            exact(&[GPU7]),
            &["true"],
        ))
        .await
        .unwrap_err();
    assert_eq!(reason_of(&status).as_deref(), Some("DEVICE_RESERVED"));

    // Asking for every full GPU leaves the reserved one out.
    let status = client
        .launch(launch_as(
            "tiny-all",
            "u-carol",
            Some("tiny"),
            gpus(6),
            &["true"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::ResourceExhausted, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("NO_FREE_DEVICES"));
    assert!(
        status
            .message()
            .contains("1 reserved for another organisation"),
        "{}",
        status.message()
    );
    let five = client
        .launch(launch_as(
            "tiny-five",
            "u-carol",
            Some("tiny"),
            gpus(5),
            &["sleep", "300"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(five.device_uuids.len(), 5);
    assert!(!five.device_uuids.iter().any(|d| d == GPU7), "{five:?}");
    let env = strings(&inspect(&five.container_id)["Config"]["Env"]);
    let visible = format!("NVIDIA_VISIBLE_DEVICES={}", five.device_uuids.join(","));
    assert!(env.contains(&visible), "{env:?}");
    assert!(!env.iter().any(|e| e.contains(GPU7)), "{env:?}");

    // acme itself gets it, billed to the reservation.
    let acme = client
        .launch(launch_as(
            "acme-gpu7",
            "u-alice",
            Some("acme"),
            exact(&[GPU7]),
            &["sleep", "300"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(acme.device_uuids, [GPU7]);
    assert_eq!(acme.billing_path, proto::BillingPath::Reservation as i32);
}

/// A request id is the caller's idempotency key: another account using the
/// same key must neither get the first session back (its container, devices
/// and usage) nor have its own launch silently answered with someone
/// else's session.
#[tokio::test]
async fn a_request_id_of_another_account_returns_nothing_of_its_session() {
    let mut daemon = Daemon::start("sim-h100-pair.toml", "");
    let mut client = daemon.client().await;
    let alice = client
        .launch(launch_as(
            "shared-key",
            "u-alice",
            None,
            gpus(1),
            &["sleep", "300"],
        ))
        .await
        .unwrap()
        .into_inner();
    let status = client
        .launch(launch_as(
            "shared-key",
            "u-bob",
            None,
            gpus(1),
            &["sleep", "300"],
        ))
        .await
        .unwrap_err();
    assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
    assert_eq!(reason_of(&status).as_deref(), Some("INVALID_REQUEST"));
    assert!(
        !status.message().contains(&alice.id),
        "{}",
        status.message()
    );
    assert!(
        !status.message().contains("u-alice"),
        "{}",
        status.message()
    );
    // The same key from the same caller is still the same session.
    let again = client
        .launch(launch_as(
            "shared-key",
            "u-alice",
            None,
            gpus(1),
            &["sleep", "300"],
        ))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(again.id, alice.id);
}
