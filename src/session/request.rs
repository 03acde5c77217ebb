//! What a launch may ask for. A request arrives as [`LaunchRequest`] (the
//! API's shape, untrusted) and leaves as [`LaunchPlan`] (checked, ready to
//! build a container from), or as a refusal that names what to change.
//! Anything that would reach beyond the session's own devices and volumes
//! (privileges, host namespaces, host paths, extra devices or capabilities,
//! the device variables) is refused, never silently dropped.

use std::collections::BTreeMap;

use super::{Principal, Scope};
use crate::allocation::DeviceSelector;
use crate::error::{Reason, Refusal};
use crate::gpu::DeviceUuid;
use crate::runtime::Network;

/// Variables that choose devices: the agent sets them to the session's
/// devices, a request cannot.
pub const DEVICE_VARIABLES: [&str; 2] = ["NVIDIA_VISIBLE_DEVICES", "CUDA_VISIBLE_DEVICES"];

/// Variables with which the NVIDIA container toolkit gives a container more
/// of the host than its GPUs (MIG control and monitoring, IMEX channels,
/// GPUDirect Storage, InfiniBand, NVSwitch, GDRCopy), each with the value
/// under which the toolkit adds nothing. A request cannot set them, and the
/// agent sets every container's to these values, so an image's own `ENV`
/// cannot ask for them either: the toolkit reads the container's merged
/// environment, where the container's value wins over the image's.
pub const HOST_DEVICE_VARIABLES: [(&str, &str); 7] = [
    // The toolkit asks only for a non-empty value (and refuses it in an
    // unprivileged container, failing the launch).
    ("NVIDIA_MIG_CONFIG_DEVICES", ""),
    ("NVIDIA_MIG_MONITOR_DEVICES", ""),
    // A device list: empty means none ("void").
    ("NVIDIA_IMEX_CHANNELS", ""),
    // Each is on only when `enabled`.
    ("NVIDIA_GDS", "disabled"),
    ("NVIDIA_MOFED", "disabled"),
    ("NVIDIA_NVSWITCH", "disabled"),
    ("NVIDIA_GDRCOPY", "disabled"),
];

/// Where the toolkit, when configured to, reads device requests from the
/// container's mounts (`accept-nvidia-visible-devices-as-volume-mounts`,
/// IMEX channels as volume mounts): no volume may be mounted there.
const TOOLKIT_MOUNT_DIRS: [&[&str]; 2] = [
    &["var", "run", "nvidia-container-devices"],
    &["run", "nvidia-container-devices"],
];

const MAX_ID_LEN: usize = 64;
const MAX_REQUEST_ID_LEN: usize = 128;
const MAX_DEVICES: u32 = 64;
const MAX_ENV: usize = 1024;
const MAX_ENV_BYTES: usize = 256 * 1024;
const MAX_ARGS: usize = 1024;
/// Linux's limit on one argument of execve (MAX_ARG_STRLEN), less its NUL.
const MAX_ARG_BYTES: usize = 128 * 1024 - 1;
const MAX_COMMAND_BYTES: usize = 256 * 1024;
const MAX_VOLUMES: usize = 32;
/// Device names and MIG profiles are short ("NVIDIA H100 80GB HBM3", "1g.10gb").
const MAX_SELECTOR_LEN: usize = 128;
const MAX_IMAGE_LEN: usize = 512;
/// How much of a refused value a message repeats.
const SHOWN_CHARS: usize = 64;

/// A launch as the API received it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LaunchRequest {
    pub request_id: String,
    pub principal: Option<Principal>,
    pub scope: Option<Scope>,
    pub org_id: String,
    pub gpu_count: u32,
    pub gpu_model: String,
    pub mig_profile: String,
    pub mig_count: u32,
    pub device_uuids: Vec<String>,
    pub container: ContainerRequest,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ContainerRequest {
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<VolumeRequest>,
    pub privileged: bool,
    pub network_mode: String,
    pub pid_mode: String,
    pub ipc_mode: String,
    pub cap_add: Vec<String>,
    pub devices: Vec<String>,
    pub binds: Vec<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct VolumeRequest {
    pub name: String,
    pub target: String,
    pub read_only: bool,
}

/// A launch that passed every check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LaunchPlan {
    pub request_id: String,
    pub principal: Principal,
    pub scope: Scope,
    /// The user (personal) or org (org scope) the session runs under.
    pub account_id: String,
    pub devices: DeviceSelector,
    pub image: String,
    pub command: Vec<String>,
    pub env: BTreeMap<String, String>,
    pub volumes: Vec<VolumeRequest>,
    pub network: Network,
}

