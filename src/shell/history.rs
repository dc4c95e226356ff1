//! What the shell's history file may hold: commands only, never message text.
//!
//! The history file (`<home>/history`) is plain text outside the encrypted state, so anything in
//! it is readable by whoever reads the disk. It therefore keeps the lines that are commands
//! (`/chat bob`, `/group list`, `/contact add bob KEY`) and never a line that carries text for
//! someone: `@bob hi`, `#team hi`, `/say ...`, `send bob hi`, plain lines in an open
//! conversation. A line that does not parse, a help request (`send bob hi --help`), a line
//! typed with a leading space (bash's ignorespace) and any line of a secret verb are not kept
//! either, nor a history search (`/history --grep WORD`): what someone looks for in their
//! messages says as much as the messages.
//!
//! A kept line is written in its slash form (`whoami` typed in the lobby is kept as
//! `/whoami`): it then means the same wherever it is recalled (bare, it would be sent as text
//! inside a conversation), and the file can be checked without knowing where a line was typed.
//! That check runs when the editor starts: every line that would not be kept today is removed
//! (a file written by an older qpq kept message text), and the file is made owner-only (0600).
//! Bare lines from such files are removed too: whether `group list` was a command or a message
//! depended on a conversation being open, which the file does not say.

use std::io;
use std::path::Path;

use crate::cli::client::ClientVerb;
use crate::fsutil;
use crate::limits::MAX_HISTORY_FILE_BYTES;
use crate::shell::grammar::{self, Action};

/// First line of rustyline's history format 2, in which `\` and newlines are escaped.
const FORMAT_V2: &str = "#V2";

/// Verbs whose lines may carry a secret: never kept, should such a verb ever exist.
const SECRET_VERBS: &[&str] = &["passphrase"];

/// The history line for `line` typed with or without an open conversation, or None if the
/// line must not be kept.
pub fn entry_for(line: &str, in_conversation: bool) -> Option<String> {
    if line.trim().is_empty()
        || line.starts_with(char::is_whitespace)
        || line.contains('\n')
        || is_secret(line)
    {
        return None;
    }
    let command = match grammar::parse(line, in_conversation).ok()? {
        Action::Verb(ClientVerb::Send(_)) | Action::Say { .. } | Action::Show(_) | Action::Nothing => false,
        Action::History(h) | Action::Verb(ClientVerb::History(h)) if h.grep.is_some() => false,
        Action::Verb(_) | Action::Chat(_) | Action::History(_) | Action::Help(_) | Action::Quit => true,
    };
    let line = line.trim_end();
    command.then(|| if line.starts_with('/') { line.to_string() } else { format!("/{line}") })
}

/// Whether a line found in the history file is one [`entry_for`] would write today.
pub fn keeps(entry: &str) -> bool {
    // As typed in a conversation: a bare line there is text.
    entry_for(entry, true).as_deref() == Some(entry)
}

fn is_secret(line: &str) -> bool {
    let mut words = line.trim_start_matches('/').split_whitespace().peekable();
    if words.peek() == Some(&"qpq") {
        words.next();
    }
    let verb = words.next().unwrap_or("").trim_start_matches('/').to_ascii_lowercase();
    SECRET_VERBS.contains(&verb.as_str())
}

/// Removes from the history file at `path` every line [`keeps`] refuses and makes it owner-only;
/// true when something was removed. A file larger than [`MAX_HISTORY_FILE_BYTES`] is emptied
/// whole. A missing file is fine (rustyline creates it 0600).
pub fn clean_file(path: &Path) -> io::Result<bool> {
    let bytes = match fsutil::read_bounded(path, MAX_HISTORY_FILE_BYTES) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(false),
        Err(e) if e.kind() == io::ErrorKind::FileTooLarge => {
            fsutil::write_atomic(path, format!("{FORMAT_V2}\n").as_bytes(), 0o600)?;
            return Ok(true);
        }
        Err(e) => return Err(e),
    };
    let (kept, removed) = clean(&String::from_utf8_lossy(&bytes));
    if removed > 0 {
        // A new file (rename): the old lines are not left in the one rustyline appends to.
        fsutil::write_atomic(path, kept.as_bytes(), 0o600)?;
    } else {
        restrict_permissions(path)?;
    }
    Ok(removed > 0)
}

