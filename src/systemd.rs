//! The systemd notify protocol (`sd_notify(3)`), without libsystemd: one
//! datagram of `KEY=VALUE` lines to the Unix socket named by
//! `NOTIFY_SOCKET`, which is a path or, starting with `@`, an abstract
//! socket. Outside systemd (no `NOTIFY_SOCKET`) every call is a no-op.
//!
//! What the daemon says, and when:
//! - `READY=1` once the API serves, with a `STATUS=` line for
//!   `systemctl status`;
//! - `RELOADING=1` with `MONOTONIC_USEC=` (as `Type=notify-reload` in
//!   systemd 253 and later expects) when SIGHUP starts a policy reload, and
//!   `READY=1` when it is done, whether the new policy was taken or refused;
//! - `STOPPING=1` when a stop signal arrives;
//! - `WATCHDOG=1` from the daemon's main loop every half `WATCHDOG_USEC`,
//!   so that a main loop that hangs stops pinging and systemd restarts it.
//!
//! A message that cannot be sent is logged, never fatal: the service goes on
//! whatever its manager hears.

use std::collections::HashSet;
use std::ffi::OsStr;
use std::os::linux::net::SocketAddrExt as _;
use std::os::unix::ffi::OsStrExt as _;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use tokio::time::{Instant, Interval, MissedTickBehavior};

use crate::agent::Agent;
use crate::inventory::{Health, InventoryView};

/// How often `STATUS=` is refreshed (sessions come and go) when systemd
/// asks for no watchdog, or for a slower one.
const STATUS_REFRESH: Duration = Duration::from_secs(30);

/// How long a status line may take to make.
const STATUS_TIMEOUT: Duration = Duration::from_secs(2);

/// Tells systemd how the daemon is doing; a no-op when not under systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<Target>,
    watchdog: Option<Duration>,
    /// The last `STATUS=` sent, so refreshes only send changes.
    last_status: Mutex<String>,
}

#[derive(Debug)]
struct Target {
    socket: UnixDatagram,
    address: SocketAddr,
    /// `NOTIFY_SOCKET` as given, for logs.
    shown: String,
    /// Whether the last send failed: failures are logged once, not at every
    /// watchdog ping.
    failing: AtomicBool,
}

/// Where `NOTIFY_SOCKET` points.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Address {
    Path(Vec<u8>),
    Abstract(Vec<u8>),
}

impl Notifier {
    /// From `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`. Values that
    /// cannot be used are logged and leave that part off.
    pub fn from_env() -> Self {
        let var = |name: &str| std::env::var(name).ok();
        Self::from_vars(
            std::env::var_os("NOTIFY_SOCKET").as_deref(),
            var("WATCHDOG_USEC").as_deref(),
            var("WATCHDOG_PID").as_deref(),
            std::process::id(),
        )
    }

    /// A notifier that sends nothing.
    fn disabled() -> Self {
        Self {
            target: None,
            watchdog: None,
            last_status: Mutex::new(String::new()),
        }
    }

    fn from_vars(
        notify_socket: Option<&OsStr>,
        watchdog_usec: Option<&str>,
        watchdog_pid: Option<&str>,
        own_pid: u32,
    ) -> Self {
        let Some(value) = notify_socket.filter(|v| !v.is_empty()) else {
            return Self::disabled();
        };
        let shown = value.to_string_lossy().into_owned();
        let target = match parse_address(value).and_then(|address| open(&address)) {
            Ok((socket, address)) => Target {
                socket,
                address,
                shown,
                failing: AtomicBool::new(false),
            },
            Err(problem) => {
                tracing::warn!(
                    notify_socket = %shown,
                    "NOTIFY_SOCKET cannot be used ({problem}); systemd will not hear from this daemon"
                );
                return Self::disabled();
            }
        };
        let watchdog = match parse_watchdog(watchdog_usec, watchdog_pid, own_pid) {
            Ok(watchdog) => watchdog,
            Err(problem) => {
                tracing::warn!("systemd watchdog off: {problem}");
                None
            }
        };
        tracing::debug!(notify_socket = %target.shown, watchdog = ?watchdog, "systemd notify on");
        Self {
            target: Some(target),
            watchdog,
            last_status: Mutex::new(String::new()),
        }
    }

    /// Whether a service manager listens.
    pub fn is_enabled(&self) -> bool {
        self.target.is_some()
    }

    /// How often to send `WATCHDOG=1`: half of `WATCHDOG_USEC`, as
    /// `sd_watchdog_enabled(3)` advises; `None` when systemd asked for none.
    #[cfg(test)]
    pub fn watchdog_interval(&self) -> Option<Duration> {
        self.watchdog
    }

    /// `READY=1`: start-up (or a reload) is done.
    #[cfg(test)]
    pub fn ready(&self) {
        self.send(&[("READY", "1")]);
    }