fn invalid(message: impl Into<String>) -> Refusal {
    Refusal::new(Reason::InvalidRequest, message)
}

fn forbidden(option: &str, message: impl Into<String>) -> Refusal {
    Refusal::new(Reason::ForbiddenContainerOption, message).with("option", option)
}

/// A refused value as a message repeats it: escaped, and cut after
/// [`SHOWN_CHARS`] characters so that a huge value never makes a huge
/// message (which would go into a gRPC header, the audit trail and events).
fn shown(value: &str) -> String {
    let mut chars = value.chars();
    let head: String = chars.by_ref().take(SHOWN_CHARS).collect();
    let escaped = head.escape_debug().to_string();
    if chars.next().is_none() {
        escaped
    } else {
        format!("{escaped}... ({} bytes)", value.len())
    }
}

/// `value` cut to at most `max` bytes (at a character boundary), with a
/// note of its full length: for recording what an unvalidated request said
/// (audit trail, events, logs) without recording megabytes of it.
pub fn clipped(value: &str, max: usize) -> std::borrow::Cow<'_, str> {
    if value.len() <= max {
        return value.into();
    }
    let mut end = max;
    while !value.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}... ({} bytes)", &value[..end], value.len()).into()
}

/// Account, user and org ids end up in labels and volume names: letters,
/// digits, `.`, `_`, `-`, starting with a letter or digit.
pub fn check_id(field: &str, value: &str) -> Result<(), Refusal> {
    let plain = value.len() <= MAX_ID_LEN
        && value
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphanumeric())
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if !plain {
        return Err(invalid(format!(
            "{field} `{}` is not an id: use 1 to {MAX_ID_LEN} letters, digits, `.`, `_` or `-`, \
             starting with a letter or digit",
            shown(value)
        )));
    }
    Ok(())
}

impl LaunchRequest {
    /// Checks everything that can be checked without the node's state.
    pub fn validate(self) -> Result<LaunchPlan, Refusal> {
        let request_id = self.request_id;
        if request_id.is_empty()
            || request_id.len() > MAX_REQUEST_ID_LEN
            || !request_id.chars().all(|c| c.is_ascii_graphic())
        {
            return Err(invalid(format!(
                "request_id must be 1 to {MAX_REQUEST_ID_LEN} printable characters without spaces: \
                 a key the caller reuses when it retries"
            )));
        }
        let principal = self
            .principal
            .ok_or_else(|| invalid("principal is required: who launches"))?;
        check_id("principal.subject", &principal.subject)?;
        let scope = self
            .scope
            .ok_or_else(|| invalid("scope is required: SCOPE_PERSONAL or SCOPE_ORG"))?;
        let account_id = match scope {
            Scope::Personal => {
                if !self.org_id.is_empty() {
                    return Err(invalid(
                        "org_id is set on a personal launch: use scope SCOPE_ORG, or leave org_id empty",
                    ));
                }
                principal.subject.clone()
            }
            Scope::Org => {
                if self.org_id.is_empty() {
                    return Err(invalid("org_id is required with scope SCOPE_ORG"));
                }
                check_id("org_id", &self.org_id)?;
                self.org_id
            }
        };
        let devices = selector(
            self.gpu_count,
            self.gpu_model,
            self.mig_profile,
            self.mig_count,
            self.device_uuids,
        )?;
        let container = self.container;
        let network = container_options(&container)?;
        let image = container.image;
        if !is_image_reference(&image) {
            return Err(invalid(format!(
                "container.image `{}` is not an image reference: use NAME[:TAG][@DIGEST] with a \
                 lowercase name, such as `busybox:1.36` or `registry.example.com:5000/team/app:v2`",
                shown(&image)
            )));
        }
        check_command(&container.command)?;
        check_env(&container.env)?;
        check_volumes(&container.volumes)?;
        Ok(LaunchPlan {
            request_id,
            principal,
            scope,
            account_id,
            devices,
            image,
            command: container.command,
            env: container.env,
            volumes: container.volumes,
            network,
        })
    }
}

