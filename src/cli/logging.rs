//! Logging set-up shared by the daemons: under systemd (stderr connected to the journal, which
//! systemd says in `JOURNAL_STREAM`: its device and inode) records go to journald with their fields as journal
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

/// Whether stderr is the journal stream systemd connected: `JOURNAL_STREAM` names its device
/// and inode, and is inherited by children whose stderr may be elsewhere (a test's log file).
fn stderr_is_journal() -> bool {
    let Some(v) = std::env::var_os("JOURNAL_STREAM") else { return false };
    let Some((dev, ino)) = v.to_str().and_then(|v| v.split_once(':')) else { return false };
    let (Ok(dev), Ok(ino)) = (dev.parse::<u64>(), ino.parse::<u64>()) else { return false };
    // SAFETY: fstat on the process's own stderr into a zeroed, owned struct.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    if unsafe { libc::fstat(2, &mut st) } != 0 {
        return false;
    }
    st.st_dev as u64 == dev && st.st_ino as u64 == ino
}

/// Installs the process's log subscriber.
pub fn init(format: LogFormat) {
    let filter = || EnvFilter::try_from_env("VMT_LOG").unwrap_or_else(|_| "info".into());
    let registry = tracing_subscriber::registry().with(filter());
    if format == LogFormat::Auto && stderr_is_journal() {
        match tracing_journald::layer() {
            // Fields keep their names (`IMAGE=debian12`), not tracing-journald's `F_` prefix.
            Ok(journal) => return registry.with(journal.with_field_prefix(None)).init(),
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
