//! Every decoder the edge runs on bytes from the network or disk: none may panic, hang or
//! allocate without bound, whatever the input.
#![no_main]

use libfuzzer_sys::fuzz_target;
use protocol::messages::{Chunk, Complete, Message, Offer, Report, SignedCommand, Status};
use protocol::package::{Manifest, Package};

fuzz_target!(|data: &[u8]| {
    let _ = Offer::decode(data);
    let _ = Complete::decode(data);
    let _ = Report::decode(data);
    let _ = Status::decode(data);
    let _ = SignedCommand::decode(data);
    let _ = Chunk::decode(data);
    let _ = Manifest::from_json(data);
    if let Ok(p) = Package::from_bytes(data.to_vec(), "fuzz") {
        let _ = p.verify(&[]);
        let _ = Manifest::from_json(&p.manifest_bytes);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = text.parse::<protocol::Target>();
        let _ = serde_json::from_str::<protocol::Command>(text);
    }
});