fn selector(
    gpu_count: u32,
    gpu_model: String,
    mig_profile: String,
    mig_count: u32,
    device_uuids: Vec<String>,
) -> Result<DeviceSelector, Refusal> {
    let ways = [
        gpu_count > 0,
        mig_count > 0 || !mig_profile.is_empty(),
        !device_uuids.is_empty(),
    ];
    match ways.iter().filter(|&&w| w).count() {
        0 => {
            return Err(invalid(
                "devices: set gpu_count, or mig_profile with mig_count, or device_uuids",
            ));
        }
        1 => {}
        _ => {
            return Err(invalid(
                "devices: use one of gpu_count, mig_profile + mig_count, or device_uuids, not several",
            ));
        }
    }
    if gpu_count > MAX_DEVICES
        || mig_count > MAX_DEVICES
        || device_uuids.len() > MAX_DEVICES as usize
    {
        return Err(invalid(format!(
            "devices: at most {MAX_DEVICES} per session"
        )));
    }
    for (field, value) in [
        ("devices.gpu_model", &gpu_model),
        ("devices.mig_profile", &mig_profile),
    ] {
        if value.len() > MAX_SELECTOR_LEN || value.chars().any(char::is_control) {
            return Err(invalid(format!(
                "{field} `{}` is not a device name or MIG profile: use at most \
                 {MAX_SELECTOR_LEN} printable characters, as GetInventory shows them",
                shown(value)
            )));
        }
    }
    if gpu_count > 0 {
        return Ok(DeviceSelector::Gpus {
            count: gpu_count,
            model: (!gpu_model.is_empty()).then_some(gpu_model),
        });
    }
    if !gpu_model.is_empty() {
        return Err(invalid(
            "devices.gpu_model only goes with devices.gpu_count",
        ));
    }
    if !device_uuids.is_empty() {
        // Well-formed but unknown UUIDs are the allocator's UNKNOWN_DEVICE;
        // these are not UUIDs at all.
        if let Some(bad) = device_uuids.iter().find(|u| {
            !(u.starts_with("GPU-") || u.starts_with("MIG-"))
                || u.len() <= 4
                || u.len() > 128
                || !u.chars().all(|c| c.is_ascii_graphic())
        }) {
            return Err(invalid(format!(
                "devices.device_uuids: `{}` is not a device UUID: NVML's UUIDs start with `GPU-` \
                 or `MIG-`; ask GetInventory for this node's",
                shown(bad)
            )));
        }
        return Ok(DeviceSelector::Exact(
            device_uuids.into_iter().map(DeviceUuid::new).collect(),
        ));
    }
    if mig_profile.is_empty() || mig_count == 0 {
        return Err(invalid("devices: mig_profile and mig_count go together"));
    }
    Ok(DeviceSelector::Mig {
        profile: mig_profile,
        count: mig_count,
    })
}

/// Refuses every option that would reach beyond the container's own
/// devices and namespaces; returns the network it may have.
fn container_options(container: &ContainerRequest) -> Result<Network, Refusal> {
    if container.privileged {
        return Err(forbidden(
            "privileged",
            "container.privileged is not allowed: a privileged container sees every device of the host",
        ));
    }
    let network = match container.network_mode.as_str() {
        "" | "bridge" => Network::Bridge,
        "none" => Network::None,
        other => {
            return Err(forbidden(
                "network_mode",
                format!(
                    "container.network_mode `{}` is not allowed: use \"bridge\" (the default) or \"none\"",
                    shown(other)
                ),
            ));
        }
    };
    for (option, value) in [
        ("pid_mode", &container.pid_mode),
        ("ipc_mode", &container.ipc_mode),
    ] {
        if !value.is_empty() {
            return Err(forbidden(
                option,
                format!(
                    "container.{option} is not allowed: sessions never share the host's or another container's namespaces"
                ),
            ));
        }
    }
    if !container.cap_add.is_empty() {
        return Err(forbidden(
            "cap_add",
            "container.cap_add is not allowed: sessions get Docker's default capabilities only",
        ));
    }
    if !container.devices.is_empty() {
        return Err(forbidden(
            "devices",
            "container.devices is not allowed: GPUs come through `devices` of the request, nothing else of the host",
        ));
    }
    if !container.binds.is_empty() {
        return Err(forbidden(
            "binds",
            "container.binds is not allowed: use named volumes (container.volumes)",
        ));
    }
    Ok(network)
}

