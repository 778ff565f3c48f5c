//! The rollout record: a journal a restarted publisher continues from. The first line is the
//! plan (transfer, target, waves); every later line one event (the next wave opened, the rollout
//! halted, a device finished). Appending keeps the cost of a save proportional to what happened,
//! not to the fleet; a torn last line (the publisher killed mid-write) is ignored.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

use super::DeviceOutcome;
use crate::ProtocolError;

/// The plan, the journal's first line.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub(super) struct Plan {
    pub transfer: String,
    pub target: String,
    pub waves: Vec<Vec<String>>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Event {
    /// The rollout moved on to this wave.
    Wave(usize),
    Halted(String),
    Finished(DeviceOutcome),
}

/// The state of a rollout as its journal tells it.
#[derive(Clone, Debug)]
pub(super) struct Record {
    pub plan: Plan,
    pub wave: usize,
    pub halted: Option<String>,
    pub finished: BTreeMap<String, DeviceOutcome>,
}

impl Record {
    pub fn new(plan: Plan) -> Self {
        Self {
            plan,
            wave: 0,
            halted: None,
            finished: BTreeMap::new(),
        }
    }

    /// Reads a journal; `None` when there is none at `path`.
    pub fn read(path: &Path) -> Result<Option<Record>, ProtocolError> {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => {
                return Err(ProtocolError::Io {
                    path: path.display().to_string(),
                    source: e,
                });
            }
        };
        let bad = |line: usize, what: String| {
            ProtocolError::Invalid(format!(
                "rollout record {} line {line}: {what}",
                path.display()
            ))
        };
        let mut lines = text.split_inclusive('\n').enumerate();
        let plan: Plan = match lines.next() {
            Some((_, l)) => serde_json::from_str(l).map_err(|e| bad(1, e.to_string()))?,
            None => return Err(bad(1, "empty file, no plan".into())),
        };
        let mut record = Record::new(plan);
        for (n, line) in lines {
            let event: Event = match serde_json::from_str(line) {
                Ok(e) => e,
                // Killed while writing its last line: that event did not happen.
                Err(_) if !line.ends_with('\n') => break,
                Err(e) => return Err(bad(n + 1, e.to_string())),
            };
            match event {
                Event::Wave(w) if w < record.plan.waves.len() => record.wave = w,
                Event::Wave(w) => return Err(bad(n + 1, format!("wave {w} is not in the plan"))),
                Event::Halted(why) => record.halted = Some(why),
                Event::Finished(o) => {
                    record.finished.insert(o.device.clone(), o);
                }
            }
        }
        Ok(Some(record))
    }
}

/// Appends events to the journal, flushed to disk at most once a second (and at the end).
pub(super) struct Journal {
    out: Option<(PathBuf, BufWriter<File>)>,
    dirty: bool,
    synced: Instant,
}

impl Journal {
    /// No journal.
    pub fn none() -> Self {
        Self {
            out: None,
            dirty: false,
            synced: Instant::now(),
        }
    }

    /// Continues the journal at `path`, or starts it with the plan and what `record` holds.
    pub fn open(path: &Path, record: &Record, existing: bool) -> Result<Self, ProtocolError> {
        let io = |e| ProtocolError::Io {
            path: path.display().to_string(),
            source: e,
        };
        if !existing {
            let mut text = serde_json::to_string(&record.plan).expect("plans serialize");
            text.push('\n');
            crate::package::write_atomic(path, text.as_bytes())?;
        }
        let file = OpenOptions::new().append(true).open(path).map_err(io)?;
        if existing {
            // A torn last line is cut off, so that the next event starts a line of its own.
            let text = std::fs::read(path).map_err(io)?;
            if text.last().is_some_and(|&b| b != b'\n') {
                let whole = text.iter().rposition(|&b| b == b'\n').map_or(0, |p| p + 1);
                file.set_len(whole as u64).map_err(io)?;
            }
        }
        Ok(Self {
            out: Some((path.to_path_buf(), BufWriter::new(file))),
            dirty: false,
            synced: Instant::now(),
        })
    }

    pub fn wave(&mut self, wave: usize) {
        self.push(&Event::Wave(wave));
    }

    pub fn halted(&mut self, why: &str) {
        self.push(&Event::Halted(why.to_string()));
    }

    pub fn finished(&mut self, outcome: &DeviceOutcome) {
        self.push(&Event::Finished(outcome.clone()));
    }

    fn push(&mut self, event: &Event) {
        let mut line = serde_json::to_vec(event).expect("events serialize");
        line.push(b'\n');
        self.write_raw(&line);
    }

    fn write_raw(&mut self, bytes: &[u8]) {
        if let Some((path, out)) = &mut self.out {
            if let Err(e) = out.write_all(bytes) {
                tracing::error!("rollout record {}: {e}", path.display());
            }
            self.dirty = true;
        }
    }

    /// Writes what is buffered to disk if a second has passed since the last time.
    pub fn sync_now_and_then(&mut self) {
        if self.dirty && self.synced.elapsed() >= Duration::from_secs(1) {
            self.sync();
        }
    }

    pub fn sync(&mut self) {
        if let Some((path, out)) = &mut self.out {
            let r = out.flush().and_then(|_| out.get_ref().sync_data());
            if let Err(e) = r {
                tracing::error!("rollout record {}: {e}", path.display());
            }
        }
        self.dirty = false;
        self.synced = Instant::now();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ReportState;

    #[test]
    fn a_journal_is_continued_and_a_torn_last_line_ignored() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        assert!(Record::read(&path).unwrap().is_none());
        let plan = Plan {
            transfer: "ab".into(),
            target: "fleet".into(),
            waves: vec![vec!["a".into()], vec!["b".into(), "c".into()]],
        };
        let record = Record::new(plan);
        let mut j = Journal::open(&path, &record, false).unwrap();
        let done = |id: &str| DeviceOutcome {
            device: id.into(),
            state: Some(ReportState::Activated),
            reason: None,
        };
        j.finished(&done("a"));
        j.wave(1);
        j.sync();
        drop(j);
        // Killed mid-line.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"finished\":{\"dev").unwrap();
        drop(f);
        let r = Record::read(&path).unwrap().unwrap();
        assert_eq!((r.wave, r.finished.len()), (1, 1));
        let mut j = Journal::open(&path, &r, true).unwrap();
        j.finished(&done("b"));
        j.halted("stop");
        j.sync();
        let r = Record::read(&path).unwrap().unwrap();
        assert_eq!(r.finished.len(), 2);
        assert_eq!(r.halted.as_deref(), Some("stop"));
        // A bad line in the middle is an error naming the line.
        std::fs::write(&path, "{\"transfer\":\"ab\",\"target\":\"fleet\",\"waves\":[[\"a\"]]}\nnonsense\n{\"wave\":0}\n").unwrap();
        let e = Record::read(&path).unwrap_err().to_string();
        assert!(e.contains("line 2"), "{e}");
        std::fs::write(
            &path,
            "{\"transfer\":\"ab\",\"target\":\"fleet\",\"waves\":[[\"a\"]]}\n{\"wave\":3}\n",
        )
        .unwrap();
        assert!(
            Record::read(&path)
                .unwrap_err()
                .to_string()
                .contains("not in the plan")
        );
    }
}
