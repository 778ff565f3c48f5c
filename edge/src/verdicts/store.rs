//! The verdict store (sled): every verdict is written, with its outbox entry, in one transaction
//! and flushed to disk before it is published; defect crops and frames are kept as JPEG; old
//! verdicts and images go by count, age and bytes. The outbox is never trimmed by retention:
//! what was decided is delivered.
//!
//! The disk budget (`disk_budget_mb`, counting the bytes the store holds: verdicts, outbox,
//! frames and crops) is kept in this order: frames and crops go first (the oldest), then
//! delivered verdicts (the oldest); the last `reserve_mb` of the budget takes verdicts only
//! (new frames are shed, counted); only when undelivered verdicts alone fill the whole budget is
//! the oldest of them dropped to store the new one, counted as lost (the alarm).

use std::path::Path;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};

use image::GrayImage;
use protocol::Verdict;
use protocol::messages::Message;
use serde::{Deserialize, Serialize};
use sled::Transactional;

/// Which frames are kept as JPEG for `/api/frames/{id}.jpg` (crops of failing defects are kept
/// whenever the frame is not).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum KeepFrames {
    None,
    Failed,
    All,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StoreConfig {
    /// Verdicts kept (oldest go first).
    #[serde(default = "default_max_verdicts")]
    pub max_verdicts: u64,
    /// Verdicts older than this go (days).
    #[serde(default = "default_max_age_days")]
    pub max_age_days: f64,
    /// Bytes of JPEG frames and crops kept.
    #[serde(default = "default_max_image_mb")]
    pub max_image_mb: u64,
    #[serde(default = "default_keep_frames")]
    pub keep_frames: KeepFrames,
    /// JPEG quality of stored frames and crops.
    #[serde(default = "default_quality")]
    pub jpeg_quality: u8,
    /// Memory sled may use to cache the store's pages, MiB (sled's own default is 1 GiB, which
    /// a long run fills: resident memory then grows with the store).
    #[serde(default = "default_cache_mb")]
    pub cache_mb: u64,
    /// Bytes the store may hold (verdicts, outbox, frames, crops), MiB. Sled's files take up to
    /// about twice that on disk (its log is compacted in the background).
    #[serde(default = "default_budget_mb")]
    pub disk_budget_mb: u64,
    /// The last part of the budget, MiB, kept for verdicts: once the store reaches it, frames and
    /// crops are no longer kept (shed, counted) and the oldest images are removed.
    #[serde(default = "default_reserve_mb")]
    pub reserve_mb: u64,
}

fn default_budget_mb() -> u64 {
    4096
}
fn default_reserve_mb() -> u64 {
    256
}

fn default_cache_mb() -> u64 {
    32
}

fn default_max_verdicts() -> u64 {
    1_000_000
}
fn default_max_age_days() -> f64 {
    30.0
}
fn default_max_image_mb() -> u64 {
    2048
}
fn default_keep_frames() -> KeepFrames {
    KeepFrames::Failed
}
fn default_quality() -> u8 {
    85
}

impl Default for StoreConfig {
    fn default() -> Self {
        Self {
            max_verdicts: default_max_verdicts(),
            max_age_days: default_max_age_days(),
            max_image_mb: default_max_image_mb(),
            keep_frames: default_keep_frames(),
            jpeg_quality: default_quality(),
            cache_mb: default_cache_mb(),
            disk_budget_mb: default_budget_mb(),
            reserve_mb: default_reserve_mb(),
        }
    }
}