fn check_command(command: &[String]) -> Result<(), Refusal> {
    if command.len() > MAX_ARGS {
        return Err(invalid(format!(
            "container.command has {} arguments; at most {MAX_ARGS}",
            command.len()
        )));
    }
    if let Some((i, _)) = command.iter().enumerate().find(|(_, a)| a.contains('\0')) {
        return Err(invalid(format!(
            "container.command[{i}] contains a NUL byte"
        )));
    }
    if let Some((i, arg)) = command
        .iter()
        .enumerate()
        .find(|(_, a)| a.len() > MAX_ARG_BYTES)
    {
        return Err(invalid(format!(
            "container.command[{i}] is {} bytes; at most {MAX_ARG_BYTES} (Linux's limit for one \
             argument): pass large data through a volume",
            arg.len()
        )));
    }
    let bytes: usize = command.iter().map(String::len).sum();
    if bytes > MAX_COMMAND_BYTES {
        return Err(invalid(format!(
            "container.command is {bytes} bytes; at most {MAX_COMMAND_BYTES}: pass large data \
             through a volume"
        )));
    }
    Ok(())
}

/// Whether `image` is a reference Docker accepts (its distribution
/// reference grammar): `[DOMAIN[:PORT]/]PATH[:TAG][@ALGORITHM:HEX]`, with
/// lowercase path components. Checked here so that a malformed one is the
/// caller's INVALID_REQUEST rather than an engine failure.
fn is_image_reference(image: &str) -> bool {
    if image.is_empty() || image.len() > MAX_IMAGE_LEN || !image.is_ascii() {
        return false;
    }
    let (rest, digest) = match image.split_once('@') {
        Some((rest, digest)) => (rest, Some(digest)),
        None => (image, None),
    };
    if let Some(digest) = digest {
        let Some((algorithm, hex)) = digest.split_once(':') else {
            return false;
        };
        let algorithm_ok = algorithm.split(['+', '.', '_', '-']).all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && part.chars().all(|c| c.is_ascii_alphanumeric())
        });
        if !algorithm_ok || hex.len() < 32 || !hex.chars().all(|c| c.is_ascii_hexdigit()) {
            return false;
        }
    }
    // A tag follows the last `:` after the last `/` (an earlier `:` is a
    // registry's port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(tag) = tag {
        let tag_ok = (1..=128).contains(&tag.len())
            && tag
                .chars()
                .next()
                .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_')
            && tag
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-'));
        if !tag_ok {
            return false;
        }
    }
    if name.is_empty() || name.len() > 255 {
        return false;
    }
    let mut components: Vec<&str> = name.split('/').collect();
    // The first component is a registry when it looks like a host: it has
    // a `.` or a `:` or is `localhost` (Docker's rule).
    if components.len() > 1 {
        let first = components[0];
        if first.contains(['.', ':']) || first == "localhost" {
            if !is_registry(first) {
                return false;
            }
            components.remove(0);
        }
    }
    components.iter().all(|c| is_path_component(c))
}

/// `host[:port]`: host labels of letters, digits and `-`, joined by `.`,
/// or a bracketed IPv6 address.
fn is_registry(domain: &str) -> bool {
    let (host, port) = if let Some(v6) = domain.strip_prefix('[') {
        let Some((address, after)) = v6.split_once(']') else {
            return false;
        };
        if address.is_empty() || !address.chars().all(|c| c.is_ascii_hexdigit() || c == ':') {
            return false;
        }
        match after {
            "" => return true,
            _ => match after.strip_prefix(':') {
                Some(port) => ("v6", Some(port)),
                None => return false,
            },
        }
    } else {
        match domain.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (domain, None),
        }
    };
    let port_ok =
        port.is_none_or(|p| (1..=5).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit()));
    let host_ok = host.split('.').all(|label| {
        !label.is_empty()
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
    });
    port_ok && host_ok
}

