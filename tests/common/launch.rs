//! What the tests ask the agent for: principals, device selectors, launch
//! and stop requests of the test image.

use gpuwarden::proto;

use super::test_image;

/// A command that outlasts any test: `sleep 300`.
pub const SLEEP: &[&str] = &["sleep", "300"];

/// A script that exits on SIGTERM at once, so a stop (or the engine's own
/// shutdown) ends it within the grace; run it as `sh(TRAPPED)`.
pub const TRAPPED: &str = "trap 'exit 0' TERM; sleep 600 & wait";

/// The USER principal `subject`.
pub fn user(subject: &str) -> Option<proto::Principal> {
    Some(proto::Principal {
        subject: subject.into(),
        kind: proto::PrincipalKind::User.into(),
    })
}

/// The USER principal u-alice, who launches in most tests.
pub fn alice() -> Option<proto::Principal> {
    user("u-alice")
}

/// A selector of `count` full GPUs, whichever are free.
pub fn gpus(count: u32) -> proto::DeviceSelector {
    proto::DeviceSelector {
        gpu_count: count,
        ..Default::default()
    }
}

/// A selector of exactly these devices (GPU or MIG uuids).
pub fn exact(uuids: &[&str]) -> proto::DeviceSelector {
    proto::DeviceSelector {
        device_uuids: uuids.iter().map(|s| s.to_string()).collect(),
        ..Default::default()
    }
}

/// The command `sh -c script`.
pub fn sh(script: &str) -> [&str; 3] {
    ["sh", "-c", script]
}

/// u-alice's personal launch of the test image: `command` on `devices`.
pub fn launch_request(
    request_id: &str,
    devices: proto::DeviceSelector,
    command: &[&str],
) -> proto::LaunchRequest {
    launch_as(request_id, "u-alice", None, devices, command)
}

/// A launch of the test image by USER `subject`, in the scope of org `org`
/// where one is given (personal otherwise): `command` on `devices`.
pub fn launch_as(
    request_id: &str,
    subject: &str,
    org: Option<&str>,
    devices: proto::DeviceSelector,
    command: &[&str],
) -> proto::LaunchRequest {
    proto::LaunchRequest {
        request_id: request_id.into(),
        principal: user(subject),
        scope: match org {
            Some(_) => proto::Scope::Org,
            None => proto::Scope::Personal,
        }
        .into(),
        org_id: org.unwrap_or_default().into(),
        devices: Some(devices),
        container: Some(proto::ContainerSpec {
            image: test_image(),
            command: command.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }),
    }
}

/// A stop of `session_id` by `principal` (`None`: the local operator), with
/// a one-second grace.
pub fn stop_request(session_id: &str, principal: Option<proto::Principal>) -> proto::StopRequest {
    proto::StopRequest {
        session_id: session_id.into(),
        principal,
        timeout_seconds: 1,
    }
}
