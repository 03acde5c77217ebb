//! A launch request built field by field from the input (`arbitrary`), so
//! the fuzzer reaches the checks behind the first ones quickly: ids, device
//! selection, forbidden options, env, volumes. Besides not panicking, an
//! accepted request must ask for nothing beyond its devices and its own
//! volumes (`gpuwarden_fuzz::check_launch`).
#![no_main]

use std::collections::BTreeMap;

use arbitrary::Arbitrary;
use gpuwarden::session::request::{ContainerRequest, LaunchRequest, VolumeRequest};
use gpuwarden::session::{Principal, PrincipalKind, Scope};
use libfuzzer_sys::fuzz_target;

#[derive(Debug, Arbitrary)]
struct Input {
    request_id: String,
    principal: Option<(String, bool)>,
    scope: Option<bool>,
    org_id: String,
    gpu_count: u32,
    gpu_model: String,
    mig_profile: String,
    mig_count: u32,
    device_uuids: Vec<String>,
    image: String,
    command: Vec<String>,
    env: Vec<(String, String)>,
    volumes: Vec<(String, String, bool)>,
    privileged: bool,
    network_mode: String,
    pid_mode: String,
    ipc_mode: String,
    cap_add: Vec<String>,
    devices: Vec<String>,
    binds: Vec<String>,
}

fuzz_target!(|input: Input| {
    let request = LaunchRequest {
        request_id: input.request_id,
        principal: input.principal.map(|(subject, service)| Principal {
            subject,
            kind: if service {
                PrincipalKind::ServiceAccount
            } else {
                PrincipalKind::User
            },
        }),
        scope: input
            .scope
            .map(|org| if org { Scope::Org } else { Scope::Personal }),
        org_id: input.org_id,
        gpu_count: input.gpu_count,
        gpu_model: input.gpu_model,
        mig_profile: input.mig_profile,
        mig_count: input.mig_count,
        device_uuids: input.device_uuids,
        container: ContainerRequest {
            image: input.image,
            command: input.command,
            env: input.env.into_iter().collect::<BTreeMap<_, _>>(),
            volumes: input
                .volumes
                .into_iter()
                .map(|(name, target, read_only)| VolumeRequest {
                    name,
                    target,
                    read_only,
                })
                .collect(),
            privileged: input.privileged,
            network_mode: input.network_mode,
            pid_mode: input.pid_mode,
            ipc_mode: input.ipc_mode,
            cap_add: input.cap_add,
            devices: input.devices,
            binds: input.binds,
        },
    };
    gpuwarden_fuzz::check_launch(request);
});
