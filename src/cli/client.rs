//! The client verbs. [`ClientVerb`] is shared by the one-shot command line and the shell (which
//! parses its lines with the same definitions), and [`run_verb`] executes one against a
//! [`Messenger`], writing data to `out`. `init` and `recv` are one-shot only.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use clap_complete::engine::ArgValueCandidates;
use zeroize::Zeroizing;

use crate::cli::{GlobalArgs, complete};
use crate::client::groups::GroupSummary;
use crate::client::history::{Before, HistoryPage, HistoryQuery, parse_retention};
use crate::client::inbox::{Arrival, Cursor, Unread};
use crate::client::messenger::ClientError;
use crate::client::messenger::{ConnectOptions, Event, MAX_TEXT_BYTES, Messenger};
use crate::client::outbox::{EXIT_QUEUED, Fate, QueuedEntry, QueuedFor};
use crate::client::requests::{RequestView, preview_line};
use crate::client::session::{Health, Session, SessionError};
use crate::client::state::{self, Entry, GroupKind, StateError, Unlock};
use crate::client::timeline::{Item, changes_of};
use crate::crypto::identity::PublicKey;
use crate::crypto::statefile::StateFileError;
use crate::limits::{
    DEFAULT_HISTORY_PAGE, LIVE_READER_WAIT_MS, MAX_HISTORY_PAGE, MAX_PASSPHRASE_FILE_BYTES, PASSPHRASE_TRIES,
    REQUEST_PREVIEW_CHARS,
};
use crate::localtime;
use crate::text::{self, Shown};
use crate::transport::{Fingerprint, Pin};

/// Verbs that work both as `qpq VERB` and inside `qpq shell`.
#[derive(Debug, Subcommand, Clone)]
pub enum ClientVerb {
    /// Show your identity key (hex) and name
    Whoami {
        /// One JSON object: key, name, fingerprint
        #[arg(long)]
        json: bool,
    },
    /// Check the server; exits 0 only if it is healthy
    Health {
        /// One JSON object: status, version, uptime, certificate, protocol, key exchange (and
        /// key packages, with a home)
        #[arg(long)]
        json: bool,
    },
    /// Manage contacts (names for keys)
    #[command(subcommand)]
    Contact(ContactCmd),
    /// Send a message to a contact, a key (64-hex, or a unique short key) or #group
    ///
    /// Messages go out through an outbox in the home. When the server cannot be reached the
    /// message stays queued, `send` says "queued, will send when the server is back" and exits
    /// with status 75; the next command that connects (send, recv, shell) sends it first.
    Send(SendArgs),
    /// Create and manage groups
    #[command(subcommand)]
    Group(GroupCmd),
    /// Your envelope key (X-Wing, post-quantum), which rotates weekly by itself
    #[command(subcommand)]
    Keys(KeysCmd),
    /// Message requests: invitations from keys that are not contacts wait here until you
    /// accept or block them
    Requests(RequestsArgs),
    /// The display name others see (marked as your claim)
    #[command(subcommand)]
    Name(NameCmd),
    /// Show message history, newest page last; pages back with --before, searches with --grep
    ///
    /// Every message is kept unless a retention is set (`--retention 90d`). A page ends with
    /// the cursor of the page before it (on stderr, and as `position` in each JSON line):
    /// `qpq history bob --before CURSOR` shows that one. In the shell, `/history` again shows
    /// the page before the last one shown, and `/history N` shows N messages.
    #[command(visible_alias = "tail")]
    History(HistoryArgs),
}

#[derive(Debug, Args, Clone)]
pub struct HistoryArgs {
    /// A contact name, a key or #group; all conversations without it
    #[arg(add = ArgValueCandidates::new(complete::targets))]
    pub target: Option<String>,
    /// Messages per page, as -n N (`history #team 5`; a lone number is a count too: `history 5`)
    #[arg(
        value_name = "N",
        conflicts_with = "n",
        value_parser = clap::value_parser!(u64).range(1..=MAX_HISTORY_PAGE as u64)
    )]
    pub count: Option<u64>,
    /// Only messages older than this: the cursor the previous page printed, a time
    /// ("2026-11-30 14:00", "2026-11-30", "14:00"), "today", "yesterday", or an age ("2h", "3d")
    #[arg(long, value_name = "WHEN|CURSOR")]
    pub before: Option<String>,
    /// Messages per page
    #[arg(
        short = 'n',
        value_name = "N",
        default_value_t = DEFAULT_HISTORY_PAGE as u64,
        value_parser = clap::value_parser!(u64).range(1..=MAX_HISTORY_PAGE as u64)
    )]
    pub n: u64,
    /// One JSON object per message (and membership change) and line
    #[arg(long)]
    pub json: bool,
    /// Only messages containing WORD, ignoring case
    #[arg(long, value_name = "WORD")]
    pub grep: Option<String>,
    /// Keep history for this long ("90d", "12h") and delete older messages now and from then
    /// on, or "off" to keep everything (the default); "show" prints the setting
    #[arg(long, value_name = "AGE|off|show", conflicts_with_all = ["target", "count", "before", "grep", "json"])]
    pub retention: Option<String>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum NameCmd {
    /// Sign a new display name into your groups and your next key packages
    Set {
        /// 1-64 bytes of printable text
        name: String,
    },
}

#[derive(Debug, Args, Clone)]
#[command(args_conflicts_with_subcommands = true)]
pub struct RequestsArgs {
    #[command(subcommand)]
    pub cmd: Option<RequestsCmd>,
    /// List as one JSON object per request and line
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Subcommand, Clone)]
pub enum RequestsCmd {
    /// Join the group or open the conversation, and show the messages that waited with it
    Accept {
        /// N or '#N' from the list, or a key / contact name (all of its requests)
        which: String,
    },
    /// Drop requests without blocking their sender
    Decline {
        /// N or '#N' from the list, or a key / contact name
        which: String,
    },
    /// Drop a key's requests and ignore everything it sends from now on
    Block {
        /// N or '#N' from the list, or a key / contact name
        which: String,
    },
    /// Let a blocked key's invitations through as requests again
    Unblock { key: String },
    /// List blocked keys
    Blocked,
}

#[derive(Debug, Subcommand, Clone)]
pub enum KeysCmd {
    /// Show your envelope key's fingerprint and age
    Show {
        /// One JSON object: fingerprint, created_at, published, retired
        #[arg(long)]
        json: bool,
    },
    /// Replace your envelope key and your published key packages now (say, after a device may
    /// have leaked them)
    Rotate,
}

#[derive(Debug, Subcommand, Clone)]
pub enum ContactCmd {
    /// Name a key: `contact add bob 6a3f...`
    Add { name: String, key: String },
    /// List contacts ("no contacts yet" on a terminal when there are none)
    List {
        /// One JSON object per contact and line (nothing when there are none)
        #[arg(long)]
        json: bool,
    },
    /// Forget a contact name
    Remove {
        #[arg(add = ArgValueCandidates::new(complete::contacts))]
        name: String,
    },
}

/// `qpq server`: the pinned certificate of the server (ssh-keygen -F / -R for qpq).
#[derive(Debug, Subcommand, Clone)]
pub enum ServerCmd {
    /// Show the server address and the certificate pinned for it (and other pinned servers)
    Show,
    /// Pin a certificate for the server: the given fingerprint (as the operator told you), or
    /// the one the server presents now after you confirm it on a terminal
    Pin {
        /// sha256:HEX as `qpq serve` printed it; without it the server is asked
        fingerprint: Option<String>,
    },
    /// Forget the server's pinned certificate (the next connection pins again)
    Forget,
}

