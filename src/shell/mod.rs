//! `qpq shell`: the interactive chat REPL, and a line-by-line script runner when stdin is not a
//! terminal.
//!
//! # Design
//! One core loop on a current-thread runtime in a `LocalSet` (capnp-rpc is `!Send`) owns the
//! [`Messenger`] and its connection for the whole session. It `select!`s between the next line
//! from the [`input`] thread and a long poll `receive`; a line wins, the poll is dropped (safe:
//! effects are saved before acks and `processed_seq` makes redelivery a no-op), the line runs,
//! then the editor is asked for the next line. A round dropped midway loses the requests and
//! notices it had not shown yet (membership changes wait in the inbox, and the state itself is
//! saved), and a send cut between
//! the server taking it and the outbox recording that is sent again, encrypted anew if the
//! epoch moved meanwhile (so it can arrive twice). Running rounds whole avoided both but made a
//! dead link hold every typed line, `/quit` included, for minutes. Arrivals go through the [`printer`] so they
//! appear above a half-typed line. A failing receive is reported once and retried with backoff
//! ([`link`]); commands keep working meanwhile, and those needing the server fail with one line.
//! Messages never wait for the network: a chat line (or `send`) only queues the message in the
//! home's outbox ([`crate::client::outbox`]), and the loop's next receive round sends it, so
//! the prompt comes back at once and text typed while the server is away is kept. Arrivals are
//! read from the home's inbox with this shell's own cursor ([`crate::client::inbox`]), so a
//! `recv --follow` on the same home shows them too.
//!
//! Lines mean what [`grammar`] says: shared verbs parsed by the one-shot clap definitions and
//! run by [`run_verb`], plus chat syntax (`@bob hi`, `#team hi`, `/chat`, `/history`, ...).
//!
//! # Layout
//! - [`grammar`]: line → action (no I/O).
//! - [`complete`]: tab completion of verbs, contacts and groups.
//! - [`input`]: the rustyline editor thread (history in `<home>/history`) or stdin lines.
//! - [`history`]: what that file may keep: commands only, never message text.
//! - [`printer`]: output that never mangles the line being typed.
//! - [`link`]: the connection's up/down state and reconnect backoff.

pub mod complete;
pub mod grammar;
pub mod history;
pub mod input;
pub mod link;
pub mod printer;

use std::io::IsTerminal;
use std::process::ExitCode;
use std::sync::{Arc, Mutex, mpsc};

use anyhow::Context;
use futures::FutureExt as _;

use crate::cli::GlobalArgs;
use crate::cli::client::{
    ClientVerb, HistoryArgs, SendArgs, VerbOutcome, block_on_local, describe_event, empty_page, format_entry,
    history_query, home_dir, missed_line, new_contact_newest_page, older_or_search, open_messenger, run_verb,
    write_history, write_new_contact_history,
};
use crate::client::history::{Before, Position};
use crate::client::inbox::{Arrival, Cursor};
use crate::client::messenger::{ClientError, Event, Messenger, Target};
use crate::client::outbox::EXIT_QUEUED;
use crate::client::timeline::changes_of;
use crate::limits::DEFAULT_HISTORY_PAGE;
use crate::shell::complete::{Names, SharedNames};
use crate::shell::grammar::Action;
use crate::shell::input::{Input, LineSource};
use crate::shell::link::{Change, Link};
use crate::shell::printer::Printer;
use crate::text;

/// Long-poll length while waiting for a line: short enough to notice a dead server quickly,
/// long enough to cost nothing while idle.
pub const LONG_POLL_MS: u32 = 25_000;

