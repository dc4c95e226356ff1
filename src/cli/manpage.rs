//! The man pages: clap_mangen renders NAME, SYNOPSIS, DESCRIPTION, OPTIONS and SUBCOMMANDS from
//! the clap definitions; this module appends what clap does not know (man-pages(7) order):
//! EXIT STATUS, ENVIRONMENT, FILES, EXAMPLES, and for `qpq-shell(1)` the REPL's COMMANDS, taken
//! from the shell's own help so the page cannot drift from it.

use std::fmt::Write as _;

/// Exit statuses every client command shares; the lead's merge adds the codes of other verbs.
const EXIT_STATUS: &[(&str, &str)] = &[
    ("0", "success (for health: the server answered and is healthy)"),
    (
        "1",
        "an error, printed on stderr as `qpq: message`; for health also an unhealthy server; for \
         recv (without --follow) also a message of yours it found was not sent",
    ),
    ("2", "a usage error: unknown option, missing argument (clap)"),
    (
        "75",
        "send: the message is queued in the home's outbox (the server could not be reached, or the \
         answer was lost and it may have been sent); group add: the members were added but their \
         invitation (Welcome) waits in the outbox; the next command that connects sends it; \
         shell (a script): a message it typed is still queued when it ends (1 when a line failed \
         or a message was refused)",
    ),
];

/// Variables clients read.
const CLIENT_ENV: &[(&str, &str)] = &[
    ("QPQ_HOME", "the client home, as --home [default: ~/.local/share/qpq]"),
    ("QPQ_SERVER", "the server HOST:PORT, as --server; init remembers it"),
    ("QPQ_SERVER_FINGERPRINT", "the expected server certificate, as --server-fingerprint"),
    (
        "QPQ_PASSPHRASE",
        "the home's passphrase instead of a prompt (--passphrase-file is preferred: the environment \
         of a process can be read by its user's other processes)",
    ),
];

/// Variables `qpq serve` reads.
const SERVER_ENV: &[(&str, &str)] = &[
    ("QPQ_LISTEN", "--listen: HOST:PORT to listen on (UDP) [default: 0.0.0.0:7000]"),
    ("QPQ_DATA_DIR", "--data-dir [default: ~/.local/share/qpq-server]"),
    ("QPQ_CONFIG", "--config [default: DATA_DIR/qpq-server.toml if present]"),
    ("QPQ_CERT, QPQ_KEY", "--cert, --key: the operator's own certificate chain and key (PEM)"),
    ("QPQ_LOG", "log filter for stderr [default: info; else RUST_LOG]"),
];

const CLIENT_FILES: &[(&str, &str)] = &[
    (
        "~/.local/share/qpq/qpq.db",
        "the client database (redb): identity, contacts, groups, MLS state, history and the pinned \
         server certificates, each record encrypted with the passphrase unless init --no-passphrase \
         (mode 0600); a qpq-state.bin of an older qpq is migrated into it once",
    ),
    ("~/.local/share/qpq/LOCK", "held by the qpq process working on the home at the moment"),
    ("~/.local/share/qpq/history", "the shell's line history (commands only)"),
];

const SERVER_FILES: &[(&str, &str)] = &[
    ("DATA_DIR/qpq.db", "the server database (redb); one qpq serve at a time"),
    ("DATA_DIR/cert.pem, DATA_DIR/key.pem", "the generated self-signed certificate and key (0600)"),
    ("DATA_DIR/qpq-server.toml", "optional settings (see the README)"),
];

