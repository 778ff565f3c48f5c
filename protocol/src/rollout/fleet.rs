//! The devices of a rollout, indexed by where they stand, so that each decision touches the
//! devices it concerns and not the whole fleet: the publisher's work grows with the number of
//! devices, not with devices x time.

use std::collections::{BTreeSet, HashMap};
use std::time::{Duration, Instant};

use super::DeviceOutcome;

/// Where a device is in the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Not offered yet (its wave has not started, the rate limit, or it is offline).
    Waiting,
    Offered,
    Receiving,
    Done,
}

pub(super) struct Dev {
    pub id: String,
    pub wave: usize,
    pub online: bool,
    pub phase: Phase,
    pub outcome: Option<DeviceOutcome>,
    pub offered_at: Option<Instant>,
    pub last_heard: Instant,
    pub next_probe: Instant,
    pub probe_every: Duration,
    /// Chunks the device said it misses that no queued send covers yet.
    pub missing: BTreeSet<u32>,
    /// Whether it listens on the transfer's topic: it answered an offer (it subscribes before
    /// answering) and has not reconnected since (it does not subscribe again then).
    pub subscribed: bool,
    /// Chunks sent to it on its own topic: queue position and when.
    pub sent: HashMap<u32, (u64, Instant)>,
    /// Queue position of the last send meant for it (chunks or probe).
    pub last_send: u64,
}

/// The counts a wave's progress is told in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Bucket {
    /// Online, not offered yet.
    Waiting,
    /// Offline, not offered yet.
    Offline,
    Offered,
    Receiving,
    Activated,
    /// Refused, failed, rolled back or timed out.
    Failed,
}

pub(super) const BUCKETS: usize = 6;

impl Dev {
    pub fn new(id: &str, wave: usize, online: bool, outcome: Option<DeviceOutcome>) -> Self {
        let now = Instant::now();
        Self {
            id: id.to_string(),
            wave,
            online,
            phase: if outcome.is_some() {
                Phase::Done
            } else {
                Phase::Waiting
            },
            outcome,
            offered_at: None,
            last_heard: now,
            next_probe: now,
            probe_every: Duration::from_secs(5),
            missing: BTreeSet::new(),
            subscribed: false,
            sent: HashMap::new(),
            last_send: 0,
        }
    }

    pub fn bucket(&self) -> Bucket {
        match self.phase {
            Phase::Waiting if self.online => Bucket::Waiting,
            Phase::Waiting => Bucket::Offline,
            Phase::Offered => Bucket::Offered,
            Phase::Receiving => Bucket::Receiving,
            Phase::Done if self.outcome.as_ref().is_some_and(DeviceOutcome::succeeded) => {
                Bucket::Activated
            }
            Phase::Done => Bucket::Failed,
        }
    }

    fn unanswered(&self) -> bool {
        self.phase == Phase::Offered && self.online
    }
}

/// The devices, and indexes kept up to date as their phase and presence change. `phase`,
/// `online` and `outcome` change only through [`Fleet::update`]; the other fields directly.
pub(super) struct Fleet {
    pub devs: Vec<Dev>,
    index: HashMap<String, usize>,
    /// Devices per wave per bucket.
    counts: Vec<[usize; BUCKETS]>,
    /// Per wave: online devices not offered yet.
    pub ready: Vec<BTreeSet<usize>>,
    /// Offered or receiving.
    pub active: BTreeSet<usize>,
    /// Offered, online, not answered yet.
    unanswered: usize,
    /// Receiving devices that may miss chunks no send covers yet.
    pub needy: BTreeSet<usize>,
}

impl Fleet {
    pub fn new(waves: usize, devs: Vec<Dev>) -> Self {
        let mut fleet = Self {
            index: devs
                .iter()
                .enumerate()
                .map(|(i, d)| (d.id.clone(), i))
                .collect(),
            devs,
            counts: vec![[0; BUCKETS]; waves],
            ready: vec![BTreeSet::new(); waves],
            active: BTreeSet::new(),
            unanswered: 0,
            needy: BTreeSet::new(),
        };
        for i in 0..fleet.devs.len() {
            let b = fleet.devs[i].bucket();
            fleet.enter(i, b);
            fleet.unanswered += fleet.devs[i].unanswered() as usize;
        }
        fleet
    }