/// `qpq shell`.
pub fn run(g: &GlobalArgs) -> anyhow::Result<ExitCode> {
    let terminal = std::io::stdin().is_terminal() && std::io::stdout().is_terminal();
    let home = home_dir(g)?;
    let mut messenger = open_messenger(g)?;
    // The shell keeps its place in the home: another reader of it cannot move what this one
    // has not shown yet out of the inbox (see `crate::client::inbox`).
    let cursor = messenger.live_cursor()?;
    // Once the prompts of opening the home (passphrase, pinning a new server's certificate)
    // are answered, with echo as the person left it.
    let no_echo = if terminal { input::NoEcho::on_stdin() } else { None };
    crate::failpoint::hit("shell-starting");
    let names: SharedNames = Arc::new(Mutex::new(Names::default()));
    let (out, input) = if terminal {
        let (tx, rx) = mpsc::channel();
        let source = LineSource::editor(home.join(input::HISTORY_FILE), names.clone(), rx)?;
        (Printer::terminal(tx), source)
    } else {
        (Printer::plain(), LineSource::stdin()?)
    };
    let mut shell = Shell {
        m: messenger,
        out,
        input,
        names,
        conversation: None,
        link: Link::default(),
        cursor,
        failed: false,
        interrupt: None,
        paging: None,
        enders: Enders::none(),
        ended: None,
    };
    let code = block_on_local(shell.run())?;
    // A place not given up here (the home cannot be written) lapses with its lease.
    let _ = shell.m.forget_reader(&shell.cursor);
    let Shell { out, input, ended, .. } = shell;
    drop(out); // ends the printer thread before the editor is joined
    if ended.is_some() {
        // The editor may be reading a line, in raw mode: it is not waited for (it ends with
        // the process), and the terminal is set back from here.
        drop(input);
    } else {
        input.close();
    }
    drop(no_echo); // the terminal as it was, once the editor gave it back
    if let Some(code) = ended {
        use std::io::Write as _;
        // Bracketed paste off (the editor turns it on for each line it reads), and a new line
        // below the prompt it drew. Errors are no matter: after SIGHUP the terminal is gone.
        let _ = write!(std::io::stdout(), "\x1b[?2004l\n");
        let _ = std::io::stdout().flush();
        let signal = if code == 128 + 1 { "SIGHUP" } else { "SIGTERM" };
        let _ = writeln!(std::io::stderr(), "qpq: shell ended by {signal}");
    }
    Ok(code)
}

/// The open conversation: what `send` is given, and what the prompt shows.
struct Conversation {
    target: String,
    label: String,
}

/// Whether the shell goes on after a line.
#[derive(PartialEq, Eq)]
enum Flow {
    Continue,
    Quit,
}

/// What the loop does after a wake-up.
enum Step {
    /// The editor is still reading (or nothing was asked of it).
    Waiting,
    /// Show the next prompt.
    Ask,
    Quit,
    /// One of [`Enders`] came, with its status.
    Ended(u8),
}

enum Wake {
    Input(Input),
    Received(Result<Vec<Event>, ClientError>),
    /// SIGTERM or SIGHUP at an interactive shell: the status to end with (128 + the signal).
    Ended(u8),
}

/// SIGTERM and SIGHUP (the terminal closed) at an interactive shell. Left to their default
/// action they ended the process with the terminal still in the editor's raw mode and without
/// echo (exploratory testing); caught, they end the shell at once, the terminal given back.
struct Enders {
    term: Option<tokio::signal::unix::Signal>,
    hup: Option<tokio::signal::unix::Signal>,
}

impl Enders {
    fn none() -> Enders {
        Enders { term: None, hup: None }
    }

    /// Registered inside the runtime.
    fn catch() -> Enders {
        use tokio::signal::unix::{SignalKind, signal};
        Enders { term: signal(SignalKind::terminate()).ok(), hup: signal(SignalKind::hangup()).ok() }
    }

    /// The status of the first that comes; never, for none registered.
    async fn next(&mut self) -> u8 {
        async fn one(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            () = one(&mut self.term) => 128 + 15,
            () = one(&mut self.hup) => 128 + 1,
        }
    }
}

/// What makes two `/history` lines the same request (their target resolved).
#[derive(Debug, Clone, PartialEq, Eq)]
struct PageKey {
    target: Option<String>,
    n: u64,
    grep: Option<String>,
    json: bool,
}