#[derive(Debug, Args, Clone)]
pub struct SendArgs {
    /// A contact name, a key (64-hex, or a unique short key like 304b-9934), or #group
    #[arg(add = ArgValueCandidates::new(complete::targets))]
    pub target: String,
    /// The message; without it (or as `-`), stdin is read to its end (one message)
    pub text: Vec<String>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum GroupCmd {
    /// Create a group with only you in it
    Create { name: String },
    /// Add members (contact names or keys)
    Add {
        #[arg(add = ArgValueCandidates::new(complete::groups))]
        name: String,
        #[arg(required = true, add = ArgValueCandidates::new(complete::contacts))]
        members: Vec<String>,
    },
    /// Remove members
    Remove {
        #[arg(add = ArgValueCandidates::new(complete::groups))]
        name: String,
        #[arg(required = true, add = ArgValueCandidates::new(complete::contacts))]
        members: Vec<String>,
    },
    /// Leave a group
    Leave {
        #[arg(add = ArgValueCandidates::new(complete::groups))]
        name: String,
    },
    /// Rotate your keys in a group (post-compromise security)
    Update {
        #[arg(add = ArgValueCandidates::new(complete::groups))]
        name: String,
    },
    /// List your groups and direct conversations
    List {
        /// One JSON object per conversation and line
        #[arg(long)]
        json: bool,
    },
    /// List the members of a group
    Members {
        #[arg(add = ArgValueCandidates::new(complete::groups))]
        name: String,
        /// One JSON object per member and line
        #[arg(long)]
        json: bool,
    },
    /// Show a group's size, epoch and MLS ciphersuite
    Info {
        #[arg(add = ArgValueCandidates::new(complete::groups))]
        name: String,
        /// One JSON object
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Args, Clone)]
pub struct InitArgs {
    /// Display name (1-64 bytes), signed into your MLS leaf: others see it marked as a claim
    #[arg(long)]
    pub name: Option<String>,
    /// Store the state without a passphrase (keys protected only by file permissions). Without
    /// it the passphrase comes from --passphrase-file, QPQ_PASSPHRASE, or a prompt on a terminal
    #[arg(long)]
    pub no_passphrase: bool,
}

#[derive(Debug, Args, Clone)]
pub struct PassphraseArgs {
    /// Read the new passphrase from FILE (its first line; the file must not be readable by
    /// others) instead of asking twice on the terminal
    #[arg(long, value_name = "FILE", conflicts_with = "remove")]
    pub new_passphrase_file: Option<PathBuf>,
    /// Remove the passphrase: the home's keys are then protected only by file permissions
    #[arg(long)]
    pub remove: bool,
    /// Also re-seal every record under a new key (other qpq processes of the home must start
    /// again)
    #[arg(long)]
    pub new_key: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RecvArgs {
    /// Wait up to SECS for the first message when none is pending
    #[arg(long, value_name = "SECS", conflicts_with = "follow")]
    pub wait: Option<u64>,
    /// Keep printing messages as they arrive until interrupted; rides out a lost connection,
    /// exits 1 on what only you can fix (a replaced certificate, an outdated side)
    #[arg(long)]
    pub follow: bool,
    /// One JSON object per message and line
    #[arg(long)]
    pub json: bool,
}

/// Runs `f` on a current-thread runtime inside a LocalSet (capnp-rpc is !Send).
pub fn block_on_local<F: std::future::Future>(f: F) -> anyhow::Result<F::Output> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    Ok(local.block_on(&rt, f))
}

/// The client home from --home / QPQ_HOME / the XDG default.
pub fn home_dir(g: &GlobalArgs) -> anyhow::Result<PathBuf> {
    match &g.home {
        Some(h) => Ok(h.clone()),
        None => Ok(state::default_home()?),
    }
}

/// True when the home (from --home / QPQ_HOME / the default) holds an identity.
pub fn has_home(g: &GlobalArgs) -> bool {
    home_dir(g).is_ok_and(|d| state::exists(&d))
}

pub fn connect_options(g: &GlobalArgs) -> anyhow::Result<ConnectOptions> {
    let fingerprint = g.server_fingerprint.as_deref().map(Fingerprint::parse).transpose()?;
    Ok(ConnectOptions { server: g.server.clone(), fingerprint })
}

/// `QPQ_PASSPHRASE` as the binary found it before taking it out of its environment
/// (src/main.rs), held until the process exits.
static ENV_PASSPHRASE: std::sync::OnceLock<Zeroizing<String>> = std::sync::OnceLock::new();

/// Hands over `QPQ_PASSPHRASE`, read and removed from the environment by the binary's `main`
/// before any thread exists (the library may not touch the environment: that needs `unsafe`).
/// Only the first call counts.
pub fn set_env_passphrase(passphrase: Zeroizing<String>) {
    let _ = ENV_PASSPHRASE.set(passphrase);
}

/// The passphrase handed over by [`set_env_passphrase`], else `QPQ_PASSPHRASE` as it is now
/// (for callers other than the binary).
fn passphrase_from_env() -> Option<Zeroizing<String>> {
    match ENV_PASSPHRASE.get() {
        Some(p) => Some(p.clone()),
        None => std::env::var("QPQ_PASSPHRASE").ok().map(Zeroizing::new),
    }
}

fn prompt(msg: &str) -> anyhow::Result<Zeroizing<String>> {
    Ok(Zeroizing::new(rpassword::prompt_password(msg).context("cannot read passphrase")?))
}

/// The passphrase from the environment, for callers that must not prompt (completion).
pub(crate) fn env_passphrase() -> Option<Zeroizing<String>> {
    passphrase_from_env()
}

/// Opens the home for a command that may connect: as [`open_home`], and on a terminal a first
/// connection to a server without a pin asks the person to confirm its certificate first.
pub fn open_messenger(g: &GlobalArgs) -> anyhow::Result<Messenger> {
    let mut m = open_home(g)?;
    if let Some(server) = m.server()
        && m.pinned(&server).is_none()
        && g.server_fingerprint.is_none()
        && std::io::stdin().is_terminal()
    {
        // When the server cannot be reached now, the command's own connection says so.
        if let Ok(fp) = block_on_local(probe_fingerprint(&server))?
            && confirm_first_use(&server, &fp)?
        {
            m.pin_server(&server, fp)?;
        }
    }
    Ok(m)
}

/// The certificate fingerprint `server` presents (a connection that trusts nothing and is
/// closed at once).
async fn probe_fingerprint(server: &str) -> anyhow::Result<Fingerprint> {
    let session = Session::connect(server, Pin::FirstUse(Default::default())).await?;
    let fp = session.fingerprint();
    session.close().await;
    Ok(fp)
}

/// Asks on the terminal whether to trust `fp` for `server`, as ssh does; an error when not.
fn confirm_first_use(server: &str, fp: &Fingerprint) -> anyhow::Result<bool> {
    let mut err = std::io::stderr().lock();
    write!(
        err,
        "qpq: the authenticity of server {server} cannot be established.\n\
         qpq: its certificate fingerprint is {fp}\n\
         qpq: compare it with the one `qpq serve` printed. trust it and pin it (yes/no)? "
    )?;
    err.flush()?;
    // A stray answer asks again (as ssh does), up to PASSPHRASE_TRIES times; an end of input
    // is a no.
    for _ in 0..PASSPHRASE_TRIES {
        let mut answer = String::new();
        if std::io::stdin().read_line(&mut answer).context("cannot read the answer")? == 0 {
            break;
        }
        match answer.trim().to_ascii_lowercase().as_str() {
            "yes" | "y" => return Ok(true),
            "no" | "n" => break,
            _ => {
                write!(err, "qpq: please type yes or no: ")?;
                err.flush()?;
            }
        }
    }
    bail!("server certificate not trusted: nothing pinned for {server}")
}

/// `qpq server show|pin|forget`.
pub fn server_verb(g: &GlobalArgs, cmd: ServerCmd) -> anyhow::Result<()> {
    let mut m = open_home(g)?;
    let server = m.server().ok_or(crate::client::messenger::ClientError::NoServer)?;
    match cmd {
        ServerCmd::Show => {
            let pinned = m.pinned(&server).map(|f| f.to_string());
            out!("server {server}")?;
            out!("pinned {}", pinned.as_deref().unwrap_or("nothing (the next connection pins)"))?;
            for (other, fp) in m.pins().into_iter().filter(|(s, _)| *s != server) {
                out!("also pinned {other} {fp}")?;
            }
        }
        ServerCmd::Pin { fingerprint } => {
            let given = fingerprint.or_else(|| g.server_fingerprint.clone());
            let fp = match given {
                Some(f) => Fingerprint::parse(&f)?,
                None => {
                    let fp = block_on_local(probe_fingerprint(&server))??;
                    if !std::io::stdin().is_terminal() {
                        bail!(
                            "the server presents {fp}: check it with the operator, then run `qpq server pin {fp}`"
                        );
                    }
                    confirm_first_use(&server, &fp)?;
                    fp
                }
            };
            let before = m.pinned(&server);
            m.pin_server(&server, fp)?;
            match before {
                Some(old) if old != fp => out!("pinned {server} {fp} (was {old})")?,
                _ => out!("pinned {server} {fp}")?,
            }
        }
        ServerCmd::Forget => {
            if m.forget_server(&server)? {
                out!("forgot the certificate pinned for {server}")?;
            } else {
                bail!("nothing pinned for {server}");
            }
        }
    }
    Ok(())
}

/// Opens the home, asking for the passphrase if the state needs one: `--passphrase-file`,
/// else QPQ_PASSPHRASE, else a prompt naming the home with [`PASSPHRASE_TRIES`] tries.
pub fn open_home(g: &GlobalArgs) -> anyhow::Result<Messenger> {
    Ok(open_home_proved(g)?.0)
}

/// As [`open_home`], with the passphrase that opened the home (None when it has none).
fn open_home_proved(g: &GlobalArgs) -> anyhow::Result<(Messenger, Option<Zeroizing<String>>)> {
    let dir = home_dir(g)?;
    let opts = connect_options(g)?;
    if !(state::exists(&dir) && state::needs_passphrase(&dir)?) {
        return Ok((Messenger::open(&dir, None, opts)?, None));
    }
    if let Some(p) = given_passphrase(g)? {
        if p.is_empty() {
            // Only the variable can be empty (a file's empty first line is refused).
            bail!(
                "QPQ_PASSPHRASE is set but empty: set it to the passphrase of {}, or unset it to be asked",
                Shown(&dir.display().to_string())
            );
        }
        let m = Messenger::open(&dir, Some(p.as_bytes()), opts)?;
        return Ok((m, Some(p)));
    }
    if !std::io::stdin().is_terminal() {
        bail!(
            "the state in {} is encrypted with a passphrase: set QPQ_PASSPHRASE, pass --passphrase-file or run on a terminal",
            dir.display()
        );
    }
    let mut tries = 1;
    loop {
        let p = prompt(&format!("qpq passphrase for {}: ", Shown(&dir.display().to_string())))?;
        match Messenger::open(&dir, Some(p.as_bytes()), opts.clone()) {
            Err(ClientError::State(StateError::File(StateFileError::WrongPassphrase)))
                if tries < PASSPHRASE_TRIES =>
            {
                err!("qpq: wrong passphrase, try again");
                tries += 1;
            }
            r => return Ok((r?, Some(p))),
        }
    }
}

/// Why `p` will not do as a new passphrase, if it will not.
fn weak_passphrase(p: &str) -> Option<&'static str> {
    if p.is_empty() {
        Some("an empty passphrase protects nothing")
    } else if p.trim().is_empty() {
        Some("a passphrase of spaces alone protects next to nothing")
    } else {
        None
    }
}