pub struct VerdictStore {
    db: sled::Db,
    verdicts: sled::Tree,
    outbox: sled::Tree,
    /// key: verdict id (8 bytes BE) + kind (0 = frame, 1.. = crop n) -> JPEG.
    images: sled::Tree,
    meta: sled::Tree,
    config: StoreConfig,
    /// Entries in `verdicts` and `outbox`, counted at open and kept up to date: sled's `len`
    /// walks the whole tree, and retention asked for it every 64 verdicts (up to a million
    /// entries) and /metrics on every scrape.
    stored: AtomicUsize,
    queued: AtomicUsize,
    /// Bytes of the values in `verdicts` and `outbox`, counted the same way.
    stored_bytes: AtomicU64,
    queued_bytes: AtomicU64,
    /// Frames (with their crops) removed or not kept to stay out of the reserve.
    pub frames_shed: AtomicU64,
    /// Undelivered verdicts dropped because they alone filled the budget (the alarm).
    pub lost: AtomicU64,
}

/// Big-endian id: sled keys that sort in id order.
pub(crate) fn key(id: u64) -> [u8; 8] {
    id.to_be_bytes()
}

/// The id of a [`key`].
fn id_of(k: &[u8]) -> u64 {
    u64::from_be_bytes(k.try_into().unwrap_or([0; 8]))
}

fn image_key(id: u64, n: u16) -> [u8; 10] {
    let mut k = [0u8; 10];
    k[..8].copy_from_slice(&id.to_be_bytes());
    k[8..].copy_from_slice(&n.to_be_bytes());
    k
}

pub(crate) fn jpeg(image: &GrayImage, quality: u8) -> Vec<u8> {
    let mut out = Vec::new();
    let mut enc = image::codecs::jpeg::JpegEncoder::new_with_quality(&mut out, quality);
    enc.encode_image(image).expect("encoding to memory");
    out
}

#[derive(Debug, thiserror::Error)]
#[error("verdict store: {0}")]
pub struct StoreError(String);

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        StoreError(e.to_string())
    }
}

