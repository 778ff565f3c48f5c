//! Fault points for the fault-injection tests. They exist only in builds with the
//! `fault-injection` feature (the workspace's test build turns it on through the `e2e` crate);
//! in every other build they compile to nothing.
//!
//! `EDGE_FAULTS` lists the faults, comma-separated, each `point:batches` where batches is a
//! number or an inclusive range of detector batches (1-based, counted since the daemon started):
//! `detect_error:3-5` (the detector returns an error), `detect_panic:8` (it panics).

#[cfg(feature = "fault-injection")]
mod points {
    use std::sync::OnceLock;

    struct Fault {
        point: String,
        from: u64,
        to: u64,
    }

    fn faults() -> &'static [Fault] {
        static FAULTS: OnceLock<Vec<Fault>> = OnceLock::new();
        FAULTS.get_or_init(|| {
            let spec = std::env::var("EDGE_FAULTS").unwrap_or_default();
            let faults: Vec<Fault> = spec
                .split(',')
                .filter(|s| !s.trim().is_empty())
                .map(|item| {
                    let (point, range) = item
                        .trim()
                        .split_once(':')
                        .unwrap_or_else(|| panic!("EDGE_FAULTS: `{item}` is not point:batches"));
                    let (a, b) = range.split_once('-').unwrap_or((range, range));
                    let n = |x: &str| {
                        x.parse::<u64>()
                            .unwrap_or_else(|_| panic!("EDGE_FAULTS: `{item}`: bad batch number"))
                    };
                    Fault {
                        point: point.to_string(),
                        from: n(a),
                        to: n(b),
                    }
                })
                .collect();
            if !faults.is_empty() {
                tracing::warn!("fault injection armed: {spec}");
            }
            faults
        })
    }

    pub fn detect(batch: u64) -> Result<(), String> {
        for f in faults() {
            if (f.from..=f.to).contains(&batch) {
                match f.point.as_str() {
                    "detect_error" => return Err(format!("injected fault at batch {batch}")),
                    "detect_panic" => panic!("injected panic at batch {batch}"),
                    _ => {}
                }
            }
        }
        Ok(())
    }
}

/// Whether this build carries the fault points (logged at start: a test build, not for a line).
pub const COMPILED_IN: bool = cfg!(feature = "fault-injection");

/// Before the detector runs batch `batch`: an injected error or panic, if one is armed.
#[cfg(feature = "fault-injection")]
pub fn detect(batch: u64) -> Result<(), String> {
    points::detect(batch)
}

/// Before the detector runs a batch: nothing (built without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn detect(_batch: u64) -> Result<(), String> {
    Ok(())
}
