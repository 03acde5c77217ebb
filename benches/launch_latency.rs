//! Launch -> RUNNING latency of the agent against a plain Docker create +
//! start of the same container on the same engine, interleaved in one run.
//! Prints p50/p90 of both and the p50 ratio (target: at most 1.10x).
//!
//!     cargo bench --bench launch_latency            # 40 rounds
//!     ROUNDS=200 cargo bench --bench launch_latency
//!
//! Needs the Docker engine and the test image (scripts/test.sh sets both up).

#![allow(clippy::unwrap_used, clippy::print_stdout)]

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::BTreeMap;
use std::path::Path;
use std::time::Instant;

use common::launch::{SLEEP, exact, launch_as, stop_request};
use common::{Daemon, ms, percentile, test_image};
use gpuwarden::proto;
use gpuwarden::runtime::docker::DockerRuntime;
use gpuwarden::runtime::{
    ContainerId, ContainerRuntime, ContainerSpec, DeviceRequest, Network, labels,
};

const MIG: &str = "MIG-0d4b7102-166c-4d26-804d-35a10322fc1b";

#[tokio::main]
async fn main() {
    let rounds: usize = std::env::var("ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(40);
    let mut daemon = Daemon::start("sim-dgx-a100.toml", "");
    let mut agent = daemon.client().await;
    let docker = DockerRuntime::connect(Path::new("/var/run/docker.sock"))
        .await
        .unwrap();
    let plain_label = format!("gpuwarden-bench-plain={}", daemon.node_id);

    let mut through_agent = Vec::with_capacity(rounds);
    let mut plain = Vec::with_capacity(rounds);
    for round in 0..rounds + 2 {
        // The agent: Launch answers once the container runs and the ledger
        // has recorded Docker's StartedAt.
        let request = launch_as(
            &format!("bench-{round}"),
            "u-bench",
            None,
            exact(&[MIG]),
            SLEEP,
        );
        let started = Instant::now();
        let session = agent.launch(request).await.unwrap().into_inner();
        let agent_time = started.elapsed();
        assert_eq!(session.state(), proto::SessionState::Running);

        // Plain Docker: the same container, created and started directly.
        let spec = ContainerSpec {
            name: format!("gpuwarden-bench-{}-{round}", daemon.node_id),
            image: test_image(),
            command: vec!["sleep".into(), "300".into()],
            env: BTreeMap::from([
                ("NVIDIA_VISIBLE_DEVICES".to_owned(), MIG.to_owned()),
                ("CUDA_VISIBLE_DEVICES".to_owned(), MIG.to_owned()),
            ]),
            labels: BTreeMap::from([
                (labels::SESSION.to_owned(), format!("bench-{round}")),
                ("gpuwarden-bench-plain".to_owned(), daemon.node_id.clone()),
            ]),
            volumes: Vec::new(),
            devices: DeviceRequest::None,
            network: Network::Bridge,
            pids_limit: 4096,
        };
        let started = Instant::now();
        let id = docker.create(&spec).await.unwrap();
        docker.start(&id).await.unwrap();
        let plain_time = started.elapsed();

        // Not measured: put both away so every round starts alike.
        agent.stop(stop_request(&session.id, None)).await.unwrap();
        docker.remove(&id).await.unwrap();
        docker
            .remove(&ContainerId(session.container_id))
            .await
            .unwrap();
        if round >= 2 {
            // The first rounds warm caches on both sides.
            through_agent.push(agent_time);
            plain.push(plain_time);
        }
    }
    common::remove_containers(&plain_label);
    through_agent.sort();
    plain.sort();
    let (a50, p50) = (percentile(&through_agent, 0.5), percentile(&plain, 0.5));
    println!(
        "launch latency over {rounds} interleaved rounds (Docker {})",
        common::docker(&["version", "-f", "{{.Server.Version}}"])
    );
    println!(
        "  agent Launch -> RUNNING   p50 {:7.2} ms   p90 {:7.2} ms",
        ms(a50),
        ms(percentile(&through_agent, 0.9))
    );
    println!(
        "  plain create + start      p50 {:7.2} ms   p90 {:7.2} ms",
        ms(p50),
        ms(percentile(&plain, 0.9))
    );
    println!(
        "  p50 ratio {:.3}x (target <= 1.10x), agent's own work ~{:.2} ms",
        ms(a50) / ms(p50),
        ms(a50) - ms(p50)
    );
}
