//! Thin wrapper: the target's logic is `qpq::fuzzing::rpc_entry`, shared with the stable smoke run.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| qpq::fuzzing::rpc_entry(data));
