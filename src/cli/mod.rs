//! The command line: one clap definition for every verb, so `--help`, the man pages, shell
//! completions and the REPL grammar all come from the same place.

/// `println!` that hands a failing stdout (a closed pipe: `qpq server show | true`) back as an
/// error for `?` instead of panicking; [`report`] takes a closed pipe for success.
macro_rules! out {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout(), $($t)*)
    }};
}

/// `eprintln!` that ignores a failing stderr instead of panicking: there is nowhere left to
/// tell.
macro_rules! err {
    ($($t:tt)*) => {{
        use std::io::Write as _;
        let _ = writeln!(std::io::stderr(), $($t)*);
    }};
}

pub mod client;
pub mod complete;
pub mod manpage;
pub mod serve;

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Version string: crate version plus the git commit the binary was built from, if known.
pub const VERSION: &str = concat!(env!("CARGO_PKG_VERSION"), " (", env!("QPQ_GIT_COMMIT"), ")");

/// What `qpq --help` adds below the options (the man pages have it in their own sections).
const AFTER_HELP: &str = "\
    Environment: QPQ_HOME, QPQ_SERVER, QPQ_SERVER_FINGERPRINT as their options; QPQ_PASSPHRASE the \
    home's passphrase instead of a prompt (--passphrase-file FILE is the safer way).\n\n\
    The first connection to a server asks to confirm its certificate on a terminal and trusts it \
    on first use otherwise; `qpq server` shows, re-pins or forgets it.\n\n\
    Exit status: 0 success, 1 error (`qpq: message` on stderr), 2 usage error,
    75 message queued (send: the server could not be reached; it goes out with the next command).";

/// qpq: end-to-end encrypted group messaging over MLS with a post-quantum envelope.
#[derive(Debug, Parser)]
#[command(name = "qpq", version = VERSION, propagate_version = true, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(flatten)]
    pub global: GlobalArgs,
    #[command(subcommand)]
    pub command: Command,
}

/// Options every client command shares.
#[derive(Debug, Args, Clone, Default)]
pub struct GlobalArgs {
    /// Client home directory holding qpq.db [default: the XDG data dir, ~/.local/share/qpq]
    #[arg(long, global = true, env = "QPQ_HOME", value_name = "DIR")]
    pub home: Option<PathBuf>,
    /// Server address HOST:PORT (remembered by `init`)
    #[arg(long, global = true, env = "QPQ_SERVER", value_name = "HOST:PORT")]
    pub server: Option<String>,
    /// Expect this server certificate. Without it, the first connection to a server asks on a
    /// terminal and trusts on first use otherwise; a different certificate than the pinned one
    /// is refused (re-pin with `qpq server pin`)
    #[arg(long, global = true, env = "QPQ_SERVER_FINGERPRINT", value_name = "sha256:HEX")]
    pub server_fingerprint: Option<String>,
    /// Read the home's passphrase from FILE (its first line; the file must not be readable by
    /// others) instead of QPQ_PASSPHRASE or a prompt
    #[arg(long, global = true, value_name = "FILE")]
    pub passphrase_file: Option<PathBuf>,
}

/// Every verb.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the server (Authentication + Delivery Service)
    ///
    /// It logs to stderr; QPQ_LOG (else RUST_LOG) sets the filter: `info` by default, `warn` for
    /// less, `debug` for more, or per module (`qpq=debug,quinn=warn`).
    Serve(serve::ServeArgs),
    /// Create your identity, pin the server, upload your keys; prints your key
    Init(client::InitArgs),
    #[command(flatten)]
    Client(client::ClientVerb),
    /// The pinned server certificate, like ssh's known_hosts: show, pin or forget it
    #[command(subcommand)]
    Server(client::ServerCmd),
    /// Change the home's passphrase, set one, or remove it (asks for the current one first)
    ///
    /// The records have keys of their own, which the passphrase unlocks: a change copies qpq.db
    /// with those keys sealed anew and renames the copy into place, and other qpq processes using
    /// the home go on working. With --new-key, and always when a home without a passphrase gets
    /// one, every record is also re-sealed under a new key: an old copy of qpq.db then opens
    /// nothing written afterwards, and other qpq processes using the home must start again.
    Passphrase(client::PassphraseArgs),
    /// Receive: process everything pending and print each message
    Recv(client::RecvArgs),
    /// Chat interactively (@bob hi, #team hi, /chat bob); runs a script when stdin is not a terminal
    Shell,
    /// Measure the server and the client against the limits of their own stack
    Bench(crate::bench::BenchArgs),
    /// Print the script that registers qpq's shell completion (bash, zsh, fish, elvish,
    /// powershell): it completes verbs, options, and contact and group names from the home
    /// (without asking for a passphrase: only with QPQ_PASSPHRASE set or an unencrypted home)
    Completions {
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Write the man pages (qpq.1 and one per subcommand) into DIR
    #[command(hide = true)]
    Man { dir: PathBuf },
}