    /// `READY=1` with the status line in the same message.
    pub fn ready_with_status(&self, status: &str) {
        self.remember_status(status);
        self.send(&[("READY", "1"), ("STATUS", status)]);
    }

    /// `READY=1` with the agent's serving status; the status is only
    /// worked out when a service manager listens.
    pub async fn ready_serving(&self, agent: &Agent) {
        if self.is_enabled() {
            self.ready_with_status(&serving_status(agent).await);
        }
    }

    /// `STATUS=`: one line for `systemctl status`.
    pub fn status(&self, status: &str) {
        self.remember_status(status);
        self.send(&[("STATUS", status)]);
    }

    /// `RELOADING=1` with the `MONOTONIC_USEC=` systemd 253+ expects; send
    /// `READY=1` when the reload is over.
    pub fn reloading(&self) {
        let usec = monotonic_usec().map(|usec| usec.to_string());
        let mut fields = vec![("RELOADING", "1")];
        if let Some(usec) = &usec {
            fields.push(("MONOTONIC_USEC", usec));
        }
        fields.push(("STATUS", "reloading the policy"));
        self.send(&fields);
    }

    /// `STOPPING=1`: a stop signal arrived.
    pub fn stopping(&self) {
        self.send(&[
            ("STOPPING", "1"),
            ("STATUS", "stopping: finishing in-flight requests"),
        ]);
    }

    /// `WATCHDOG=1`; nothing when systemd asked for no watchdog.
    pub fn watchdog(&self) {
        if self.watchdog.is_some() {
            self.send(&[("WATCHDOG", "1")]);
        }
    }

    /// The main loop's tick: every watchdog interval (at most every
    /// `STATUS_REFRESH`); never when not under systemd.
    pub fn heartbeat(&self) -> Heartbeat {
        let period = match (&self.target, self.watchdog) {
            (None, _) => None,
            (Some(_), Some(watchdog)) => Some(watchdog.min(STATUS_REFRESH)),
            (Some(_), None) => Some(STATUS_REFRESH),
        };
        Heartbeat {
            interval: period.map(|period| {
                let mut interval = tokio::time::interval_at(Instant::now() + period, period);
                interval.set_missed_tick_behavior(MissedTickBehavior::Delay);
                interval
            }),
        }
    }

    /// What the main loop does at each heartbeat: ping the watchdog, then
    /// refresh `STATUS=` if it changed.
    pub async fn beat(&self, agent: &Agent) {
        self.watchdog();
        if !self.is_enabled() {
            return;
        }
        let status = serving_status(agent).await;
        let changed = *self.lock_status() != status;
        if changed {
            self.status(&status);
        }
    }

    fn lock_status(&self) -> std::sync::MutexGuard<'_, String> {
        self.last_status
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn remember_status(&self, status: &str) {
        if self.is_enabled() {
            status.clone_into(&mut self.lock_status());
        }
    }

    fn send(&self, fields: &[(&str, &str)]) {
        let Some(target) = &self.target else {
            return;
        };
        let message = message(fields);
        match target
            .socket
            .send_to_addr(message.as_bytes(), &target.address)
        {
            Ok(_) => {
                if target.failing.swap(false, Ordering::Relaxed) {
                    tracing::info!(notify_socket = %target.shown, "systemd notify works again");
                }
            }
            Err(error) => {
                if !target.failing.swap(true, Ordering::Relaxed) {
                    tracing::warn!(
                        notify_socket = %target.shown,
                        error = %error,
                        message = %message.trim_end().replace('\n', " "),
                        "cannot notify systemd; the daemon goes on"
                    );
                }
            }
        }
    }
}

/// Ticks of the main loop's heartbeat arm; pends forever without systemd.
#[derive(Debug)]
pub struct Heartbeat {
    interval: Option<Interval>,
}

impl Heartbeat {
    pub async fn tick(&mut self) {
        match &mut self.interval {
            Some(interval) => {
                interval.tick().await;
            }
            None => std::future::pending().await,
        }
    }
}

/// The daemon's `STATUS=` line: what it serves now. Bounded, so a slow
/// ledger holds up the main loop by at most `STATUS_TIMEOUT`.
pub async fn serving_status(agent: &Agent) -> String {
    let mut line = match tokio::time::timeout(STATUS_TIMEOUT, agent.inventory()).await {
        Ok(Ok(view)) => status_line(&view),
        Ok(Err(refusal)) => format!("serving; inventory unavailable: {refusal}"),
        Err(_) => "serving; inventory slow to answer".to_owned(),
    };
    if let Some(cause) = agent.sessions().recovering().await {
        line.push_str(&format!(
            "; launches refused until the ledger is in line with the engine: {cause}"
        ));
    }
    line
}

