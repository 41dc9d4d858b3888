//! Logging set-up shared by the daemons: under systemd (stderr connected to the journal, which
//! systemd says in `JOURNAL_STREAM`) records go to journald with their fields as journal
//! fields; otherwise text lines, or JSON lines with `--log-format json`, go to stderr. The level
//! filter comes from `VMT_LOG` (default `info`).

use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;
use tracing_subscriber::EnvFilter;

/// How log records are written.
#[derive(clap::ValueEnum, Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// journald under systemd, text lines on stderr otherwise.
    #[default]
    Auto,
    /// Text lines on stderr.
    Text,
    /// One JSON object per line on stderr.
    Json,
}

/// Installs the process's log subscriber.
pub fn init(format: LogFormat) {
    let filter = || EnvFilter::try_from_env("VMT_LOG").unwrap_or_else(|_| "info".into());
    let registry = tracing_subscriber::registry().with(filter());
    if format == LogFormat::Auto && std::env::var_os("JOURNAL_STREAM").is_some() {
        match tracing_journald::layer() {
            Ok(journal) => return registry.with(journal).init(),
            // No journald socket after all: fall through to stderr.
            Err(e) => eprintln!("journald not reachable ({e}); logging to stderr"),
        }
    }
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    match format {
        LogFormat::Json => registry.with(fmt.json().flatten_event(true)).init(),
        _ => registry.with(fmt.with_ansi(ansi)).init(),
    }
}
