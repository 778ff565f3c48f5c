//! The documented example config loads, and bad configs fail naming the key.

use std::path::Path;

use edge::config::EdgeConfig;

#[test]
fn documented_example_config_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/edge.toml");
    let config = EdgeConfig::load(&path).unwrap();
    assert_eq!(config.device.id, "cam-01");
    assert_eq!(config.models.keep, 3);
    assert!(config.mqtt.unwrap().tls.is_some());
    assert_eq!(config.pipeline.tile, 200);
    assert_eq!(config.rules.classes["crazing"].min_score, Some(0.6));
    assert!(matches!(
        config.source,
        Some(edge::capture::SourceConfig::Synthetic { tiles: 2, .. })
    ));
    assert_eq!(config.http.unwrap().listen, "127.0.0.1:8080");
    assert_eq!(
        config.store.keep_frames,
        edge::verdicts::store::KeepFrames::Failed
    );
}

/// The commented-out [plc] section, uncommented, loads with the values it documents.
#[test]
fn documented_plc_section_loads() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../configs/edge.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let at = text
        .find("#[plc]")
        .expect("a [plc] section in configs/edge.toml");
    let plc: String = text[at..]
        .lines()
        .filter(|l| !l.starts_with("##"))
        .map(|l| l.strip_prefix('#').unwrap_or(l))
        .collect::<Vec<_>>()
        .join("\n");
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("edge.toml");
    std::fs::write(
        &copy,
        format!("{}\n{plc}\n", &text[..at]).replace(
            "../edge/",
            &format!("{}/../edge/", env!("CARGO_MANIFEST_DIR")),
        ),
    )
    .unwrap();
    let plc = EdgeConfig::load(&copy).unwrap().plc.expect("[plc]");
    assert_eq!(plc.address, "192.168.10.20:502");
    assert_eq!(
        (plc.unit_id, plc.timeout_ms, plc.heartbeat_ms, plc.stale_ms),
        (1, 500, 500, 2000)
    );
    assert_eq!(
        (plc.pass_coil, plc.record_register, plc.heartbeat_register),
        (0, 0, 20)
    );
    assert_eq!(plc.classes.len(), 6);
    let bad = format!(
        "{}\n{}\n",
        &text[..at],
        "[plc]\naddress = \"h:502\"\nheartbeat_register = 3\n"
    );
    assert!(
        load(&bad).contains("plc.heartbeat_register 3 lies inside the verdict record"),
        "{}",
        load(&bad)
    );
}

fn load(text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("edge.toml");
    std::fs::write(&path, text).unwrap();
    match EdgeConfig::load(&path) {
        Ok(_) => "ok".into(),
        Err(e) => e.to_string(),
    }
}

const KEY: &str = "d128a205774d84cd3c797ee1e23a1705a38afb4acb05b501e59db8df939c85d6";

#[test]
fn bad_configs_name_the_key() {
    let good = format!(
        "[device]\nid = \"a\"\nsite = \"s\"\nline = \"l\"\n[storage]\ndir = \"x\"\n[models]\ntrusted_keys = [\"{KEY}\"]\n"
    );
    assert_eq!(load(&good), "ok");
    let unknown = good.replace("[storage]", "colour = \"red\"\n[storage]");
    let e = load(&unknown);
    assert!(e.contains("unknown field `colour`"), "{e}");
    let e = load(&good.replace("id = \"a\"", "id = \"a/b\""));
    assert!(e.contains("device.id `a/b`"), "{e}");
    let e = load(&good.replace(KEY, "12ab"));
    assert!(e.contains("models.trusted_keys[0]"), "{e}");
    let e = load(&good.replace("[models]\n", "[models]\nkeep = 1\n"));
    assert!(e.contains("models.keep"), "{e}");
    let e = load(&good.replace("[models]\n", "[models]\nkeep = \"three\"\n"));
    assert!(e.contains("keep"), "{e}");
    let e = load(&(good.clone() + "[pipeline]\non_full = \"panic\"\n"));
    assert!(e.contains("unknown variant `panic`"), "{e}");
    let e = load(&(good.clone() + "[rules]\nmin_score = 1.5\n"));
    assert!(e.contains("rules.min_score"), "{e}");
    let e = load(&good.replace("[storage]\ndir = \"x\"\n", ""));
    assert!(e.contains("missing field `storage`"), "{e}");
}
