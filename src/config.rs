//! The daemon's config file: parsed strictly (unknown keys are errors),
//! validated once at start into [`Config`], whose values are ready to use.
//! Relative paths are taken from the config file's folder.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

use crate::toml_file::{self, FileError};

pub const DEFAULT_STATE_DIR: &str = "/var/lib/gpuwarden";
pub const DEFAULT_UNIX_SOCKET: &str = "/run/gpuwarden/gpuwarden.sock";
pub const DEFAULT_DOCKER_SOCKET: &str = "unix:///var/run/docker.sock";
pub const DEFAULT_METRICS_LISTEN: &str = "127.0.0.1:9477";

/// A config that cannot be used, with the key to change.
pub type ConfigError = FileError;

// ---- the file as written ----

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigFile {
    node_id: Option<String>,
    state_dir: Option<PathBuf>,
    #[serde(default)]
    gpu: GpuSection,
    #[serde(default)]
    docker: DockerSection,
    #[serde(default)]
    api: ApiSection,
    #[serde(default)]
    metrics: MetricsSection,
    #[serde(default)]
    policy: PolicySection,
    control_plane: Option<ControlPlaneSection>,
    #[serde(default)]
    metering: MeteringSection,
    #[serde(default)]
    ledger: LedgerSection,
    #[serde(default)]
    health: HealthSection,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct GpuSection {
    backend: Option<BackendChoice>,
    fixture: Option<PathBuf>,
    /// Where libnvidia-ml lives when not at the driver's usual name.
    nvml_library: Option<PathBuf>,
    rescan_seconds: Option<u64>,
}

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "lowercase")]
enum BackendChoice {
    Nvml,
    Simulated,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct DockerSection {
    socket: Option<String>,
    device_injection: Option<DeviceInjection>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ApiSection {
    unix_socket: Option<PathBuf>,
    unix_socket_group: Option<String>,
    listen: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    client_ca: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MetricsSection {
    listen: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct PolicySection {
    file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct ControlPlaneSection {
    endpoint: Option<String>,
    tls_cert: Option<PathBuf>,
    tls_key: Option<PathBuf>,
    ca: Option<PathBuf>,
    offline_grace_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct MeteringSection {
    checkpoint_seconds: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct LedgerSection {
    usage_retention_days: Option<u64>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct HealthSection {
    recovery_seconds: Option<u64>,
}

// ---- the validated config ----

/// How the agent puts the assigned devices into a container.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DeviceInjection {
    /// A Docker device request with driver `nvidia` and the devices' UUIDs
    /// (the NVIDIA Container Toolkit).
    Nvidia,
    /// A device request with driver `cdi`, `nvidia.com/gpu=<uuid>` (Docker 25+).
    Cdi,
    /// Only `NVIDIA_VISIBLE_DEVICES` / `CUDA_VISIBLE_DEVICES`: simulated hosts and tests.
    Env,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum GpuSource {
    Nvml { library: Option<PathBuf> },
    Simulated { fixture: PathBuf },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuConfig {
    pub source: GpuSource,
    pub rescan_interval: Duration,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DockerConfig {
    /// Path of the engine's Unix socket.
    pub socket: PathBuf,
    pub device_injection: DeviceInjection,
}

/// A certificate, its key and the CA that signs the peers we accept.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MtlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TcpListenerConfig {
    pub listen: SocketAddr,
    pub tls: MtlsFiles,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiConfig {
    pub unix_socket: PathBuf,
    /// Besides root and the agent's own user, members of this group (the
    /// gid of `api.unix_socket_group`) may use the Unix socket.
    pub unix_socket_gid: Option<u32>,
    /// The TCP listener, always with mutual TLS; `None` when not configured.
    pub tcp: Option<TcpListenerConfig>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ControlPlaneConfig {
    pub endpoint: String,
    pub tls: MtlsFiles,
    pub offline_grace: Duration,
}

/// Where accounts, limits and balances come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mode {
    /// Policy from a file on this host, balances in the local ledger.
    Standalone { policy_file: Option<PathBuf> },
    /// The control plane decides pools and balances.
    ControlPlane(ControlPlaneConfig),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// The file this was read from.
    pub path: PathBuf,
    pub node_id: String,
    pub state_dir: PathBuf,
    pub gpu: GpuConfig,
    pub docker: DockerConfig,
    pub api: ApiConfig,
    pub metrics_listen: SocketAddr,
    pub mode: Mode,
    pub checkpoint_interval: Duration,
    pub health_recovery: Duration,
    /// Raw usage records older than this are folded into the sums that
    /// hold them (only acknowledged ones in control-plane mode); `None`:
    /// kept.
    pub usage_retention: Option<Duration>,
}

impl Config {
    /// Reads and validates the config file at `path`.
    pub fn load(path: &Path) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml_file::load(path)?;
        Validator { path }.validate(file)
    }

    /// Validates config text as if read from `path`.
    pub fn parse(path: &Path, text: &str) -> Result<Self, ConfigError> {
        let file: ConfigFile = toml_file::parse(path, text)?;
        Validator { path }.validate(file)
    }
}

struct Validator<'a> {
    path: &'a Path,
}

impl Validator<'_> {
    fn bad(&self, key: &str, reason: impl Into<String>) -> ConfigError {
        FileError::invalid(self.path, key, reason)
    }

    /// A path from the file: relative ones are taken from the file's folder.
    fn resolve(&self, key: &str, path: PathBuf) -> Result<PathBuf, ConfigError> {
        if path.as_os_str().is_empty() {
            return Err(self.bad(key, "must not be empty"));
        }
        if path.is_absolute() {
            return Ok(path);
        }
        let base = self.path.parent().unwrap_or(Path::new("."));
        Ok(base.join(path))
    }

    fn seconds(
        &self,
        key: &str,
        value: Option<u64>,
        default: u64,
        range: std::ops::RangeInclusive<u64>,
    ) -> Result<Duration, ConfigError> {
        let seconds = value.unwrap_or(default);
        if !range.contains(&seconds) {
            return Err(self.bad(
                key,
                format!(
                    "{seconds} is out of range: use {} to {} seconds",
                    range.start(),
                    range.end()
                ),
            ));
        }
        Ok(Duration::from_secs(seconds))
    }

    fn socket_addr(&self, key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
        value.parse().map_err(|_| {
            self.bad(
                key,
                format!(
                    "`{value}` is not an address and port such as `127.0.0.1:9477` or `[::]:7443`"
                ),
            )
        })
    }

    /// All three files of a mutual-TLS setup, named by their keys in `section`.
    fn mtls(
        &self,
        section: &str,
        [cert_key, key_key, ca_key]: [&str; 3],
        [cert, key, ca]: [Option<PathBuf>; 3],
        needed_for: &str,
    ) -> Result<MtlsFiles, ConfigError> {
        let take = |name: &str, value: Option<PathBuf>| {
            let key = format!("{section}.{name}");
            match value {
                Some(path) => self.resolve(&key, path),
                None => Err(self.bad(
                    &key,
                    format!("is required {needed_for}: gpuwarden only speaks mutual TLS there"),
                )),
            }
        };
        Ok(MtlsFiles {
            cert: take(cert_key, cert)?,
            key: take(key_key, key)?,
            ca: take(ca_key, ca)?,
        })
    }

    fn validate(&self, file: ConfigFile) -> Result<Config, ConfigError> {
        let node_id = match file.node_id {
            Some(id) => id,
            None => local_hostname().ok_or_else(|| {
                self.bad(
                    "node_id",
                    "is not set and the host name could not be read: set it",
                )
            })?,
        };
        validate_node_id(&node_id).map_err(|reason| self.bad("node_id", reason))?;

        let state_dir = self.resolve(
            "state_dir",
            file.state_dir.unwrap_or_else(|| DEFAULT_STATE_DIR.into()),
        )?;

        let gpu = self.gpu(file.gpu)?;
        let docker = self.docker(file.docker)?;
        let api = self.api(file.api)?;
        let metrics_listen = self.socket_addr(
            "metrics.listen",
            file.metrics
                .listen
                .as_deref()
                .unwrap_or(DEFAULT_METRICS_LISTEN),
        )?;

        let mode = match (file.control_plane, file.policy.file) {
            (Some(_), Some(_)) => {
                return Err(self.bad(
                    "policy.file",
                    "is for standalone mode, but [control_plane] is set too: the control plane \
                     sends the policy; remove one of them",
                ));
            }
            (Some(cp), None) => Mode::ControlPlane(self.control_plane(cp)?),
            (None, policy) => Mode::Standalone {
                policy_file: policy.map(|p| self.resolve("policy.file", p)).transpose()?,
            },
        };

        // Standalone keeps every record unless told; with a control plane,
        // acknowledged records go after a week (their sums stay).
        let retention_default = match mode {
            Mode::Standalone { .. } => None,
            Mode::ControlPlane(_) => Some(7),
        };
        let usage_retention = match file.ledger.usage_retention_days.or(retention_default) {
            None => None,
            Some(days @ 1..=36_500) => Some(Duration::from_secs(days * 86_400)),
            Some(days) => {
                return Err(self.bad(
                    "ledger.usage_retention_days",
                    format!(
                        "{days} is out of range: use 1 to 36500 days, or leave it out to keep every record"
                    ),
                ));
            }
        };

        Ok(Config {
            path: self.path.to_path_buf(),
            node_id,
            state_dir,
            gpu,
            docker,
            api,
            metrics_listen,
            mode,
            checkpoint_interval: self.seconds(
                "metering.checkpoint_seconds",
                file.metering.checkpoint_seconds,
                60,
                1..=3600,
            )?,
            health_recovery: self.seconds(
                "health.recovery_seconds",
                file.health.recovery_seconds,
                600,
                1..=7 * 86400,
            )?,
            usage_retention,
        })
    }

    fn gpu(&self, gpu: GpuSection) -> Result<GpuConfig, ConfigError> {
        let source = match gpu.backend.unwrap_or(BackendChoice::Nvml) {
            BackendChoice::Nvml => {
                if gpu.fixture.is_some() {
                    return Err(self.bad(
                        "gpu.fixture",
                        "is only read with backend = \"simulated\"; remove it or change gpu.backend",
                    ));
                }
                GpuSource::Nvml {
                    library: gpu
                        .nvml_library
                        .map(|p| self.resolve("gpu.nvml_library", p))
                        .transpose()?,
                }
            }
            BackendChoice::Simulated => {
                if gpu.nvml_library.is_some() {
                    return Err(self.bad(
                        "gpu.nvml_library",
                        "is only used with backend = \"nvml\"; remove it or change gpu.backend",
                    ));
                }
                let fixture = gpu.fixture.ok_or_else(|| {
                    self.bad(
                        "gpu.fixture",
                        "is required with backend = \"simulated\": the host fixture to read, \
                         e.g. fixtures/sim-dgx-a100.toml",
                    )
                })?;
                GpuSource::Simulated {
                    fixture: self.resolve("gpu.fixture", fixture)?,
                }
            }
        };
        Ok(GpuConfig {
            source,
            rescan_interval: self.seconds(
                "gpu.rescan_seconds",
                gpu.rescan_seconds,
                30,
                1..=86400,
            )?,
        })
    }

    fn docker(&self, docker: DockerSection) -> Result<DockerConfig, ConfigError> {
        let socket = docker
            .socket
            .unwrap_or_else(|| DEFAULT_DOCKER_SOCKET.into());
        let path = socket
            .strip_prefix("unix://")
            .filter(|path| path.starts_with('/'))
            .ok_or_else(|| {
                self.bad(
                    "docker.socket",
                    format!(
                        "`{socket}` is not a Unix socket address such as `{DEFAULT_DOCKER_SOCKET}`: \
                         gpuwarden talks to the local engine only"
                    ),
                )
            })?;
        Ok(DockerConfig {
            socket: PathBuf::from(path),
            device_injection: docker.device_injection.unwrap_or(DeviceInjection::Nvidia),
        })
    }

    fn api(&self, api: ApiSection) -> Result<ApiConfig, ConfigError> {
        let unix_socket = self.resolve(
            "api.unix_socket",
            api.unix_socket
                .unwrap_or_else(|| DEFAULT_UNIX_SOCKET.into()),
        )?;
        let tls_files = [api.tls_cert, api.tls_key, api.client_ca];
        let tcp = match api.listen {
            Some(listen) => Some(TcpListenerConfig {
                listen: self.socket_addr("api.listen", &listen)?,
                tls: self.mtls(
                    "api",
                    ["tls_cert", "tls_key", "client_ca"],
                    tls_files,
                    "when api.listen is set",
                )?,
            }),
            None => {
                if let Some(name) = ["tls_cert", "tls_key", "client_ca"]
                    .iter()
                    .zip(&tls_files)
                    .find_map(|(name, file)| file.as_ref().map(|_| name))
                {
                    return Err(self.bad(
                        &format!("api.{name}"),
                        "is only used by the TCP listener: set api.listen too, or remove it",
                    ));
                }
                None
            }
        };
        let unix_socket_gid = match api.unix_socket_group {
            Some(name) => match nix::unistd::Group::from_name(&name) {
                Ok(Some(group)) => Some(group.gid.as_raw()),
                Ok(None) => {
                    return Err(self.bad(
                        "api.unix_socket_group",
                        format!("no group `{name}` on this host; create it or name another"),
                    ));
                }
                Err(errno) => {
                    return Err(self.bad(
                        "api.unix_socket_group",
                        format!("cannot look up group `{name}`: {errno}"),
                    ));
                }
            },
            None => None,
        };
        Ok(ApiConfig {
            unix_socket,
            unix_socket_gid,
            tcp,
        })
    }

    fn control_plane(&self, cp: ControlPlaneSection) -> Result<ControlPlaneConfig, ConfigError> {
        let endpoint = cp.endpoint.ok_or_else(|| {
            self.bad(
                "control_plane.endpoint",
                "is required in control-plane mode, e.g. `https://cp.example.net:443`",
            )
        })?;
        if !endpoint.starts_with("https://") || endpoint.len() == "https://".len() {
            return Err(self.bad(
                "control_plane.endpoint",
                format!("`{endpoint}` must be an https:// URL: the link is always mutual TLS"),
            ));
        }
        Ok(ControlPlaneConfig {
            endpoint,
            tls: self.mtls(
                "control_plane",
                ["tls_cert", "tls_key", "ca"],
                [cp.tls_cert, cp.tls_key, cp.ca],
                "in control-plane mode",
            )?,
            offline_grace: self.seconds(
                "control_plane.offline_grace_seconds",
                cp.offline_grace_seconds,
                300,
                0..=7 * 86400,
            )?,
        })
    }
}

/// Node ids appear in container labels, metrics and the control plane's
/// records: keep them short and plain.
fn validate_node_id(id: &str) -> Result<(), String> {
    let plain = |c: char| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.');
    if id.is_empty() || id.len() > 63 || !id.chars().all(plain) {
        return Err(format!(
            "`{id}` is not a node id: use 1 to 63 letters, digits, `-`, `_` or `.`"
        ));
    }
    Ok(())
}

fn local_hostname() -> Option<String> {
    let name = std::fs::read_to_string("/proc/sys/kernel/hostname").ok()?;
    let name = name.trim();
    (!name.is_empty()).then(|| name.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        Config::parse(Path::new("/etc/gpuwarden/gpuwarden.toml"), text)
    }

    fn refused_key(text: &str) -> (String, String) {
        match parse(text) {
            Err(FileError::Invalid { problem, .. }) => (problem.key, problem.reason),
            other => panic!("expected the config to be refused, got {other:?}"),
        }
    }

    #[test]
    fn an_empty_file_gets_the_documented_defaults() {
        let config = parse("node_id = \"n1\"").unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/var/lib/gpuwarden"));
        assert_eq!(config.gpu.source, GpuSource::Nvml { library: None });
        assert_eq!(config.gpu.rescan_interval, Duration::from_secs(30));
        assert_eq!(config.docker.socket, PathBuf::from("/var/run/docker.sock"));
        assert_eq!(config.docker.device_injection, DeviceInjection::Nvidia);
        assert_eq!(config.api.unix_socket, PathBuf::from(DEFAULT_UNIX_SOCKET));
        assert_eq!(config.api.tcp, None);
        assert_eq!(config.metrics_listen, "127.0.0.1:9477".parse().unwrap());
        assert_eq!(config.mode, Mode::Standalone { policy_file: None });
        assert_eq!(config.checkpoint_interval, Duration::from_secs(60));
        assert_eq!(config.health_recovery, Duration::from_secs(600));
        assert_eq!(config.usage_retention, None);
    }

    #[test]
    fn the_commented_production_example_is_a_valid_config() {
        let config = parse(include_str!("../systemd/gpuwarden.toml")).unwrap();
        assert_eq!(
            config.usage_retention,
            Some(Duration::from_secs(90 * 86_400))
        );
    }

    #[test]
    fn the_node_id_defaults_to_the_host_name() {
        let config = parse("").unwrap();
        assert_eq!(Some(config.node_id), local_hostname());
    }

    #[test]
    fn relative_paths_are_taken_from_the_config_files_folder() {
        let config = parse(
            "node_id = \"n\"\nstate_dir = \"state\"\n[gpu]\nbackend = \"simulated\"\nfixture = \"../fixtures/sim.toml\"",
        )
        .unwrap();
        assert_eq!(config.state_dir, PathBuf::from("/etc/gpuwarden/state"));
        assert_eq!(
            config.gpu.source,
            GpuSource::Simulated {
                fixture: PathBuf::from("/etc/gpuwarden/../fixtures/sim.toml")
            }
        );
    }

    #[test]
    fn unknown_keys_are_errors_naming_the_key() {
        let (key, reason) = refused_key("[api]\nlisten_addr = \"0.0.0.0:1\"");
        assert_eq!(key, "api.listen_addr");
        assert!(reason.contains("unknown field"), "{reason}");
        let (key, _) = refused_key("colour = \"blue\"");
        assert_eq!(key, "colour");
        let (key, _) = refused_key("[gpus]\nbackend = \"nvml\"");
        assert_eq!(key, "gpus");
    }

    #[test]
    fn wrong_values_name_the_key_and_the_fix() {
        let cases = [
            (
                "[gpu]\nbackend = \"cuda\"",
                "gpu.backend",
                "unknown variant",
            ),
            (
                "[gpu]\nbackend = \"simulated\"",
                "gpu.fixture",
                "is required",
            ),
            (
                "[gpu]\nfixture = \"x.toml\"",
                "gpu.fixture",
                "only read with backend",
            ),
            (
                "[gpu]\nrescan_seconds = 0",
                "gpu.rescan_seconds",
                "out of range",
            ),
            (
                "[ledger]\nusage_retention_days = 0",
                "ledger.usage_retention_days",
                "leave it out to keep every record",
            ),
            (
                "[ledger]\nretention = 3",
                "ledger.retention",
                "unknown field",
            ),
            (
                "[gpu]\nrescan_seconds = -3",
                "gpu.rescan_seconds",
                "invalid value",
            ),
            (
                "[docker]\nsocket = \"tcp://1.2.3.4:2375\"",
                "docker.socket",
                "Unix socket",
            ),
            (
                "[docker]\ndevice_injection = \"magic\"",
                "docker.device_injection",
                "unknown variant",
            ),
            ("[api]\nlisten = \"7443\"", "api.listen", "address and port"),
            (
                "[api]\nlisten = \"0.0.0.0:7443\"",
                "api.tls_cert",
                "mutual TLS",
            ),
            (
                "[api]\nclient_ca = \"ca.pem\"",
                "api.client_ca",
                "set api.listen",
            ),
            (
                "[metrics]\nlisten = \"localhost\"",
                "metrics.listen",
                "address and port",
            ),
            (
                "[metering]\ncheckpoint_seconds = 0",
                "metering.checkpoint_seconds",
                "out of range",
            ),
            (
                "[health]\nrecovery_seconds = 0",
                "health.recovery_seconds",
                "out of range",
            ),
            (
                "[control_plane]\ntls_cert = \"c\"",
                "control_plane.endpoint",
                "is required",
            ),
            (
                "[control_plane]\nendpoint = \"http://cp:80\"",
                "control_plane.endpoint",
                "https://",
            ),
            (
                "[control_plane]\nendpoint = \"https://cp\"\ntls_cert = \"c\"\ntls_key = \"k\"",
                "control_plane.ca",
                "is required",
            ),
            (
                "[policy]\nfile = \"p.toml\"\n[control_plane]\nendpoint = \"https://cp\"",
                "policy.file",
                "remove one",
            ),
            ("state_dir = \"\"", "state_dir", "must not be empty"),
        ];
        for (text, want_key, want_reason) in cases {
            let (key, reason) = refused_key(&format!("node_id = \"n\"\n{text}"));
            assert_eq!(key, want_key, "for {text:?}: {reason}");
            assert!(reason.contains(want_reason), "for {text:?}: {reason}");
        }
    }

    #[test]
    fn node_ids_stay_plain() {
        assert!(validate_node_id("sim-dgx-a100-01").is_ok());
        assert!(validate_node_id("").is_err());
        assert!(validate_node_id("a b").is_err());
        assert!(validate_node_id(&"x".repeat(64)).is_err());
        let (key, _) = refused_key("node_id = \"../etc\"");
        assert_eq!(key, "node_id");
    }

    #[test]
    fn a_full_config_validates() {
        let config = parse(
            r#"
node_id = "sim-dgx-a100-01"
state_dir = "/var/lib/gpuwarden"
[gpu]
backend = "simulated"
fixture = "/usr/share/gpuwarden/sim-dgx-a100.toml"
rescan_seconds = 10
[docker]
socket = "unix:///run/docker.sock"
device_injection = "env"
[api]
unix_socket = "/run/gpuwarden/gpuwarden.sock"
listen = "0.0.0.0:7443"
tls_cert = "/etc/gpuwarden/tls/agent.pem"
tls_key = "/etc/gpuwarden/tls/agent.key"
client_ca = "/etc/gpuwarden/tls/clients-ca.pem"
[metrics]
listen = "127.0.0.1:9477"
[control_plane]
endpoint = "https://cp.example.net:443"
tls_cert = "tls/node.pem"
tls_key = "tls/node.key"
ca = "tls/cp-ca.pem"
offline_grace_seconds = 120
[metering]
checkpoint_seconds = 15
[health]
recovery_seconds = 300
"#,
        )
        .unwrap();
        let tcp = config.api.tcp.unwrap();
        assert_eq!(tcp.listen, "0.0.0.0:7443".parse().unwrap());
        assert_eq!(
            tcp.tls.ca,
            PathBuf::from("/etc/gpuwarden/tls/clients-ca.pem")
        );
        assert_eq!(config.docker.device_injection, DeviceInjection::Env);
        let Mode::ControlPlane(cp) = config.mode else {
            panic!("expected control-plane mode")
        };
        assert_eq!(cp.offline_grace, Duration::from_secs(120));
        assert_eq!(cp.tls.cert, PathBuf::from("/etc/gpuwarden/tls/node.pem"));
        assert_eq!(config.checkpoint_interval, Duration::from_secs(15));
    }
}
