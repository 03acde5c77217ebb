//! Prometheus metrics at `GET /metrics` on `[metrics] listen`, in the
//! OpenMetrics text format (prometheus-client).
//!
//! Two kinds of series: event counts and latencies the agent observes as
//! they happen ([`Metrics`], one per agent, handed to whoever observes), and
//! state read at scrape time (devices, telemetry, sessions, usage totals
//! from the ledger, outbox backlog, control-plane link), so a scrape shows
//! the ledger's truth and nothing is kept twice. Label values are bounded:
//! device UUIDs and classes of this host, accounts with usage on this host,
//! the contract's reasons.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http_body_util::Full;
use hyper::body::Bytes;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing::Instrument as _;

use crate::agent::Agent;

const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";
const PROMETHEUS_TEXT: &str = "text/plain; version=0.0.4; charset=utf-8";

type Labels = Vec<(&'static str, String)>;
type FloatGauge = Gauge<f64, std::sync::atomic::AtomicU64>;

/// What the agent counts as it happens.
#[derive(Debug, Clone)]
pub struct Metrics {
    /// Launches by result (`started`, `refused`) and refusal reason.
    pub launches: Family<Labels, Counter>,
    /// Launch -> RUNNING (or refusal) time.
    pub launch_duration: Histogram,
    /// One blocking SQLite transaction, commit (and fsync) included.
    pub ledger_write: Histogram,
    /// XID events by device and XID, critical or not.
    pub xid_errors: Family<Labels, Counter>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        Self {
            launches: Family::default(),
            // 10 ms .. ~40 s
            launch_duration: Histogram::new(exponential_buckets(0.01, 2.0, 13)),
            // 100 µs .. ~0.8 s
            ledger_write: Histogram::new(exponential_buckets(0.0001, 2.0, 14)),
            xid_errors: Family::default(),
        }
    }

    pub fn launch(&self, outcome: Result<(), &str>, took: Duration) {
        let labels = match outcome {
            Ok(()) => vec![("result", "started".to_owned()), ("reason", String::new())],
            Err(reason) => vec![
                ("result", "refused".to_owned()),
                ("reason", reason.to_owned()),
            ],
        };
        self.launches.get_or_create(&labels).inc();
        self.launch_duration.observe(took.as_secs_f64());
    }
}

/// Renders every series: the observed ones and a snapshot of the agent.
pub async fn render(agent: &Agent) -> String {
    let metrics = agent.metrics();
    let mut registry = Registry::with_prefix("gpuwarden");
    registry.register(
        "launches",
        "Launch requests by result and refusal reason",
        metrics.launches.clone(),
    );
    registry.register_with_unit(
        "launch_duration",
        "Time from a Launch request to its container running (or its refusal)",
        Unit::Seconds,
        metrics.launch_duration.clone(),
    );
    registry.register_with_unit(
        "ledger_write_duration",
        "Time of one ledger transaction, commit and fsync included",
        Unit::Seconds,
        metrics.ledger_write.clone(),
    );
    registry.register(
        "xid_errors",
        "XID error events reported by the driver, by device and XID",
        metrics.xid_errors.clone(),
    );
    snapshot(agent, &mut registry).await;
    let mut text = String::new();
    if encode(&mut text, &registry).is_err() {
        text = "# EOF\n".into();
    }
    text
}

fn gauge_family(
    registry: &mut Registry,
    name: &str,
    help: &str,
    unit: Option<Unit>,
) -> Family<Labels, FloatGauge> {
    let family = Family::<Labels, FloatGauge>::default();
    match unit {
        Some(unit) => registry.register_with_unit(name, help, unit, family.clone()),
        None => registry.register(name, help, family.clone()),
    }
    family
}

