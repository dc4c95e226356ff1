//! Thin wrapper: the target's logic is `qpq::fuzzing::state_file`, shared with the stable smoke run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qpq::fuzzing::state_file(data));
