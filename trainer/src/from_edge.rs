//! `trainer finetune --from-edge URL`: downloads what quality engineers labeled on an edge's
//! review page (`GET /api/dataset`, a tar in the NEU-DET VOC layout) into a dataset folder.

use std::path::Path;

use anyhow::{Context, Result, bail};

/// Largest export accepted (frames are JPEG; 10,000 labeled 2k frames fit).
const MAX_BYTES: u64 = 8 << 30;

/// The export URL for `url`: a daemon's base URL or its `/api/dataset` URL.
pub fn dataset_url(url: &str) -> String {
    let url = url.trim_end_matches('/');
    if url.ends_with("/api/dataset") {
        url.to_string()
    } else {
        format!("{url}/api/dataset")
    }
}

/// Downloads and unpacks the labeled set into `into` (images/, annotations/, labels.jsonl);
/// returns the number of labeled frames.
pub fn fetch(url: &str, token: &str, into: &Path) -> Result<usize> {
    let url = dataset_url(url);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let mut response = agent
        .get(&url)
        .header("Authorization", &format!("Bearer {token}"))
        .call()
        .with_context(|| format!("--from-edge {url}: no answer"))?;
    let status = response.status().as_u16();
    if status != 200 {
        let reason = response.body_mut().read_to_string().unwrap_or_default();
        match status {
            401 => bail!(
                "--from-edge {url}: the edge refused the token ({}); use a token from its review.labelers",
                reason.trim()
            ),
            404 => bail!(
                "--from-edge {url}: no labeling API there (is [review] configured on that edge?)"
            ),
            _ => bail!("--from-edge {url}: HTTP {status}: {}", reason.trim()),
        }
    }
    if into.exists() {
        std::fs::remove_dir_all(into).with_context(|| format!("clearing {}", into.display()))?;
    }
    std::fs::create_dir_all(into).with_context(|| format!("creating {}", into.display()))?;
    let reader = response.body_mut().with_config().limit(MAX_BYTES).reader();
    // tar refuses entries that would land outside `into` (absolute paths, `..`).
    tar::Archive::new(reader).unpack(into).with_context(|| {
        format!(
            "--from-edge {url}: unpacking the export into {}",
            into.display()
        )
    })?;
    let images = into.join("images");
    let n = std::fs::read_dir(&images).map(|d| d.count()).unwrap_or(0);
    if n == 0 {
        bail!(
            "--from-edge {url}: the edge has no labeled frames yet (label some on its /label page)"
        );
    }
    Ok(n)
}
