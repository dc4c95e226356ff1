//! The `qpq` binary: take `QPQ_PASSPHRASE` out of the process environment, then parse,
//! dispatch, map errors to `qpq: message` and an exit code.
//!
//! The passphrase leaves the environment here, first thing, because only here is the process
//! known to be single-threaded (edition 2024 makes changing the environment `unsafe` for that
//! reason), and the library forbids `unsafe`. Its value is overwritten with zeros where the
//! kernel placed it, so `/proc/<pid>/environ` (`ps e`) no longer shows it (the name stays
//! there, with an empty value), and it is removed from the environment, so no child process
//! inherits it.

use std::process::ExitCode;

use zeroize::{Zeroize, Zeroizing};

/// The variable holding the state file's passphrase (README, "Environment").
const PASSPHRASE_VAR: &std::ffi::CStr = c"QPQ_PASSPHRASE";

fn main() -> ExitCode {
    if let Some(passphrase) = take_passphrase_from_env() {
        qpq::cli::client::set_env_passphrase(passphrase);
    }
    qpq::cli::main()
}

/// Copies `QPQ_PASSPHRASE`, zeroes its value in place and removes it from the environment. A
/// value that is not UTF-8 is wiped and removed too, and counts as unset (as it did before).
fn take_passphrase_from_env() -> Option<Zeroizing<String>> {
    #[allow(unsafe_code)]
    // SAFETY: this runs first in `main`, before anything has spawned a thread (std starts none
    // before `main`, and no dependency has a constructor that does), so nothing can read or
    // change the environment concurrently, which is what `remove_var` requires. `getenv`
    // returns null or a pointer to the NUL-terminated value inside the environment block,
    // which stays allocated and writable (the initial block is on the process stack; a string
    // added by `setenv` stays allocated while it is in the environment): `strlen` and the
    // `len`-byte read and write stay inside that value. The value is wiped before
    // `remove_var`, while the string is certainly still in the environment.
    let value = unsafe {
        let ptr = libc::getenv(PASSPHRASE_VAR.as_ptr());
        if ptr.is_null() {
            return None;
        }
        let len = libc::strlen(ptr);
        let copy = Zeroizing::new(std::slice::from_raw_parts(ptr.cast::<u8>(), len).to_vec());
        std::ptr::write_bytes(ptr, 0, len);
        std::env::remove_var("QPQ_PASSPHRASE");
        copy
    };
    let mut value = value;
    match String::from_utf8(std::mem::take(&mut *value)) {
        Ok(s) => Some(Zeroizing::new(s)),
        Err(e) => {
            e.into_bytes().zeroize();
            None
        }
    }
}