/// Lowercase letters and digits, with `.`, `_`, `__` or runs of `-`
/// between them.
fn is_path_component(component: &str) -> bool {
    let alnum = |c: char| c.is_ascii_lowercase() || c.is_ascii_digit();
    let bytes: Vec<char> = component.chars().collect();
    let (Some(first), Some(last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(*first) || !alnum(*last) {
        return false;
    }
    // Each run of separators between alphanumerics is `.`, `_`, `__` or
    // one or more `-`.
    component
        .split(alnum)
        .filter(|run| !run.is_empty())
        .all(|run| matches!(run, "." | "_" | "__") || run.chars().all(|c| c == '-'))
        && component
            .chars()
            .all(|c| alnum(c) || matches!(c, '.' | '_' | '-'))
}

fn check_env(env: &BTreeMap<String, String>) -> Result<(), Refusal> {
    if env.len() > MAX_ENV {
        return Err(invalid(format!(
            "container.env has {} entries; at most {MAX_ENV}",
            env.len()
        )));
    }
    let mut bytes = 0;
    for (name, value) in env {
        if let Some(reserved) = DEVICE_VARIABLES
            .iter()
            .find(|v| name.eq_ignore_ascii_case(v))
        {
            return Err(forbidden(
                "env",
                format!("container.env cannot set {reserved}: the agent sets it to the session's devices"),
            )
            .with("variable", *reserved));
        }
        if let Some((reserved, _)) = HOST_DEVICE_VARIABLES
            .iter()
            .find(|(v, _)| name.eq_ignore_ascii_case(v))
        {
            return Err(forbidden(
                "env",
                format!(
                    "container.env cannot set {reserved}: the NVIDIA container toolkit would give \
                     the container host devices beyond its GPUs"
                ),
            )
            .with("variable", *reserved));
        }
        let valid_name = name
            .chars()
            .next()
            .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
            && name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !valid_name {
            return Err(invalid(format!(
                "container.env name `{}` is not a variable name (letters, digits, `_`)",
                shown(name)
            )));
        }
        if value.contains('\0') {
            return Err(invalid(format!("container.env {name} contains a NUL byte")));
        }
        bytes += name.len() + value.len();
    }
    if bytes > MAX_ENV_BYTES {
        return Err(invalid(format!(
            "container.env is {bytes} bytes; at most {MAX_ENV_BYTES}"
        )));
    }
    Ok(())
}

/// Volume names are the request's own namespace (prefixed by the owning
/// account when the container is built); a path is a host bind mount.
fn check_volumes(volumes: &[VolumeRequest]) -> Result<(), Refusal> {
    if volumes.len() > MAX_VOLUMES {
        return Err(invalid(format!("container.volumes: at most {MAX_VOLUMES}")));
    }
    let mut targets = std::collections::HashSet::new();
    for volume in volumes {
        if volume.name.contains('/') || volume.name.starts_with('.') || volume.name.starts_with('~')
        {
            return Err(forbidden(
                "volumes",
                format!(
                    "volume `{}` looks like a host path: host bind mounts are not allowed, name a volume",
                    shown(&volume.name)
                ),
            ));
        }
        check_id("container.volumes.name", &volume.name)?;
        // The Docker volume is `gpuwarden.<account>.<name>`: with a dot in
        // the name, account `a` with volume `b.c` and account `a.b` with
        // volume `c` would share `gpuwarden.a.b.c`.
        if volume.name.contains('.') {
            return Err(invalid(format!(
                "container.volumes.name `{}` has a `.`: use letters, digits, `_` or `-` \
                 (volumes are named gpuwarden.<account>.<name>, so a dot would reach into \
                 another account's names)",
                shown(&volume.name)
            )));
        }
        let target = &volume.target;
        if !target.starts_with('/')
            || target == "/"
            || target.split('/').any(|part| part == ".." || part == ".")
            || target.contains('\0')
            || target.len() > 1024
        {
            return Err(invalid(format!(
                "volume target `{}` must be an absolute path inside the container, without `.` or `..`",
                shown(target)
            )));
        }
        // Compared by components, as Docker cleans the path (`//run/x/`).
        let components: Vec<&str> = target.split('/').filter(|c| !c.is_empty()).collect();
        if let Some(dir) = TOOLKIT_MOUNT_DIRS
            .iter()
            .find(|dir| components.starts_with(dir))
        {
            return Err(forbidden(
                "volumes",
                format!(
                    "container.volumes target {} is under /{}, where the NVIDIA container toolkit reads \
                     device requests: mount the volume elsewhere",
                    shown(target),
                    dir.join("/")
                ),
            ));
        }
        if !targets.insert(target.trim_end_matches('/')) {
            return Err(invalid(format!(
                "two volumes are mounted at {}",
                shown(target)
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::session::PrincipalKind;

    fn base() -> LaunchRequest {
        LaunchRequest {
            request_id: "req-1".into(),
            principal: Some(Principal {
                subject: "u-alice".into(),
                kind: PrincipalKind::User,
            }),
            scope: Some(Scope::Personal),
            gpu_count: 1,
            container: ContainerRequest {
                image: "busybox:latest".into(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    fn refused(change: impl FnOnce(&mut LaunchRequest)) -> Refusal {
        let mut request = base();
        change(&mut request);
        request.validate().unwrap_err()
    }

    fn option_of(refusal: &Refusal) -> Option<&str> {
        refusal
            .metadata
            .iter()
            .find(|(k, _)| k == "option")
            .map(|(_, v)| v.as_str())
    }

    #[test]
    fn a_plain_personal_launch_passes() {
        let plan = base().validate().unwrap();
        assert_eq!(plan.account_id, "u-alice");
        assert_eq!(
            plan.devices,
            DeviceSelector::Gpus {
                count: 1,
                model: None
            }
        );
        assert_eq!(plan.network, Network::Bridge);
    }

    #[test]
    fn an_org_launch_runs_under_the_org() {
        let mut request = base();
        request.scope = Some(Scope::Org);
        request.org_id = "acme".into();
        assert_eq!(request.validate().unwrap().account_id, "acme");
        assert_eq!(
            refused(|r| r.scope = Some(Scope::Org)).reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            refused(|r| r.org_id = "acme".into()).reason,
            Reason::InvalidRequest
        );
    }

    #[test]
    fn every_escape_is_refused_naming_the_option() {
        type Change = Box<dyn FnOnce(&mut LaunchRequest)>;
        let cases: Vec<(&str, Change)> = vec![
            ("privileged", Box::new(|r| r.container.privileged = true)),
            (
                "network_mode",
                Box::new(|r| r.container.network_mode = "host".into()),
            ),
            (
                "network_mode",
                Box::new(|r| r.container.network_mode = "container:x".into()),
            ),
            (
                "pid_mode",
                Box::new(|r| r.container.pid_mode = "host".into()),
            ),
            (
                "ipc_mode",
                Box::new(|r| r.container.ipc_mode = "host".into()),
            ),
            (
                "cap_add",
                Box::new(|r| r.container.cap_add = vec!["SYS_ADMIN".into()]),
            ),
            (
                "devices",
                Box::new(|r| r.container.devices = vec!["/dev/nvidia1".into()]),
            ),
            (
                "binds",
                Box::new(|r| r.container.binds = vec!["/:/host".into()]),
            ),
            (
                "volumes",
                Box::new(|r| {
                    r.container.volumes = vec![VolumeRequest {
                        name: "/etc".into(),
                        target: "/x".into(),
                        read_only: false,
                    }]
                }),
            ),
            (
                "volumes",
                Box::new(|r| {
                    r.container.volumes = vec![VolumeRequest {
                        name: "../other".into(),
                        target: "/x".into(),
                        read_only: false,
                    }]
                }),
            ),
            (
                "env",
                Box::new(|r| {
                    r.container
                        .env
                        .insert("NVIDIA_VISIBLE_DEVICES".into(), "all".into());
                }),
            ),
            (
                "env",
                Box::new(|r| {
                    r.container
                        .env
                        .insert("cuda_visible_devices".into(), "0".into());
                }),
            ),
            (
                "env",
                Box::new(|r| {
                    r.container
                        .env
                        .insert("NVIDIA_IMEX_CHANNELS".into(), "0".into());
                }),
            ),
            (
                "env",
                Box::new(|r| {
                    r.container
                        .env
                        .insert("nvidia_mofed".into(), "enabled".into());
                }),
            ),
            (
                "env",
                Box::new(|r| {
                    r.container
                        .env
                        .insert("NVIDIA_MIG_MONITOR_DEVICES".into(), "all".into());
                }),
            ),
            (
                "volumes",
                Box::new(|r| {
                    r.container.volumes = vec![VolumeRequest {
                        name: "v".into(),
                        target: "//run/nvidia-container-devices/GPU-0/".into(),
                        read_only: false,
                    }]
                }),
            ),
            (
                "volumes",
                Box::new(|r| {
                    r.container.volumes = vec![VolumeRequest {
                        name: "v".into(),
                        target: "/var/run/nvidia-container-devices".into(),
                        read_only: false,
                    }]
                }),
            ),
        ];
        for (option, change) in cases {
            let refusal = refused(change);
            assert_eq!(
                refusal.reason,
                Reason::ForbiddenContainerOption,
                "{option}: {refusal:?}"
            );
            assert_eq!(option_of(&refusal), Some(option));
        }
    }

    #[test]
    fn device_selection_takes_exactly_one_way() {
        assert_eq!(refused(|r| r.gpu_count = 0).reason, Reason::InvalidRequest);
        assert_eq!(refused(|r| r.mig_count = 1).reason, Reason::InvalidRequest);
        assert_eq!(
            refused(|r| {
                r.gpu_count = 0;
                r.mig_profile = "1g.10gb".into();
            })
            .reason,
            Reason::InvalidRequest
        );
        assert_eq!(refused(|r| r.gpu_count = 65).reason, Reason::InvalidRequest);
        let mut mig = base();
        mig.gpu_count = 0;
        mig.mig_profile = "1g.10gb".into();
        mig.mig_count = 2;
        assert_eq!(
            mig.validate().unwrap().devices,
            DeviceSelector::Mig {
                profile: "1g.10gb".into(),
                count: 2
            }
        );
        let mut exact = base();
        exact.gpu_count = 0;
        exact.device_uuids = vec!["GPU-1".into()];
        assert_eq!(
            exact.validate().unwrap().devices,
            DeviceSelector::Exact(vec![DeviceUuid::new("GPU-1")])
        );
    }

    #[test]
    fn ids_and_names_stay_plain() {
        assert_eq!(
            refused(|r| r.request_id = String::new()).reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            refused(|r| r.request_id = "a b".into()).reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            refused(|r| r.principal = None).reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            refused(|r| r.principal.as_mut().unwrap().subject = "../root".into()).reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            refused(|r| r.container.image = String::new()).reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            refused(|r| {
                r.container.env.insert("1BAD".into(), "x".into());
            })
            .reason,
            Reason::InvalidRequest
        );
    }

    #[test]
    fn image_references_follow_dockers_grammar() {
        for good in [
            "busybox",
            "busybox:1.36",
            "gpuwarden-test/busybox:latest",
            "nvcr.io/nvidia/pytorch:24.05-py3",
            "localhost:5000/team/app_v2:v2.1",
            "registry.example.com:5000/a/b/c@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "[::1]:5000/x:y",
            "a__b/c-d/e.f:_tag",
            "sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            let mut request = base();
            request.container.image = good.into();
            assert!(request.validate().is_ok(), "{good}");
        }
        for bad in [
            "",
            "../x",
            "Foo",
            "a b",
            "busybox:",
            "busybox:-x",
            "x@sha256:zz",
            "x@sha256",
            "/x",
            "x/",
            "x//y",
            "a..b",
            "a-_b",
            "-a",
            "bad_host.:5000/x",
            "host:port/x",
            "caf\u{e9}",
            "x\0y",
        ] {
            let refusal = refused(|r| r.container.image = bad.into());
            assert_eq!(refusal.reason, Reason::InvalidRequest, "{bad}");
            assert!(refusal.message.contains("container.image"), "{bad}");
        }
        let long = format!("a:{}", "b".repeat(129));
        assert_eq!(
            refused(|r| r.container.image = long).reason,
            Reason::InvalidRequest
        );
    }

    #[test]
    fn refusals_repeat_at_most_a_bounded_part_of_a_huge_value() {
        let huge = "\u{1}".repeat(1 << 20);
        type Change<'a> = Box<dyn FnOnce(&mut LaunchRequest) + 'a>;
        let cases: Vec<Change> = vec![
            Box::new(|r| r.principal.as_mut().unwrap().subject = huge.clone()),
            Box::new(|r| r.container.network_mode = huge.clone()),
            Box::new(|r| r.container.image = huge.clone()),
            Box::new(|r| {
                r.container.env.insert(huge.clone(), "x".into());
            }),
            Box::new(|r| {
                r.gpu_count = 0;
                r.device_uuids = vec![huge.clone()];
            }),
            Box::new(|r| r.gpu_model = huge.clone()),
            Box::new(|r| {
                r.container.volumes = vec![VolumeRequest {
                    name: format!("/{huge}"),
                    target: "/x".into(),
                    read_only: false,
                }]
            }),
            Box::new(|r| {
                r.container.volumes = vec![VolumeRequest {
                    name: "v".into(),
                    target: format!("/{huge}"),
                    read_only: false,
                }]
            }),
        ];
        for change in cases {
            let refusal = refused(change);
            assert!(refusal.message.len() < 1024, "{}", refusal.message.len());
            assert!(refusal.message.contains("bytes)"), "{}", refusal.message);
        }
    }

    #[test]
    fn clipped_keeps_short_values_and_cuts_long_ones_at_a_char_boundary() {
        assert_eq!(clipped("req-1", 8), "req-1");
        assert_eq!(clipped("aaaa\u{e9}", 5), "aaaa... (6 bytes)");
        assert_eq!(clipped(&"x".repeat(1 << 20), 4), "xxxx... (1048576 bytes)");
    }

    #[test]
    fn commands_and_selectors_are_bounded() {
        let refusal = refused(|r| r.container.command = vec!["x".repeat(MAX_ARG_BYTES + 1)]);
        assert!(
            refusal.message.contains("command[0]"),
            "{}",
            refusal.message
        );
        let refusal = refused(|r| r.container.command = vec!["x".repeat(100_000); 3]);
        assert!(
            refusal
                .message
                .contains("container.command is 300000 bytes"),
            "{}",
            refusal.message
        );
        let refusal = refused(|r| r.container.command = vec!["a".into(), "b\0".into()]);
        assert!(
            refusal.message.contains("command[1]"),
            "{}",
            refusal.message
        );
        let mut request = base();
        request.container.command = vec!["x".repeat(MAX_ARG_BYTES)];
        assert!(request.validate().is_ok());
        assert_eq!(
            refused(|r| r.gpu_model = "H".repeat(MAX_SELECTOR_LEN + 1)).reason,
            Reason::InvalidRequest
        );
        assert_eq!(
            refused(|r| {
                r.gpu_count = 0;
                r.mig_profile = "1g.10gb\n".into();
                r.mig_count = 1;
            })
            .reason,
            Reason::InvalidRequest
        );
    }

    #[test]
    fn what_is_not_a_device_uuid_is_an_invalid_request() {
        for bad in ["", "GPU-", "0", "../../dev/nvidia0", "GPU-a b", "gpu-1"] {
            let refusal = refused(|r| {
                r.gpu_count = 0;
                r.device_uuids = vec![bad.into()];
            });
            assert_eq!(refusal.reason, Reason::InvalidRequest, "{bad:?}");
            assert!(refusal.message.contains("GetInventory"), "{bad:?}");
        }
    }

    #[test]
    fn a_volume_name_cannot_reach_into_another_accounts_names() {
        // Account `u-alice` with volume `x.data` would be gpuwarden.u-alice.x.data,
        // the volume `data` of an account `u-alice.x`.
        let refusal = refused(|r| {
            r.container.volumes = vec![VolumeRequest {
                name: "x.data".into(),
                target: "/data".into(),
                read_only: false,
            }]
        });
        assert_eq!(refusal.reason, Reason::InvalidRequest);
        assert!(refusal.message.contains("`.`"), "{}", refusal.message);
    }

    #[test]
    fn env_and_volumes_are_bounded() {
        let refusal = refused(|r| {
            for i in 0..=MAX_ENV {
                r.container.env.insert(format!("V{i}"), "x".into());
            }
        });
        assert_eq!(refusal.reason, Reason::InvalidRequest);
        let refusal = refused(|r| {
            r.container.volumes = vec![
                VolumeRequest {
                    name: "a".into(),
                    target: "/data".into(),
                    read_only: false,
                },
                VolumeRequest {
                    name: "b".into(),
                    target: "/data/".into(),
                    read_only: true,
                },
            ]
        });
        assert_eq!(refusal.reason, Reason::InvalidRequest);
        let refusal = refused(|r| {
            r.container.volumes = vec![VolumeRequest {
                name: "a".into(),
                target: "/data/../etc".into(),
                read_only: false,
            }]
        });
        assert_eq!(refusal.reason, Reason::InvalidRequest);
    }
}
