//! Decision rules: which detections fail a frame.

use std::collections::BTreeMap;

use edge_detector::Detection;
use serde::{Deserialize, Serialize};

/// Per-class rule; absent fields fall back to the defaults.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ClassRule {
    pub min_score: Option<f32>,
    /// Minimum box area in frame pixels.
    pub min_area: Option<f32>,
    /// Never fail on this class (still recorded).
    #[serde(default)]
    pub ignore: bool,
}

/// What the line is told about a frame that could not be decided (detector error, bad frame,
/// no model, overload, deadline): the fail-safe policy.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum UndecidedPolicy {
    /// The part is rejected (`pass = false`), as a failed frame would be.
    #[default]
    Reject,
    /// The part passes (`pass = true`) with the verdict flagged `undecided`, for lines where
    /// a stop costs more than an escaped defect (checked downstream).
    PassFlagged,
}

/// Decision rules: a frame fails if any detection passes its class's score and area thresholds
/// and its centre lies in a region of interest; a frame that could not be decided follows
/// `undecided`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Rules {
    #[serde(default = "default_min_score")]
    pub min_score: f32,
    #[serde(default)]
    pub min_area: f32,
    /// Per-class overrides by class name.
    #[serde(default)]
    pub classes: BTreeMap<String, ClassRule>,
    /// Regions of interest `[x1, y1, x2, y2]` in frame pixels; empty: the whole frame.
    #[serde(default)]
    pub roi: Vec<[f32; 4]>,
    /// Fail-safe policy for frames that could not be decided.
    #[serde(default)]
    pub undecided: UndecidedPolicy,
}

fn default_min_score() -> f32 {
    0.5
}

impl Default for Rules {
    fn default() -> Self {
        Self {
            min_score: default_min_score(),
            min_area: 0.0,
            classes: BTreeMap::new(),
            roi: vec![],
            undecided: UndecidedPolicy::Reject,
        }
    }
}

impl Rules {
    /// `pass` for a frame that could not be decided.
    pub fn undecided_pass(&self) -> bool {
        self.undecided == UndecidedPolicy::PassFlagged
    }

    /// Whether a detection makes the frame fail.
    pub fn fails(&self, class: &str, d: &Detection) -> bool {
        let rule = self.classes.get(class);
        if rule.is_some_and(|r| r.ignore) {
            return false;
        }
        let min_score = rule.and_then(|r| r.min_score).unwrap_or(self.min_score);
        let min_area = rule.and_then(|r| r.min_area).unwrap_or(self.min_area);
        let area = (d.x2 - d.x1).max(0.0) * (d.y2 - d.y1).max(0.0);
        let (cx, cy) = ((d.x1 + d.x2) / 2.0, (d.y1 + d.y2) / 2.0);
        let in_roi = self.roi.is_empty()
            || self
                .roi
                .iter()
                .any(|r| cx >= r[0] && cx < r[2] && cy >= r[1] && cy < r[3]);
        d.score >= min_score && area >= min_area && in_roi
    }
}
