//! Crash points for tests: `QPQ_FAILPOINT=NAME` makes the process exit abruptly (like a kill)
//! when it reaches the point called NAME, so tests can check recovery from that exact moment.
//! `QPQ_FAILPOINT=pause:NAME` holds it there instead, until a line comes on stdin, so a test
//! can run another command at that very moment; it says `qpq: failpoint NAME` on stderr when it
//! stops. Unset (always, outside tests) it costs one environment lookup per point reached.

/// Exit code of a process stopped at a failpoint.
pub const FAILPOINT_EXIT_CODE: i32 = 86;

/// Exits the process at once if `QPQ_FAILPOINT` names this point (holds it if it says
/// `pause:` and this point).
pub fn hit(name: &str) {
    let Some(v) = std::env::var_os("QPQ_FAILPOINT") else { return };
    if v == name {
        // No destructors, no flushing: as close to a kill as a process can do to itself.
        std::process::exit(FAILPOINT_EXIT_CODE);
    }
    if v.to_str().and_then(|v| v.strip_prefix("pause:")) == Some(name) {
        eprintln!("qpq: failpoint {name}");
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
}

/// True if `QPQ_FAILPOINT` names this point: for points that make the process behave as if
/// something failed (say, an answer lost on the way) rather than exit.
pub fn active(name: &str) -> bool {
    std::env::var_os("QPQ_FAILPOINT").is_some_and(|v| v == name)
}