impl VerdictStore {
    pub fn open(path: &Path, config: StoreConfig) -> Result<Self, StoreError> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(config.cache_mb << 20)
            .open()
            .map_err(|e| StoreError(format!("{}: {e}", path.display())))?;
        let verdicts = db.open_tree("verdicts")?;
        let outbox = db.open_tree("outbox")?;
        let count = |t: &sled::Tree| -> Result<(usize, u64), StoreError> {
            let (mut n, mut bytes) = (0, 0);
            for entry in t.iter() {
                let (_, v) = entry?;
                n += 1;
                bytes += v.len() as u64;
            }
            Ok((n, bytes))
        };
        let (stored, stored_bytes) = count(&verdicts)?;
        let (queued, queued_bytes) = count(&outbox)?;
        Ok(Self {
            stored: AtomicUsize::new(stored),
            queued: AtomicUsize::new(queued),
            stored_bytes: AtomicU64::new(stored_bytes),
            queued_bytes: AtomicU64::new(queued_bytes),
            frames_shed: AtomicU64::new(0),
            lost: AtomicU64::new(0),
            verdicts,
            outbox,
            images: db.open_tree("images")?,
            meta: db.open_tree("meta")?,
            db,
            config,
        })
    }

    /// A new verdict id: increasing, also across restarts and crashes.
    pub fn next_id(&self) -> Result<u64, StoreError> {
        Ok(self.db.generate_id()? + 1)
    }

    /// Stores a verdict (and its images) durably and queues it for publishing.
    pub fn record(&self, verdict: &Verdict, frame: &GrayImage) -> Result<(), StoreError> {
        let bytes = verdict.encode();
        let k = key(verdict.id);
        let budget = self.config.disk_budget_mb << 20;
        let reserve_floor = budget.saturating_sub(self.config.reserve_mb << 20);
        let need = 2 * bytes.len() as u64;
        if self.usage() + need > budget {
            self.make_room(budget.saturating_sub(need))?;
        }
        let (was_stored, was_queued) = (&self.verdicts, &self.outbox)
            .transaction(|(v, o)| {
                let stored = v.insert(&k, bytes.as_slice())?.is_some();
                let queued = o.insert(&k, bytes.as_slice())?.is_some();
                Ok::<_, sled::transaction::ConflictableTransactionError<()>>((stored, queued))
            })
            .map_err(|e| StoreError(format!("{e:?}")))?;
        if !was_stored {
            self.stored.fetch_add(1, Ordering::Relaxed);
            self.stored_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        if !was_queued {
            self.queued.fetch_add(1, Ordering::Relaxed);
            self.queued_bytes
                .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        }
        let keep_frame = match self.config.keep_frames {
            KeepFrames::All => true,
            KeepFrames::Failed => !verdict.pass,
            KeepFrames::None => false,
        };
        if self.usage() > reserve_floor {
            // In the reserve: verdicts only. Old images make room for getting out of it.
            self.drop_images_until(reserve_floor)?;
            if self.usage() > reserve_floor {
                if keep_frame || verdict.defects.iter().any(|d| d.fails) {
                    self.frames_shed.fetch_add(1, Ordering::Relaxed);
                }
                self.db.flush()?;
                return Ok(());
            }
        }
        let mut added = 0u64;
        // A frame that never decoded (undecided, cause bad_frame) has no pixels to keep.
        if keep_frame && frame.width() > 0 && frame.height() > 0 {
            let data = jpeg(frame, self.config.jpeg_quality);
            added += data.len() as u64;
            self.images.insert(image_key(verdict.id, 0), data)?;
        }
        for (n, d) in verdict
            .defects
            .iter()
            .filter(|d| d.fails)
            .enumerate()
            .take(32)
        {
            let pad = 8.0;
            let x1 = (d.bbox[0] - pad).max(0.0) as u32;
            let y1 = (d.bbox[1] - pad).max(0.0) as u32;
            let x2 = ((d.bbox[2] + pad) as u32).min(frame.width());
            let y2 = ((d.bbox[3] + pad) as u32).min(frame.height());
            if x2 > x1 && y2 > y1 {
                let crop = image::imageops::crop_imm(frame, x1, y1, x2 - x1, y2 - y1).to_image();
                let data = jpeg(&crop, self.config.jpeg_quality);
                added += data.len() as u64;
                self.images
                    .insert(image_key(verdict.id, n as u16 + 1), data)?;
            }
        }
        if added > 0 {
            self.meta.update_and_fetch("image_bytes", |old| {
                let now = old
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                    .unwrap_or(0);
                Some((now + added).to_be_bytes().to_vec())
            })?;
            // The newest images push the oldest out of the part of the budget they may use.
            self.drop_images_until(reserve_floor)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Bytes the store holds: verdicts, outbox, frames and crops (what the budget counts).
    pub fn usage(&self) -> u64 {
        self.image_bytes()
            + self.stored_bytes.load(Ordering::Relaxed)
            + self.queued_bytes.load(Ordering::Relaxed)
    }

    /// Whether the store is in its reserve (frames are being shed).
    pub fn in_reserve(&self) -> bool {
        let budget = self.config.disk_budget_mb << 20;
        self.usage() > budget.saturating_sub(self.config.reserve_mb << 20)
    }

    /// Removes the oldest verdicts' frames and crops until the store holds at most `target`
    /// bytes or no image is left.
    fn drop_images_until(&self, target: u64) -> Result<(), StoreError> {
        while self.usage() > target {
            let Some((first, _)) = self.images.first()? else {
                break;
            };
            self.remove_images(&first[..8])?;
            self.frames_shed.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn remove_images(&self, prefix: &[u8]) -> Result<(), StoreError> {
        let mut freed = 0u64;
        for entry in self.images.scan_prefix(prefix) {
            let (ik, iv) = entry?;
            freed += iv.len() as u64;
            self.images.remove(ik)?;
        }
        if freed > 0 {
            self.meta.update_and_fetch("image_bytes", |old| {
                let now = old
                    .map(|b| u64::from_be_bytes(b.try_into().unwrap_or([0; 8])))
                    .unwrap_or(0);
                Some(now.saturating_sub(freed).to_be_bytes().to_vec())
            })?;
        }
        Ok(())
    }

    /// Brings the store down to `target` bytes: images first, then delivered verdicts, then (the
    /// budget is full of undelivered verdicts) the oldest undelivered ones, counted as lost.
    fn make_room(&self, target: u64) -> Result<(), StoreError> {
        self.drop_images_until(target)?;
        while self.usage() > target {
            let Some((k, v)) = self.verdicts.first()? else {
                break;
            };
            if self.outbox.contains_key(&k)? {
                break;
            }
            self.remove_verdict(&k, v.len() as u64)?;
        }
        while self.usage() > target {
            let Some((k, v)) = self.outbox.first()? else {
                break;
            };
            let id = id_of(&k);
            tracing::error!(
                "store budget ({} MiB) full of undelivered verdicts: verdict {id} dropped (lost)",
                self.config.disk_budget_mb
            );
            if self.outbox.remove(&k)?.is_some() {
                self.queued.fetch_sub(1, Ordering::Relaxed);
                self.queued_bytes
                    .fetch_sub(v.len() as u64, Ordering::Relaxed);
            }
            if let Some(sv) = self.verdicts.get(&k)? {
                self.remove_verdict(&k, sv.len() as u64)?;
            }
            self.lost.fetch_add(1, Ordering::Relaxed);
        }
        Ok(())
    }

    fn remove_verdict(&self, k: &[u8], len: u64) -> Result<(), StoreError> {
        if self.verdicts.remove(k)?.is_some() {
            self.stored.fetch_sub(1, Ordering::Relaxed);
            self.stored_bytes.fetch_sub(len, Ordering::Relaxed);
        }
        self.remove_images(k)
    }

    /// Queued verdicts with id > `after`, oldest first, at most `limit`.
    pub fn pending_after(
        &self,
        after: u64,
        limit: usize,
    ) -> Result<Vec<(u64, Vec<u8>)>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .outbox
            .range(key(after.saturating_add(1))..)
            .take(limit)
        {
            let (k, v) = entry?;
            out.push((id_of(&k), v.to_vec()));
        }
        Ok(out)
    }

    /// The queued payload of verdict `id` (`None` once delivered).
    pub fn pending_payload(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.outbox.get(key(id))?.map(|v| v.to_vec()))
    }

    /// Several acknowledged verdicts leave the outbox in one batch.
    pub fn delivered_many(&self, ids: &[u64]) -> Result<(), StoreError> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut batch = sled::Batch::default();
        let (mut removed, mut bytes) = (0, 0);
        for &id in ids {
            if let Some(v) = self.outbox.get(key(id))? {
                batch.remove(&key(id));
                removed += 1;
                bytes += v.len() as u64;
            }
        }
        self.outbox.apply_batch(batch)?;
        self.queued.fetch_sub(removed, Ordering::Relaxed);
        self.queued_bytes.fetch_sub(bytes, Ordering::Relaxed);
        Ok(())
    }

    /// The broker acknowledged the verdict: it leaves the outbox.
    pub fn delivered(&self, id: u64) -> Result<(), StoreError> {
        self.delivered_many(&[id])
    }

    pub fn pending(&self) -> usize {
        self.queued.load(Ordering::Relaxed)
    }

    pub fn len(&self) -> usize {
        self.stored.load(Ordering::Relaxed)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Verdicts with id > `since`, oldest first, at most `limit`.
    pub fn since(&self, since: u64, limit: usize) -> Result<Vec<Verdict>, StoreError> {
        let mut out = Vec::new();
        for entry in self
            .verdicts
            .range(key(since.saturating_add(1))..)
            .take(limit)
        {
            let (_, v) = entry?;
            out.push(Verdict::decode(&v).map_err(|e| StoreError(e.to_string()))?);
        }
        Ok(out)
    }

    pub fn frame_jpeg(&self, id: u64) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.images.get(image_key(id, 0))?.map(|v| v.to_vec()))
    }

    pub fn crop_jpeg(&self, id: u64, n: u16) -> Result<Option<Vec<u8>>, StoreError> {
        Ok(self.images.get(image_key(id, n + 1))?.map(|v| v.to_vec()))
    }

    pub fn image_bytes(&self) -> u64 {
        self.meta
            .get("image_bytes")
            .ok()
            .flatten()
            .map(|b| u64::from_be_bytes(b.as_ref().try_into().unwrap_or([0; 8])))
            .unwrap_or(0)
    }

    /// Applies retention (count, age, image bytes); returns verdicts removed.
    pub fn enforce_retention(&self, now_ms: u64) -> Result<u64, StoreError> {
        let mut removed = 0;
        let max_age_ms = (self.config.max_age_days * 86_400_000.0) as u64;
        let image_budget = self.config.max_image_mb << 20;
        loop {
            let Some((k, v)) = self.verdicts.first()? else {
                break;
            };
            let too_many = self.len() as u64 > self.config.max_verdicts;
            let decided = Verdict::decode(&v).map(|v| v.decided_ms).unwrap_or(0);
            let too_old = now_ms.saturating_sub(decided) > max_age_ms;
            let too_big = self.image_bytes() > image_budget;
            if !(too_many || too_old || too_big) {
                break;
            }
            self.remove_verdict(&k, v.len() as u64)?;
            removed += 1;
        }
        Ok(removed)
    }

    pub fn flush(&self) -> Result<(), StoreError> {
        self.db.flush()?;
        Ok(())
    }
}

