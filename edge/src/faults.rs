//! Fault points for the fault-injection tests. They exist only in builds with the
//! `fault-injection` feature (the workspace's test build turns it on through the `e2e` crate);
//! in every other build they compile to nothing.
//!
//! `EDGE_FAULTS` lists the faults, comma-separated, each `point:arg`:
//! - `detect_error:3-5`, `detect_panic:8`: detector batches (a number or an inclusive range,
//!   1-based, counted since the daemon started) that return an error or panic;
//! - `abort:NAME`: the process aborts at the named point of the model lifecycle (no cleanup, no
//!   flush: a kill -9 at an exact place). Names: `offer`, `chunk-K` (the K-th chunk stored),
//!   `finalize`, `transfer-dropped`, `package-written`, `staged`, `self-tested`, `state-saved`,
//!   `event-saved`, `activated`, `reported`, `confirmed` (see [`point`] calls).

#[cfg(feature = "fault-injection")]
mod points {
    use std::sync::OnceLock;

    struct Fault {
        point: String,
        arg: String,
    }

    fn range(f: &Fault) -> (u64, u64) {
        let (a, b) = f.arg.split_once('-').unwrap_or((&f.arg, &f.arg));
        let n = |x: &str| {
            x.parse::<u64>().unwrap_or_else(|_| {
                panic!("EDGE_FAULTS: `{}:{}`: bad batch number", f.point, f.arg)
            })
        };
        (n(a), n(b))
    }

    fn faults() -> &'static [Fault] {
        static FAULTS: OnceLock<Vec<Fault>> = OnceLock::new();
        FAULTS.get_or_init(|| {
            let spec = std::env::var("EDGE_FAULTS").unwrap_or_default();
            let faults: Vec<Fault> =
                spec.split(',')
                    .filter(|s| !s.trim().is_empty())
                    .map(|item| {
                        let (point, range) = item.trim().split_once(':').unwrap_or_else(|| {
                            panic!("EDGE_FAULTS: `{item}` is not point:batches")
                        });
                        Fault {
                            point: point.to_string(),
                            arg: range.to_string(),
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
            let hit = || {
                let (from, to) = range(f);
                (from..=to).contains(&batch)
            };
            match f.point.as_str() {
                "detect_error" if hit() => return Err(format!("injected fault at batch {batch}")),
                "detect_panic" if hit() => panic!("injected panic at batch {batch}"),
                _ => {}
            }
        }
        Ok(())
    }

    pub fn point(name: &str) {
        if faults().iter().any(|f| f.point == "abort" && f.arg == name) {
            eprintln!("fault injection: abort at `{name}`");
            std::process::abort();
        }
    }
}

/// Whether this build carries the fault points (logged at start: a test build, not for a line).
pub const COMPILED_IN: bool = cfg!(feature = "fault-injection");

/// Before the detector runs batch `batch`: an injected error or panic, if one is armed.
#[cfg(feature = "fault-injection")]
pub fn detect(batch: u64) -> Result<(), String> {
    points::detect(batch)
}

/// A named point of the model lifecycle: aborts the process there when `abort:NAME` is armed.
#[cfg(feature = "fault-injection")]
pub fn point(name: &str) {
    points::point(name)
}

/// A named point: nothing (built without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn point(_name: &str) {}

/// Before the detector runs a batch: nothing (built without `fault-injection`).
#[cfg(not(feature = "fault-injection"))]
#[inline(always)]
pub fn detect(_batch: u64) -> Result<(), String> {
    Ok(())
}
