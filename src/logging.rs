//! Logs through `tracing` to stderr: text for people, JSON for log
//! pipelines. Under systemd (JOURNAL_STREAM set) lines carry no timestamp or
//! colour, since journald adds its own.

use tracing_subscriber::EnvFilter;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    Text,
    Json,
}

/// The environment variable that sets the level filter (`info` when unset),
/// in `tracing`'s directive syntax, e.g. `gpuwarden=debug`.
pub const LEVEL_VAR: &str = "GPUWARDEN_LOG";

pub fn init(format: LogFormat) {
    let filter = EnvFilter::try_from_env(LEVEL_VAR).unwrap_or_else(|_| EnvFilter::new("info"));
    let journald = std::env::var_os("JOURNAL_STREAM").is_some();
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match (format, journald) {
        (LogFormat::Json, _) => builder.json().flatten_event(true).init(),
        (LogFormat::Text, true) => builder.with_ansi(false).without_time().init(),
        (LogFormat::Text, false) => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
}