/// Verbs that never touch a client home or a server connection: their help and man pages do
/// not list the client options (clap copies global options into every subcommand).
const NOT_CLIENT_VERBS: [&str; 3] = ["serve", "completions", "man"];

/// The command line as parsed and documented: [`Cli`] without the client-only options under
/// [`NOT_CLIENT_VERBS`]. clap copies a global option into a subcommand unless that subcommand
/// has an argument with its id, so each gets a hidden stand-in that refuses any value.
pub fn command() -> clap::Command {
    let mut cmd = <Cli as clap::CommandFactory>::command();
    for verb in NOT_CLIENT_VERBS {
        cmd = cmd.mut_subcommand(verb, |sub| {
            [
                ("home", "home"),
                ("server", "server"),
                ("server_fingerprint", "server-fingerprint"),
                ("passphrase_file", "passphrase-file"),
            ]
            .into_iter()
            .fold(sub, |sub, (id, long)| {
                sub.arg(clap::Arg::new(id).long(long).hide(true).value_parser(refuse_client_option))
            })
        });
    }
    cmd
}

fn refuse_client_option(_: &str) -> Result<PathBuf, String> {
    Err("this is a client option; this verb does not take it".into())
}

/// Logs to stderr; `QPQ_LOG` (or `RUST_LOG`) sets the filter.
pub fn init_logging(default: &str) {
    let filter = std::env::var("QPQ_LOG")
        .or_else(|_| std::env::var("RUST_LOG"))
        .unwrap_or_else(|_| default.to_string());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new(filter))
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, not in files or journald.
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        // A log line that cannot be written (its reader went away) is dropped: reporting it,
        // tracing-subscriber writes to stderr with `eprintln!`, which panics on a closed stderr
        // and took down whichever task was logging, the one that handles SIGTERM among them.
        .log_internal_errors(false)
        .try_init();
}

/// Entry point of the binary: returns the process exit code.
pub fn main() -> std::process::ExitCode {
    // A TAB in a shell with qpq's completion registered runs this (and exits here).
    complete::complete_if_asked();
    let parsed = command()
        .try_get_matches()
        .and_then(|matches| <Cli as clap::FromArgMatches>::from_arg_matches(&matches));
    let cli = match parsed {
        Ok(c) => c,
        Err(e) => {
            // clap prints help/version to stdout (exit 0) and usage errors to stderr (exit 2).
            // A usage error quotes the argument it refused as typed, and clap writes it raw to
            // a colour terminal. When an argument holds anything unsafe (`qpq name $'\e[31m'`, a
            // bidi override), the error is printed plain (clap's rendering without styles, which
            // also drops escape sequences) and escaped, losing clap's colours.
            let unsafe_arg = std::env::args_os()
                .any(|a| a.to_string_lossy().chars().any(|c| crate::text::is_unsafe(c) && c != '\n'));
            if e.use_stderr() && unsafe_arg {
                eprint!("{}", crate::text::guard(&e.render().to_string()));
            } else {
                let _ = e.print();
            }
            return std::process::ExitCode::from(if e.use_stderr() { 2 } else { 0 });
        }
    };
    match run(cli) {
        Ok(code) => code,
        Err(e) => report(&e),
    }
}

/// An error and its causes on one line, each text once: wrapper errors often display their
/// source already (`#[error("{0}")]`), so the plain chain would repeat it.
pub fn error_line(e: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in e.chain() {
        let raw = cause.to_string();
        let text = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io_error_text(io),
            None => raw.clone(),
        };
        // An error that prints its source (`cannot read {path}: {source}`) has the raw text in
        // the line already: it reads as ours there, and is not added twice.
        if text != raw && line.contains(&raw) {
            line = line.replace(&raw, &text);
            continue;
        }
        if !line.contains(&text) {
            if !line.is_empty() {
                line.push_str(": ");
            }
            line.push_str(&text);
        }
    }
    line
}

/// An operating system's error as our lines read: lowercase, without the errno the standard
/// library appends ("No such file or directory (os error 2)" is "no such file or directory").
fn io_error_text(e: &std::io::Error) -> String {
    let text = e.to_string();
    let text = match e.raw_os_error() {
        Some(code) => text.strip_suffix(&format!(" (os error {code})")).unwrap_or(&text).to_string(),
        None => text,
    };
    let mut chars = text.chars();
    match (chars.next(), chars.next()) {
        // "No such file", not "EOF" or "TLS": only a capital followed by a small letter.
        (Some(first), Some(second)) if first.is_ascii_uppercase() && second.is_ascii_lowercase() => {
            // Slicing at 1 is on a char boundary: the first char is ASCII.
            format!("{}{}", first.to_ascii_lowercase(), &text[1..])
        }
        _ => text,
    }
}

