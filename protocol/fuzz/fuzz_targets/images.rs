//! The strict image decoder every frame, training image and golden sample goes through
//! (`edge_detector::image_io`, compiled here from its source so that this target does not build
//! the detector): no panic, no hang, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;

#[path = "../../../edge/detector/src/image_io.rs"]
#[allow(dead_code)]
mod image_io;

fuzz_target!(|data: &[u8]| {
    // image_io catches a decoder's panic and returns an error: silence libfuzzer-sys's hook,
    // which would abort on a panic even when it is caught (an uncaught one still aborts).
    static QUIET: std::sync::Once = std::sync::Once::new();
    QUIET.call_once(|| std::panic::set_hook(Box::new(|_| {})));
    let _ = image_io::decode(data, "fuzz");
});