/// The passphrase given without a prompt: `--passphrase-file`, else QPQ_PASSPHRASE.
fn given_passphrase(g: &GlobalArgs) -> anyhow::Result<Option<Zeroizing<String>>> {
    match &g.passphrase_file {
        Some(path) => passphrase_from_file(path).map(Some),
        None => Ok(passphrase_from_env()),
    }
}

/// The first line of a passphrase file that only its owner can read (as ssh insists for keys).
fn passphrase_from_file(path: &std::path::Path) -> anyhow::Result<Zeroizing<String>> {
    use std::os::unix::fs::PermissionsExt;
    let shown = path.display();
    let meta = std::fs::metadata(path).with_context(|| format!("cannot read {shown}"))?;
    if !meta.is_file() {
        bail!("passphrase file {shown} is not a file");
    }
    let mode = meta.permissions().mode();
    if mode & 0o077 != 0 {
        bail!("passphrase file {shown} is readable by others (mode {:o}): chmod 600 it", mode & 0o777);
    }
    let bytes = Zeroizing::new(
        crate::fsutil::read_bounded(path, MAX_PASSPHRASE_FILE_BYTES)
            .with_context(|| format!("cannot read {shown} (at most {MAX_PASSPHRASE_FILE_BYTES} bytes)"))?,
    );
    let text =
        std::str::from_utf8(&bytes).map_err(|_| anyhow::anyhow!("passphrase file {shown} is not utf-8"))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        bail!("passphrase file {shown} has an empty first line");
    }
    Ok(Zeroizing::new(line.to_string()))
}

/// `qpq init`.
pub fn init(g: &GlobalArgs, args: InitArgs) -> anyhow::Result<()> {
    let dir = home_dir(g)?;
    let unlock = if args.no_passphrase {
        Unlock::None
    } else if let Some(p) = given_passphrase(g)? {
        if p.is_empty() {
            bail!("QPQ_PASSPHRASE is empty: choose a passphrase or pass --no-passphrase");
        }
        if let Some(why) = weak_passphrase(&p) {
            bail!("{why}: choose another or pass --no-passphrase; nothing created");
        }
        Unlock::Passphrase(p)
    } else if std::io::stdin().is_terminal() {
        Unlock::Passphrase(new_passphrase(&dir, NewPassphrase::Init)?)
    } else {
        bail!(
            "no passphrase: set QPQ_PASSPHRASE, pass --passphrase-file, run on a terminal, or pass --no-passphrase"
        );
    };
    let mut opts = connect_options(g)?;
    let given = opts.fingerprint.is_some();
    if let Some(server) = &opts.server
        && opts.fingerprint.is_none()
        && std::io::stdin().is_terminal()
    {
        let fp = block_on_local(probe_fingerprint(server))??;
        confirm_first_use(server, &fp)?;
        opts.fingerprint = Some(fp);
    }
    let (m, report) = match block_on_local(Messenger::init(&dir, args.name, unlock, opts))? {
        Err(ClientError::Session(e)) if given && given_certificate_mismatch(&e).is_some() => {
            bail!("{}; nothing was created", given_certificate_mismatch(&e).unwrap_or_default())
        }
        r => r?,
    };
    if report.first_use {
        err!("qpq: pinned server certificate {} (trust on first use)", report.fingerprint);
    }
    err!("qpq: identity created in {}", Shown(&dir.display().to_string()));
    out!("{}", report.key)?;
    drop(m);
    Ok(())
}

/// `qpq passphrase`: proves the current passphrase by opening the home, then seals its keys
/// under the new one (see [`crate::client::state::Home::change_passphrase`]).
pub fn passphrase(g: &GlobalArgs, args: PassphraseArgs) -> anyhow::Result<()> {
    let dir = home_dir(g)?;
    // Where the new one comes from is settled before the current one is asked for.
    let terminal = std::io::stdin().is_terminal();
    if !args.remove && args.new_passphrase_file.is_none() && !terminal {
        bail!("no new passphrase: pass --new-passphrase-file FILE, run on a terminal, or pass --remove");
    }
    let from_file = args.new_passphrase_file.as_deref().map(passphrase_from_file).transpose()?;
    if let Some(why) = from_file.as_deref().and_then(|p| weak_passphrase(p)) {
        bail!("{why}: choose another (or pass --remove); nothing changed");
    }
    let (mut m, current) = open_home_proved(g)?;
    let protected = m.home.is_passphrase_protected()?;
    let new = if args.remove {
        if !protected && !args.new_key {
            err!("qpq: {} has no passphrase; nothing changed", Shown(&dir.display().to_string()));
            return Ok(());
        }
        Unlock::None
    } else if let Some(p) = from_file {
        Unlock::Passphrase(p)
    } else {
        Unlock::Passphrase(new_passphrase(&dir, NewPassphrase::Change)?)
    };
    if let (Unlock::Passphrase(new), Some(current)) = (&new, &current)
        && same_passphrase(new, current)
        && !args.new_key
        && !m.home.opened_with_raw_passphrase()
    {
        err!("qpq: that is the passphrase of {} already; nothing changed", Shown(&dir.display().to_string()));
        return Ok(());
    }
    let change = m.home.change_passphrase(&new, args.new_key)?;
    let home = Shown(&dir.display().to_string()).to_string();
    match (&new, protected) {
        (Unlock::None, true) => {
            err!("qpq: passphrase removed from {home}: only file permissions protect its keys now")
        }
        (Unlock::None, false) => err!("qpq: {home} stays without a passphrase"),
        (Unlock::Passphrase(_), true) => err!("qpq: passphrase changed for {home}"),
        (Unlock::Passphrase(_), false) => err!("qpq: passphrase set for {home}"),
    }
    if let Some(n) = change.resealed {
        let why = if args.new_key {
            ""
        } else {
            " (any copy of the home from while it had no passphrase holds the old key)"
        };
        err!(
            "qpq: {n} records re-sealed under a new key{why}; other qpq commands running on this home must start again"
        );
    }
    Ok(())
}

/// What a `--server-fingerprint` the server does not match says where nothing was pinned yet
/// (`init`, `health` without a home): no certificate "changed", the one given is not the
/// server's. None for other errors.
fn given_certificate_mismatch(e: &SessionError) -> Option<String> {
    match e {
        SessionError::CertificateChanged { pinned, presented } => Some(format!(
            "the server's certificate is not the one given: --server-fingerprint {pinned}, the server presented {presented}"
        )),
        _ => None,
    }
}

/// True when `a` and `b` derive the same key: equal once both are in Unicode NFC (see
/// [`crate::client::state::Unlock`]).
fn same_passphrase(a: &str, b: &str) -> bool {
    use unicode_normalization::UnicodeNormalization;
    // Compared char by char: no normalised copy of either is built.
    a.nfc().eq(b.nfc())
}

/// Why a new passphrase is asked for: what an empty one and repeated mismatches say.
#[derive(Clone, Copy)]
enum NewPassphrase {
    Init,
    Change,
}

/// Asks for a new passphrase and its repeat, again after a mismatch ([`PASSPHRASE_TRIES`] in all).
fn new_passphrase(dir: &std::path::Path, why: NewPassphrase) -> anyhow::Result<Zeroizing<String>> {
    let (without, nothing) = match why {
        NewPassphrase::Init => ("--no-passphrase", "nothing created"),
        NewPassphrase::Change => ("--remove", "nothing changed"),
    };
    for tries_left in (0..PASSPHRASE_TRIES).rev() {
        let p = prompt(&format!("new qpq passphrase for {}: ", Shown(&dir.display().to_string())))?;
        if let Some(why) = weak_passphrase(&p) {
            err!("qpq: {why}: type one (or pass {without})");
            continue;
        }
        let again = prompt("repeat passphrase: ")?;
        if p == again {
            return Ok(p);
        }
        if tries_left > 0 {
            err!("qpq: passphrases do not match, try again");
        }
    }
    bail!("no passphrase after {PASSPHRASE_TRIES} tries: {nothing}")
}

fn print_notices(m: &mut Messenger) {
    for n in m.notices.drain(..) {
        err!("qpq: {}", Shown(&n));
    }
}

/// A line describing an event for people (None for messages, which are printed as data); names
/// and reasons in it may come from peers, so the whole line is escaped ([`text::shown`]).
pub fn describe_event(m: &Messenger, e: &Event) -> Option<String> {
    event_line(m, e).map(|line| text::shown(&line))
}

