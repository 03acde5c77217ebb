//! The `gpuwarden` command: the daemon, its config check, a one-shot
//! inventory, and `ctl` to talk to a running daemon.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::SystemTime;

use clap::{Parser, Subcommand};

use gpuwarden::config::{Config, DEFAULT_UNIX_SOCKET, GpuSource, Mode};
use gpuwarden::ctl::{self, print_inventory, write_stdout};
use gpuwarden::gpu::{self, DeviceUuid};
use gpuwarden::inventory::InventoryView;
use gpuwarden::logging::{self, LogFormat};
use gpuwarden::policy::Policy;

/// Exit code of a config that cannot be used (EX_USAGE): systemd's unit
/// lists it in RestartPreventExitStatus, since restarting will not fix it.
const EXIT_BAD_CONFIG: u8 = 64;

#[derive(Debug, Parser)]
#[command(
    name = "gpuwarden",
    version,
    about = "GPU host agent: discovers GPUs and MIG instances, launches containers with exactly their devices, meters GPU-seconds."
)]
struct Cli {
    /// Log format on stderr (level: GPUWARDEN_LOG, e.g. `debug`).
    #[arg(long, value_enum, default_value = "text", global = true)]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the daemon.
    Run {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Validate a config file and what it names; exit 1 naming the bad key.
    CheckConfig {
        #[arg(long, value_name = "FILE")]
        config: PathBuf,
    },
    /// Discover and print the host's devices without starting the daemon.
    Inventory {
        /// Take the GPU backend from this config file.
        #[arg(long, value_name = "FILE", conflicts_with = "simulate")]
        config: Option<PathBuf>,
        /// Read a simulated host from this fixture instead of NVML.
        #[arg(long, value_name = "FIXTURE")]
        simulate: Option<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Talk to a running daemon over its Unix socket.
    Ctl {
        #[arg(long, value_name = "PATH", default_value = DEFAULT_UNIX_SOCKET)]
        socket: PathBuf,
        /// Print JSON for scripts instead of tables.
        #[arg(long, global = true)]
        json: bool,
        #[command(subcommand)]
        command: ctl::Command,
    },
}

/// A failure and the exit code it deserves.
struct Failure {
    code: u8,
    error: anyhow::Error,
}

impl<E: Into<anyhow::Error>> From<E> for Failure {
    fn from(error: E) -> Self {
        Self {
            code: 1,
            error: error.into(),
        }
    }
}

fn bad_config(error: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: EXIT_BAD_CONFIG,
        error: error.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    logging::init(cli.log_format);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the async runtime: {error}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(dispatch(cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(Failure { code, error }) => {
            eprintln!("error: {}", gpuwarden::error::chain(error.as_ref()));
            ExitCode::from(code)
        }
    }
}

async fn dispatch(command: Command) -> Result<(), Failure> {
    match command {
        Command::Run { config } => {
            let config = Config::load(&config).map_err(bad_config)?;
            gpuwarden::daemon::run(config).await.map_err(|error| {
                if error.is_config_problem() {
                    bad_config(error)
                } else {
                    error.into()
                }
            })
        }
        Command::CheckConfig { config } => check_config(&config)
            .await
            .map_err(|error| Failure { code: 1, error }),
        Command::Inventory {
            config,
            simulate,
            json,
        } => inventory(config.as_deref(), simulate, json).await,
        Command::Ctl {
            socket,
            json,
            command,
        } => Ok(ctl::run(&socket, json, command).await?),
    }
}

/// Validates the config and opens what it names the way `run` would,
/// without binding sockets or touching containers.
async fn check_config(path: &Path) -> anyhow::Result<()> {
    let config = Config::load(path)?;
    // The simulated host's devices check the policy's reservations; NVML's
    // are only known to the daemon.
    let (gpus, host_devices) = match &config.gpu.source {
        GpuSource::Simulated { fixture } => {
            let scan = gpu::simulated::load_fixture(fixture)?;
            let devices: HashSet<DeviceUuid> = scan.assignable_uuids();
            (
                format!(
                    "simulated host {} ({} GPUs, {} assignable devices)",
                    fixture.display(),
                    scan.gpus.len(),
                    devices.len()
                ),
                Some(devices),
            )
        }
        GpuSource::Nvml { .. } => ("NVML (checked when the daemon starts)".to_owned(), None),
    };
    if let Some(tcp) = &config.api.tcp {
        gpuwarden::api::server::check_tls(&tcp.tls).await?;
    }
    let mode = match &config.mode {
        Mode::Standalone {
            policy_file: Some(policy),
        } => {
            let loaded = Policy::load(policy, host_devices.as_ref())?;
            let mut line = format!(
                "standalone, policy {} ({} accounts)",
                policy.display(),
                loaded.policy.accounts().count()
            );
            for warning in loaded.warnings {
                line.push_str(&format!("\n  warning: {warning}"));
            }
            line
        }
        Mode::Standalone { policy_file: None } => {
            "standalone, no policy file: every launch is refused (UNKNOWN_ACCOUNT)".to_owned()
        }
        Mode::ControlPlane(cp) => format!("control plane {}", cp.endpoint),
    };
    write_stdout(&format!(
        "{}: OK\n  node {}\n  GPUs: {gpus}\n  mode: {mode}\n",
        path.display(),
        config.node_id
    ))
}

async fn inventory(
    config: Option<&Path>,
    simulate: Option<PathBuf>,
    json: bool,
) -> Result<(), Failure> {
    let (node_id, source) = match (config, simulate) {
        (Some(path), _) => {
            let config = Config::load(path).map_err(bad_config)?;
            (config.node_id, config.gpu.source)
        }
        (None, Some(fixture)) => (String::new(), GpuSource::Simulated { fixture }),
        (None, None) => (String::new(), GpuSource::Nvml { library: None }),
    };
    let backend = gpu::open(&source)?;
    let scan = gpu::blocking(&backend, |backend| backend.discover()).await?;
    let node_id = if node_id.is_empty() {
        scan.hostname.clone()
    } else {
        node_id
    };
    Ok(print_inventory(
        &InventoryView::from_scan(&node_id, &scan, SystemTime::now()),
        json,
    )?)
}