    pub fn find(&self, id: &str) -> Option<usize> {
        self.index.get(id).copied()
    }

    pub fn len(&self) -> usize {
        self.devs.len()
    }

    /// Changes device `i` and keeps the indexes right.
    pub fn update<R>(&mut self, i: usize, f: impl FnOnce(&mut Dev) -> R) -> R {
        let (b0, u0) = (self.devs[i].bucket(), self.devs[i].unanswered());
        let r = f(&mut self.devs[i]);
        let (b1, u1) = (self.devs[i].bucket(), self.devs[i].unanswered());
        if b0 != b1 {
            self.leave(i, b0);
            self.enter(i, b1);
        }
        self.unanswered = self.unanswered + u1 as usize - u0 as usize;
        let d = &self.devs[i];
        if d.phase == Phase::Receiving && !d.missing.is_empty() {
            self.needy.insert(i);
        } else if d.phase == Phase::Done {
            self.needy.remove(&i);
        }
        r
    }

    fn enter(&mut self, i: usize, b: Bucket) {
        let w = self.devs[i].wave;
        self.counts[w][b as usize] += 1;
        match b {
            Bucket::Waiting => {
                self.ready[w].insert(i);
            }
            Bucket::Offered | Bucket::Receiving => {
                self.active.insert(i);
            }
            _ => {}
        }
    }

    fn leave(&mut self, i: usize, b: Bucket) {
        let w = self.devs[i].wave;
        self.counts[w][b as usize] -= 1;
        match b {
            Bucket::Waiting => {
                self.ready[w].remove(&i);
            }
            Bucket::Offered | Bucket::Receiving => {
                self.active.remove(&i);
            }
            _ => {}
        }
    }

    /// Wave `w`'s devices per bucket.
    pub fn counts(&self, w: usize) -> [usize; BUCKETS] {
        self.counts[w]
    }

    /// Whether every device of wave `w` finished or is offline without an offer.
    pub fn settled(&self, w: usize) -> bool {
        let c = &self.counts[w];
        c[Bucket::Waiting as usize] + c[Bucket::Offered as usize] + c[Bucket::Receiving as usize]
            == 0
    }

    /// Devices finished and of them failed, all waves.
    pub fn finished(&self) -> (usize, usize) {
        self.counts.iter().fold((0, 0), |(n, f), c| {
            let failed = c[Bucket::Failed as usize];
            (n + c[Bucket::Activated as usize] + failed, f + failed)
        })
    }

    pub fn all_done(&self) -> bool {
        self.finished().0 == self.devs.len()
    }

    /// Whether every online device offered something has answered.
    pub fn all_answered(&self) -> bool {
        self.unanswered == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::messages::ReportState;

    #[test]
    fn indexes_follow_the_devices() {
        let devs = vec![
            Dev::new("a", 0, true, None),
            Dev::new("b", 1, false, None),
            Dev::new(
                "c",
                1,
                true,
                Some(DeviceOutcome {
                    device: "c".into(),
                    state: Some(ReportState::Activated),
                    reason: None,
                }),
            ),
        ];
        let mut f = Fleet::new(2, devs);
        assert_eq!(f.ready[0].len(), 1);
        assert!(f.ready[1].is_empty());
        assert!(!f.settled(0) && f.settled(1));
        assert_eq!(f.finished(), (1, 0));
        f.update(0, |d| d.phase = Phase::Offered);
        assert!(!f.all_answered() && f.active.contains(&0) && f.ready[0].is_empty());
        f.update(0, |d| {
            d.phase = Phase::Receiving;
            d.missing.insert(3);
        });
        assert!(f.all_answered() && f.needy.contains(&0));
        f.update(0, |d| {
            d.phase = Phase::Done;
            d.outcome = Some(DeviceOutcome {
                device: "a".into(),
                state: Some(ReportState::Failed),
                reason: None,
            });
        });
        assert!(f.settled(0) && f.needy.is_empty() && f.active.is_empty());
        assert_eq!(f.finished(), (2, 1));
        f.update(1, |d| d.online = true);
        assert!(f.ready[1].contains(&1) && !f.settled(1) && !f.all_done());
        assert_eq!(f.counts(1)[Bucket::Waiting as usize], 1);
    }
}
