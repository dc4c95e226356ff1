//! The client verbs. [`ClientVerb`] is shared by the one-shot command line and the shell (which
//! parses its lines with the same definitions), and [`run_verb`] executes one against a
//! [`Messenger`], writing data to `out`. `init` and `recv` are one-shot only.

use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use zeroize::Zeroizing;

use crate::cli::GlobalArgs;
use crate::client::messenger::{ConnectOptions, Event, MAX_TEXT_BYTES, Messenger};
use crate::client::requests::{RequestView, preview_line};
use crate::client::state::{self, Entry, Unlock};
use crate::crypto::identity::PublicKey;
use crate::limits::REQUEST_PREVIEW_CHARS;
use crate::text::{self, Shown};
use crate::transport::Fingerprint;

/// Verbs that work both as `qpq VERB` and inside `qpq shell`.
#[derive(Debug, Subcommand, Clone)]
pub enum ClientVerb {
    /// Show your identity key (hex) and name
    Whoami,
    /// Check the server; exits 0 only if it is healthy
    Health,
    /// Manage contacts (names for keys)
    #[command(subcommand)]
    Contact(ContactCmd),
    /// Send a message to a contact, a 64-hex key or #group
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
        /// #n from the list, or a key / contact name (all of its requests)
        which: String,
    },
    /// Drop requests without blocking their sender
    Decline {
        /// #n from the list, or a key / contact name
        which: String,
    },
    /// Drop a key's requests and ignore everything it sends from now on
    Block {
        /// #n from the list, or a key / contact name
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
    Show,
    /// Replace your envelope key and your published key packages now (say, after a device may
    /// have leaked them)
    Rotate,
}

#[derive(Debug, Subcommand, Clone)]
pub enum ContactCmd {
    /// Name a key: `contact add bob 6a3f...`
    Add { name: String, key: String },
    /// List contacts
    List,
    /// Forget a contact name
    Remove { name: String },
}

#[derive(Debug, Args, Clone)]
pub struct SendArgs {
    /// A contact name, a 64-hex key, or #group
    pub target: String,
    /// The message; without it, stdin is read to its end (one message)
    pub text: Vec<String>,
}