/// Prints `qpq: message` (lowercase causes chained with `: `); a closed stdout is not an error.
pub fn report(e: &anyhow::Error) -> std::process::ExitCode {
    if e.chain().any(|c| {
        c.downcast_ref::<std::io::Error>().is_some_and(|io| io.kind() == std::io::ErrorKind::BrokenPipe)
    }) {
        return std::process::ExitCode::SUCCESS;
    }
    // Errors may quote what a peer or the server sent.
    let msg = error_line(e);
    err!("qpq: {}", crate::text::guard(&msg));
    std::process::ExitCode::FAILURE
}

fn run(cli: Cli) -> anyhow::Result<std::process::ExitCode> {
    use std::process::ExitCode;
    let g = cli.global;
    match cli.command {
        Command::Serve(args) => serve::run(args).map(|()| ExitCode::SUCCESS),
        Command::Init(args) => client::init(&g, args).map(|()| ExitCode::SUCCESS),
        // An operator checks a server from anywhere: without a home, health needs no identity.
        Command::Client(client::ClientVerb::Health { json }) if !client::has_home(&g) => {
            client::health_without_home(&g, json)
        }
        Command::Client(verb) => client::oneshot(&g, verb),
        Command::Server(cmd) => client::server_verb(&g, cmd).map(|()| ExitCode::SUCCESS),
        Command::Passphrase(args) => client::passphrase(&g, args).map(|()| ExitCode::SUCCESS),
        Command::Recv(args) => client::recv(&g, args),
        Command::Shell => crate::shell::run(&g),
        Command::Bench(args) => crate::bench::run(&g, args).map(|()| ExitCode::SUCCESS),
        Command::Completions { shell } => {
            complete::write_registration(shell, &mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Man { dir } => {
            let written = write_man_pages(&dir)?;
            for p in written {
                out!("{}", p.display())?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// Renders `qpq.1` and one page per visible subcommand (`qpq-group-add.1`, ...) into `dir`;
/// returns the paths written. `man/` in the repository holds their output (`qpq man man/`).
pub fn write_man_pages(dir: &std::path::Path) -> anyhow::Result<Vec<PathBuf>> {
    std::fs::create_dir_all(dir)?;
    // Only the crate version: with the commit in it, the checked-in pages in man/ would go stale
    // on every commit. clap_mangen adds no date unless asked, so the output is deterministic.
    // Built once from the root, so every page lists the global options and its synopsis reads
    // `qpq group add`.
    // The after-help text is in the pages' own sections (manpage.rs), not in an EXTRA one.
    let mut cmd =
        command().after_help(None::<&str>).version(env!("CARGO_PKG_VERSION")).disable_help_subcommand(true);
    cmd.build();
    let mut out = Vec::new();
    render_man(&cmd, dir, &mut out)?;
    Ok(out)
}

fn render_man(cmd: &clap::Command, dir: &std::path::Path, out: &mut Vec<PathBuf>) -> anyhow::Result<()> {
    let name = cmd.get_display_name().unwrap_or_else(|| cmd.get_name());
    let mut buf = Vec::new();
    clap_mangen::Man::new(cmd.clone())
        .source(format!("qpq {}", env!("CARGO_PKG_VERSION")))
        .render(&mut buf)?;
    buf.extend_from_slice(manpage::extra_sections(name).as_bytes());
    let path = dir.join(format!("{name}.1"));
    std::fs::write(&path, buf)?;
    out.push(path);
    for sub in cmd.get_subcommands().filter(|s| !s.is_hide_set()) {
        render_man(sub, dir, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    enum Prints {
        #[error("cannot read {0}: {1}")]
        Read(String, #[source] std::io::Error),
    }

    /// An operating system's error reads lowercase without its errno, once: as a cause added
    /// by context, and as the source an error prints itself (review: it was added twice).
    #[test]
    fn an_io_error_reads_as_ours_once() {
        let missing = || std::io::Error::from_raw_os_error(2);
        let e = anyhow::Error::new(missing()).context("cannot read /x");
        assert_eq!(error_line(&e), "cannot read /x: no such file or directory");
        let e = anyhow::Error::new(Prints::Read("/x".into(), missing()));
        assert_eq!(error_line(&e), "cannot read /x: no such file or directory");
        let e = anyhow::Error::new(std::io::Error::other("EOF while reading"));
        assert_eq!(error_line(&e), "EOF while reading");
    }
}
