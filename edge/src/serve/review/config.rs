//! `[review]`: what goes into the review queue, its bounds, the classes engineers may pick and
//! who may label.

use std::collections::BTreeMap;

use serde::Deserialize;

/// `[review]` in the daemon config.
#[derive(Clone, Debug, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ReviewConfig {
    /// Labeler name -> API token. The name is recorded with every label the token saves.
    pub labelers: BTreeMap<String, String>,
    /// Classes offered on the page (keys 1-9 pick them), in this order.
    #[serde(default = "default_classes")]
    pub classes: Vec<String>,
    /// Fraction of failed frames queued.
    #[serde(default = "one")]
    pub failed_rate: f64,
    /// Passing frames whose top score is in [low, high) are uncertain.
    #[serde(default = "default_band")]
    pub uncertain: [f32; 2],
    /// Fraction of uncertain frames queued.
    #[serde(default = "one")]
    pub uncertain_rate: f64,
    /// Fraction of the other passing frames queued (a check on what the model lets through).
    #[serde(default = "default_pass_rate")]
    pub pass_rate: f64,
    /// Unlabeled frames kept (oldest go first).
    #[serde(default = "default_max_pending")]
    pub max_pending: usize,
    /// Labeled frames kept; when reached, nothing new is queued.
    #[serde(default = "default_max_labeled")]
    pub max_labeled: usize,
}

pub(super) fn default_classes() -> Vec<String> {
    edge_detector::NEU_CLASSES
        .iter()
        .map(|s| s.to_string())
        .collect()
}
fn one() -> f64 {
    1.0
}
fn default_band() -> [f32; 2] {
    [0.2, 0.5]
}
fn default_pass_rate() -> f64 {
    0.01
}
fn default_max_pending() -> usize {
    500
}
fn default_max_labeled() -> usize {
    10_000
}

/// Labeler names and class names: what may appear in a file name or an XML element.
pub(super) fn valid_name(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 64
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl ReviewConfig {
    pub fn validate(&self) -> Result<(), String> {
        if self.labelers.is_empty() {
            return Err("review.labelers: at least one `name = \"token\"`".into());
        }
        for (name, token) in &self.labelers {
            if !valid_name(name) {
                return Err(format!(
                    "review.labelers.{name}: names are 1-64 of A-Z a-z 0-9 - _ ."
                ));
            }
            if token.len() < 16 || token.chars().any(|c| c.is_whitespace() || c.is_control()) {
                return Err(format!(
                    "review.labelers.{name}: the token must be at least 16 printable characters without spaces"
                ));
            }
        }
        let tokens: std::collections::BTreeSet<&String> = self.labelers.values().collect();
        if tokens.len() != self.labelers.len() {
            return Err("review.labelers: two labelers share a token".into());
        }
        if self.classes.is_empty() || self.classes.len() > 64 {
            return Err("review.classes: 1 to 64 class names".into());
        }
        for (i, c) in self.classes.iter().enumerate() {
            if !valid_name(c) {
                return Err(format!(
                    "review.classes[{i}] {c:?}: names are 1-64 of A-Z a-z 0-9 - _ ."
                ));
            }
            if self.classes[..i].contains(c) {
                return Err(format!("review.classes: {c:?} is listed twice"));
            }
        }
        for (key, rate) in [
            ("failed_rate", self.failed_rate),
            ("uncertain_rate", self.uncertain_rate),
            ("pass_rate", self.pass_rate),
        ] {
            if !(0.0..=1.0).contains(&rate) {
                return Err(format!("review.{key}: {rate} is not in [0, 1]"));
            }
        }
        let [lo, hi] = self.uncertain;
        if !(0.0 <= lo && lo < hi && hi <= 1.0) {
            return Err(format!(
                "review.uncertain: [{lo}, {hi}] must be [low, high] with 0 <= low < high <= 1"
            ));
        }
        if self.max_pending == 0 || self.max_labeled == 0 {
            return Err("review.max_pending and review.max_labeled: at least 1".into());
        }
        Ok(())
    }

    /// The labeler a token belongs to.
    pub fn labeler(&self, token: &str) -> Option<&str> {
        // Compare every token in full: the time taken does not tell how much of one matched.
        let mut found = None;
        for (name, t) in &self.labelers {
            let same = t.len() == token.len()
                && t.bytes()
                    .zip(token.bytes())
                    .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                    == 0;
            if same {
                found = Some(name.as_str());
            }
        }
        found
    }
}
