//! Helpers shared by the integration tests and the benches: a real
//! `gpuwarden` daemon in a temporary state folder, reached over its real
//! Unix socket.
#![allow(dead_code, clippy::unwrap_used)]

pub mod launch;
pub mod operator;
pub mod plane;
pub mod standin;
pub mod tls;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use gpuwarden::api::client;
use gpuwarden::clock::UnixNanos;
use gpuwarden::proto;
use gpuwarden::proto::node_agent_client::NodeAgentClient;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use tonic::transport::Channel;

pub const BIN: &str = env!("CARGO_BIN_EXE_gpuwarden");

pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fixtures")
        .join(name)
}

/// Runs the binary to completion.
pub fn gpuwarden(args: &[&str]) -> std::process::Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("the gpuwarden binary runs")
}

/// A daemon started from a config written into its own temporary folder;
/// killed when dropped if still running.
pub struct Daemon {
    pub dir: tempfile::TempDir,
    /// Unique per daemon: tests share one Docker engine, and each agent
    /// only looks at the containers labelled with its node id.
    pub node_id: String,
    pub socket: PathBuf,
    pub config: PathBuf,
    /// Extra environment of the daemon process, kept for restarts.
    env: Vec<(String, String)>,
    /// Where its stderr goes, when not to the test's (see `start_logged`).
    log: Option<PathBuf>,
    child: Child,
}

/// How long a daemon may take to start serving before a test gives up.
const START_TIMEOUT: Duration = Duration::from_secs(20);

impl Daemon {
    /// Starts `gpuwarden run` on the given fixture; `extra` is appended to
    /// the config file. Without a `[policy]` section in `extra`, the daemon
    /// runs under `fixtures/policy-test.toml` (generous limits).
    pub fn start(fixture_name: &str, extra: &str) -> Self {
        Self::start_with_env(fixture_name, extra, &[])
    }

    /// `start`, with these variables in the daemon's environment.
    pub fn start_with_env(fixture_name: &str, extra: &str, env: &[(&str, &str)]) -> Self {
        Self::start_inner(fixture_name, extra, env, false, |_| {})
    }

    /// `start`, with the daemon's log written to a file that `log` reads.
    pub fn start_logged(fixture_name: &str, extra: &str) -> Self {
        Self::start_inner(fixture_name, extra, &[], true, |_| {})
    }

    /// `start`, on a state directory `prepare` fills first (a ledger built
    /// beforehand).
    pub fn start_with_state(fixture_name: &str, extra: &str, prepare: impl FnOnce(&Path)) -> Self {
        Self::start_inner(fixture_name, extra, &[], false, prepare)
    }

