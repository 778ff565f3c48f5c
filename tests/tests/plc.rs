//! The PLC link against an independent Modbus/TCP server (pymodbus, tests/tools/modbus_plc.py,
//! which logs every write it accepts): the real daemon inspects a synthetic strip, with detector
//! errors injected so that some frames get the fail-safe verdict. Every record the PLC received
//! equals the stored verdict of its sequence number, in order, each followed by its pass coil,
//! with no gap in the sequence while the link is up; the PLC is killed mid-run (the daemon keeps
//! inspecting and storing, the metrics say the link is down and count the verdicts it missed),
//! restarted on the same port: the link comes back by itself and the heartbeat resumes.

use std::time::Duration;

use e2e::{Edge, PlcServer, PlcWrite, metric, metric_or, signed_nano_v1};
use protocol::Verdict;

const RECORD: u16 = 100;
const HEARTBEAT: u16 = 120;
const COIL: u16 = 3;
const HEARTBEAT_MS: u64 = 100;

/// A record as the PLC got it (edge/src/plc.rs lays it out).
#[derive(Debug)]
struct Record {
    seq: u32,
    pass: bool,
    undecided: bool,
    class_mask: u16,
    failing: u16,
    line: u32,
    model_version: u32,
    verdict_id: u64,
}

fn record(w: &PlcWrite) -> Record {
    let v = &w.values;
    let u32_at = |i: usize| ((v[i] as u32) << 16) | v[i + 1] as u32;
    Record {
        seq: u32_at(0),
        pass: v[2] == 1,
        undecided: v[3] & 1 == 1,
        class_mask: v[4],
        failing: v[5],
        line: u32_at(6),
        model_version: u32_at(8),
        verdict_id: v[10..14].iter().fold(0u64, |id, &w| (id << 16) | w as u64),
    }
}