/// Tests that reopen a sled database they just dropped: sled's flusher thread lets go of the
/// file lock a moment after the drop, so a lock error is retried for up to 10 s.
#[cfg(test)]
pub(crate) fn reopen_after_drop<T, E: std::fmt::Display>(open: impl Fn() -> Result<T, E>) -> T {
    let start = std::time::Instant::now();
    loop {
        match open() {
            Ok(db) => return db,
            Err(e) if start.elapsed() < std::time::Duration::from_secs(10) => {
                assert!(e.to_string().contains("lock"), "{e}");
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
            Err(e) => panic!("{e}"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use protocol::Defect;

    fn verdict(id: u64, pass: bool, decided_ms: u64) -> Verdict {
        Verdict {
            id,
            device: "cam".into(),
            frame: id,
            line: 0,
            origin: "test".into(),
            width: 64,
            height: 64,
            captured_ms: decided_ms,
            decided_ms,
            latency_ms: 1.0,
            pass,
            defects: vec![Defect {
                class: "scratches".into(),
                score: 0.9,
                bbox: [10.0, 10.0, 30.0, 40.0],
                fails: !pass,
            }],
            model: Some(("m".into(), 1)),
            undecided: None,
            position_mm: None,
        }
    }

    #[test]
    fn record_publish_order_reopen_and_retention() {
        let dir = tempfile::tempdir().unwrap();
        let frame = GrayImage::from_fn(64, 64, |x, y| image::Luma([(x * 3 + y) as u8]));
        let config = StoreConfig {
            max_verdicts: 3,
            ..Default::default()
        };
        let ids: Vec<u64> = {
            let store = VerdictStore::open(dir.path(), config.clone()).unwrap();
            let ids: Vec<u64> = (0..5).map(|_| store.next_id().unwrap()).collect();
            assert!(ids.windows(2).all(|w| w[1] > w[0]));
            for (i, &id) in ids.iter().enumerate() {
                store
                    .record(&verdict(id, i % 2 == 0, 1000), &frame)
                    .unwrap();
            }
            assert_eq!(store.pending(), 5);
            let (first, _) = store.pending_after(0, 1).unwrap()[0].clone();
            assert_eq!(first, ids[0]);
            store.delivered(first).unwrap();
            store.delivered(first).unwrap(); // a second acknowledgement changes nothing
            assert_eq!((store.len(), store.pending()), (5, 4));
            assert!(
                store.frame_jpeg(ids[1]).unwrap().is_some(),
                "failed frames are kept"
            );
            assert!(
                store.frame_jpeg(ids[0]).unwrap().is_none(),
                "passed frames are not"
            );
            assert!(store.crop_jpeg(ids[1], 0).unwrap().is_some());
            ids
        };
        // Reopened (as after a restart): ids continue upwards, the outbox is intact.
        let store = VerdictStore::open(dir.path(), config).unwrap();
        assert!(store.next_id().unwrap() > ids[4]);
        assert_eq!(store.pending(), 4);
        assert_eq!(store.since(ids[2], 10).unwrap().len(), 2);
        let before = store.image_bytes();
        assert!(before > 0);
        assert_eq!(store.enforce_retention(2000).unwrap(), 2);
        assert_eq!(store.len(), 3);
        assert!(
            store.image_bytes() < before,
            "images of removed verdicts are freed"
        );
        assert_eq!(
            store.pending(),
            4,
            "retention never drops undelivered verdicts"
        );
        // Age.
        assert_eq!(store.enforce_retention(1000 + 31 * 86_400_000).unwrap(), 3);
        assert!(store.is_empty());
        // The kept counts agree with sled's own (a full scan).
        assert_eq!(
            (store.len(), store.pending()),
            (store.verdicts.len(), store.outbox.len())
        );
    }

    /// A store offline for long: frames go first (shed in the reserve), verdicts stay within
    /// the budget, and only when undelivered verdicts alone fill it are the oldest dropped,
    /// counted; the accounting survives a reopen.
    #[test]
    fn the_disk_budget_sheds_frames_first_then_counts_lost_verdicts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("v.sled");
        // Noise compresses badly: each 256x256 frame is tens of KB of JPEG.
        let mut x = 12345u32;
        let frame = GrayImage::from_fn(256, 256, |_, _| {
            x = x.wrapping_mul(1_103_515_245).wrapping_add(12345);
            image::Luma([(x >> 24) as u8])
        });
        let config = StoreConfig {
            keep_frames: KeepFrames::All,
            disk_budget_mb: 2,
            reserve_mb: 1,
            ..Default::default()
        };
        let budget = 2u64 << 20;
        let store = VerdictStore::open(&path, config.clone()).unwrap();
        for _ in 0..60 {
            let id = store.next_id().unwrap();
            store.record(&verdict(id, false, 1), &frame).unwrap();
            assert!(store.usage() <= budget, "{} > {budget}", store.usage());
        }
        assert!(store.frames_shed.load(Ordering::Relaxed) > 0);
        assert!(
            store.image_bytes() <= 1 << 20,
            "frames stay out of the reserve"
        );
        assert_eq!(store.pending(), 60, "every verdict kept");
        assert_eq!(store.lost.load(Ordering::Relaxed), 0);
        // Thousands of verdicts while offline: the budget holds, the newest are kept.
        for _ in 0..8000 {
            let id = store.next_id().unwrap();
            store.record(&verdict(id, true, 1), &frame).unwrap();
        }
        assert!(store.usage() <= budget);
        let lost = store.lost.load(Ordering::Relaxed);
        assert!(
            lost > 0,
            "8,060 verdicts of ~300 bytes twice do not fit in 2 MiB"
        );
        assert_eq!(store.pending() as u64 + lost, 8060);
        let newest = store.pending_after(0, usize::MAX).unwrap();
        assert_eq!(newest.last().unwrap().0, store.next_id().unwrap() - 1);
        assert_eq!(newest.first().unwrap().0, lost + 1, "the oldest went first");
        let usage = store.usage();
        drop(store);
        let store = reopen_after_drop(|| VerdictStore::open(&path, config.clone()));
        assert_eq!(store.usage(), usage);
    }
}
