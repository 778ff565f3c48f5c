//! The labeled set as a tar in the NEU-DET VOC layout, for `trainer finetune --from-edge`.

use std::io::Write;

use super::{ReviewError, ReviewQueue, id_of};

impl ReviewQueue {
    /// Writes the labeled frames as a tar in the NEU-DET layout: `images/NAME.jpg`,
    /// `annotations/NAME.xml` (VOC; no objects = no defect) and `labels.jsonl` (who labeled what,
    /// when, and why it was queued). NAME is `{device}_{id}`. Returns the frames written.
    pub fn export(&self, device: &str, out: impl Write) -> Result<usize, ReviewError> {
        let io = |e: std::io::Error| ReviewError::Store(format!("writing the export: {e}"));
        let mut tar = tar::Builder::new(out);
        let mut provenance = Vec::new();
        let mut n = 0;
        for entry in self.labeled.iter() {
            let (k, _) = entry?;
            let id = id_of(&k);
            let (Some(item), Some(frame)) = (self.get(id)?, self.jpeg(id, false)?) else {
                continue;
            };
            let Some(label) = &item.label else { continue };
            let name = format!("{device}_{id}");
            let objects: Vec<(&str, [f32; 4])> = label
                .boxes
                .iter()
                .map(|b| (b.class.as_str(), b.bbox))
                .collect();
            let xml = edge_detector::voc::voc_xml(
                &format!("{name}.jpg"),
                item.width,
                item.height,
                "edge review",
                &objects,
            );
            let mtime = label.at_ms / 1000;
            append(&mut tar, &format!("images/{name}.jpg"), &frame, mtime).map_err(io)?;
            append(
                &mut tar,
                &format!("annotations/{name}.xml"),
                xml.as_bytes(),
                mtime,
            )
            .map_err(io)?;
            let line = serde_json::json!({
                "name": name, "id": id, "by": label.by, "at_ms": label.at_ms,
                "reason": item.reason, "model": item.model, "boxes": label.boxes.len(),
            });
            provenance.extend_from_slice(line.to_string().as_bytes());
            provenance.push(b'\n');
            n += 1;
        }
        append(
            &mut tar,
            "labels.jsonl",
            &provenance,
            crate::capture::now_ms() / 1000,
        )
        .map_err(io)?;
        tar.into_inner().and_then(|mut w| w.flush()).map_err(io)?;
        Ok(n)
    }
}

fn append<W: Write>(
    tar: &mut tar::Builder<W>,
    path: &str,
    data: &[u8],
    mtime: u64,
) -> std::io::Result<()> {
    let mut header = tar::Header::new_gnu();
    header.set_size(data.len() as u64);
    header.set_mode(0o644);
    header.set_mtime(mtime);
    header.set_cksum();
    tar.append_data(&mut header, path, data)
}