#[test]
fn every_verdict_reaches_the_plc_in_order_and_the_link_survives_a_plc_restart() {
    let (files, public) = signed_nano_v1("plc", 1, 11);
    let mut plc = PlcServer::start(&files.dir);
    let http = e2e::free_port();
    let config = format!(
        "{}\n[source]\nkind = \"synthetic\"\nfps = 20\n\n[pipeline]\non_full = \"block\"\n\n\
         [http]\nlisten = \"127.0.0.1:{http}\"\n\n\
         [plc]\naddress = \"127.0.0.1:{}\"\ntimeout_ms = 2000\nheartbeat_ms = {HEARTBEAT_MS}\n\
         stale_ms = 60000\npass_coil = {COIL}\nrecord_register = {RECORD}\nheartbeat_register = {HEARTBEAT}\n",
        e2e::offline_edge_config("cam1", &[], &public, &files.path("v1.edgepkg"), ""),
        plc.port
    );
    // Batches 4 and 5 fail in the detector: their frames get the fail-safe verdict.
    let mut edge = Edge::start_with_env(
        &files.dir,
        "cam1",
        &config,
        &[("EDGE_FAULTS", "detect_error:4-5")],
    );
    let wait_for = |what: &str, ok: &dyn Fn(&str) -> bool| {
        e2e::wait_for_metrics(http, what, Duration::from_secs(120), ok, &|| edge.log())
    };
    let written = |m: &str| metric_or(m, "edge_plc_verdicts_written_total").unwrap_or(0.0);
    let missed_down =
        |m: &str| metric_or(m, "edge_plc_verdicts_missed_total{reason=\"down\"}").unwrap_or(0.0);
    let verdicts = |m: &str| e2e::verdicts_counted(m, &["pass", "fail", "undecided"]);
    let m = wait_for("30 verdicts written to the PLC, some undecided", &|m| {
        written(m) >= 30.0
            && metric_or(m, "edge_undecided_total{cause=\"detector_error\"}").unwrap_or(0.0) > 0.0
    });
    assert_eq!(metric(&m, "edge_plc_connected"), 1.0, "{m}");

    // The PLC goes away: inspection and the store go on, the link is reported down.
    plc.kill();
    let killed = std::time::SystemTime::now();
    let m = wait_for("the link reported down", &|m| {
        metric_or(m, "edge_plc_connected") == Some(0.0)
    });
    let (stored_then, missed_then) = (verdicts(&m), missed_down(&m));
    let m = wait_for("verdicts stored and missed while the PLC is away", &|m| {
        verdicts(m) >= stored_then + 10.0 && missed_down(m) >= missed_then + 5.0
    });
    let written_down = written(&m);

    // The PLC comes back on the same port: the link recovers by itself.
    plc.restart();
    let back = std::time::SystemTime::now();
    let m = wait_for("20 more verdicts written after the PLC's return", &|m| {
        metric_or(m, "edge_plc_connected") == Some(1.0) && written(m) >= written_down + 20.0
    });
    assert!(metric(&m, "edge_plc_connects_total") >= 2.0, "{m}");
    assert!(edge.stop().success(), "{}", edge.log());

    // The stored verdicts of this run, in id order: the n-th is the PLC's sequence number n.
    let store = edge::verdicts::store::VerdictStore::open(
        &files.dir.join("cam1/state/verdicts.sled"),
        Default::default(),
    )
    .unwrap();
    let stored: Vec<Verdict> = store.since(0, usize::MAX).unwrap();
    let writes = plc.writes();
    let secs = |t: std::time::SystemTime| {
        t.duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_secs_f64()
    };
    let (killed, back) = (secs(killed), secs(back));

    let mut records = vec![];
    for (i, w) in writes.iter().enumerate() {
        if w.fc == 16 && w.address == RECORD {
            assert_eq!(w.values.len(), 14, "{w:?}");
            let r = record(w);
            // Its pass coil follows it, before the next record; only the PLC's kill may come
            // between the two.
            let next = writes[i + 1..].iter().find(|c| c.fc != 6);
            match next {
                Some(c) if c.fc == 5 => {
                    assert_eq!((c.address, c.values[0] == 1), (COIL, r.pass), "{r:?}")
                }
                _ => assert!(
                    w.t < killed && next.is_none_or(|n| n.t > killed),
                    "no pass coil after {r:?}: {next:?}"
                ),
            }
            records.push((w.t, r));
        }
    }
    let before: Vec<_> = records.iter().filter(|(t, _)| *t < killed).collect();
    let after: Vec<_> = records.iter().filter(|(t, _)| *t > back).collect();
    assert!(
        before.len() >= 30 && after.len() >= 20,
        "{} before, {} after",
        before.len(),
        after.len()
    );
    // No gap while the link is up; a gap (the verdicts decided while it was down) after it.
    for run in [&before, &after] {
        for pair in run.windows(2) {
            assert_eq!(pair[1].1.seq, pair[0].1.seq + 1, "{:?}", pair);
        }
    }
    assert_eq!(before[0].1.seq, 1);
    assert!(after[0].1.seq > before.last().unwrap().1.seq + 1);
    let (mut undecided, mut models) = (0, 0);
    for (_, r) in &records {
        let v = &stored[r.seq as usize - 1];
        assert_eq!(
            r.verdict_id, v.id,
            "sequence {} is not the stored verdict of its rank",
            r.seq
        );
        assert_eq!(r.pass, v.pass, "{r:?} {v:?}");
        assert_eq!(r.undecided, v.undecided.is_some(), "{r:?} {v:?}");
        assert_eq!(r.line, v.line as u32);
        assert_eq!(r.model_version as u64, v.model.as_ref().map_or(0, |m| m.1));
        models += (r.model_version == 1) as usize;
        let failing: Vec<_> = v.defects.iter().filter(|d| d.fails).collect();
        assert_eq!(r.failing as usize, failing.len());
        assert_eq!(r.class_mask == 0, failing.is_empty(), "{r:?} {v:?}");
        if r.undecided {
            // The default fail-safe policy: reject.
            assert!(!r.pass, "{r:?}");
            undecided += 1;
        }
    }
    assert!(undecided > 0, "no undecided verdict reached the PLC");
    assert!(models > 0, "no record names the model");

    // The heartbeat counts up while the link is up, and again after the PLC's return.
    let beats: Vec<&PlcWrite> = writes
        .iter()
        .filter(|w| w.fc == 6 && w.address == HEARTBEAT)
        .collect();
    let beats_before = beats.iter().filter(|w| w.t < killed).count();
    let beats_after: Vec<u16> = beats
        .iter()
        .filter(|w| w.t > back)
        .map(|w| w.values[0])
        .collect();
    assert!(
        beats_before >= 3 && beats_after.len() >= 3,
        "{beats_before} beats before, {beats_after:?} after"
    );
    for pair in beats_after.windows(2) {
        assert_eq!(pair[1], pair[0].wrapping_add(1));
    }
    eprintln!(
        "plc: {} records ({} undecided), {} before the kill, {} after the return (sequence {} -> {}), {} heartbeats after",
        records.len(),
        undecided,
        before.len(),
        after.len(),
        before.last().unwrap().1.seq,
        after[0].1.seq,
        beats_after.len()
    );
}