fn event_line(m: &Messenger, e: &Event) -> Option<String> {
    let names = |ks: &[[u8; 32]]| ks.iter().map(|k| m.display_name(k)).collect::<Vec<_>>().join(", ");
    match e {
        Event::Message(_) => None,
        Event::Joined { group_id, by } => {
            if m.group_label(group_id).is_some() {
                Some(format!("you were added to {} by {}", m.conversation_name(group_id), m.display_name(by)))
            } else {
                Some(format!("{} started a conversation with you", m.display_name(by)))
            }
        }
        Event::Membership { group_id, by, added, removed, left } => {
            let group = m.conversation_name(group_id);
            // A leave reads the same to everyone, whoever committed it (issue 10, bug 2).
            let me = m.public_key().0;
            let leavers = if left == &[me] { "you".to_string() } else { names(left) };
            let leave = format!("{leavers} left {group}");
            if added.is_empty() && removed.is_empty() {
                return (!left.is_empty()).then_some(leave);
            }
            // "you added dave", like "you left #team" and "you were added to #team".
            let who = if *by == me { "you".to_string() } else { m.display_name(by) };
            let mut parts = Vec::new();
            if !added.is_empty() {
                parts.push(format!("{who} added {}", names(added)));
            }
            if !removed.is_empty() {
                parts.push(format!("{who} removed {}", names(removed)));
            }
            if !left.is_empty() {
                parts.push(leave);
            }
            Some(format!("[{group}] {}", parts.join("; ")))
        }
        Event::Removed { group_id, by } => {
            Some(format!("you were removed from {} by {}", m.conversation_name(group_id), m.display_name(by)))
        }
        Event::Request { group_id, from } => {
            let (number, preview) = m.request_summary(group_id)?;
            let group = m.request_group_name(group_id).map(|g| preview_line(&g, REQUEST_PREVIEW_CHARS));
            // A group's request names the group, with or without a message to show.
            let (to, what) = match (preview, group) {
                (Some(text), Some(g)) => (format!(" to #{g}"), format!("\u{201c}{text}\u{201d}")),
                (Some(text), None) => (String::new(), format!("\u{201c}{text}\u{201d}")),
                (None, Some(g)) => (String::new(), format!("an invitation to #{g}")),
                (None, None) => (String::new(), "wants to start a conversation".to_string()),
            };
            let reuse = reuse_note(m.reuses_left(group_id, from).as_deref(), "it ");
            Some(format!(
                "message request from {}{to}: {what}{reuse} \u{2014} qpq requests accept {number} (or decline {number}, block {number})",
                m.request_sender_name(group_id, from)
            ))
        }
        Event::Dropped { reason } | Event::NotSent { reason } => Some(reason.clone()),
        Event::WelcomeRefused { to, reason } => {
            Some(format!("the server refused the invitation of {}: {reason}", names(to)))
        }
    }
}

/// One message for people: `14:03 [#team] alice: hello`, or `14:03 alice: hello` for a direct
/// one, with peer text escaped and further lines indented under the header ([`text::message`]).
/// The time is when we received it, in local time with the date when it is not today
/// ([`localtime::short`]): our own clock orders what we saw and cannot be set by a peer; the
/// sender's claimed time is in `--json` as `sent_at`.
pub fn format_entry(m: &Messenger, e: &Entry) -> String {
    let from = m.display_name_in(&e.group_id, &e.from);
    let when = localtime::short(e.received_at_ms, m.now_ms());
    let header = match m.group_label(&e.group_id) {
        Some(g) => format!("{when} [#{}] {}: ", Shown(&g), Shown(&from)),
        None => format!("{when} {}: ", Shown(&from)),
    };
    text::message_for_width(&header, &e.text, terminal_columns())
}

/// Columns of the terminal on stdout, when stdout is one: messages are broken to fit it
/// ([`text::message_for_width`]) rather than left to the terminal's own wrapping.
pub(crate) fn terminal_columns() -> Option<usize> {
    terminal_size::terminal_size_of(std::io::stdout()).map(|(w, _)| usize::from(w.0)).filter(|w| *w > 0)
}

/// One message as a JSON object (print it with [`text::json_line`], which keeps the exact text
/// but escapes what a terminal would obey).
/// `peer` and `peer_name` of a JSON object about conversation `group_id`: its other person
/// when it is a direct one, whoever wrote (exploratory testing: an outgoing direct message said
/// nowhere whom it went to); null in a group.
fn peer_json(m: &Messenger, group_id: &[u8]) -> (serde_json::Value, serde_json::Value) {
    let peer = m.direct_peer(group_id);
    (
        serde_json::json!(peer.map(|p| PublicKey(p).to_hex())),
        serde_json::json!(peer.and_then(|p| m.contact_name(&p))),
    )
}

pub fn entry_json(m: &Messenger, e: &Entry) -> serde_json::Value {
    let (peer, peer_name) = peer_json(m, &e.group_id);
    serde_json::json!({
        "type": "message",
        "group_id": hex::encode(&e.group_id),
        "from": PublicKey(e.from).to_hex(),
        "from_name": m.contact_name(&e.from),
        "from_claimed_name": m.claimed_name_in(&e.group_id, &e.from),
        "group": m.group_label(&e.group_id),
        "peer": peer,
        "peer_name": peer_name,
        "text": e.text,
        // The sender's clock may say anything: the year 10000 and later are clamped.
        "sent_at": localtime::rfc3339(e.sent_at_ms),
        "received_at": localtime::rfc3339(e.received_at_ms),
    })
}

/// A message still waiting in the outbox as a JSON object: [`entry_json`] marked `"queued":
/// true`, with a null `position` (it gets one when it is encrypted and enters the history, and
/// a later page shows it there, unmarked).
/// A message to a person we have no conversation with yet has a null `group_id` and names
/// them in `to` (their key) and `to_name`.
fn queued_entry_json(m: &Messenger, q: &QueuedEntry) -> serde_json::Value {
    let mut v = entry_json(m, &q.entry);
    v["position"] = serde_json::Value::Null;
    v["outgoing"] = serde_json::Value::Bool(true);
    v["queued"] = serde_json::Value::Bool(true);
    if let Some(peer) = &q.new_contact {
        v["group_id"] = serde_json::Value::Null;
        v["to"] = serde_json::Value::String(PublicKey(*peer).to_hex());
        v["to_name"] = serde_json::json!(m.contact_name(peer));
        v["peer"] = v["to"].clone();
        v["peer_name"] = v["to_name"].clone();
    }
    v
}

/// A membership event as JSON objects, one per kind of change (none for other events): `type`
/// "event", `event` joined/added/removed/left/removed_you, the group by stable id (hex of the
/// MLS group id) and local name, who made the change and whom it concerns, and when we learned
/// of it (`received_at`, like a message's).
pub fn event_json(m: &Messenger, e: &Event, at_ms: u64) -> Vec<serde_json::Value> {
    let Some((group_id, changes)) = changes_of(e) else { return Vec::new() };
    let person =
        |k: &[u8; 32]| serde_json::json!({ "key": PublicKey(*k).to_hex(), "name": m.contact_name(k) });
    let (peer, peer_name) = peer_json(m, group_id);
    changes
        .into_iter()
        .map(|c| {
            serde_json::json!({
                "type": "event",
                "event": c.kind.as_str(),
                "group_id": hex::encode(group_id),
                "group": m.group_label(group_id),
                "peer": peer,
                "peer_name": peer_name,
                "by": PublicKey(c.by).to_hex(),
                "by_name": m.contact_name(&c.by),
                "members": c.members.iter().map(person).collect::<Vec<_>>(),
                "received_at": localtime::rfc3339(at_ms),
            })
        })
        .collect()
}