/// The state series, read now.
async fn snapshot(agent: &Agent, registry: &mut Registry) {
    let Ok(view) = agent.inventory().await else {
        return;
    };
    let devices = gauge_family(
        registry,
        "devices",
        "Assignable devices by class and state",
        None,
    );
    let info = gauge_family(
        registry,
        "device_info",
        "Every GPU and MIG instance of this host, with what it is",
        None,
    );
    for device in &view.devices {
        info.get_or_create(&vec![
            ("uuid", device.uuid.to_string()),
            ("class", device.class.clone()),
            ("kind", format!("{:?}", device.kind).to_lowercase()),
            (
                "parent",
                device
                    .parent_uuid
                    .as_ref()
                    .map(ToString::to_string)
                    .unwrap_or_default(),
            ),
            ("health", device.health.as_str().to_owned()),
        ])
        .set(1.0);
        if device.assignable {
            let state = if !matches!(device.health, crate::inventory::Health::Healthy) {
                device.health.as_str()
            } else if device.session_id.is_some() {
                "busy"
            } else {
                "free"
            };
            devices
                .get_or_create(&vec![
                    ("class", device.class.clone()),
                    ("state", state.to_owned()),
                ])
                .inc();
        }
    }
    let draining = gauge_family(
        registry,
        "draining",
        "1 while the node takes no new sessions",
        None,
    );
    draining
        .get_or_create(&Vec::new())
        .set(if view.draining { 1.0 } else { 0.0 });

    let utilization = gauge_family(
        registry,
        "gpu_utilization",
        "Share of the last sample period a kernel ran on the GPU",
        Some(Unit::Other("ratio".into())),
    );
    let memory_used = gauge_family(
        registry,
        "gpu_memory_used",
        "GPU memory in use",
        Some(Unit::Bytes),
    );
    let memory_total = gauge_family(
        registry,
        "gpu_memory_total",
        "GPU memory in all",
        Some(Unit::Bytes),
    );
    let power = gauge_family(
        registry,
        "gpu_power",
        "Board power draw",
        Some(Unit::Other("watts".into())),
    );
    let temperature = gauge_family(
        registry,
        "gpu_temperature",
        "GPU die temperature",
        Some(Unit::Celsius),
    );
    for reading in agent.telemetry().await {
        let labels = vec![("uuid", reading.uuid.to_string())];
        if let Some(percent) = reading.utilization_percent {
            utilization
                .get_or_create(&labels)
                .set(f64::from(percent) / 100.0);
        }
        if let Some(mib) = reading.memory_used_mib {
            memory_used
                .get_or_create(&labels)
                .set(mib as f64 * 1024.0 * 1024.0);
        }
        if let Some(mib) = reading.memory_total_mib {
            memory_total
                .get_or_create(&labels)
                .set(mib as f64 * 1024.0 * 1024.0);
        }
        if let Some(watts) = reading.power_watts {
            power.get_or_create(&labels).set(watts);
        }
        if let Some(celsius) = reading.temperature_c {
            temperature.get_or_create(&labels).set(f64::from(celsius));
        }
    }

    let ledger = agent.sessions().ledger();
    let sessions = gauge_family(
        registry,
        "sessions",
        "Open sessions by account and scope",
        None,
    );
    if let Ok(open) = ledger
        .list(crate::ledger::SessionFilter::open())
        .await
        .map(|page| page.sessions)
    {
        for session in open {
            sessions
                .get_or_create(&vec![
                    ("account", session.account_id.clone()),
                    ("scope", session.scope.as_str().to_owned()),
                ])
                .inc();
        }
    }
    let gpu_seconds = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register_with_unit(
        "gpu",
        "GPU-seconds metered on this node (MIG weighted by compute slices), from the ledger",
        Unit::Seconds,
        gpu_seconds.clone(),
    );
    let cost = Family::<Labels, Counter<f64, std::sync::atomic::AtomicU64>>::default();
    registry.register_with_unit(
        "cost",
        "Cost of the usage metered on this node, from the ledger",
        Unit::Other("credits".into()),
        cost.clone(),
    );
    if let Ok(totals) = ledger.usage_totals().await {
        for total in totals {
            let labels = vec![
                ("account", total.account_id.clone()),
                ("scope", total.scope.as_str().to_owned()),
                ("billing_path", total.billing_path.as_str().to_owned()),
            ];
            gpu_seconds.get_or_create(&labels).inc_by(total.gpu_seconds);
            cost.get_or_create(&labels).inc_by(total.cost.as_f64());
        }
    }
    let backlog = gauge_family(
        registry,
        "usage_outbox_records",
        "Usage records not yet acknowledged by the control plane",
        None,
    );
    // In control-plane mode the inventory read it already.
    let count = match &view.control_plane {
        Some(link) => Ok(link.outbox_backlog),
        None => ledger.outbox_backlog().await,
    };
    if let Ok(count) = count {
        backlog.get_or_create(&Vec::new()).set(count as f64);
    }
    if let Some(link) = &view.control_plane {
        let up = gauge_family(
            registry,
            "control_plane_up",
            "1 while the control-plane link is up",
            None,
        );
        up.get_or_create(&Vec::new())
            .set(if link.up { 1.0 } else { 0.0 });
        let version = gauge_family(
            registry,
            "control_plane_policy_version",
            "Version of the control plane's policy in force",
            None,
        );
        version
            .get_or_create(&Vec::new())
            .set(link.policy_version as f64);
    }
}

