//! What the fuzz targets check beyond "does not panic": a launch request
//! that passes validation asks for nothing beyond its devices and its own
//! volumes, a refusal names what to change, and a file that parses can be
//! queried without panicking.

use std::collections::HashSet;
use std::path::Path;
use std::time::{Duration, SystemTime};

use gpuwarden::config::Config;
use gpuwarden::error::{Reason, Refusal};
use gpuwarden::gpu::DeviceUuid;
use gpuwarden::gpu::simulated::parse_fixture;
use gpuwarden::inventory::InventoryView;
use gpuwarden::policy::Policy;
use gpuwarden::proto;
use gpuwarden::session::manager::volume_name;
use gpuwarden::session::request::{
    DEVICE_VARIABLES, HOST_DEVICE_VARIABLES, LaunchPlan, LaunchRequest, check_id,
};

/// Validates `request` and checks the outcome.
pub fn check_launch(request: LaunchRequest) {
    let original = request.clone();
    match request.validate() {
        Ok(plan) => check_plan(&original, &plan),
        Err(refusal) => check_refusal(&refusal),
    }
}

/// Decodes a wire `LaunchRequest` as the server would, converts it as the
/// service does and validates it.
pub fn check_launch_bytes(bytes: &[u8]) {
    let Ok(message) = <proto::LaunchRequest as prost::Message>::decode(bytes) else {
        return;
    };
    match LaunchRequest::try_from(message) {
        Ok(request) => check_launch(request),
        Err(refusal) => check_refusal(&refusal),
    }
}

fn check_refusal(refusal: &Refusal) {
    assert!(!refusal.message.is_empty(), "a refusal without a message");
    // Messages go into a gRPC header, the audit trail and events: a huge
    // value in a request must not make a huge message.
    assert!(
        refusal.message.len() < 1024,
        "a refusal of {} bytes",
        refusal.message.len()
    );
    match refusal.reason {
        Reason::InvalidRequest | Reason::UnknownDevice => {}
        Reason::ForbiddenContainerOption => assert!(
            refusal
                .metadata
                .iter()
                .any(|(k, v)| k == "option" && !v.is_empty()),
            "FORBIDDEN_CONTAINER_OPTION without the option: {refusal:?}"
        ),
        other => panic!("validation refused with {other:?}: {refusal:?}"),
    }
}

fn check_plan(request: &LaunchRequest, plan: &LaunchPlan) {
    let c = &request.container;
    assert!(!c.privileged, "privileged accepted");
    assert!(
        matches!(c.network_mode.as_str(), "" | "bridge" | "none"),
        "network_mode {:?} accepted",
        c.network_mode
    );
    assert!(
        c.pid_mode.is_empty() && c.ipc_mode.is_empty(),
        "host namespace accepted"
    );
    assert!(c.cap_add.is_empty(), "cap_add accepted");
    assert!(c.devices.is_empty(), "host devices accepted");
    assert!(c.binds.is_empty(), "binds accepted");
    assert!(!plan.request_id.is_empty());
    assert!(check_id("account", &plan.account_id).is_ok());
    for (name, value) in &plan.env {
        assert!(
            !DEVICE_VARIABLES
                .iter()
                .chain(HOST_DEVICE_VARIABLES.iter().map(|(v, _)| v))
                .any(|v| v.eq_ignore_ascii_case(name)),
            "device variable {name} accepted"
        );
        assert!(
            !name.is_empty() && !name.contains(['=', '\0']),
            "env name {name:?}"
        );
        assert!(!value.contains('\0'), "NUL in env {name}");
    }
    assert!(plan.command.iter().all(|a| !a.contains('\0')));
    assert!(!plan.image.is_empty() && !plan.image.contains(char::is_whitespace));
    let mut targets = HashSet::new();
    for volume in &plan.volumes {
        assert!(
            !volume.name.is_empty() && !volume.name.contains(['/', '\\', '\0']),
            "volume name {:?} accepted",
            volume.name
        );
        assert!(volume.target.starts_with('/') && volume.target != "/");
        assert!(
            !volume.target.split('/').any(|p| p == ".."),
            "volume target {:?} accepted",
            volume.target
        );
        let parts: Vec<&str> = volume.target.split('/').filter(|p| !p.is_empty()).collect();
        assert!(
            !parts.starts_with(&["run", "nvidia-container-devices"])
                && !parts.starts_with(&["var", "run", "nvidia-container-devices"]),
            "volume target {:?} is where the toolkit reads device requests",
            volume.target
        );
        assert!(targets.insert(volume.target.trim_end_matches('/')));
        // The Docker volume of the plan's account never belongs to another
        // account: the account id is recoverable from the volume's name.
        let docker_name = volume_name(&plan.account_id, &volume.name);
        assert_eq!(
            owner_of_volume(&docker_name, &volume.name),
            Some(plan.account_id.as_str()),
            "volume {docker_name} is ambiguous"
        );
    }
}

/// The account a Docker volume name belongs to when read back as the agent
/// names volumes, `gpuwarden.<account>.<name>`, splitting at the last dot;
/// `None` when `name` is not what that split gives.
pub fn owner_of_volume<'a>(docker_name: &'a str, name: &str) -> Option<&'a str> {
    let rest = docker_name.strip_prefix("gpuwarden.")?;
    let (account, tail) = rest.rsplit_once('.')?;
    (tail == name).then_some(account)
}

/// Parses a policy and asks it everything the agent asks.
pub fn check_policy(text: &str) {
    let host: HashSet<DeviceUuid> = [
        "GPU-6a5da790-0728-45bf-9407-3e280f594b6d",
        "MIG-0d4b7102-166c-4d26-804d-35a10322fc1b",
    ]
    .into_iter()
    .map(DeviceUuid::new)
    .collect();
    let Ok(loaded) = Policy::parse(Path::new("policy.toml"), text, Some(&host)) else {
        return;
    };
    let policy = loaded.policy;
    let accounts: Vec<String> = policy.accounts().map(str::to_owned).collect();
    for account in &accounts {
        let _ = policy.kind_of(account);
        let _ = policy.session_limit(account);
        let _ = policy.opening_balance(account);
        let billed = policy.billed_account(account);
        assert!(policy.kind_of(billed).is_some());
        let ancestors = policy.ancestors(account);
        assert!(ancestors.len() <= accounts.len());
        let subtree = policy.subtree(account);
        assert!(subtree.len() <= accounts.len());
        for other in accounts.iter().take(16) {
            let _ = policy.role_of(other, account);
        }
    }
    for reservation in policy.reservations() {
        for window in &reservation.windows {
            assert!(window.start < window.end);
        }
        let _ = reservation.is_active(gpuwarden::clock::UnixNanos(0));
    }
    let _ = policy.rate("NVIDIA A100-SXM4-80GB");
}

/// Parses a config file's text.
pub fn check_config(text: &str) {
    if let Ok(config) = Config::parse(Path::new("/etc/gpuwarden/gpuwarden.toml"), text) {
        assert!(!config.node_id.is_empty());
    }
}

/// Parses a host fixture and builds the inventory the API shows from it.
pub fn check_fixture(text: &str) {
    let Ok(scan) = parse_fixture(Path::new("fixture.toml"), text) else {
        return;
    };
    let at = SystemTime::UNIX_EPOCH + Duration::from_secs(1_795_392_000);
    let view = InventoryView::from_scan("node", &scan, at);
    let wire = proto::Inventory::from(&view);
    assert!(wire.devices.len() >= scan.gpus.len());
}