/// Examples by page name (`qpq`, `qpq-send`, ...).
fn examples(page: &str) -> &'static [(&'static str, &'static str)] {
    match page {
        "qpq" => &[
            ("qpq serve --listen 0.0.0.0:7000", "run a server; it prints its certificate fingerprint"),
            ("qpq init --server chat.example.org:7000", "create your identity; prints your key"),
            ("qpq contact add bob 6a3f...", "name bob's key"),
            ("qpq send bob hello", "a direct message"),
            ("qpq group create team && qpq group add team bob carol", "a group"),
            ("qpq recv --follow", "print messages as they arrive"),
            ("qpq shell", "chat interactively"),
        ],
        "qpq-serve" => &[
            ("qpq serve --listen localhost:7000 --data-dir /var/lib/qpq", "a server for this machine"),
            ("qpq health --server chat.example.org:7000", "check it from anywhere, without an identity"),
        ],
        "qpq-init" => &[
            ("qpq init --server chat.example.org:7000 --name alice", "asks for a passphrase"),
            (
                "qpq init --server 10.0.0.5:7000 --server-fingerprint sha256:6f1e... --passphrase-file ~/.qpq-pass",
                "for scripts: nothing asked",
            ),
        ],
        "qpq-passphrase" => &[
            ("qpq passphrase", "asks for the current passphrase, then twice for the new one"),
            (
                "qpq passphrase --passphrase-file ~/.old --new-passphrase-file ~/.new",
                "for scripts: nothing asked",
            ),
            ("qpq passphrase --remove", "no passphrase any more (only file permissions protect the home)"),
            ("qpq passphrase --new-key", "a new passphrase and every record re-sealed under a new key"),
        ],
        "qpq-health" => &[
            ("qpq health", "the server of your home, and your key packages on it"),
            ("qpq health --server chat.example.org:7000", "without a home: an operator's check"),
        ],
        "qpq-send" => &[
            ("qpq send bob see you at 10", "to a contact"),
            ("qpq send '#team' build is green", "to a group (quote the #)"),
            ("date | qpq send bob", "the message from stdin"),
        ],
        "qpq-recv" => &[
            ("qpq recv", "print what is pending, then exit"),
            ("qpq recv --wait 30", "wait up to 30 s for a first message"),
            ("qpq recv --follow --json", "one JSON object per message, for scripts"),
        ],
        "qpq-server" | "qpq-server-pin" => &[
            ("qpq server show", "the pinned certificate"),
            ("qpq server pin sha256:6f1e...", "re-pin after the operator replaced the certificate"),
            ("qpq server pin", "on a terminal: show the server's certificate, ask, pin"),
            ("qpq server forget", "the next connection pins again"),
        ],
        "qpq-contact" | "qpq-contact-add" => &[
            ("qpq contact add bob 6a3f...", "name a key (not your own, not one already named)"),
            ("qpq contact list --json", "one JSON object per contact"),
        ],
        "qpq-group" => &[
            ("qpq group create team", "a group with only you"),
            ("qpq group add team bob carol", "add members"),
            ("qpq group members team", "who is in it"),
        ],
        "qpq-history" => &[
            ("qpq history", "the newest messages of all conversations"),
            ("qpq history bob -n 50", "the last 50 with bob; stderr names the command for the page before"),
            ("qpq history '#team' --before yesterday", "what #team said before today"),
            ("qpq history --grep invoice --json", "every message mentioning an invoice, as JSON lines"),
            ("qpq history --retention 90d", "from now on keep 90 days (off: keep everything)"),
        ],
        "qpq-shell" => &[
            ("qpq shell", "then: @bob hi, #team hi, /chat bob, /history, /quit"),
            ("printf '@bob hi\\n' | qpq shell", "a script: runs each line, then exits"),
        ],
        "qpq-completions" => &[
            ("qpq completions bash > ~/.local/share/bash-completion/completions/qpq", "bash"),
            ("qpq completions fish > ~/.config/fish/completions/qpq.fish", "fish"),
        ],
        _ => &[],
    }
}

/// The sections to append to `page` (already rendered by clap_mangen), as roff.
pub fn extra_sections(page: &str) -> String {
    let mut roff = String::new();
    if page == "qpq-shell" {
        roff.push_str(".SH COMMANDS\n.nf\n");
        for line in crate::shell::grammar::help_overview(None).lines() {
            let _ = writeln!(roff, "{}", escape(line));
        }
        roff.push_str(".fi\n");
    }
    let serve = page == "qpq-serve";
    section(&mut roff, "EXIT STATUS", EXIT_STATUS);
    section(&mut roff, "ENVIRONMENT", if serve { SERVER_ENV } else { CLIENT_ENV });
    section(&mut roff, "FILES", if serve { SERVER_FILES } else { CLIENT_FILES });
    if page == "qpq" {
        section(&mut roff, "FILES", SERVER_FILES);
    }
    let ex = examples(page);
    if !ex.is_empty() {
        roff.push_str(".SH EXAMPLES\n");
        for (command, what) in ex {
            let _ = writeln!(roff, ".TP\n\\fB{}\\fR\n{}", escape(command), escape(what));
        }
    }
    roff
}

/// A `.SH` with one `.TP` paragraph per item (a second call with the same title continues it).
fn section(roff: &mut String, title: &str, items: &[(&str, &str)]) {
    if !roff.contains(&format!(".SH {title}\n")) {
        let _ = writeln!(roff, ".SH {title}");
    }
    for (term, text) in items {
        let _ = writeln!(roff, ".TP\n\\fB{}\\fR\n{}", escape(term), escape(text));
    }
}

/// Text safe in a roff line: backslashes doubled, `-` as a real minus (options), and a leading
/// `.` or `'` (a control line) guarded by a zero-width `\&`.
fn escape(text: &str) -> String {
    let s = text.replace('\\', "\\\\").replace('-', "\\-");
    if s.starts_with('.') || s.starts_with('\'') { format!("\\&{s}") } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roff_control_characters_in_text_are_escaped() {
        assert_eq!(escape(".SH x"), "\\&.SH x");
        assert_eq!(escape("a\\b --c"), "a\\\\b \\-\\-c");
    }

    #[test]
    fn every_page_gets_files_environment_and_exit_status_and_the_shell_its_commands() {
        let root = extra_sections("qpq");
        for title in ["EXAMPLES", "FILES", "ENVIRONMENT", "EXIT STATUS"] {
            assert_eq!(root.matches(&format!(".SH {title}\n")).count(), 1, "{title} once in {root}");
        }
        assert!(root.contains("QPQ_PASSPHRASE") && root.contains("qpq.db"));
        let serve = extra_sections("qpq-serve");
        assert!(serve.contains("QPQ_LISTEN") && !serve.contains("QPQ_PASSPHRASE"));
        let shell = extra_sections("qpq-shell");
        assert!(shell.contains(".SH COMMANDS") && shell.contains("/say TEXT"), "{shell}");
    }
}
