//! Progress bars of the command-line tools (indicatif): drawn on stderr when it is a terminal,
//! hidden otherwise, so scripts and logs get only the final lines.

use indicatif::{ProgressBar, ProgressStyle};

/// A bar over `total` bytes, with rate and ETA.
pub fn bytes(prefix: &str, total: u64) -> ProgressBar {
    styled(prefix, total, "{prefix} [{bar:25}] {percent:>3}% {bytes}/{total_bytes} {bytes_per_sec} ETA {eta}")
}

/// A bar over `total` items (chunks).
pub fn count(prefix: &str, total: u64, unit: &str) -> ProgressBar {
    styled(prefix, total, &format!("{{prefix}} [{{bar:25}}] {{percent:>3}}% {{pos}}/{{len}} {unit}"))
}

fn styled(prefix: &str, total: u64, template: &str) -> ProgressBar {
    let style = ProgressStyle::with_template(template).expect("the templates above are valid").progress_chars("#>-");
    ProgressBar::new(total).with_style(style).with_prefix(prefix.to_string())
}
