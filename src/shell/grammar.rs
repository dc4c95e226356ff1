//! What a shell line means. Two layers, so the shell and the one-shot commands never drift:
//!
//! - **Chat syntax** on top, taken verbatim (no quoting rules, so `don't` just works):
//!   `@bob TEXT`, `#team TEXT`, `/say TEXT`, and plain text while a conversation is open.
//! - **Verbs** below, parsed by clap from the *same* definitions as the command line
//!   ([`ClientVerb`]) plus a few shell-only verbs, through a `multicall` wrapper after
//!   shell-style word splitting. A verb may be written bare in the lobby (`group create team`)
//!   and with a leading `/` anywhere (`/group create team`); inside a conversation a bare line is
//!   text, as in irssi: `health is fine` is a message, `/health` the command.
//!
//! Parsing does no I/O and knows nothing of the messenger, so it is tested directly.

use clap::error::{ContextKind, ContextValue, ErrorKind};
use clap::{ColorChoice, CommandFactory, Parser, Subcommand};

use crate::cli::client::ClientVerb;

use crate::cli::client::HistoryArgs;
use crate::text::clipped;

/// One shell line, as clap sees it after word splitting.
#[derive(Debug, Parser)]
#[command(multicall = true, disable_help_subcommand = true, color = ColorChoice::Never)]
pub struct ShellLine {
    #[command(subcommand)]
    pub verb: ShellVerb,
}

/// Every verb the shell knows: the shared ones and the shell's own.
#[derive(Debug, Subcommand)]
pub enum ShellVerb {
    #[command(flatten)]
    Client(ClientVerb),
    /// Open a conversation: plain lines then go there (`/chat` alone goes back to the lobby)
    #[command(visible_alias = "c")]
    Chat {
        /// A contact name, a 64-hex key or #group
        target: Option<String>,
    },
    /// Show this help, or the help of one command
    #[command(visible_alias = "h")]
    Help { command: Option<String> },
    /// Leave the shell (Ctrl-D does too)
    #[command(visible_aliases = ["q", "exit"])]
    Quit,
}

/// What the shell should do with a line.
#[derive(Debug)]
pub enum Action {
    /// An empty line.
    Nothing,
    /// A verb shared with the one-shot commands.
    Verb(ClientVerb),
    /// Send `text` to `to`, or to the open conversation when `to` is None.
    Say {
        to: Option<String>,
        text: String,
    },
    /// Open a conversation, or go back to the lobby.
    Chat(Option<String>),
    /// `history`, whose target defaults to the open conversation and whose repetition pages
    /// back (a bare number as the target is a count: `/history 5`).
    History(HistoryArgs),
    Help(Option<String>),
    /// Text clap rendered for `--help`: output, not an error.
    Show(String),
    Quit,
}

/// Why a line could not be understood; the text is one lowercase line (a usage line may follow).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct LineError(pub String);

/// Parses one line. `in_conversation` decides whether a bare line is text or a verb.
pub fn parse(line: &str, in_conversation: bool) -> Result<Action, LineError> {
    let line = line.trim();
    if line.is_empty() {
        return Ok(Action::Nothing);
    }
    if let Some(rest) = strip_word(line, "/say") {
        return say(None, rest, "/say");
    }
    if let Some(rest) = line.strip_prefix('/') {
        return parse_verb(rest, "/");
    }
    if let Some(rest) = line.strip_prefix('@') {
        return address(rest, "", "@NAME TEXT, with a contact name or a 64-hex key");
    }
    if let Some(rest) = line.strip_prefix('#') {
        return address(rest, "#", "#GROUP TEXT, with the name of a group");
    }
    if in_conversation {
        return Ok(Action::Say { to: None, text: line.to_string() });
    }
    parse_verb(line, "")
}

/// `rest` after `word` when the line is `word` alone or `word` followed by whitespace.
fn strip_word<'a>(line: &'a str, word: &str) -> Option<&'a str> {
    let rest = line.strip_prefix(word)?;
    (rest.is_empty() || rest.starts_with(char::is_whitespace)).then(|| rest.trim_start())
}

/// `@bob TEXT` or `#team TEXT` (`sigil` is what the target keeps: "" or "#").
fn address(rest: &str, sigil: &str, usage: &str) -> Result<Action, LineError> {
    let (name, text) = rest.split_once(char::is_whitespace).unwrap_or((rest, ""));
    let shown = if sigil.is_empty() { "@" } else { sigil };
    if name.is_empty() {
        return Err(LineError(format!("{shown} needs a name right after it ({usage})")));
    }
    let target = format!("{sigil}{name}");
    say(Some(target), text.trim_start(), &format!("{shown}{name}"))
}