/// "serving 17 devices (2 busy), 2 sessions", with unhealthy devices and
/// the drain when there are any.
pub fn status_line(view: &InventoryView) -> String {
    let assignable: Vec<_> = view.devices.iter().filter(|d| d.assignable).collect();
    let sessions: HashSet<&str> = view
        .devices
        .iter()
        .filter_map(|d| d.session_id.as_deref())
        .collect();
    let busy = assignable.iter().filter(|d| d.session_id.is_some()).count();
    let unhealthy = assignable
        .iter()
        .filter(|d| d.health != Health::Healthy)
        .count();
    let mut line = format!(
        "serving {} devices ({busy} busy), {} {}",
        assignable.len(),
        sessions.len(),
        if sessions.len() == 1 {
            "session"
        } else {
            "sessions"
        }
    );
    if unhealthy > 0 {
        line.push_str(&format!(", {unhealthy} unhealthy"));
    }
    if view.draining {
        line.push_str("; draining: new launches refused");
    }
    line
}

/// One notify datagram: `KEY=VALUE` lines. A value is one line: newlines
/// in it (a status built from an error, say) become spaces.
fn message(fields: &[(&str, &str)]) -> String {
    let mut text = String::new();
    for (key, value) in fields {
        text.push_str(key);
        text.push('=');
        text.extend(
            value
                .chars()
                .map(|c| if c == '\n' || c == '\r' { ' ' } else { c }),
        );
        text.push('\n');
    }
    text
}

fn parse_address(value: &OsStr) -> Result<Address, String> {
    let bytes = value.as_bytes();
    match bytes.first() {
        Some(b'@') => Ok(Address::Abstract(bytes[1..].to_vec())),
        Some(b'/') => Ok(Address::Path(bytes.to_vec())),
        _ => Err("neither an absolute path nor an abstract socket (`@name`)".to_owned()),
    }
}

fn open(address: &Address) -> Result<(UnixDatagram, SocketAddr), String> {
    let address = match address {
        Address::Path(path) => SocketAddr::from_pathname(Path::new(OsStr::from_bytes(path))),
        Address::Abstract(name) => SocketAddr::from_abstract_name(name),
    }
    .map_err(|e| e.to_string())?;
    let socket = UnixDatagram::unbound().map_err(|e| e.to_string())?;
    // A full socket buffer must never hold up the main loop: such a message
    // is dropped and logged.
    socket.set_nonblocking(true).map_err(|e| e.to_string())?;
    Ok((socket, address))
}

/// Half of `WATCHDOG_USEC` when the watchdog is for this process
/// (`WATCHDOG_PID` unset or ours), as `sd_watchdog_enabled(3)` decides.
fn parse_watchdog(
    usec: Option<&str>,
    pid: Option<&str>,
    own_pid: u32,
) -> Result<Option<Duration>, String> {
    let Some(usec) = usec.filter(|u| !u.is_empty()) else {
        return Ok(None);
    };
    let usec: u64 = usec
        .parse()
        .ok()
        .filter(|&usec| usec > 0)
        .ok_or_else(|| format!("WATCHDOG_USEC `{usec}` is not a positive number"))?;
    if let Some(pid) = pid.filter(|p| !p.is_empty()) {
        match pid.parse::<u32>() {
            Ok(pid) if pid == own_pid => {}
            Ok(_) => return Ok(None),
            Err(_) => return Err(format!("WATCHDOG_PID `{pid}` is not a process id")),
        }
    }
    Ok(Some(Duration::from_micros(usec / 2)))
}

