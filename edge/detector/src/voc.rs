//! VOC XML annotations in NEU-DET's shape: what the synthetic generator and the labeling export
//! write, and what `trainer` reads.

/// Escapes text for an XML element.
fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// One image's annotation: `objects` are (class, `[x1, y1, x2, y2]` in pixels); none means the
/// image shows no defect.
pub fn voc_xml(
    filename: &str,
    width: u32,
    height: u32,
    database: &str,
    objects: &[(&str, [f32; 4])],
) -> String {
    let mut xml = format!(
        "<annotation>\n\t<folder>images</folder>\n\t<filename>{}</filename>\n\t<source>\n\t\t<database>{}</database>\n\t</source>\n\t<size>\n\t\t<width>{width}</width>\n\t\t<height>{height}</height>\n\t\t<depth>1</depth>\n\t</size>\n\t<segmented>0</segmented>\n",
        escape(filename),
        escape(database)
    );
    for (class, b) in objects {
        xml.push_str(&format!(
            "\t<object>\n\t\t<name>{}</name>\n\t\t<pose>Unspecified</pose>\n\t\t<truncated>0</truncated>\n\t\t<difficult>0</difficult>\n\t\t<bndbox>\n\t\t\t<xmin>{}</xmin>\n\t\t\t<ymin>{}</ymin>\n\t\t\t<xmax>{}</xmax>\n\t\t\t<ymax>{}</ymax>\n\t\t</bndbox>\n\t</object>\n",
            escape(class),
            b[0].round() as u32,
            b[1].round() as u32,
            b[2].round() as u32,
            b[3].round() as u32
        ));
    }
    xml.push_str("</annotation>\n");
    xml
}
