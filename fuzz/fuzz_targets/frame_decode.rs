//! Thin wrapper: the target's logic is `qpq::fuzzing::frame_decode`, shared with the stable smoke run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qpq::fuzzing::frame_decode(data));
