//! The `qpq` binary: parse, dispatch, map errors to `qpq: message` and an exit code.

use std::process::ExitCode;

fn main() -> ExitCode {
    qpq::cli::main()
}