#[derive(Debug, Subcommand, Clone)]
pub enum GroupCmd {
    /// Create a group with only you in it
    Create { name: String },
    /// Add members (contact names or keys)
    Add {
        name: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Remove members
    Remove {
        name: String,
        #[arg(required = true)]
        members: Vec<String>,
    },
    /// Leave a group
    Leave { name: String },
    /// Rotate your keys in a group (post-compromise security)
    Update { name: String },
    /// List your groups and direct conversations
    List,
    /// List the members of a group
    Members { name: String },
    /// Show a group's size, epoch and MLS ciphersuite
    Info { name: String },
}

#[derive(Debug, Args, Clone)]
pub struct InitArgs {
    /// Display name (kept locally, shown by whoami)
    #[arg(long)]
    pub name: Option<String>,
    /// Store the state without a passphrase (keys protected only by file permissions)
    #[arg(long)]
    pub no_passphrase: bool,
}

#[derive(Debug, Args, Clone)]
pub struct RecvArgs {
    /// Wait up to SECS for the first message when none is pending
    #[arg(long, value_name = "SECS", conflicts_with = "follow")]
    pub wait: Option<u64>,
    /// Keep printing messages as they arrive until interrupted
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

pub fn connect_options(g: &GlobalArgs) -> anyhow::Result<ConnectOptions> {
    let fingerprint = g.server_fingerprint.as_deref().map(Fingerprint::parse).transpose()?;
    Ok(ConnectOptions { server: g.server.clone(), fingerprint })
}

fn passphrase_from_env() -> Option<Zeroizing<String>> {
    std::env::var("QPQ_PASSPHRASE").ok().map(Zeroizing::new)
}

fn prompt(msg: &str) -> anyhow::Result<Zeroizing<String>> {
    Ok(Zeroizing::new(rpassword::prompt_password(msg).context("cannot read passphrase")?))
}

/// Opens the home, asking for the passphrase if the state needs one.
pub fn open_messenger(g: &GlobalArgs) -> anyhow::Result<Messenger> {
    let dir = home_dir(g)?;
    let pass = if state::exists(&dir) && state::needs_passphrase(&dir)? {
        match passphrase_from_env() {
            Some(p) => Some(p),
            None if std::io::stdin().is_terminal() => Some(prompt("qpq passphrase: ")?),
            None => {
                bail!("state file is encrypted with a passphrase: set QPQ_PASSPHRASE or run interactively")
            }
        }
    } else {
        None
    };
    Ok(Messenger::open(&dir, pass.as_ref().map(|p| p.as_bytes()), connect_options(g)?)?)
}

/// `qpq init`.
pub fn init(g: &GlobalArgs, args: InitArgs) -> anyhow::Result<()> {
    let dir = home_dir(g)?;
    let unlock = if args.no_passphrase {
        Unlock::None
    } else if let Some(p) = passphrase_from_env() {
        if p.is_empty() {
            bail!("QPQ_PASSPHRASE is empty: choose a passphrase or pass --no-passphrase");
        }
        Unlock::Passphrase(p)
    } else if std::io::stdin().is_terminal() {
        let p = prompt("new qpq passphrase: ")?;
        let again = prompt("repeat passphrase: ")?;
        if p != again {
            bail!("passphrases do not match");
        }
        if p.is_empty() {
            bail!("empty passphrase: choose one or pass --no-passphrase");
        }
        Unlock::Passphrase(p)
    } else {
        bail!("no passphrase: set QPQ_PASSPHRASE, run interactively, or pass --no-passphrase");
    };
    let opts = connect_options(g)?;
    let (m, report) = block_on_local(Messenger::init(&dir, args.name, unlock, opts))??;
    if report.first_use {
        eprintln!("qpq: pinned server certificate {} (trust on first use)", report.fingerprint);
    }
    eprintln!("qpq: identity created in {}", dir.display());
    println!("{}", report.key);
    drop(m);
    Ok(())
}

fn print_notices(m: &mut Messenger) {
    for n in m.notices.drain(..) {
        eprintln!("qpq: {}", Shown(&n));
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
        Event::Membership { group_id, by, added, removed } => {
            let mut parts = Vec::new();
            if !added.is_empty() {
                parts.push(format!("{} added {}", m.display_name(by), names(added)));
            }
            if !removed.is_empty() {
                parts.push(format!("{} removed {}", m.display_name(by), names(removed)));
            }
            Some(format!("[{}] {}", m.conversation_name(group_id), parts.join("; ")))
        }
        Event::Removed { group_id, by } => {
            Some(format!("you were removed from {} by {}", m.conversation_name(group_id), m.display_name(by)))
        }
        Event::Request { group_id, from } => {
            let (number, preview) = m.request_summary(group_id)?;
            let what = match (preview, m.request_group_name(group_id)) {
                (Some(text), _) => format!("\u{201c}{text}\u{201d}"),
                (None, Some(g)) => format!("an invitation to #{}", preview_line(&g, REQUEST_PREVIEW_CHARS)),
                (None, None) => "wants to start a conversation".to_string(),
            };
            Some(format!(
                "message request from {}: {what} \u{2014} qpq requests accept #{number} (or block #{number})",
                m.display_name(from)
            ))
        }
        Event::Dropped { reason } => Some(reason.clone()),
    }
}

/// One message for people: `[#team] alice: hello`, or `alice: hello` for a direct one, with
/// peer text escaped and further lines indented under the header ([`text::message`]).
pub fn format_entry(m: &Messenger, e: &Entry) -> String {
    let from = m.display_name(&e.from);
    let header = match m.group_label(&e.group_id) {
        Some(g) => format!("[#{}] {}: ", Shown(&g), Shown(&from)),
        None => format!("{}: ", Shown(&from)),
    };
    text::message(&header, &e.text)
}

fn rfc3339(ms: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_millis(ms)).to_string()
}

/// One message as a JSON object (print it with [`text::json_line`], which keeps the exact text
/// but escapes what a terminal would obey).
pub fn entry_json(m: &Messenger, e: &Entry) -> serde_json::Value {
    serde_json::json!({
        "from": PublicKey(e.from).to_hex(),
        "from_name": m.contact_name(&e.from),
        "group": m.group_label(&e.group_id),
        "text": e.text,
        "sent_at": rfc3339(e.sent_at_ms),
        "received_at": rfc3339(e.received_at_ms),
    })
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
}

/// Executes one shared verb. `stdin_ok` lets `send` read its text from stdin (one-shots only).
/// What the verb's catching-up brought in (joins, membership changes) is added to `events` for
/// the caller to show its own way.
pub async fn run_verb(
    m: &mut Messenger,
    verb: ClientVerb,
    out: &mut dyn Write,
    stdin_ok: bool,
    events: &mut Vec<Event>,
) -> anyhow::Result<VerbOutcome> {
    match verb {
        ClientVerb::Whoami => {
            writeln!(out, "{}", m.public_key())?;
            if let Some(n) = &m.state().name {
                writeln!(out, "name: {}", Shown(n))?;
            }
            writeln!(out, "fingerprint: {}", m.public_key().short())?;
        }
        ClientVerb::Health => {
            let server = m.server().unwrap_or_default();
            let session = m.connect().await?;
            let h = session.health().await?;
            let (kps, last_resort) = session.key_package_count().await?;
            // The server's words are a stranger's too.
            let (status, version) = (Shown(&h.status), Shown(&h.version));
            writeln!(out, "{status} version {version} uptime {}s server {server}", h.uptime_secs)?;
            let lr = if last_resort { "yes" } else { "no" };
            writeln!(out, "key packages: {kps} on the server, last resort: {lr}")?;
            if h.status != "ok" {
                return Ok(VerbOutcome::Unhealthy);
            }
        }
        ClientVerb::Contact(ContactCmd::Add { name, key }) => {
            m.contact_add(&name, &key)?;
        }
        ClientVerb::Contact(ContactCmd::List) => {
            for (name, key) in m.contacts() {
                writeln!(out, "{} {key}", Shown(&name))?;
            }
        }
        ClientVerb::Contact(ContactCmd::Remove { name }) => m.contact_remove(&name)?,
        ClientVerb::Send(args) => {
            let target = m.resolve_target(&args.target)?;
            let text = if args.text.is_empty() {
                if !stdin_ok {
                    bail!("nothing to send: write the message after the target");
                }
                read_stdin_message()?
            } else {
                args.text.join(" ")
            };
            if text.is_empty() {
                bail!("nothing to send: the message is empty");
            }
            events.extend(m.send(&target, &text).await?.events);
        }
        ClientVerb::Group(cmd) => events.extend(run_group(m, cmd, out).await?),
        ClientVerb::Keys(KeysCmd::Show) => {
            let k = m.envelope_key();
            let days = k.age_ms / (24 * 60 * 60 * 1000);
            writeln!(out, "envelope key: {} created {days} days ago", k.fingerprint)?;
            let published = if k.published { "yes" } else { "no (at the next connection)" };
            writeln!(out, "on the server: {published}; replaced keys kept: {}", k.retired)?;
        }
        ClientVerb::Requests(args) => run_requests(m, args, out, events)?,
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

fn run_requests(
    m: &mut Messenger,
    args: RequestsArgs,
    out: &mut dyn Write,
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
                let line = format!(
                    "#{} {} {what}{preview} ({} waiting, since {})",
                    r.number,
                    PublicKey(r.from),
                    r.held,
                    rfc3339(r.received_at_ms)
                );
                writeln!(out, "{}", text::shown(&line))?;
            }
            if !args.json {
                if list.is_empty() {
                    writeln!(out, "no message requests")?;
                } else {
                    writeln!(
                        out,
                        "accept with `qpq requests accept #n`, refuse with `qpq requests block #n`"
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
            for e in m.request_accept(&sel, &which)? {
                match &e {
                    Event::Message(entry) => writeln!(out, "{}", format_entry(m, entry))?,
                    _ => events.push(e),
                }
            }
        }
        Some(RequestsCmd::Decline { which }) => {
            let sel = m.request_selector(&which)?;
            let n = m.request_decline(&sel, &which)?;
            writeln!(out, "declined {n} request{}", if n == 1 { "" } else { "s" })?;
        }
        Some(RequestsCmd::Block { which }) => {
            let sel = m.request_selector(&which)?;
            let key = m.request_block(&sel, &which)?;
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
        "kind": if r.group.is_some() { "group" } else { "direct" },
        "group": r.group,
        "waiting": r.held,
        "preview": r.preview,
        "received_at": rfc3339(r.received_at_ms),
        "expires_at": rfc3339(r.expires_at_ms),
    })
}

async fn run_group(m: &mut Messenger, cmd: GroupCmd, out: &mut dyn Write) -> anyhow::Result<Vec<Event>> {
    let events = match cmd {
        GroupCmd::Create { name } => {
            m.group_create(name.trim_start_matches('#'))?;
            Vec::new()
        }
        GroupCmd::Add { name, members } => m.group_add(name.trim_start_matches('#'), &members).await?,
        GroupCmd::Remove { name, members } => m.group_remove(name.trim_start_matches('#'), &members).await?,
        GroupCmd::Leave { name } => {
            m.group_leave(name.trim_start_matches('#')).await?;
            Vec::new()
        }
        GroupCmd::Update { name } => m.group_update(name.trim_start_matches('#')).await?,
        GroupCmd::List => {
            for g in m.group_list() {
                let state = if g.active {
                    format!("{} members, epoch {}", g.members, g.epoch)
                } else {
                    "left".into()
                };
                let kind = if g.direct { "direct" } else { "group" };
                writeln!(out, "{} ({kind}, {state})", Shown(&g.name))?;
            }
            Vec::new()
        }
        GroupCmd::Info { name } => {
            let name = name.trim_start_matches('#');
            let suite = m.group_ciphersuite(name)?;
            let gid = m.find_group(name)?;
            if let Some(g) = m.group_list().into_iter().find(|g| g.group_id == gid) {
                writeln!(out, "{}", Shown(&g.name))?;
                writeln!(out, "members {}", g.members)?;
                writeln!(out, "epoch {}", g.epoch)?;
            }
            writeln!(out, "ciphersuite {suite}")?;
            Vec::new()
        }
        GroupCmd::Members { name } => {
            for mem in m.group_members(name.trim_start_matches('#'))? {
                let label = if mem.me { "(you)".to_string() } else { mem.name.unwrap_or_else(|| "-".into()) };
                writeln!(out, "{} {}", mem.key, Shown(&label))?;
            }
            Vec::new()
        }
    };
    Ok(events)
}

/// Runs one shared verb as a one-shot command.
pub fn oneshot(g: &GlobalArgs, verb: ClientVerb) -> anyhow::Result<std::process::ExitCode> {
    let mut m = open_messenger(g)?;
    let res = block_on_local(async {
        let mut stdout = std::io::stdout().lock();
        let mut events = Vec::new();
        let r = run_verb(&mut m, verb, &mut stdout, true, &mut events).await;
        let _ = stdout.flush();
        for e in &events {
            if let Some(line) = describe_event(&m, e) {
                eprintln!("qpq: {line}");
            }
        }
        m.disconnect().await;
        r
    })?;
    print_notices(&mut m);
    match res? {
        VerbOutcome::Ok => Ok(std::process::ExitCode::SUCCESS),
        VerbOutcome::Unhealthy => Ok(std::process::ExitCode::FAILURE),
    }
}

/// `qpq recv`.
pub fn recv(g: &GlobalArgs, args: RecvArgs) -> anyhow::Result<()> {
    let mut m = open_messenger(g)?;
    let res = block_on_local(recv_loop(&mut m, &args))?;
    print_notices(&mut m);
    res
}

async fn recv_loop(m: &mut Messenger, args: &RecvArgs) -> anyhow::Result<()> {
    let deadline = args.wait.map(|s| Instant::now() + Duration::from_secs(s));
    let mut printed_any = false;
    let mut backoff = Duration::from_millis(250);
    loop {
        let wait_ms = if args.follow {
            30_000
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
            _ = tokio::signal::ctrl_c() => break,
        };
        let events = match events {
            Ok(e) => {
                backoff = Duration::from_millis(250);
                e
            }
            Err(e) if args.follow => {
                eprintln!("qpq: {}; retrying in {}s", Shown(&e.to_string()), backoff.as_secs_f32());
                m.disconnect().await;
                tokio::select! {
                    _ = tokio::time::sleep(backoff) => {}
                    _ = tokio::signal::ctrl_c() => break,
                }
                backoff = (backoff * 2).min(Duration::from_secs(10));
                continue;
            }
            Err(e) => return Err(e.into()),
        };
        for e in &events {
            if let Some(line) = describe_event(m, e) {
                eprintln!("qpq: {line}");
            }
        }
        print_notices(m);
        // Taken out of the inbox durably first, then printed: a crash in between can lose the
        // printout (the message stays in history) but never prints it twice.
        let entries = m.take_inbox()?;
        // One write for the whole batch keeps that window to a single system call.
        let mut batch = String::new();
        for e in &entries {
            let line = if args.json { text::json_line(&entry_json(m, e)) } else { format_entry(m, e) };
            batch.push_str(&line);
            batch.push('\n');
        }
        let mut stdout = std::io::stdout().lock();
        // Both forms are escaped line by line (a guard over the batch would corrupt the JSON).
        stdout.write_all(batch.as_bytes())?;
        stdout.flush()?;
        printed_any |= !entries.is_empty();
        if args.follow {
            continue;
        }
        let waiting = deadline.is_some_and(|d| Instant::now() < d) && !printed_any;
        if !waiting {
            break;
        }
    }
    m.disconnect().await;
    Ok(())
}