struct Shell {
    m: Messenger,
    out: Printer,
    input: LineSource,
    /// The completer's copy of contact and group names.
    names: SharedNames,
    conversation: Option<Conversation>,
    link: Link,
    /// This shell's place in the home's inbox (other readers of the home keep their own).
    cursor: Cursor,
    /// A line failed: a script exits with status 1.
    failed: bool,
    /// SIGINT while a line runs (interactive only): Ctrl-C abandons that command, not the
    /// shell. At the prompt the editor reads Ctrl-C as a key itself.
    interrupt: Option<tokio::signal::unix::Signal>,
    /// The last `/history` and the cursor of the page before the one it showed: the same
    /// `/history` again (or a bare one) shows that page. Any other command forgets it.
    paging: Option<(PageKey, Position)>,
    /// Interactive only: see [`Enders`].
    enders: Enders,
    /// The status of the signal of [`Enders`] that ended the shell: the editor thread may still
    /// be reading, and is not waited for.
    ended: Option<u8>,
}

impl Shell {
    async fn run(&mut self) -> ExitCode {
        if self.input.is_editor() {
            // Registered inside the runtime; from now on SIGINT no longer ends the process.
            self.interrupt = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::interrupt()).ok();
            self.enders = Enders::catch();
            self.greet();
        }
        self.show(Vec::new());
        let mut asked = false;
        loop {
            if !asked {
                self.input.request(&self.prompt(), self.conversation.is_some());
                self.out.set_editing(self.input.is_editor());
                asked = true;
            }
            let wake = {
                let due = self.link.next_attempt(tokio::time::Instant::now());
                // The first receive, and the first after an outage, catch up at once, so the
                // link state (and "connected again") is known without a long poll's delay.
                // Queued messages go out at once too (a receive round sends the outbox first).
                let wait = if self.link.is_starting()
                    || self.link.is_offline()
                    || self.m.has_queued_sends()
                    || self.m.has_backlog()
                {
                    0
                } else {
                    LONG_POLL_MS
                };
                let m = &mut self.m;
                let lines = &mut self.input.lines;
                let enders = &mut self.enders;
                tokio::select! {
                    biased;
                    code = enders.next() => Wake::Ended(code),
                    input = lines.recv() => Wake::Input(input.unwrap_or(Input::Eof)),
                    r = async {
                        tokio::time::sleep_until(due).await;
                        m.receive(wait).await
                    } => Wake::Received(r),
                }
            };
            let mut key_lost = false;
            let step = match wake {
                Wake::Received(Err(e)) if e.home_key_changed() => {
                    key_lost = true;
                    Step::Waiting
                }
                Wake::Received(r) => {
                    self.received(r).await;
                    Step::Waiting
                }
                Wake::Input(input) => self.take(input).await,
                Wake::Ended(code) => Step::Ended(code),
            };
            if let Step::Ended(code) = step {
                // At once: what is queued stays queued for the next command, as after a Ctrl-C
                // of the last flush; the home holds nothing unsaved between steps (a command
                // the signal cut short was abandoned as after a crash).
                self.ended = Some(code);
                self.m.disconnect().await;
                return ExitCode::from(code);
            }
            // Nothing this shell does can open a home re-sealed under a new key, whichever step
            // met it (a receive, a command, reading the inbox, keeping its place).
            if key_lost || self.m.home_key_changed() {
                self.fail(
                    "this shell's home was re-sealed under another key since it started (`qpq passphrase`): \
                     start qpq shell again",
                );
                self.m.disconnect().await;
                return ExitCode::FAILURE;
            }
            match step {
                Step::Waiting | Step::Ended(_) => {}
                Step::Ask => asked = false,
                Step::Quit => break,
            }
        }
        // A script's last word: what arrived while it ran. Messages typed just before leaving go
        // out now, even when the last receive failed (the link may have come back since): one
        // attempt, bounded, since the outbox keeps whatever does not go out.
        let flush = self.m.has_queued_sends();
        if flush || (!self.input.is_editor() && !self.link.is_offline()) {
            self.last_flush().await;
        }
        let n = self.m.queued_sends();
        if n > 0 {
            let s = if n == 1 { "" } else { "s" };
            self.out.status(&format!(
                "{n} message{s} queued: the next qpq command that reaches the server sends {}",
                if n == 1 { "it" } else { "them" }
            ));
        }
        self.m.disconnect().await;
        // A script's status says what `qpq send` would: 1 for a failed line or a refused
        // message, else 75 while any message is still queued, else 0.
        if let Some(code) = self.ended {
            ExitCode::from(code)
        } else if self.input.is_editor() {
            ExitCode::SUCCESS
        } else if self.failed {
            ExitCode::FAILURE
        } else if n > 0 {
            ExitCode::from(EXIT_QUEUED)
        } else {
            ExitCode::SUCCESS
        }
    }

    /// The last receive round before leaving, bounded in time. Interactive, Ctrl-C ends it at
    /// once: whatever did not go out stays queued (and the person is told why they wait).
    async fn last_flush(&mut self) {
        let mut interrupt = self.interrupt.take();
        if let Some(i) = interrupt.as_mut() {
            // A signal from before the flush is not meant for it (see `line_interruptibly`).
            while let Some(Some(())) = i.recv().now_or_never() {}
            let n = self.m.queued_sends();
            if n > 0 {
                let them = if n == 1 { "message: Ctrl-C leaves it" } else { "messages: Ctrl-C leaves them" };
                self.out.status(&format!("sending {n} queued {them} queued"));
            }
        }
        let mut enders = std::mem::replace(&mut self.enders, Enders::none());
        let interrupted = async {
            match interrupt.as_mut() {
                Some(i) => {
                    tokio::select! {
                        _ = i.recv() => None,
                        code = enders.next() => Some(code),
                    }
                }
                None => std::future::pending().await,
            }
        };
        // A backlog comes in rounds, each shown as it comes; queued messages go out after the
        // last one.
        let rounds = tokio::time::timeout(
            std::time::Duration::from_secs(crate::limits::SHELL_QUIT_FLUSH_SECS),
            async {
                loop {
                    match self.m.receive(0).await {
                        Ok(events) => self.show(events),
                        Err(e) => return Err(e),
                    }
                    if !self.m.has_backlog() {
                        return Ok(());
                    }
                }
            },
        );
        let last = tokio::select! {
            last = rounds => Some(last),
            code = interrupted => {
                self.ended = code;
                None
            }
        };
        self.interrupt = interrupt;
        self.enders = enders;
        match last {
            Some(Ok(Ok(()))) => {}
            Some(Ok(Err(e))) => self.out.status(&format!("cannot receive: {e}")),
            Some(Err(_)) => self.out.status("the server did not answer in time"),
            // Like a command dropped midway: only what the round saved counts.
            None => self.abandoned().await,
        }
    }

    /// Handles what the line source reported.
    async fn take(&mut self, input: Input) -> Step {
        match input {
            // Sent by the editor thread before its line: the prompt request is still pending.
            Input::Notice(n) => {
                self.out.status(&n);
                return Step::Waiting;
            }
            // A line that could not be read (not utf-8, too long): it failed. The editor waits
            // for the next prompt request; stdin reads on without one.
            Input::Bad(e) => {
                self.fail(&e);
                return if self.input.is_editor() { Step::Ask } else { Step::Waiting };
            }
            _ => {}
        }
        self.out.set_editing(false);
        match input {
            Input::Line(line) => match self.line_interruptibly(&line).await {
                Some(Flow::Quit) => Step::Quit,
                Some(Flow::Continue) => Step::Ask,
                None => {
                    self.abandoned().await;
                    self.ended.map_or(Step::Ask, Step::Ended)
                }
            },
            Input::Interrupted | Input::Notice(_) | Input::Bad(_) => Step::Ask, // (the last two returned above)
            Input::Eof => Step::Quit,
            Input::Failed(e) => {
                self.fail(&e);
                Step::Quit
            }
        }
    }

    fn greet(&self) {
        let who =
            self.m.state().name.as_deref().map(text::shown).unwrap_or_else(|| self.m.public_key().short());
        let server = self.m.server().unwrap_or_else(|| "no server".into());
        self.out.data(&format!("qpq shell: {who} on {server}; /help for help, Ctrl-D to leave"));
    }

    fn prompt(&self) -> String {
        match &self.conversation {
            Some(c) => format!("{}> ", c.label),
            None => "qpq> ".to_string(),
        }
    }

    fn fail(&mut self, msg: &str) {
        self.failed = true;
        self.out.error(msg);
    }

    /// The server answered (a receive, or a command that connected): say so if it was gone.
    fn link_up(&mut self) {
        if self.link.succeeded() == Change::Back {
            let server = self.m.server().unwrap_or_default();
            self.out.status(&format!("connected to {server} again"));
        }
    }

    /// After a long poll: report the link, show what came.
    async fn received(&mut self, r: Result<Vec<Event>, ClientError>) {
        let server = self.m.server().unwrap_or_default();
        match r {
            Ok(events) => {
                self.link_up();
                self.show(events);
            }
            Err(e) => {
                let said = match self.link.failed(tokio::time::Instant::now()) {
                    Change::Lost => {
                        format!("lost the connection to {server} ({e}); reconnecting in the background")
                    }
                    Change::Unreachable => format!("cannot reach {server} ({e}); retrying in the background"),
                    Change::Same | Change::Back => String::new(),
                };
                self.m.announce_queued_sends();
                if !said.is_empty() {
                    self.out.status(&said);
                    let n = self.m.queued_sends();
                    if n > 0 {
                        let s = if n == 1 { "" } else { "s" };
                        self.out.status(&format!("{n} message{s} queued, will send when the server is back"));
                    }
                }
                self.m.disconnect().await;
                // What another process of the home fetched meanwhile still shows (and this
                // shell's place in the inbox is renewed).
                self.show(Vec::new());
            }
        }
    }

    /// Prints what this process's round or command brought besides membership changes
    /// (requests, refused invitations, dropped messages), then the inbox's unread messages and
    /// membership changes, whichever process fetched them, and notices.
    fn show(&mut self, events: Vec<Event>) {
        for e in events.iter().filter(|e| changes_of(e).is_none()) {
            match describe_event(&self.m, e) {
                // A message typed here that will never go: a script fails like `qpq send`.
                Some(line) if matches!(e, Event::NotSent { .. }) => self.fail(&line),
                Some(line) => self.out.data(&format!("* {line}")),
                None => {}
            }
        }
        match self.m.read_inbox(&mut self.cursor) {
            Ok(unread) => {
                if let Some(line) = missed_line(&unread) {
                    self.out.status(&line);
                }
                for item in &unread.items {
                    match item {
                        Arrival::Message(e) => self.out.data(&format_entry(&self.m, e)),
                        // Timed like a message and like the same change in /history.
                        Arrival::Event(e) => {
                            if let Some(line) = describe_event(&self.m, &e.to_event()) {
                                let when = crate::localtime::short(e.at_ms, self.m.now_ms());
                                self.out.data(&format!("{when} * {line}"));
                            }
                        }
                    }
                }
            }
            Err(e) => self.fail(&format!("cannot update the inbox: {e}")),
        }
        for n in std::mem::take(&mut self.m.notices) {
            self.out.status(&n);
        }
        self.refresh_names();
    }

    fn refresh_names(&self) {
        let names = Names {
            contacts: self.m.contacts().into_iter().map(|(n, _)| n).filter(|n| completable(n)).collect(),
            groups: self
                .m
                .group_list()
                .into_iter()
                .filter(|g| !g.is_direct() && g.active && completable(&g.name))
                .map(|g| g.name.trim_start_matches('#').to_string())
                .collect(),
        };
        *self.names.lock().unwrap_or_else(|p| p.into_inner()) = names;
    }

    /// Runs one line; errors become one `error:` line and the shell goes on.
    /// Runs a line; None when Ctrl-C (SIGINT) came first.
    /// SIGTERM or SIGHUP ([`Enders`]) drops it too, and is noted in `ended`.
    async fn line_interruptibly(&mut self, line: &str) -> Option<Flow> {
        let Some(mut interrupt) = self.interrupt.take() else { return Some(self.line(line).await) };
        // A signal from before this line (say, sent while the editor was reading) is not meant
        // for it.
        while let Some(Some(())) = interrupt.recv().now_or_never() {}
        let mut enders = std::mem::replace(&mut self.enders, Enders::none());
        let flow = tokio::select! {
            flow = self.line(line) => Some(flow),
            _ = interrupt.recv() => None,
            code = enders.next() => {
                self.ended = Some(code);
                None
            }
        };
        self.interrupt = Some(interrupt);
        self.enders = enders;
        flow
    }

    /// After Ctrl-C dropped a command midway: like after a crash, only what it saved counts.
    async fn abandoned(&mut self) {
        self.out.status("interrupted");
        if let Err(e) = self.m.abandon().await {
            self.fail(&format!("cannot reload the state: {e}"));
        }
    }

    async fn line(&mut self, line: &str) -> Flow {
        let flow = match grammar::parse(line, self.conversation.is_some()) {
            Err(e) => {
                self.fail(&e.0);
                Flow::Continue
            }
            Ok(action) => match self.act(action).await {
                Ok(flow) => flow,
                Err(e) => {
                    self.fail(&crate::cli::error_line(&e));
                    Flow::Continue
                }
            },
        };
        if self.m.is_connected() {
            self.link_up();
        }
        self.show(Vec::new());
        flow
    }

    async fn act(&mut self, action: Action) -> anyhow::Result<Flow> {
        if !matches!(action, Action::History(_) | Action::Nothing) {
            self.paging = None;
        }
        match action {
            Action::Nothing => {}
            Action::Quit => return Ok(Flow::Quit),
            Action::Show(text) => self.out.data(&text),
            Action::Help(None) => {
                self.out.data(&grammar::help_overview(crate::cli::client::terminal_columns()))
            }
            Action::Help(Some(topic)) => self.out.data(&grammar::help_for(&topic)?),
            Action::Chat(target) => self.open(target)?,
            Action::History(args) if args.retention.is_some() => self.verb(ClientVerb::History(args)).await?,
            Action::History(args) => self.history(args)?,
            Action::Say { to, text } => {
                let target = match (to, &self.conversation) {
                    (Some(t), _) => t,
                    (None, Some(c)) => c.target.clone(),
                    (None, None) => {
                        anyhow::bail!("no open conversation: use @NAME TEXT, #GROUP TEXT or /chat NAME first")
                    }
                };
                self.say(&target, &text).context("message not sent")?;
            }
            Action::Verb(ClientVerb::Send(SendArgs { target, text })) if !text.is_empty() => {
                self.say(&target, &text.join(" ")).context("message not sent")?;
            }
            Action::Verb(verb) => self.verb(verb).await?,
        }
        Ok(Flow::Continue)
    }

    /// Queues a message; the receive loop sends it in the background, so the prompt never
    /// waits for the network and nothing typed is lost while the server is away.
    fn say(&mut self, target: &str, text: &str) -> anyhow::Result<()> {
        let target = self.m.resolve_target(target)?;
        let id = self.m.queue_send(&target, text)?;
        if self.link.is_offline() {
            self.out.status("queued, will send when the server is back");
            self.m.mark_told(&[id]);
        } else {
            self.m.send_quietly(id);
        }
        Ok(())
    }

    /// A shared verb, run exactly as the one-shot command runs it.
    async fn verb(&mut self, verb: ClientVerb) -> anyhow::Result<()> {
        let mut buf = Vec::new();
        let mut events = Vec::new();
        let r = run_verb(&mut self.m, verb, &mut buf, false, &mut events).await;
        if !buf.is_empty() {
            self.out.data(&String::from_utf8_lossy(&buf));
        }
        self.show(events);
        let outcome = r?;
        if let Some(line) = outcome.queued_line() {
            self.out.status(&line);
        }
        if let VerbOutcome::Unhealthy = outcome {
            self.failed = true;
        }
        Ok(())
    }

    /// `/chat TARGET` checks the target exists; `/chat` alone goes back to the lobby.
    fn open(&mut self, target: Option<String>) -> anyhow::Result<()> {
        let Some(target) = target else {
            self.conversation = None;
            return Ok(());
        };
        let label = match self.m.resolve_target(&target)? {
            Target::Group(g) => {
                // A group we left still opens, for its `/history`; sending there says why not.
                self.m.conversation_id(&target)?;
                format!("#{g}")
            }
            Target::Person(k) => self.m.display_name(&k),
        };
        // The prompt is drawn by the editor, past the printer's guard.
        let label = text::shown(&label);
        self.conversation = Some(Conversation { target, label });
        Ok(())
    }

    /// `/history`: a page of the named conversation, the open one, or (in the lobby) all;
    /// repeated, the page before.
    fn history(&mut self, mut args: HistoryArgs) -> anyhow::Result<()> {
        // A bare `/history` after a page of the open conversation (or, in the lobby, of all)
        // goes on from it, with its search and form and this line's page size: "more". (An
        // explicit `-n` of the default size reads as bare: clap gives the same value.)
        let bare = args.target.is_none()
            && args.n == DEFAULT_HISTORY_PAGE as u64
            && args.grep.is_none()
            && args.before.is_none()
            && !args.json;
        if bare
            && let Some((k, _)) = &self.paging
            && k.target == self.conversation.as_ref().map(|c| c.target.clone())
        {
            args.grep = k.grep.clone();
            args.json = k.json;
            if let Some(k) = self.paging.as_mut() {
                k.0.n = args.n;
            }
        }
        let again = again_line(&args);
        let mut label = args.target.clone();
        if args.target.is_none()
            && let Some(c) = &self.conversation
        {
            args.target = Some(c.target.clone());
            label = Some(c.label.clone());
        }
        let key =
            PageKey { target: args.target.clone(), n: args.n, grep: args.grep.clone(), json: args.json };
        let continued = match self.paging.take() {
            Some((k, older)) if k == key && args.before.is_none() => Some(older),
            _ => None,
        };
        let Some(mut query) = history_query(&self.m, &args)? else {
            // A contact we have not talked to yet has no conversation: only what waits for it.
            let mut buf = Vec::new();
            match new_contact_newest_page(&self.m, &args) {
                Some(p) if write_new_contact_history(&self.m, &p, args.json, &mut buf)? => {
                    self.out.data(&String::from_utf8_lossy(&buf));
                }
                // An older page or a search, as for any conversation.
                Some(_) | None if older_or_search(&args) => {
                    let older = args.before.is_some() || continued.is_some();
                    self.about_page(args.json, &empty_page(&args, older, label.as_deref()))
                }
                _ => self.about_page(args.json, &empty_page(&args, false, label.as_deref())),
            }
            return Ok(());
        };
        if let Some(older) = continued.clone() {
            query.before = Before::Position(older);
        }
        let page = self.m.history_page(&query)?;
        let mut buf = Vec::new();
        // (Messages still queued end the newest page: `write_history` adds them.)
        write_history(&self.m, &query, &page, args.json, &mut buf)?;
        if buf.is_empty() {
            let older = continued.is_some() || query.before != Before::Newest;
            self.about_page(args.json, &empty_page(&args, older, label.as_deref()));
        } else {
            self.out.data(&String::from_utf8_lossy(&buf));
        }
        if let Some(older) = page.older {
            self.out.status(&format!("older messages: {again} again"));
            self.paging = Some((key, older));
        }
        Ok(())
    }

    /// A sentence about a `/history` page ("no older messages"): output for people, but with
    /// `--json` a status line (stderr without a terminal), so stdout holds only JSON lines, as
    /// the one-shot `history --json` does.
    fn about_page(&self, json: bool, sentence: &str) {
        if json {
            self.out.status(sentence);
        } else {
            self.out.data(sentence);
        }
    }
}

/// The `/history` line that shows the page before the one `args` asked for: the same line
/// (without `--before`), as the page key compares them. (A bare `/history` goes on too, with
/// pages of the default size: see `Shell::history`.)
fn again_line(args: &HistoryArgs) -> String {
    format!("/history{}", args.page_words())
}

/// Names offered for completion: the editor shows the candidates raw, so a name with anything
/// [`text::is_unsafe`] marks is never one of them.
fn completable(name: &str) -> bool {
    !name.chars().any(text::is_unsafe)
}