/// The classic Prometheus text format (0.0.4) of an OpenMetrics
/// exposition: a counter family is named with its `_total` suffix in HELP
/// and TYPE, and there are no UNIT or EOF lines.
pub fn to_prometheus_text(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|line| line.strip_prefix("# TYPE "))
        .filter_map(|rest| rest.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len());
    for line in openmetrics.lines() {
        if line.starts_with("# UNIT ") || line == "# EOF" {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let rest = line.strip_prefix(prefix)?;
            let (name, tail) = rest.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {tail}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

/// Binds `[metrics] listen`; done before the agent announces readiness.
pub async fn bind(listen: SocketAddr) -> std::io::Result<TcpListener> {
    TcpListener::bind(listen).await
}

/// Serves `GET /metrics` until `shutdown`.
pub async fn serve(listener: TcpListener, agent: Arc<Agent>, shutdown: CancellationToken) {
    tracing::info!(listen = ?listener.local_addr().ok(), "serving metrics");
    loop {
        let (stream, _) = tokio::select! {
            _ = shutdown.cancelled() => return,
            accepted = listener.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(error) => {
                    tracing::warn!(error = %error, "metrics listener failed to accept");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let agent = Arc::clone(&agent);
        let service = hyper::service::service_fn(move |request: Request<hyper::body::Incoming>| {
            let agent = Arc::clone(&agent);
            async move { Ok::<_, std::convert::Infallible>(respond(&agent, &request).await) }
        });
        tokio::spawn(
            async move {
                if let Err(error) = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await
                {
                    tracing::debug!(error = %error, "metrics connection ended");
                }
            }
            .instrument(tracing::debug_span!("metrics_connection")),
        );
    }
}

async fn respond<B>(agent: &Agent, request: &Request<B>) -> Response<Full<Bytes>> {
    let reply = |status: StatusCode, content_type: &str, body: String| {
        let mut response = Response::new(Full::new(Bytes::from(body)));
        *response.status_mut() = status;
        if let Ok(value) = content_type.parse() {
            response
                .headers_mut()
                .insert(hyper::header::CONTENT_TYPE, value);
        }
        response
    };
    // Prometheus asks for OpenMetrics; tools that do not (promtool, curl)
    // get the classic text format.
    let openmetrics = request
        .headers()
        .get(hyper::header::ACCEPT)
        .and_then(|accept| accept.to_str().ok())
        .is_some_and(|accept| accept.contains("application/openmetrics-text"));
    match (request.method(), request.uri().path()) {
        (&Method::GET, "/metrics") if openmetrics => {
            reply(StatusCode::OK, OPENMETRICS, render(agent).await)
        }
        (&Method::GET, "/metrics") => reply(
            StatusCode::OK,
            PROMETHEUS_TEXT,
            to_prometheus_text(&render(agent).await),
        ),
        (_, "/metrics") => reply(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "use GET\n".into(),
        ),
        _ => reply(
            StatusCode::NOT_FOUND,
            "text/plain",
            "gpuwarden serves /metrics only\n".into(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_get_their_total_suffix_in_the_classic_format() {
        let openmetrics = "# HELP x_launches Launches.\n# TYPE x_launches counter\nx_launches_total{a=\"b\"} 1\n# HELP x_up Up.\n# TYPE x_up gauge\n# UNIT x_up seconds\nx_up 1\n# EOF\n";
        assert_eq!(
            to_prometheus_text(openmetrics),
            "# HELP x_launches_total Launches.\n# TYPE x_launches_total counter\nx_launches_total{a=\"b\"} 1\n# HELP x_up Up.\n# TYPE x_up gauge\nx_up 1\n"
        );
    }
}
