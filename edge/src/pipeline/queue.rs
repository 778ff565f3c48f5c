//! The bounded frame queue between the source and the detector, with its policy when full.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};

/// What to do when the frame queue is full.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DropPolicy {
    /// Drop the oldest queued frame (live inspection: stay current).
    DropOldest,
    /// Make the source wait (replay, or sources that buffer themselves).
    Block,
}

/// A bounded FIFO shared by a producer and a consumer.
pub struct BoundedQueue<T> {
    inner: Mutex<(VecDeque<T>, bool)>,
    changed: Condvar,
    capacity: usize,
    policy: DropPolicy,
    pub dropped: AtomicU64,
}

impl<T> BoundedQueue<T> {
    pub fn new(capacity: usize, policy: DropPolicy) -> Self {
        Self {
            inner: Mutex::new((VecDeque::with_capacity(capacity), false)),
            changed: Condvar::new(),
            capacity: capacity.max(1),
            policy,
            dropped: AtomicU64::new(0),
        }
    }

    /// Adds an item; returns the item dropped to make room (drop-oldest policy).
    pub fn push(&self, item: T) -> Option<T> {
        let mut guard = self.inner.lock().expect("queue lock");
        let mut dropped = None;
        while guard.0.len() >= self.capacity {
            match self.policy {
                DropPolicy::DropOldest => {
                    dropped = guard.0.pop_front();
                    self.dropped.fetch_add(1, Ordering::Relaxed);
                }
                DropPolicy::Block => {
                    if guard.1 {
                        return Some(item);
                    }
                    guard = self.changed.wait(guard).expect("queue lock");
                }
            }
        }
        guard.0.push_back(item);
        self.changed.notify_all();
        dropped
    }

    /// Takes the next item, waiting up to `timeout`; `None` on timeout or when closed and empty.
    pub fn pop(&self, timeout: Duration) -> Option<T> {
        let until = Instant::now() + timeout;
        let mut guard = self.inner.lock().expect("queue lock");
        loop {
            if let Some(item) = guard.0.pop_front() {
                self.changed.notify_all();
                return Some(item);
            }
            let now = Instant::now();
            if guard.1 || now >= until {
                return None;
            }
            guard = self
                .changed
                .wait_timeout(guard, until - now)
                .expect("queue lock")
                .0;
        }
    }

    pub fn len(&self) -> usize {
        self.inner.lock().expect("queue lock").0.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// No more items will come; waiters wake up.
    pub fn close(&self) {
        self.inner.lock().expect("queue lock").1 = true;
        self.changed.notify_all();
    }

    pub fn is_closed(&self) -> bool {
        self.inner.lock().expect("queue lock").1
    }
}
