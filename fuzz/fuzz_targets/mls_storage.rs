//! Thin wrapper: the target's logic is `qpq::fuzzing::mls_storage`, shared with the stable smoke run.
//!
//! `MlsClient::from_storage` loads every group once under `catch_unwind`, because
//! openmls_memory_storage unwraps the typed decoding of stored values: a value of the wrong
//! shape panics there and qpq reports "damaged value". libfuzzer-sys's panic hook aborts on
//! every panic, caught or not, which made each such input a false crash. This target keeps a
//! quiet hook instead and aborts only on a panic that escapes qpq, printing its message.
#![no_main]

use std::cell::RefCell;
use std::sync::Once;

thread_local! {
    static LAST_PANIC: RefCell<String> = const { RefCell::new(String::new()) };
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    static HOOK: Once = Once::new();
    HOOK.call_once(|| {
        std::panic::set_hook(Box::new(|info| LAST_PANIC.with(|p| *p.borrow_mut() = info.to_string())))
    });
    if std::panic::catch_unwind(|| qpq::fuzzing::mls_storage(data)).is_err() {
        LAST_PANIC.with(|p| eprintln!("panic that escaped qpq: {}", p.borrow()));
        std::process::abort();
    }
});