/// The cleaned file text (always format 2) and the number of lines removed.
fn clean(file: &str) -> (String, usize) {
    let mut lines = file.lines().peekable();
    let v2 = lines.peek() == Some(&FORMAT_V2);
    if v2 {
        lines.next();
    }
    let mut out = format!("{FORMAT_V2}\n");
    let mut removed = if v2 { 0 } else { 1 }; // an old-format file is rewritten in any case
    for line in lines {
        let entry = if v2 { unescape(line) } else { line.to_string() };
        if keeps(&entry) {
            out.push_str(&entry.replace('\\', "\\\\"));
            out.push('\n');
        } else {
            removed += 1;
        }
    }
    (out, removed)
}

/// Undoes format 2's escapes (`\\` and `\n`).
fn unescape(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

fn restrict_permissions(path: &Path) -> io::Result<()> {
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    }
    #[cfg(not(unix))]
    let _ = path;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commands_are_kept_in_their_slash_form() {
        assert_eq!(entry_for("whoami", false).as_deref(), Some("/whoami"));
        assert_eq!(entry_for("group list  ", false).as_deref(), Some("/group list"));
        assert_eq!(entry_for("/chat bob", true).as_deref(), Some("/chat bob"));
        assert_eq!(entry_for("/history 5", true).as_deref(), Some("/history 5"));
        assert_eq!(entry_for("contact add bob 6a3f", false).as_deref(), Some("/contact add bob 6a3f"));
        assert_eq!(entry_for("/q", true).as_deref(), Some("/q"));
        assert_eq!(entry_for("qpq whoami", false).as_deref(), Some("/qpq whoami"));
    }

    #[test]
    fn message_text_is_never_kept() {
        for (line, conv) in [
            ("@bob hi", false),
            ("@bob hi", true),
            ("#team hi", false),
            ("/say hi", true),
            ("send bob hi", false),
            ("/send #team hi", true),
            ("qpq send bob hi", false),
            ("hello there", true),
            ("whoami", true),       // inside a conversation this is a message
            ("hello there", false), // not a command: unknown verbs are not kept either
            ("send bob hi --help", false),
            (" whoami", false),
            ("", false),
            ("passphrase hunter2", false),
            ("/Passphrase", true),
            ("qpq passphrase new", false),
            ("/history --grep salary", true),
            ("history bob --grep salary", false),
            ("qpq history --grep salary -n 5", false),
        ] {
            assert_eq!(entry_for(line, conv), None, "{line:?} in a conversation: {conv}");
        }
    }

    #[test]
    fn cleaning_keeps_only_slash_commands_and_is_idempotent() {
        let old = "#V2\nwhoami\n@bob secret one\n/chat bob\nhello from a conversation\n/send bob secret two\n\
                   /contact add a\\\\b 6a3f\n/group list\n";
        let (clean_text, removed) = clean(old);
        assert_eq!(clean_text, "#V2\n/chat bob\n/contact add a\\\\b 6a3f\n/group list\n");
        assert_eq!(removed, 4);
        assert_eq!(clean(&clean_text), (clean_text.clone(), 0));
        // A file in the old format (no header) is rewritten in format 2.
        assert_eq!(clean("/whoami\nhi\n"), ("#V2\n/whoami\n".to_string(), 2));
    }

    #[test]
    fn cleaning_a_file_removes_text_and_makes_it_owner_only() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("history");
        assert!(!clean_file(&path).unwrap(), "no file yet");
        std::fs::write(&path, "#V2\n/whoami\n@bob the secret\n").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        }
        assert!(clean_file(&path).unwrap());
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "#V2\n/whoami\n");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        }
    }
}