fn say(to: Option<String>, text: &str, what: &str) -> Result<Action, LineError> {
    if text.is_empty() {
        return Err(LineError(format!("nothing to send: write the message after {what}")));
    }
    Ok(Action::Say { to, text: text.to_string() })
}

/// Splits like a shell and hands the words to clap. `slash` is how the user wrote the verb.
fn parse_verb(text: &str, slash: &str) -> Result<Action, LineError> {
    let mut words = shell_words::split(&protect_hashes(text))
        .map_err(|e| LineError(format!("cannot split the line into words: {e}")))?;
    // A one-shot command pasted with its program name works too.
    if words.len() > 1 && words[0] == "qpq" {
        words.remove(0);
    }
    let Some(first) = words.first().cloned() else {
        return Err(LineError(format!("a command is expected after {slash:?}: type /help")));
    };
    match ShellLine::try_parse_from(&words) {
        Ok(ShellLine { verb }) => Ok(match verb {
            ShellVerb::Client(ClientVerb::History(args)) => Action::History(count_as_target(args)?),
            ShellVerb::Client(v) => Action::Verb(v),
            ShellVerb::Chat { target } => Action::Chat(target),
            ShellVerb::Help { command } => Action::Help(command),
            ShellVerb::Quit => Action::Quit,
        }),
        Err(e) => match e.kind() {
            ErrorKind::DisplayHelp
            | ErrorKind::DisplayVersion
            | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand => Ok(Action::Show(e.render().to_string())),
            ErrorKind::InvalidSubcommand if words.len() == 1 || is_top_level(&e, &first) => {
                Err(unknown_command(&e, slash, &first))
            }
            _ => Err(LineError(condense(&e.render().to_string()))),
        },
    }
}

/// `/history 5` and `/history #team 5` (see [`HistoryArgs::settled`]).
fn count_as_target(args: HistoryArgs) -> Result<HistoryArgs, LineError> {
    args.settled().map_err(|e| LineError(format!("/history {e}")))
}

