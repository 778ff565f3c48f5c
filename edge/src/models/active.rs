//! The model the inspection pipeline uses: one handle, swapped atomically on activation and
//! rollback, read by the pipeline per batch and by the labeling page for heat maps.

use std::sync::{Arc, RwLock};

use edge_detector::Detector;

use super::store::Installed;

/// The active model and its detector; `None` while no model is installed.
pub type ActiveModel = Arc<RwLock<Option<(Installed, Arc<Detector>)>>>;