/// CLOCK_MONOTONIC in microseconds, the clock systemd reads.
fn monotonic_usec() -> Option<u64> {
    let now = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).ok()?;
    let seconds = u64::try_from(now.tv_sec()).ok()?;
    let nanos = u64::try_from(now.tv_nsec()).ok()?;
    Some(
        seconds
            .saturating_mul(1_000_000)
            .saturating_add(nanos / 1_000),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::gpu::simulated::load_fixture;
    use std::time::SystemTime;

    fn receive(socket: &UnixDatagram) -> String {
        socket
            .set_read_timeout(Some(Duration::from_secs(5)))
            .unwrap();
        let mut buffer = [0u8; 4096];
        let n = socket.recv(&mut buffer).unwrap();
        String::from_utf8(buffer[..n].to_vec()).unwrap()
    }

    #[test]
    fn a_message_is_key_value_lines_with_one_line_values() {
        assert_eq!(message(&[("READY", "1")]), "READY=1\n");
        assert_eq!(
            message(&[("READY", "1"), ("STATUS", "bad\nfile\r\n")]),
            "READY=1\nSTATUS=bad file  \n"
        );
    }

    #[test]
    fn notify_socket_is_a_path_or_an_abstract_name() {
        assert_eq!(
            parse_address(OsStr::new("/run/systemd/notify")),
            Ok(Address::Path(b"/run/systemd/notify".to_vec()))
        );
        assert_eq!(
            parse_address(OsStr::new("@/org/freedesktop/systemd1/notify/42")),
            Ok(Address::Abstract(
                b"/org/freedesktop/systemd1/notify/42".to_vec()
            ))
        );
        assert!(parse_address(OsStr::new("relative/notify")).is_err());
        assert!(parse_address(OsStr::new("vsock:2:1234")).is_err());
    }

    #[test]
    fn the_watchdog_is_half_of_watchdog_usec_and_only_for_its_pid() {
        let half = Some(Duration::from_secs(15));
        assert_eq!(parse_watchdog(Some("30000000"), None, 7), Ok(half));
        assert_eq!(parse_watchdog(Some("30000000"), Some("7"), 7), Ok(half));
        assert_eq!(parse_watchdog(Some("30000000"), Some("8"), 7), Ok(None));
        assert_eq!(parse_watchdog(None, Some("7"), 7), Ok(None));
        assert!(parse_watchdog(Some("0"), None, 7).is_err());
        assert!(parse_watchdog(Some("soon"), None, 7).is_err());
        assert!(parse_watchdog(Some("30000000"), Some("me"), 7).is_err());
    }

    #[test]
    fn without_notify_socket_nothing_is_sent_and_nothing_ticks() {
        let notifier = Notifier::from_vars(None, Some("2000000"), None, 1);
        assert!(!notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        assert!(notifier.heartbeat().interval.is_none());
        notifier.ready();
        notifier.watchdog();
    }

    #[test]
    fn messages_reach_a_path_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let notifier = Notifier::from_vars(
            Some(path.as_os_str()),
            Some("2000000"),
            None,
            std::process::id(),
        );
        assert_eq!(notifier.watchdog_interval(), Some(Duration::from_secs(1)));

        notifier.ready_with_status("serving 1 devices (0 busy), 0 sessions");
        assert_eq!(
            receive(&listener),
            "READY=1\nSTATUS=serving 1 devices (0 busy), 0 sessions\n"
        );
        notifier.watchdog();
        assert_eq!(receive(&listener), "WATCHDOG=1\n");
        notifier.reloading();
        let reloading = receive(&listener);
        let lines: Vec<&str> = reloading.lines().collect();
        assert_eq!(lines[0], "RELOADING=1");
        let usec: u64 = lines[1]
            .strip_prefix("MONOTONIC_USEC=")
            .unwrap()
            .parse()
            .unwrap();
        assert!(usec > 0);
        assert!(usec <= monotonic_usec().unwrap());
        notifier.stopping();
        assert!(receive(&listener).starts_with("STOPPING=1\nSTATUS=stopping"));
    }

    #[test]
    fn messages_reach_an_abstract_socket() {
        let name = format!("gpuwarden-test-{}", uuid::Uuid::new_v4().simple());
        let listener =
            UnixDatagram::bind_addr(&SocketAddr::from_abstract_name(name.as_bytes()).unwrap())
                .unwrap();
        let value = format!("@{name}");
        let notifier = Notifier::from_vars(Some(OsStr::new(&value)), None, None, 1);
        assert!(notifier.is_enabled());
        assert_eq!(notifier.watchdog_interval(), None);
        notifier.watchdog();
        notifier.status("hello");
        // The watchdog ping was not sent: no watchdog was asked for.
        assert_eq!(receive(&listener), "STATUS=hello\n");
    }

    #[test]
    fn a_socket_nobody_listens_on_is_logged_not_fatal() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("gone");
        let notifier = Notifier::from_vars(Some(path.as_os_str()), None, None, 1);
        notifier.ready();
        notifier.ready();
        assert!(
            notifier
                .target
                .as_ref()
                .unwrap()
                .failing
                .load(Ordering::Relaxed)
        );
    }

    #[test]
    fn the_status_line_counts_devices_and_sessions() {
        let scan = load_fixture(Path::new("fixtures/sim-dgx-a100.toml")).unwrap();
        let mut view = InventoryView::from_scan("n1", &scan, SystemTime::UNIX_EPOCH);
        assert_eq!(
            status_line(&view),
            "serving 17 devices (0 busy), 0 sessions"
        );
        let assignable: Vec<usize> = (0..view.devices.len())
            .filter(|&i| view.devices[i].assignable)
            .collect();
        view.devices[assignable[0]].session_id = Some("s-1".into());
        view.devices[assignable[1]].session_id = Some("s-1".into());
        view.devices[assignable[2]].session_id = Some("s-2".into());
        view.devices[assignable[3]].health = Health::Unhealthy;
        view.draining = true;
        assert_eq!(
            status_line(&view),
            "serving 17 devices (3 busy), 2 sessions, 1 unhealthy; draining: new launches refused"
        );
    }
}