/// Escapes every unquoted `#`: shell-words reads one that starts a word as a comment, but here
/// it names a group (`send #team hi`). An escaped `#` inside a word is the same `#`.
fn protect_hashes(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 4);
    let (mut single, mut double, mut escaped) = (false, false, false);
    for c in text.chars() {
        if escaped {
            escaped = false;
        } else if c == '\\' && !single {
            escaped = true;
        } else if c == '\'' && !double {
            single = !single;
        } else if c == '"' && !single {
            double = !double;
        } else if c == '#' && !single && !double {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

/// True when clap rejected the verb itself rather than a sub-verb (`group frob`).
fn is_top_level(e: &clap::Error, first: &str) -> bool {
    matches!(e.get(ContextKind::InvalidSubcommand), Some(ContextValue::String(s)) if s == first)
}

/// Verbs of `qpq` that are not shell commands: each says where it runs instead of "unknown".
const ONE_SHOT_ONLY: &[&str] = &["passphrase", "init", "recv", "server", "serve", "bench", "completions"];

fn unknown_command(e: &clap::Error, slash: &str, word: &str) -> LineError {
    if ONE_SHOT_ONLY.contains(&word) {
        return LineError(format!(
            "{slash}{word} is not a shell command: run `qpq {word}` outside the shell"
        ));
    }
    // clap offers aliases too (`c` for `clear`, `h` for `histroy`): the full name reads best.
    let suggested: Vec<String> = match e.get(ContextKind::SuggestedSubcommand) {
        Some(ContextValue::String(s)) => vec![full_command_name(s)],
        Some(ContextValue::Strings(v)) => v.iter().map(|s| full_command_name(s)).collect(),
        _ => Vec::new(),
    };
    let hint = match suggested.iter().max_by_key(|s| s.len()) {
        Some(s) => format!(": did you mean {slash}{s}?"),
        None => String::new(),
    };
    let lobby = if slash.is_empty() { "; to talk, use @NAME TEXT, #GROUP TEXT or /chat NAME" } else { "" };
    LineError(format!("unknown command {slash}{}{hint} (type /help{lobby})", clipped(word)))
}

/// The command `name` is an alias of (itself when it is none).
fn full_command_name(name: &str) -> String {
    let cmd = ShellLine::command();
    cmd.get_subcommands()
        .find(|c| c.get_all_aliases().any(|a| a == name))
        .map_or_else(|| name.to_string(), |c| c.get_name().to_string())
}

/// clap's multi-line error as one line plus its usage line, without the `--help` footer.
fn condense(rendered: &str) -> String {
    let mut head = String::new();
    let mut usage = String::new();
    for line in rendered.lines().map(str::trim_end).filter(|l| !l.is_empty()) {
        if let Some(u) = line.strip_prefix("Usage: ") {
            usage = format!("\nusage: {u}");
        } else if line.starts_with("For more information") {
            continue;
        } else if head.is_empty() {
            head = line.strip_prefix("error: ").unwrap_or(line).to_string();
        } else {
            // Continuation lines (lists of missing arguments, tips) join the first one.
            head = format!("{} {}", head.trim_end_matches(':'), line.trim());
        }
    }
    format!("{head}{usage}")
}

/// The help overview: chat syntax, then every verb from the clap definitions, each verb's
/// description broken at words to fit `width` columns (a terminal's), under itself.
pub fn help_overview(width: Option<usize>) -> String {
    let mut s = String::from("chat:\n");
    for (name, about) in [
        ("@NAME TEXT", "send TEXT to a contact (or a 64-hex key)"),
        ("#GROUP TEXT", "send TEXT to a group"),
        ("TEXT", "inside a conversation (/chat NAME): send TEXT there"),
        ("/say TEXT", "send TEXT to the open conversation even if it starts with / @ #"),
    ] {
        s.push_str(&hanging(&format!("  {name:<17} "), about, width));
    }
    s.push_str("commands (bare in the lobby, with a leading / anywhere):\n");
    let cmd = ShellLine::command();
    for sub in cmd.get_subcommands() {
        let mut name = sub.get_name().to_string();
        let mut about = sub.get_about().map(|a| a.to_string()).unwrap_or_default();
        let subs: Vec<&str> = sub.get_subcommands().map(|c| c.get_name()).collect();
        if !subs.is_empty() {
            name.push_str(" SUB");
            about = format!("{about}: {}", subs.join(", "));
        }
        let aliases: Vec<&str> = sub.get_visible_aliases().collect();
        if !aliases.is_empty() {
            name = format!("{name} ({})", aliases.join(", "));
        }
        let head = format!("  {name:<17} ");
        s.push_str(&hanging(&head, &about, width));
    }
    s.push_str("`/help COMMAND` or `COMMAND --help` shows one command's arguments.\n");
    s
}

/// `head` then `text`, broken at spaces into rows of at most `width` columns (ASCII: clap's
/// text), every row after the first indented as deep as `head`. A word longer than a row
/// stays whole.
fn hanging(head: &str, text: &str, width: Option<usize>) -> String {
    let indent = head.len();
    // Under 20 columns for the text, breaking helps nobody.
    let Some(room) = width.map(|w| w.saturating_sub(indent)).filter(|r| *r >= 20) else {
        return format!("{head}{text}\n");
    };
    let mut out = String::from(head);
    let mut used = 0;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        if used > 0 && used + 1 + word.len() > room {
            out.push('\n');
            out.push_str(&" ".repeat(indent));
            used = 0;
        }
        if used > 0 {
            out.push(' ');
            used += 1;
        }
        out.push_str(word);
        used += word.len();
    }
    out.push('\n');
    out
}

/// The long help of one verb (`help group`, `help c`).
pub fn help_for(topic: &str) -> Result<String, LineError> {
    let topic = topic.trim_start_matches('/');
    let mut cmd = ShellLine::command();
    match cmd.find_subcommand_mut(topic) {
        Some(sub) => Ok(sub.render_long_help().to_string()),
        None => Err(LineError(format!("no command named {:?}: type /help for the list", clipped(topic)))),
    }
}

/// Names of all verbs (with aliases) and, per verb, its sub-verbs: the completer's vocabulary.
pub fn verb_names() -> Vec<(String, Vec<String>)> {
    let cmd = ShellLine::command();
    let mut out = Vec::new();
    for sub in cmd.get_subcommands() {
        let subs: Vec<String> = sub.get_subcommands().map(|c| c.get_name().to_string()).collect();
        out.push((sub.get_name().to_string(), subs.clone()));
        for alias in sub.get_visible_aliases() {
            out.push((alias.to_string(), subs.clone()));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cli::client::{ContactCmd, GroupCmd};

    fn ok(line: &str, conv: bool) -> Action {
        parse(line, conv).unwrap_or_else(|e| panic!("{line:?} failed: {e}"))
    }

    fn err(line: &str, conv: bool) -> String {
        match parse(line, conv) {
            Err(e) => e.0,
            Ok(a) => panic!("{line:?} parsed as {a:?}"),
        }
    }

    fn say_of(a: Action) -> (Option<String>, String) {
        match a {
            Action::Say { to, text } => (to, text),
            other => panic!("expected a message, got {other:?}"),
        }
    }

    #[test]
    fn at_and_hash_address_a_message_verbatim() {
        assert_eq!(say_of(ok("@bob don't  panic", false)), (Some("bob".into()), "don't  panic".into()));
        assert_eq!(say_of(ok("#team \"quoted\" hi", true)), (Some("#team".into()), "\"quoted\" hi".into()));
        assert_eq!(say_of(ok("/say @not an address", true)), (None, "@not an address".into()));
    }

    #[test]
    fn malformed_addresses_say_what_is_missing() {
        assert!(err("@", false).starts_with("@ needs a name"), "{}", err("@", false));
        assert!(err("@ hi", false).starts_with("@ needs a name"));
        assert_eq!(err("@bob", false), "nothing to send: write the message after @bob");
        assert_eq!(err("@bob   ", true), "nothing to send: write the message after @bob");
        assert!(err("#", false).starts_with("# needs a name"));
        assert_eq!(err("#team", false), "nothing to send: write the message after #team");
        assert_eq!(err("/say", true), "nothing to send: write the message after /say");
    }

    #[test]
    fn bare_lines_are_verbs_in_the_lobby_and_text_in_a_conversation() {
        assert!(matches!(ok("whoami", false), Action::Verb(ClientVerb::Whoami { json: false })));
        assert_eq!(say_of(ok("whoami", true)), (None, "whoami".into()));
        assert!(matches!(ok("/whoami", true), Action::Verb(ClientVerb::Whoami { json: false })));
        assert!(matches!(ok("qpq health", false), Action::Verb(ClientVerb::Health { json: false })));
    }

    #[test]
    fn shared_verbs_parse_with_the_command_line_definitions() {
        match ok("contact add bob 'ab cd'", false) {
            Action::Verb(ClientVerb::Contact(ContactCmd::Add { name, key })) => {
                assert_eq!((name.as_str(), key.as_str()), ("bob", "ab cd"));
            }
            other => panic!("{other:?}"),
        }
        match ok("/group add team bob carol", true) {
            Action::Verb(ClientVerb::Group(GroupCmd::Add { name, members })) => {
                assert_eq!(name, "team");
                assert_eq!(members, ["bob", "carol"]);
            }
            other => panic!("{other:?}"),
        }
        match ok("send bob hello there", false) {
            Action::Verb(ClientVerb::Send(a)) => {
                assert_eq!((a.target, a.text), ("bob".into(), vec!["hello".to_string(), "there".to_string()]))
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn shell_verbs_and_their_aliases() {
        for (line, want) in [("/chat bob", Some("bob")), ("/c #team", Some("#team")), ("/chat", None)] {
            match ok(line, true) {
                Action::Chat(t) => assert_eq!(t.as_deref(), want, "{line}"),
                other => panic!("{line}: {other:?}"),
            }
        }
        let history = |line: &str| match ok(line, !line.starts_with("history")) {
            Action::History(a) => (a.target, a.n, a.before, a.grep),
            other => panic!("{line}: {other:?}"),
        };
        let page = crate::limits::DEFAULT_HISTORY_PAGE as u64;
        assert_eq!(history("/history"), (None, page, None, None));
        assert_eq!(history("/tail 3"), (None, 3, None, None));
        assert_eq!(history("history 7"), (None, 7, None, None));
        assert_eq!(
            history("/history #team -n 4 --grep hi"),
            (Some("#team".into()), 4, None, Some("hi".into()))
        );
        assert_eq!(history("/history bob --before 2h"), (Some("bob".into()), page, Some("2h".into()), None));
        // Exploratory testing: a count after the target was refused as an unexpected argument.
        assert_eq!(history("/history #team 5"), (Some("#team".into()), 5, None, None));
        assert_eq!(history("/tail bob 2 --grep x"), (Some("bob".into()), 2, None, Some("x".into())));
        assert!(
            err("/history #team 5 -n 3", true).contains("cannot be used with"),
            "{}",
            err("/history #team 5 -n 3", true)
        );
        assert!(
            err("/history #team 0", true).contains("0 is not in 1..=100000"),
            "{}",
            err("/history #team 0", true)
        );
        for n in ["0", "100001", "9999999"] {
            assert_eq!(
                err(&format!("/history {n}"), true),
                format!("/history {n}: a page holds 1 to 100000 messages")
            );
        }
        assert!(
            err("/history -n 0", true).contains("0 is not in 1..=100000"),
            "{}",
            err("/history -n 0", true)
        );
        for line in ["/quit", "/q", "/exit", "quit"] {
            assert!(matches!(ok(line, false), Action::Quit), "{line}");
        }
        assert!(matches!(ok("/help", true), Action::Help(None)));
        assert!(matches!(ok("/h group", true), Action::Help(Some(t)) if t == "group"));
    }

    #[test]
    fn unknown_commands_are_named_with_a_suggestion() {
        assert_eq!(
            err("frobnicate", false),
            "unknown command frobnicate (type /help; to talk, use @NAME TEXT, #GROUP TEXT or /chat NAME)"
        );
        assert_eq!(err("/histroy", true), "unknown command /histroy: did you mean /history? (type /help)");
        // Found by exploratory testing: "clear" was offered "c", the alias of chat.
        assert_eq!(err("/clear", true), "unknown command /clear: did you mean /chat? (type /help)");
        assert_eq!(
            err("/passphrase", true),
            "/passphrase is not a shell command: run `qpq passphrase` outside the shell"
        );
        assert!(err("/", true).starts_with("a command is expected"));
        // A pasted page is not read back whole.
        let long = "z".repeat(5000);
        let e = err(&format!("/{long}"), true);
        assert!(e.len() < 200 && e.contains("zzz\u{2026} (type /help)"), "{e}");
        let e = help_for(&long).unwrap_err().0;
        assert!(e.len() < 200 && e.contains("zzz\u{2026}\""), "{e}");
    }

    #[test]
    fn usage_errors_are_one_line_plus_usage() {
        let e = err("group create", false);
        assert!(e.starts_with("the following required arguments were not provided"), "{e}");
        assert!(e.contains("<NAME>"), "{e}");
        assert!(e.ends_with("\nusage: group create <NAME>"), "{e}");
        assert_eq!(e.lines().count(), 2, "{e}");
        let e = err("whoami extra", false);
        assert!(e.starts_with("unexpected argument 'extra' found"), "{e}");
    }

    #[test]
    fn help_requests_are_output_not_errors() {
        match ok("send --help", false) {
            Action::Show(t) => assert!(t.contains("Usage: send <TARGET> [TEXT]..."), "{t}"),
            other => panic!("{other:?}"),
        }
        assert!(matches!(ok("group", false), Action::Show(t) if t.contains("create")));
    }

    #[test]
    fn hash_names_survive_word_splitting() {
        assert_eq!(protect_hashes("send #team hi"), "send \\#team hi");
        assert_eq!(protect_hashes("send '#team' \"#x\" a#b"), "send '#team' \"#x\" a\\#b");
        match ok("send #team a # b", false) {
            Action::Verb(ClientVerb::Send(a)) => {
                assert_eq!(a.target, "#team");
                assert_eq!(a.text, ["a", "#", "b"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(ok("group members #team", false),
            Action::Verb(ClientVerb::Group(GroupCmd::Members { name, .. })) if name == "#team"));
    }

    #[test]
    fn a_split_error_is_clear() {
        assert_eq!(err("send bob \"hi", false), "cannot split the line into words: missing closing quote");
    }

    /// Review: on a narrow terminal the descriptions ran past the edge and the terminal broke
    /// them at column 0, under the verb names.
    #[test]
    fn the_overview_breaks_descriptions_under_themselves_to_fit_the_terminal() {
        let wide = help_overview(None);
        let narrow = help_overview(Some(50));
        assert!(wide.lines().any(|l| l.len() > 50), "something to break");
        for line in narrow.lines().filter(|l| l.starts_with("  ")) {
            assert!(line.len() <= 50, "{line:?}");
        }
        let words = |s: &str| s.split_whitespace().map(str::to_string).collect::<Vec<_>>();
        assert_eq!(words(&wide), words(&narrow), "the same words");
        let continued: Vec<&str> = narrow.lines().filter(|l| l.starts_with(&" ".repeat(20))).collect();
        assert!(!continued.is_empty(), "{narrow}");
        assert_eq!(help_overview(Some(10)), wide, "too narrow to help: unbroken");
    }

    #[test]
    fn help_lists_every_verb_from_clap() {
        let h = help_overview(None);
        for word in [
            "whoami",
            "health",
            "contact SUB",
            "add, list, remove",
            "group SUB",
            "chat (c)",
            "quit (q, exit)",
        ] {
            assert!(h.contains(word), "{word} missing from:\n{h}");
        }
        assert!(help_for("/c").unwrap().contains("Open a conversation"));
        assert!(help_for("nope").is_err());
    }
}
