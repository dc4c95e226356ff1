//! Crash points for tests: `QPQ_FAILPOINT=NAME` makes the process exit abruptly (like a kill)
//! when it reaches the point called NAME, so tests can check recovery from that exact moment.
//! Unset (always, outside tests) it costs one environment lookup per point reached.

/// Exit code of a process stopped at a failpoint.
pub const FAILPOINT_EXIT_CODE: i32 = 86;

/// Exits the process at once if `QPQ_FAILPOINT` names this point.
pub fn hit(name: &str) {
    if std::env::var_os("QPQ_FAILPOINT").is_some_and(|v| v == name) {
        // No destructors, no flushing: as close to a kill as a process can do to itself.
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
}

/// True if `QPQ_FAILPOINT` names this point: for points that make the process behave as if
/// something failed (say, an answer lost on the way) rather than exit.
pub fn active(name: &str) -> bool {
    std::env::var_os("QPQ_FAILPOINT").is_some_and(|v| v == name)
}
