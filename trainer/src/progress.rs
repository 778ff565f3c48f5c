//! One progress bar style for every long step: position, rate, ETA and a message (loss, ...).

use indicatif::{ProgressBar, ProgressStyle};

/// A bar labelled `label` (the prefix can add e.g. the epoch).
pub fn bar(len: u64, label: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{label} {{prefix}} [{{bar:30}}] {{pos}}/{{len}} {{per_sec}} eta {{eta}} {{msg}}"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar())
        .progress_chars("=> "),
    );
    bar
}