fn read_stdin_message() -> anyhow::Result<String> {
    let mut buf = Vec::new();
    std::io::stdin().lock().take(MAX_TEXT_BYTES as u64 + 1).read_to_end(&mut buf)?;
    if buf.len() > MAX_TEXT_BYTES {
        bail!("message too large: more than {MAX_TEXT_BYTES} bytes on stdin");
    }
    let text = String::from_utf8(buf).map_err(|_| anyhow::anyhow!("message on stdin is not utf-8 text"))?;
    Ok(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

/// What a verb run decided about the exit status.
pub enum VerbOutcome {
    Ok,
    /// The command ran but reports failure (e.g. an unhealthy server).
    Unhealthy,
    /// The message waits in the outbox (the server is out of reach); `maybe_sent` when a
    /// request carrying it may have arrived all the same.
    Queued {
        maybe_sent: bool,
        reason: String,
    },
    /// The message waits in the outbox of a home this process can no longer open (`qpq
    /// passphrase --new-key` re-sealed it meanwhile): the next command sends it.
    QueuedForNext {
        maybe_sent: bool,
    },
}

impl VerbOutcome {
    /// What a queued message's sender is told, if the verb queued one.
    pub fn queued_line(&self) -> Option<String> {
        match self {
            VerbOutcome::Queued { maybe_sent: false, reason } => {
                Some(format!("queued, will send when the server is back ({reason})"))
            }
            VerbOutcome::Queued { maybe_sent: true, reason } => Some(format!(
                "may have been sent; it stays queued and the same message goes again when the server is back ({reason})"
            )),
            VerbOutcome::QueuedForNext { maybe_sent } => Some(format!(
                "{}; the next qpq command sends it (`qpq passphrase --new-key` re-sealed the home \
                 while this one ran, and it cannot open the home again)",
                if *maybe_sent { "may have been sent: it stays queued" } else { "queued" }
            )),
            _ => None,
        }
    }
}

/// Executes one shared verb. `oneshot` (false in the shell) lets `send` read its text from
/// stdin, and has `requests accept` print the membership changes it brings on stderr in their
/// place among the messages (the shell shows both from the inbox). What the verb's catching-up
/// brought in (joins, membership changes) is added to `events` for the caller to show its own
/// way.
pub async fn run_verb(
    m: &mut Messenger,
    verb: ClientVerb,
    out: &mut dyn Write,
    oneshot: bool,
    events: &mut Vec<Event>,
) -> anyhow::Result<VerbOutcome> {
    match verb {
        ClientVerb::Whoami { json: true } => {
            let v = serde_json::json!({
                "key": m.public_key().to_hex(),
                "name": m.state().name,
                "fingerprint": m.public_key().short(),
            });
            writeln!(out, "{}", text::json_line(&v))?;
        }
        ClientVerb::Whoami { json: false } => {
            writeln!(out, "{}", m.public_key())?;
            if let Some(n) = &m.state().name {
                writeln!(out, "name: {}", Shown(n))?;
            }
            writeln!(out, "fingerprint: {}", m.public_key().short())?;
        }
        ClientVerb::Name(NameCmd::Set { name }) => {
            let (groups, came) = m.set_display_name(&name).await?;
            events.extend(came);
            writeln!(
                out,
                "name: {} (signed into {groups} conversation{})",
                Shown(name.trim()),
                if groups == 1 { "" } else { "s" }
            )?;
        }
        ClientVerb::Health { json } => {
            let server = m.server().unwrap_or_default();
            let session = m.connect().await?;
            let h = session.health().await?;
            if json {
                let (kps, last_resort) = session.key_package_count().await?;
                let mut v = health_json(&server, session, &h);
                v["key_packages"] = kps.into();
                v["last_resort"] = last_resort.into();
                writeln!(out, "{}", text::json_line(&v))?;
            } else {
                // The server's lines first: they stand even if the count fails.
                write_health(out, &server, session, &h)?;
                let (kps, last_resort) = session.key_package_count().await?;
                let lr = if last_resort { "yes" } else { "no" };
                writeln!(out, "key packages: {kps} on the server, last resort: {lr}")?;
            }
            if h.status != "ok" {
                return Ok(VerbOutcome::Unhealthy);
            }
        }
        ClientVerb::Contact(ContactCmd::Add { name, key }) => {
            m.contact_add(&name, &key)?;
        }
        ClientVerb::Contact(ContactCmd::List { json }) => {
            let contacts = m.contacts();
            for (name, key) in &contacts {
                if json {
                    let obj = serde_json::json!({ "name": name, "key": key.to_hex() });
                    writeln!(out, "{}", text::json_line(&obj))?;
                } else {
                    writeln!(out, "{} {key}", Shown(name))?;
                }
            }
            // Scripts read an empty list as no lines; people get words.
            if contacts.is_empty() && !json && std::io::stdout().is_terminal() {
                writeln!(out, "no contacts yet: add one with `qpq contact add NAME KEY`")?;
            }
        }
        ClientVerb::Contact(ContactCmd::Remove { name }) => m.contact_remove(&name)?,
        ClientVerb::Send(args) => {
            let target = m.resolve_target(&args.target)?;
            // `-` alone is stdin, as for other Unix tools (one-shots only: in the shell it is text).
            let from_stdin = args.text.is_empty() || (oneshot && args.text == ["-"]);
            let text = if from_stdin {
                if !oneshot {
                    bail!("nothing to send: write the message after the target");
                }
                read_stdin_message()?
            } else {
                args.text.join(" ")
            };
            if text.trim().is_empty() {
                bail!("nothing to send: the message is empty");
            }
            let (fate, caught_up) = m.send(&target, &text).await?;
            events.extend(caught_up);
            match fate {
                Fate::Kept { maybe_sent, reason } => return Ok(VerbOutcome::Queued { maybe_sent, reason }),
                Fate::LeftForNext { maybe_sent } => return Ok(VerbOutcome::QueuedForNext { maybe_sent }),
                Fate::Sent { .. } | Fate::Refused(_) => {}
            }
        }
        ClientVerb::Group(cmd) => {
            let (came, outcome) = run_group(m, cmd, out).await?;
            events.extend(came);
            return Ok(outcome);
        }
        ClientVerb::Keys(KeysCmd::Show { json: true }) => {
            let k = m.envelope_key();
            let v = serde_json::json!({
                "fingerprint": k.fingerprint,
                "created_at": localtime::rfc3339(k.created_at_ms),
                "published": k.published,
                "retired": k.retired,
            });
            writeln!(out, "{}", text::json_line(&v))?;
        }
        ClientVerb::Keys(KeysCmd::Show { json: false }) => {
            let k = m.envelope_key();
            let days = k.age_ms / (24 * 60 * 60 * 1000);
            writeln!(out, "envelope key: {} created {days} days ago", k.fingerprint)?;
            let published = if k.published { "yes" } else { "no (at the next connection)" };
            writeln!(out, "on the server: {published}; replaced keys kept: {}", k.retired)?;
        }
        ClientVerb::Requests(args) => run_requests(m, args, out, oneshot, events)?,
        ClientVerb::History(args) => run_history(m, &args, out)?,
        ClientVerb::Keys(KeysCmd::Rotate) => {
            m.connect().await?;
            m.rotate_hybrid_key().await?;
            writeln!(out, "new envelope key: {}", m.envelope_key().fingerprint)?;
            let n = m.rotate_key_packages().await?;
            writeln!(out, "new key packages: {n} and a last-resort one")?;
        }
    }
    Ok(VerbOutcome::Ok)
}

impl HistoryArgs {
    /// What says which pages these are, as words each after a space (` bob -n 3 --grep
    /// lunch --json`): the hint for the page before repeats them with its `--before`
    /// (exploratory testing: `qpq history --grep bm -n 3` hinted at a page of everything).
    pub fn page_words(&self) -> String {
        let mut line = String::new();
        if let Some(t) = &self.target {
            line = format!("{line} {}", shell_words::quote(t));
        }
        if self.n != DEFAULT_HISTORY_PAGE as u64 {
            line = format!("{line} -n {}", self.n);
        }
        if let Some(g) = &self.grep {
            line = format!("{line} --grep {}", shell_words::quote(g));
        }
        if self.json {
            line.push_str(" --json");
        }
        line
    }

    /// The page size said as a number after the target (`history #team 5`), or as the target
    /// itself (`history 5`: names of contacts and groups are never all digits there; write
    /// `-n` to be explicit), moved to `n`. A number out of range is refused as `-n` refuses
    /// it, not looked up as a contact. The error names the number.
    pub fn settled(mut self) -> Result<Self, String> {
        if let Some(n) = self.count.take() {
            self.n = n;
            return Ok(self);
        }
        // As long as a short key (`30419934`), it is one.
        let count_like = |t: &&str| {
            !t.is_empty()
                && t.len() < crate::client::names::MIN_SHORT_KEY_HEX
                && t.bytes().all(|b| b.is_ascii_digit())
        };
        let Some(digits) = self.target.as_deref().filter(count_like) else {
            return Ok(self);
        };
        let max = MAX_HISTORY_PAGE as u64;
        match digits.parse::<u64>() {
            Ok(n) if (1..=max).contains(&n) => {
                self.target = None;
                self.n = n;
                Ok(self)
            }
            _ => Err(format!("{digits}: a page holds 1 to {max} messages")),
        }
    }
}

/// A group name as the group verbs take it, `team` or `#team` (one `#`: `##team` is no name).
fn unhashed(name: &str) -> &str {
    name.strip_prefix('#').unwrap_or(name)
}

/// `qpq history`: one page, then the cursor of the page before it on stderr.
fn run_history(m: &mut Messenger, args: &HistoryArgs, out: &mut dyn Write) -> anyhow::Result<()> {
    let args = &args.clone().settled().map_err(|e| anyhow::anyhow!("history {e}"))?;
    let target_shown = args.target.as_deref().map(|t| Shown(t).to_string());
    if let Some(keep) = &args.retention {
        if keep.trim() == "show" {
            writeln!(out, "history retention: {}", retention_text(m.history_retention()))?;
            return Ok(());
        }
        let keep = parse_retention(keep)?;
        let deleted = m.set_history_retention(keep)?;
        let s = if deleted == 1 { "" } else { "s" };
        // Turning retention off deletes nothing: no count to report.
        let deleted = match (keep, deleted) {
            (None, _) => String::new(),
            (Some(_), 0) => " (no older messages to delete)".to_string(),
            (Some(_), n) => format!(" ({n} older message{s} deleted)"),
        };
        writeln!(out, "history retention: {}{deleted}", retention_text(keep))?;
        return Ok(());
    }
    let Some(query) = history_query(m, args)? else {
        let shown = match new_contact_newest_page(m, args) {
            Some(peer) => write_new_contact_history(m, &peer, args.json, out)?,
            None => false,
        };
        if !shown {
            err!("qpq: {}", empty_page(args, args.before.is_some(), target_shown.as_deref()));
        }
        return Ok(());
    };
    let page = m.history_page(&query)?;
    let mut buf = Vec::new();
    write_history(m, &query, &page, args.json, &mut buf)?;
    out.write_all(&buf)?;
    if buf.is_empty() {
        // Said on stderr: a script reads an empty page as no lines, a person gets words.
        err!("qpq: {}", empty_page(args, args.before.is_some(), target_shown.as_deref()));
    }
    if let Some(older) = &page.older {
        err!("qpq: older messages: qpq history{} --before {older}", Shown(&args.page_words()));
    }
    Ok(())
}

/// What an empty page of `qpq history` (on stderr) or `/history` says: `older` when it was a
/// page before another, `label` the conversation as shown (terminal-safe), None for all.
pub(crate) fn empty_page(args: &HistoryArgs, older: bool, label: Option<&str>) -> String {
    let older_word = if older { "older " } else { "" };
    match (args.grep.as_deref().filter(|g| !g.is_empty()), label) {
        (Some(word), _) => {
            // The word as typed, up to a line's worth (it repeated a 100 KB word whole).
            const SHOWN_CHARS: usize = 64;
            let short: String = word.chars().take(SHOWN_CHARS).collect();
            let more = if word.chars().nth(SHOWN_CHARS).is_some() { "\u{2026}" } else { "" };
            format!("no {older_word}messages contain {}{more}", Shown(&format!("{short:?}")))
        }
        (None, _) if older => "no older messages".to_string(),
        (None, Some(t)) => format!("no messages with {t} yet"),
        (None, None) => "no messages yet".to_string(),
    }
}

/// A retention as people set it: whole days as days (`100000d` is "100000 days", not years,
/// months and hours of 365.25-day years), anything else as humantime writes it.
fn retention_text(keep: Option<Duration>) -> String {
    const DAY_SECS: u64 = 24 * 60 * 60;
    match keep {
        None => "off (every message is kept)".into(),
        Some(d) if d.subsec_nanos() == 0 && d.as_secs() % DAY_SECS == 0 => {
            let days = d.as_secs() / DAY_SECS;
            format!("{days} day{}", if days == 1 { "" } else { "s" })
        }
        Some(d) => format!("{}", humantime::format_duration(d)),
    }
}

/// The query `args` ask for; None for a contact with no conversation yet (nothing to show).
pub fn history_query(m: &Messenger, args: &HistoryArgs) -> anyhow::Result<Option<HistoryQuery>> {
    let conversation = match &args.target {
        None => None,
        Some(t) => match m.conversation_id(t) {
            Ok(id) => Some(id),
            Err(ClientError::UnknownContact(_)) if m.resolve_target(t).is_ok() => return Ok(None),
            Err(e) => return Err(e.into()),
        },
    };
    let before = match &args.before {
        None => Before::Newest,
        Some(b) => Before::parse(b, m.now_ms())?,
    };
    // In range by the parser (at most MAX_HISTORY_PAGE), so it fits a usize.
    let n = usize::try_from(args.n).unwrap_or(MAX_HISTORY_PAGE);
    let grep = args.grep.clone().filter(|g| !g.is_empty());
    Ok(Some(HistoryQuery { conversation, before, n, grep }))
}

/// Writes a page: lines like `recv`'s (with the conversation named when the query spans all),
/// membership changes as `* ...` lines; or JSON lines with each message's `position`.
pub fn write_history(
    m: &Messenger,
    query: &HistoryQuery,
    page: &HistoryPage,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    let mut at = page.entries.iter();
    for (group_id, item) in m.page_items(query, page) {
        match item {
            Item::Message(e) => {
                let position = at.next().map(|h| h.position.to_string()).unwrap_or_default();
                if json {
                    let mut v = entry_json(m, &e);
                    v["position"] = serde_json::Value::String(position);
                    v["outgoing"] = serde_json::Value::Bool(e.outgoing);
                    writeln!(out, "{}", text::json_line(&v))?;
                } else if query.conversation.is_none() {
                    writeln!(out, "{}", format_entry_in(m, &e))?;
                } else {
                    writeln!(out, "{}", format_entry(m, &e))?;
                }
            }
            Item::Event(ev) => {
                // A change has a time (when we learned of it) like a message, and no position:
                // a page begins and ends with messages.
                let event = ev.to_event(&group_id);
                if json {
                    for v in event_json(m, &event, ev.at_ms) {
                        writeln!(out, "{}", text::json_line(&v))?;
                    }
                } else if let Some(line) = describe_event(m, &event) {
                    writeln!(out, "{} * {line}", localtime::short(ev.at_ms, m.now_ms()))?;
                }
            }
        }
    }
    // What is typed counts from the moment it is queued: it ends the newest page (of its
    // conversation, or of all), in the shell and in `qpq history` alike, and a script reading
    // JSON gets it marked queued.
    if query.before == Before::Newest && query.grep.is_none() {
        let which = match &query.conversation {
            Some(id) => QueuedFor::Conversation(id),
            None => QueuedFor::All,
        };
        write_queued(m, &m.queued_entries(which), query.conversation.is_none(), json, out)?;
    }
    Ok(())
}

/// The history of a person we have no conversation with yet: the messages queued to them
/// (the conversation begins when the first leaves). False when there are none.
pub fn write_new_contact_history(
    m: &Messenger,
    peer: &[u8; 32],
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<bool> {
    let queued = m.queued_entries(QueuedFor::NewContact(peer));
    write_queued(m, &queued, false, json, out)?;
    Ok(!queued.is_empty())
}

/// The person `args` ask the newest page of, unfiltered, when we have no conversation with
/// them yet: their queued messages make that page (an older page or a search shows none, as
/// for any conversation).
pub fn new_contact_newest_page(m: &Messenger, args: &HistoryArgs) -> Option<[u8; 32]> {
    if older_or_search(args) {
        return None;
    }
    args.target.as_deref().and_then(|t| m.new_contact(t))
}

/// True when `args` ask for an older page (`--before`) or a search (a non-empty `--grep`).
pub fn older_or_search(args: &HistoryArgs) -> bool {
    args.before.is_some() || args.grep.as_deref().is_some_and(|g| !g.is_empty())
}

/// Queued messages as history lines, naming their conversation when `all` conversations are
/// listed.
fn write_queued(
    m: &Messenger,
    queued: &[QueuedEntry],
    all: bool,
    json: bool,
    out: &mut dyn Write,
) -> anyhow::Result<()> {
    for q in queued {
        if json {
            writeln!(out, "{}", text::json_line(&queued_entry_json(m, q)))?;
        } else if all {
            let with = q.new_contact.map(|p| m.display_name(&p));
            writeln!(out, "{}", format_entry_with(m, &q.entry, with))?;
        } else {
            writeln!(out, "{}", format_entry(m, &q.entry))?;
        }
    }
    Ok(())
}

/// [`format_entry`] naming the direct conversation too (`14:03 [bob] me: hi`), for a history
/// of all conversations.
fn format_entry_in(m: &Messenger, e: &Entry) -> String {
    format_entry_with(m, e, None)
}

/// [`format_entry_in`], with the direct conversation named `with` when given (a person we
/// have no conversation with yet has no group id to name it by).
fn format_entry_with(m: &Messenger, e: &Entry, with: Option<String>) -> String {
    if m.group_label(&e.group_id).is_some() {
        return format_entry(m, e);
    }
    let from = m.display_name_in(&e.group_id, &e.from);
    let when = localtime::short(e.received_at_ms, m.now_ms());
    let with = with.unwrap_or_else(|| m.conversation_name(&e.group_id));
    text::message_for_width(
        &format!("{when} [{}] {}: ", Shown(&with), Shown(&from)),
        &e.text,
        terminal_columns(),
    )
}

/// The lines of `health` every caller prints: status, version and uptime first (scripts match
/// `ok version`), then what the connection showed: certificate, wire protocol, key exchange.
fn write_health(out: &mut dyn Write, server: &str, session: &Session, h: &Health) -> std::io::Result<()> {
    // The server's words are a stranger's too.
    let (status, version) = (Shown(&h.status), Shown(&h.version));
    writeln!(out, "{status} version {version} uptime {}s server {server}", h.uptime_secs)?;
    writeln!(out, "certificate fingerprint {}", session.fingerprint())?;
    writeln!(out, "protocol {}", session.protocol().unwrap_or_else(|| "unknown".into()))?;
    let kx = session.key_exchange_group().unwrap_or_else(|| "unknown".into());
    writeln!(out, "tls 1.3 key exchange {kx}")
}

/// `health --json`: the lines of [`write_health`] as one object.
fn health_json(server: &str, session: &Session, h: &Health) -> serde_json::Value {
    serde_json::json!({
        "status": h.status,
        "version": h.version,
        "uptime_secs": h.uptime_secs,
        "server": server,
        "certificate_fingerprint": session.fingerprint().to_string(),
        "protocol": session.protocol(),
        "key_exchange": session.key_exchange_group(),
    })
}

/// `qpq health` without a home (an operator's check): no identity, nothing pinned or saved. The
/// certificate is checked against `--server-fingerprint` when given, else only shown.
pub fn health_without_home(g: &GlobalArgs, json: bool) -> anyhow::Result<std::process::ExitCode> {
    let server = g.server.clone().ok_or_else(|| {
        anyhow::anyhow!("no server: pass --server HOST:PORT (no qpq home here to remember one)")
    })?;
    let pin = match connect_options(g)?.fingerprint {
        Some(f) => Pin::Fingerprint(f),
        None => Pin::FirstUse(Default::default()),
    };
    let h = block_on_local(async {
        let session = Session::connect(&server, pin).await.map_err(|e| {
            given_certificate_mismatch(&e).map_or_else(|| anyhow::Error::from(e), anyhow::Error::msg)
        })?;
        let h = session.health().await?;
        let mut stdout = std::io::stdout().lock();
        if json {
            writeln!(stdout, "{}", text::json_line(&health_json(&server, &session, &h)))?;
        } else {
            write_health(&mut stdout, &server, &session, &h)?;
        }
        stdout.flush()?;
        session.close().await;
        anyhow::Ok(h)
    })??;
    Ok(if h.status == "ok" { std::process::ExitCode::SUCCESS } else { std::process::ExitCode::FAILURE })
}

/// What a request that reuses the id of a conversation we left says about it (nothing for
/// the others); `subject` starts the sentence ("it " in a notice, "" in the list).
fn reuse_note(left: Option<&str>, subject: &str) -> String {
    left.map(|c| format!(" ({subject}reuses the id of {c}, which you left; they were not in it then)"))
        .unwrap_or_default()
}

fn run_requests(
    m: &mut Messenger,
    args: RequestsArgs,
    out: &mut dyn Write,
    oneshot: bool,
    events: &mut Vec<Event>,
) -> anyhow::Result<()> {
    match args.cmd {
        None => {
            let list = m.requests()?;
            for r in &list {
                if args.json {
                    writeln!(out, "{}", text::json_line(&request_json(m, r)))?;
                    continue;
                }
                let what = match &r.group {
                    Some(g) => format!("invites you to #{}", preview_line(g, REQUEST_PREVIEW_CHARS)),
                    None => "wants to start a conversation".to_string(),
                };
                let preview =
                    r.preview.as_deref().map(|p| format!(": \u{201c}{p}\u{201d}")).unwrap_or_default();
                let claimed = r.claimed_name.as_deref().map(|n| format!(" ~{n}")).unwrap_or_default();
                let reuse = reuse_note(r.reuses_left.as_deref(), "");
                let line = format!(
                    "#{} {}{claimed} {what}{preview}{reuse} ({} waiting, since {})",
                    r.number,
                    PublicKey(r.from),
                    r.held,
                    localtime::rfc3339(r.received_at_ms)
                );
                writeln!(out, "{}", text::shown(&line))?;
            }
            if !args.json {
                if list.is_empty() {
                    writeln!(out, "no message requests")?;
                } else {
                    writeln!(
                        out,
                        "accept with `qpq requests accept N`, refuse with `qpq requests decline N` (or `block N`: their later ones too)"
                    )?;
                }
                let blocked = m.blocked().len();
                if blocked > 0 {
                    writeln!(
                        out,
                        "{blocked} blocked (list with `qpq requests blocked`, undo with `qpq requests unblock KEY`)"
                    )?;
                }
            }
        }
        Some(RequestsCmd::Accept { which }) => {
            let sel = m.request_selector(&which)?;
            if !oneshot {
                // The shell shows what waited from the inbox, in order with the changes.
                let (accepted, failure) = m.request_accept(&sel, &sel.label(&which), false)?;
                events.extend(accepted);
                return failure.map_or(Ok(()), |e| Err(e.into()));
            }
            // In the order it happened: the join, then what waited, with the membership changes
            // of its commits (on stderr, as every one-shot says them) in their places.
            let mut told = Vec::new();
            let (accepted, failure) = m.request_accept(&sel, &sel.label(&which), true)?;
            for e in accepted {
                match &e {
                    Event::Message(entry) => writeln!(out, "{}", format_entry(m, entry))?,
                    _ => {
                        if let Some(line) = describe_event(m, &e) {
                            out.flush()?;
                            err!("qpq: {line}");
                        }
                        told.push(e);
                    }
                }
            }
            // As the one-shot marks what it said (see `oneshot`).
            let _ = m.mark_changes_told(&told);
            if let Some(e) = failure {
                return Err(e.into());
            }
        }
        Some(RequestsCmd::Decline { which }) => {
            let sel = m.request_selector(&which)?;
            let n = m.request_decline(&sel, &sel.label(&which))?;
            writeln!(out, "declined {n} request{}", if n == 1 { "" } else { "s" })?;
        }
        Some(RequestsCmd::Block { which }) => {
            let sel = m.request_selector(&which)?;
            let key = m.request_block(&sel, &sel.label(&which))?;
            writeln!(
                out,
                "blocked {} (undo with `qpq requests unblock {}`)",
                PublicKey(key),
                PublicKey(key)
            )?;
        }
        Some(RequestsCmd::Unblock { key }) => {
            let key = m.request_unblock(&key)?;
            writeln!(out, "unblocked {}", PublicKey(key))?;
        }
        Some(RequestsCmd::Blocked) => {
            for k in m.blocked() {
                writeln!(out, "{k}")?;
            }
        }
    }
    Ok(())
}

/// One request as a JSON object.
pub fn request_json(m: &Messenger, r: &RequestView) -> serde_json::Value {
    serde_json::json!({
        "number": r.number,
        "from": PublicKey(r.from).to_hex(),
        "from_name": m.contact_name(&r.from),
        "from_claimed_name": r.claimed_name,
        "kind": if r.group.is_some() { "group" } else { "direct" },
        "group": r.group,
        "group_id": hex::encode(&r.group_id),
        "waiting": r.held,
        "preview": r.preview,
        "reuses_left": r.reuses_left,
        "received_at": localtime::rfc3339(r.received_at_ms),
        "expires_at": localtime::rfc3339(r.expires_at_ms),
    })
}

async fn run_group(
    m: &mut Messenger,
    cmd: GroupCmd,
    out: &mut dyn Write,
) -> anyhow::Result<(Vec<Event>, VerbOutcome)> {
    let mut outcome = VerbOutcome::Ok;
    let events = match cmd {
        GroupCmd::Create { name } => {
            m.group_create(unhashed(&name))?;
            Vec::new()
        }
        GroupCmd::Add { name, members } => {
            let name = unhashed(&name);
            let added = m.group_add(name, &members).await?;
            if !added.welcome_queued.is_empty() {
                let who =
                    added.welcome_queued.iter().map(|k| m.display_name(k)).collect::<Vec<_>>().join(" ");
                outcome = VerbOutcome::Queued {
                    maybe_sent: false,
                    reason: format!("{who} added to #{name}; the invitation waits in the outbox"),
                };
            }
            added.events
        }
        GroupCmd::Remove { name, members } => m.group_remove(unhashed(&name), &members).await?,
        GroupCmd::Leave { name } => m.group_leave(unhashed(&name)).await?,
        GroupCmd::Update { name } => m.group_update(unhashed(&name)).await?,
        GroupCmd::List { json: true } => {
            for g in m.group_list() {
                writeln!(out, "{}", text::json_line(&group_json(&g)))?;
            }
            Vec::new()
        }
        GroupCmd::List { json: false } => {
            for g in m.group_list() {
                let state = if g.active {
                    let s = if g.members == 1 { "" } else { "s" };
                    format!("{} member{s}, epoch {}", g.members, g.epoch)
                } else {
                    "left".into()
                };
                let kind = if g.is_direct() { "direct" } else { "group" };
                writeln!(out, "{} ({kind}, {state})", Shown(&g.name))?;
            }
            Vec::new()
        }
        GroupCmd::Info { name, json } => {
            let name = unhashed(&name);
            let suite = m.group_ciphersuite(name)?;
            let gid = m.group_or_direct(name)?;
            let group = m.group_list().into_iter().find(|g| g.group_id == gid);
            if json {
                let mut v = group.map_or_else(|| serde_json::json!({}), |g| group_json(&g));
                v["ciphersuite"] = suite.into();
                writeln!(out, "{}", text::json_line(&v))?;
            } else {
                if let Some(g) = group {
                    writeln!(out, "{}", Shown(&g.name))?;
                    writeln!(out, "members {}", g.members)?;
                    writeln!(out, "epoch {}", g.epoch)?;
                }
                writeln!(out, "ciphersuite {suite}")?;
            }
            Vec::new()
        }
        GroupCmd::Members { name, json: true } => {
            for mem in m.group_members(unhashed(&name))? {
                let v = serde_json::json!({
                    "key": mem.key.to_hex(),
                    "name": mem.name,
                    "claimed_name": m.claimed_name(&mem.key.0),
                    "me": mem.me,
                });
                writeln!(out, "{}", text::json_line(&v))?;
            }
            Vec::new()
        }
        GroupCmd::Members { name, json: false } => {
            for mem in m.group_members(unhashed(&name))? {
                // A signed name is a claim: marked with `~` (the key is on the line already).
                let claimed = || m.claimed_name(&mem.key.0).map_or_else(|| "-".into(), |n| format!("~{n}"));
                let label = if mem.me { "(you)".to_string() } else { mem.name.unwrap_or_else(claimed) };
                writeln!(out, "{} {}", mem.key, Shown(&label))?;
            }
            Vec::new()
        }
    };
    Ok((events, outcome))
}

/// One conversation of `group list --json` (and `group info --json`): `kind` "group" or
/// "direct" (with the other person's key in `peer`), `members` and `epoch` while we are in it.
fn group_json(g: &GroupSummary) -> serde_json::Value {
    serde_json::json!({
        "name": g.name,
        "group_id": hex::encode(&g.group_id),
        "kind": if g.is_direct() { "direct" } else { "group" },
        "peer": match g.kind {
            GroupKind::Direct { peer } => Some(PublicKey(peer).to_hex()),
            GroupKind::Group => None,
        },
        "active": g.active,
        "members": g.members,
        "epoch": g.epoch,
    })
}

/// Runs one shared verb as a one-shot command.
pub fn oneshot(g: &GlobalArgs, verb: ClientVerb) -> anyhow::Result<std::process::ExitCode> {
    let mut m = open_messenger(g)?;
    // Told to a person only on a terminal: stderr to a file or a script's pipe tells no one,
    // and a later `recv` says the changes then.
    if std::io::stderr().is_terminal() {
        m.tell_changes();
    }
    let res = block_on_local(async {
        let mut stdout = std::io::stdout().lock();
        let mut events = Vec::new();
        let r = run_verb(&mut m, verb, &mut stdout, true, &mut events).await;
        let _ = stdout.flush();
        for e in &events {
            if let Some(line) = describe_event(&m, e) {
                err!("qpq: {line}");
            }
        }
        // Told: a later `recv` for people does not say them again. If this fails (a full
        // disk) they are said twice, as before the mark.
        let _ = m.mark_changes_told(&events);
        m.disconnect().await;
        r
    })?;
    print_notices(&mut m);
    let outcome = res?;
    if let Some(line) = outcome.queued_line() {
        err!("qpq: {}", Shown(&line));
    }
    match outcome {
        VerbOutcome::Ok => Ok(std::process::ExitCode::SUCCESS),
        VerbOutcome::Unhealthy => Ok(std::process::ExitCode::FAILURE),
        VerbOutcome::Queued { .. } | VerbOutcome::QueuedForNext { .. } => {
            Ok(std::process::ExitCode::from(EXIT_QUEUED))
        }
    }
}

/// `qpq recv`. Without `--follow` it exits 1 when it told of a message of ours that was not sent (one that
/// waited in the outbox and the server refused, or one placed after our removal): a script
/// that saw `send` exit 75 learns of it by the status of the command that finds out, as a
/// script's shell does.
pub fn recv(g: &GlobalArgs, args: RecvArgs) -> anyhow::Result<std::process::ExitCode> {
    let mut m = open_messenger(g)?;
    let res = block_on_local(recv_loop(&mut m, &args))?;
    print_notices(&mut m);
    // A follower ends on a signal, not on what it saw: its status says how it ended.
    let not_sent = res? && !args.follow;
    Ok(if not_sent { std::process::ExitCode::FAILURE } else { std::process::ExitCode::SUCCESS })
}

/// Prints the inbox's messages and membership events after `cursor` (whichever process fetched
/// them) and moves it on; returns how many messages it printed (`--wait` waits for a message,
/// not a membership change). Messages go to stdout; events too with
/// `json` (as data, in their place among the messages), else to stderr as lines for people.
fn print_unread(m: &mut Messenger, cursor: &mut Cursor, args: &RecvArgs) -> anyhow::Result<usize> {
    let json = args.json;
    // A one-shot `recv` for people skips the changes a one-shot command already told (see
    // `crate::client::inbox`); a follower keeps a view of its own, and JSON is data.
    let skip_told = !json && !args.follow;
    // Marked read durably first, then printed: a crash in between can lose the printout (the
    // message stays in history) but never prints it twice. A write that fails (a closed pipe,
    // a full disk) marks those not yet written unread again, so the next `recv` prints them;
    // those written stay read (what a reader that went away left unread in the pipe is lost
    // to `recv`, and kept in history), so a reader taking one line at a time moves on.
    let unread = m.read_inbox(cursor)?;
    if let Some(line) = missed_line(&unread) {
        err!("qpq: {line}");
    }
    let mut stdout = std::io::stdout().lock();
    for (shown, item) in unread.items.iter().enumerate() {
        // Both forms are escaped line by line (a guard over the batch would corrupt the JSON).
        let mut line = match item {
            Arrival::Message(e) if json => text::json_line(&entry_json(m, e)),
            Arrival::Message(e) => format_entry(m, e),
            Arrival::Event(e) if json => event_json(m, &e.to_event(), e.at_ms)
                .iter()
                .map(text::json_line)
                .collect::<Vec<_>>()
                .join("\n"),
            Arrival::Event(e) => {
                if let Some(line) = describe_event(m, &e.to_event()).filter(|_| !(skip_told && e.told)) {
                    err!("qpq: {line}");
                }
                continue;
            }
        };
        line.push('\n');
        if let Err(e) = stdout.write_all(line.as_bytes()).and_then(|()| stdout.flush()) {
            m.unread_again(&unread, shown)?;
            return Err(e.into());
        }
    }
    Ok(unread.messages().count())
}

/// What a reader that fell behind the inbox's bounds is told (None when it missed nothing).
pub fn missed_line(u: &Unread) -> Option<String> {
    let count = |n: u64, one: &str, many: &str| match n {
        0 => None,
        1 => Some(format!("1 earlier {one}")),
        n => Some(format!("{n} earlier {many}")),
    };
    let parts: Vec<String> = [
        count(u.missed, "message", "messages"),
        count(u.missed_events, "membership change", "membership changes"),
    ]
    .into_iter()
    .flatten()
    .collect();
    (!parts.is_empty()).then(|| {
        format!(
            "{} not shown here: this reader fell behind and the inbox keeps only the newest (see /history)",
            parts.join(" and ")
        )
    })
}

/// Errors no retry can end: the user must act first (re-pin a replaced certificate, upgrade
/// one side, name a server, start again with the home's new key). `recv --follow` exits on
/// them (status 1) instead of retrying for ever, so a supervisor or a script sees that it
/// stopped and why.
fn needs_the_user(e: &ClientError) -> bool {
    e.home_key_changed()
        || matches!(
            e,
            ClientError::NoServer
                | ClientError::PinMismatch { .. }
                | ClientError::Session(
                    SessionError::CertificateChanged { .. }
                        | SessionError::NoPort(_)
                        | SessionError::ServerOutdated { .. }
                        | SessionError::ClientOutdated { .. }
                )
        )
}

/// Runs `recv`; true when it told of a message of ours that was not sent.
async fn recv_loop(m: &mut Messenger, args: &RecvArgs) -> anyhow::Result<bool> {
    let mut not_sent = false;
    // Clamped to 136 years, so that any number a script passes makes a deadline (an `Instant`
    // addition past its range panics).
    let deadline = args.wait.map(|s| Instant::now() + Duration::from_secs(s.min(u64::from(u32::MAX))));
    // This process's place in the home's inbox: other readers of the home (another `recv
    // --follow`, a shell) print the same messages, each from its own cursor.
    // A follower keeps its place in the home, so a faster reader of it (a shell) cannot move
    // what it has not shown yet out of the inbox.
    let mut cursor = if args.follow { m.live_cursor()? } else { m.read_cursor()? };
    // What waited already is printed before the first (long) poll.
    let mut printed_any = print_unread(m, &mut cursor, args)? > 0;
    // One listener for the rest of the run, made before the line below: one made afresh at
    // each wait missed a Ctrl-C that came in between (say, while a batch was being written to a
    // slow pipe), and ran on. (Until here a Ctrl-C ends the process the default way.)
    let mut interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt())?;
    // SIGTERM (systemd, `timeout`) ends it the same way: its place in the home is given up.
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    if args.follow {
        // Also tells a script that messages sent from now on will be printed here.
        err!("qpq: following new messages (Ctrl-C to stop)");
    }
    let mut backoff = Duration::from_millis(250);
    loop {
        // The first round after a failure catches up at once, so "connected again" is said
        // when it is, not after a long poll.
        let recovering = backoff > Duration::from_millis(250);
        let wait_ms = if args.follow && recovering {
            0
        } else if args.follow {
            LIVE_READER_WAIT_MS
        } else {
            match deadline {
                Some(d) if !printed_any => {
                    let left = d.saturating_duration_since(Instant::now()).as_millis();
                    u32::try_from(left.min(60_000)).unwrap_or(60_000)
                }
                _ => 0,
            }
        };
        let events = tokio::select! {
            r = m.receive(wait_ms) => r,
            _ = interrupt.recv() => break,
            _ = terminate.recv() => break,
        };
        let events = match events {
            Ok(e) => {
                if recovering {
                    // Said as the shell says it: the "retrying" line was its last word.
                    err!("qpq: connected to {} again", Shown(&m.server().unwrap_or_default()));
                }
                backoff = Duration::from_millis(250);
                e
            }
            Err(e) if args.follow && !needs_the_user(&e) => {
                err!("qpq: {}; retrying in {}s", Shown(&e.to_string()), backoff.as_secs_f32());
                m.disconnect().await;
                // What another process of the home fetched meanwhile still shows (and this
                // reader's place in the inbox is renewed).
                printed_any |= print_unread(m, &mut cursor, args)? > 0;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = interrupt.recv() => break,
                    _ = terminate.recv() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        // Membership events come from the inbox below, in their place among the messages
        // (whichever process of this home fetched them); what else came is for this process.
        for e in events.iter().filter(|e| changes_of(e).is_none()) {
            not_sent |= matches!(e, Event::NotSent { .. });
            if let Some(line) = describe_event(m, e) {
                err!("qpq: {line}");
            }
        }
        print_notices(m);
        printed_any |= print_unread(m, &mut cursor, args)? > 0;
        if args.follow || m.has_backlog() {
            // A long backlog comes in rounds, each printed as it comes.
            continue;
        }
        let waiting = deadline.is_some_and(|d| Instant::now() < d) && !printed_any;
        if !waiting {
            break;
        }
    }
    m.disconnect().await;
    m.forget_reader(&cursor)?;
    Ok(not_sent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::testing::offline_messenger;

    /// `sent_at` is the sender's claim: any u64 makes valid JSON, never a panic (humantime's
    /// formatter failed past the year 9999).
    #[test]
    fn a_message_json_takes_any_sent_time() {
        let dir = tempfile::tempdir().unwrap();
        let m = offline_messenger(dir.path());
        for sent_at_ms in [0, 253_402_300_800_000, u64::MAX] {
            let e = Entry {
                group_id: vec![1; 16],
                from: [2; 32],
                text: "hi".into(),
                sent_at_ms,
                received_at_ms: 1_700_000_000_000,
                outgoing: false,
            };
            let v = entry_json(&m, &e);
            let sent = v["sent_at"].as_str().unwrap();
            assert!(sent.starts_with("1970-01-01T") || sent.starts_with("9999-12-"), "{sent}");
            assert_eq!(v["received_at"], "2023-11-14T22:13:20.000Z");
        }
    }
}
