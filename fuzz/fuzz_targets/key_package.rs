//! Thin wrapper: the target's logic is `qpq::fuzzing::key_package`, shared with the stable smoke run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qpq::fuzzing::key_package(data));