    fn start_inner(
        fixture_name: &str,
        extra: &str,
        env: &[(&str, &str)],
        logged: bool,
        prepare: impl FnOnce(&Path),
    ) -> Self {
        // Tests run side by side: metrics on a port of their own.
        let extra = if extra.contains("[metrics]") {
            extra.to_owned()
        } else {
            format!("{extra}\n[metrics]\nlisten = \"127.0.0.1:0\"\n")
        };
        let extra = if extra.contains("[policy]") || extra.contains("[control_plane]") {
            extra.to_owned()
        } else {
            format!(
                "{extra}\n[policy]\nfile = \"{}\"\n",
                fixture("policy-test.toml").display()
            )
        };
        let dir = tempfile::tempdir().unwrap();
        let socket = dir.path().join("run/gpuwarden.sock");
        let config = dir.path().join("gpuwarden.toml");
        let node_id = format!("test-{}", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        std::fs::write(
            &config,
            format!(
                "node_id = \"{node_id}\"\nstate_dir = \"{}\"\n[gpu]\nbackend = \"simulated\"\nfixture = \"{}\"\n[docker]\ndevice_injection = \"env\"\n[api]\nunix_socket = \"{}\"\n{extra}",
                dir.path().join("state").display(),
                fixture(fixture_name).display(),
                socket.display(),
            ),
        )
        .unwrap();
        let env: Vec<(String, String)> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        prepare(&state);
        let log = logged.then(|| dir.path().join("daemon.log"));
        let child = spawn(&config, &env, log.as_deref());
        Self {
            dir,
            node_id,
            socket,
            config,
            env,
            log,
            child,
        }
    }

    /// What the daemon logged so far (`start_logged` only).
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log.as_ref().expect("started with start_logged"))
            .unwrap_or_default()
    }

    /// Polls the log until it has a line with every one of `words`
    /// (bounded); returns that line.
    pub async fn wait_for_log(&self, words: &[&str]) -> String {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let log = self.log();
            if let Some(line) = log
                .lines()
                .find(|line| words.iter().all(|w| line.contains(w)))
            {
                return line.to_owned();
            }
            assert!(
                Instant::now() < deadline,
                "the daemon never logged a line with {words:?}:\n{log}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Kills the daemon with SIGKILL, as a crash would, and starts a new
    /// one on the same config and state.
    pub async fn kill_and_restart(&mut self) {
        self.kill9().await;
        self.restart();
    }

    /// Kills the daemon with SIGKILL and waits for it to be gone.
    pub async fn kill9(&mut self) {
        self.signal(Signal::SIGKILL);
        self.wait(Duration::from_secs(15)).await;
    }

    /// Starts a new daemon on the same config and state; the previous one
    /// must have exited.
    pub fn restart(&mut self) {
        assert!(
            self.child.try_wait().unwrap().is_some(),
            "the daemon still runs"
        );
        self.child = spawn(&self.config, &self.env, self.log.as_deref());
    }

    /// Waits until the daemon answers on its socket (polling, bounded).
    pub async fn client(&mut self) -> NodeAgentClient<Channel> {
        NodeAgentClient::new(self.channel().await)
    }

    pub async fn channel(&mut self) -> Channel {
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Ok(channel) = client::unix_channel(&self.socket).await {
                return channel;
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!("gpuwarden exited before serving: {status}");
            }
            assert!(
                Instant::now() < deadline,
                "gpuwarden did not serve within {START_TIMEOUT:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// `docker ps -q` of this daemon's containers: the ids of those that
    /// run, one a line.
    pub fn running_containers(&self) -> String {
        self.containers("-q")
    }

    /// `docker ps -aq` of this daemon's containers: the ids of all of them,
    /// running or not, one a line.
    pub fn all_containers(&self) -> String {
        self.containers("-aq")
    }

    fn containers(&self, flags: &str) -> String {
        docker(&[
            "ps",
            flags,
            "--filter",
            &format!("label=dev.gpuwarden.node={}", self.node_id),
        ])
    }

    /// The daemon's process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn signal(&self, signal: Signal) {
        kill(Pid::from_raw(self.child.id() as i32), signal).unwrap();
    }

    /// Waits for the process to exit (polling, bounded) and returns its
    /// status. Async so the test's own connections keep being driven.
    pub async fn wait(&mut self, timeout: Duration) -> ExitStatus {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "gpuwarden did not exit within {timeout:?}"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

fn spawn(config: &Path, env: &[(String, String)], log: Option<&Path>) -> Child {
    let stderr = match log {
        Some(path) => Stdio::from(
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .unwrap(),
        ),
        None => Stdio::inherit(),
    };
    Command::new(BIN)
        .args(["run", "--config"])
        .arg(config)
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .unwrap()
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        remove_containers(&format!("dev.gpuwarden.node={}", self.node_id));
    }
}

/// The sample at fraction `p` (0 to 1) of sorted `samples`: for the
/// benches' p50 and p90.
/// Clock ticks per second of /proc/<pid>/stat's CPU times (USER_HZ).
pub const TICKS_PER_SECOND: f64 = 100.0;

/// A `Vm*:` line of /proc/<pid>/status, in KiB (`VmRSS`, `VmHWM`: peak).
fn status_kib(pid: u32, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim_start_matches(':').split_whitespace().next())
        .and_then(|kib| kib.parse().ok())
        .unwrap()
}

/// Resident memory of `pid` now, in KiB.
pub fn rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmRSS")
}

/// The most resident memory `pid` ever had, in KiB.
pub fn peak_rss_kib(pid: u32) -> u64 {
    status_kib(pid, "VmHWM")
}

/// User + system CPU ticks of `pid` so far.
pub fn cpu_ticks(pid: u32) -> u64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap();
    // Fields after the command name (which may hold spaces) start at ")".
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .unwrap()
        .1
        .split_whitespace()
        .collect();
    // utime and stime are fields 14 and 15 of the line: 12 and 13 here.
    fields[11].parse::<u64>().unwrap() + fields[12].parse::<u64>().unwrap()
}

/// GETs /metrics on `port` as Prometheus does (OpenMetrics); returns the
/// response's size in bytes.
pub fn scrape(port: u16) -> usize {
    use std::io::{Read as _, Write as _};
    let mut stream = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    write!(
        stream,
        "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: application/openmetrics-text\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    let mut response = Vec::new();
    stream.read_to_end(&mut response).unwrap();
    response.len()
}

pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

/// A duration in milliseconds, for the benches' figures.
pub fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// The image the tests run: busybox imported by the test command.
pub fn test_image() -> String {
    std::env::var("GPUWARDEN_TEST_IMAGE").unwrap_or_else(|_| "gpuwarden-test/busybox:latest".into())
}

/// Runs the docker CLI and returns its trimmed stdout; panics when it fails.
pub fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .expect("the docker CLI runs");
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The time Docker holds as the container's `.State.<field>` (StartedAt,
/// FinishedAt).
pub fn docker_time(container: &str, field: &str) -> UnixNanos {
    let text = docker(&[
        "inspect",
        "-f",
        &format!("{{{{.State.{field}}}}}"),
        container,
    ]);
    UnixNanos::parse_rfc3339(&text).unwrap()
}

/// Removes every container, running or not, that has `label` (key=value).
pub fn remove_containers(label: &str) {
    let Ok(out) = Command::new("docker")
        .args(["ps", "-aq", "--filter", &format!("label={label}")])
        .output()
    else {
        return;
    };
    let ids: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .map(str::to_owned)
        .collect();
    if !ids.is_empty() {
        let _ = Command::new("docker")
            .arg("rm")
            .arg("-f")
            .args(&ids)
            .output();
    }
}

/// Polls a session (as the local operator) until `done` holds, bounded.
pub async fn wait_for_session(
    client: &mut NodeAgentClient<Channel>,
    id: &str,
    done: impl Fn(&proto::Session) -> bool,
) -> proto::Session {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let session = client
            .get_session(proto::GetSessionRequest {
                session_id: id.into(),
                principal: None,
            })
            .await
            .unwrap()
            .into_inner();
        if done(&session) {
            return session;
        }
        assert!(
            Instant::now() < deadline,
            "session never reached the state: {session:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}
