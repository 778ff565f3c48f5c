//! Every decoder the edge runs on bytes from the network or its disk: MQTT messages (offer,
//! chunk, complete, report, status, verdict, signed command and the command inside it), model
//! packages and manifests (with the weights check), topics' targets. None may panic, hang or
//! allocate without bound, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::messages::{Chunk, Complete, Message, Offer, Report, SignedCommand, Status, Verdict};
use protocol::package::{Manifest, Package, check_weights};

fuzz_target!(|data: &[u8]| {
    let _ = Offer::decode(data);
    let _ = Complete::decode(data);
    let _ = Report::decode(data);
    let _ = Status::decode(data);
    let _ = Verdict::decode(data);
    if let Ok(c) = SignedCommand::decode(data) {
        let _ = serde_json::from_str::<protocol::Command>(&c.command);
        let _ = hex::decode(&c.signature);
    }
    let _ = Chunk::decode(data);
    if let Ok(m) = Manifest::from_json(data) {
        let _ = check_weights(&m, data);
    }
    if let Ok(p) = Package::from_bytes(data.to_vec(), "fuzz") {
        if let Ok(m) = Manifest::from_json(&p.manifest_bytes) {
            let _ = check_weights(&m, &p.weights);
        }
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<protocol::Target>();
        let _ = serde_json::from_str::<protocol::Command>(text);
    }
});
