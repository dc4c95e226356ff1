//! Where lines come from: the rustyline editor on a terminal, or stdin line by line in scripts.
//!
//! Both read on a std thread of their own (rustyline's `readline` and stdin reads block) and
//! send [`Input`]s to the core loop over a channel, so the core can `select!` between the next
//! line and incoming messages. The editor reads a line only when the core asks with a prompt:
//! the core shows the prompt after the previous line's output, so output order is right and
//! the prompt shows the conversation `/chat` just opened. Its history keeps commands only
//! ([`history`]): the request says whether a conversation is open, since that decides whether a
//! bare line is a command or text.

use std::io::BufRead;
use std::path::{Path, PathBuf};
use std::sync::mpsc;
use std::thread::JoinHandle;

use nix::sys::termios::{self, LocalFlags, SetArg, Termios};
use rustyline::error::ReadlineError;
use rustyline::history::FileHistory;
use rustyline::{CompletionType, Config, Editor};
use tokio::sync::mpsc::{Receiver, Sender, channel};

use crate::shell::complete::{SharedNames, ShellHelper};
use crate::shell::{history, printer};

/// The history file in the home.
pub const HISTORY_FILE: &str = "history";
/// Lines kept in it: enough for weeks of chat commands, small enough to load instantly.
pub const MAX_HISTORY_LINES: usize = 1000;
/// Longest script line read: the longest message with room for its command. A longer line is
/// skipped (and counts as failed) without being held in memory.
pub const MAX_SCRIPT_LINE_BYTES: usize = crate::client::messenger::MAX_TEXT_BYTES + 4096;
/// Lines read ahead of the core: the reader waits for the core beyond this, so a script fed
/// faster than it runs (`yes | qpq shell`) costs bounded memory.
const READ_AHEAD_LINES: usize = 16;

/// What a line source reports.
#[derive(Debug)]
pub enum Input {
    Line(String),
    /// Ctrl-C at the prompt: the typed line is dropped, the shell goes on.
    Interrupted,
    /// End of input (Ctrl-D, or the end of a script).
    Eof,
    /// Something to tell the user (e.g. the history file cannot be written).
    Notice(String),
    /// A line that could not be read (not utf-8); it counts as a failed line.
    Bad(String),
    /// The source broke; the shell ends.
    Failed(String),
}

/// The core asks the editor for a line.
struct Ask {
    prompt: String,
    /// A conversation is open: a bare line is text, never kept in the history.
    in_conversation: bool,
}

/// A running line source.
pub struct LineSource {
    pub lines: Receiver<Input>,
    /// Prompts for the editor; None for stdin, which reads ahead on its own.
    prompts: Option<mpsc::Sender<Ask>>,
    thread: Option<JoinHandle<()>>,
}

impl LineSource {
    /// The line editor, with `history` as its file and `prints` feeding its external printer.
    pub fn editor(
        history: PathBuf,
        names: SharedNames,
        prints: mpsc::Receiver<String>,
    ) -> std::io::Result<Self> {
        let (tx, lines) = channel(READ_AHEAD_LINES);
        let (prompts, prompt_rx) = mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("qpq-editor".into())
            .spawn(move || run_editor(&history, names, prints, prompt_rx, tx))?;
        Ok(LineSource { lines, prompts: Some(prompts), thread: Some(thread) })
    }

    /// Lines of stdin.
    pub fn stdin() -> std::io::Result<Self> {
        let (tx, lines) = channel(READ_AHEAD_LINES);
        // Not joined: a read blocked on stdin must not keep the shell from exiting.
        std::thread::Builder::new().name("qpq-stdin".into()).spawn(move || read_stdin(tx))?;
        Ok(LineSource { lines, prompts: None, thread: None })
    }

    pub fn is_editor(&self) -> bool {
        self.prompts.is_some()
    }

    /// Asks the editor for the next line, showing `prompt` (a no-op for stdin).
    pub fn request(&self, prompt: &str, in_conversation: bool) {
        if let Some(p) = &self.prompts {
            // If the editor thread ended it already sent Eof or Failed, which ends the shell.
            let _ = p.send(Ask { prompt: prompt.to_string(), in_conversation });
        }
    }

    /// Stops the editor and waits for it to give the terminal back.
    pub fn close(mut self) {
        self.prompts = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The terminal without echo while the shell runs: what is typed while it is busy (starting,
/// running a command) shows once, when the editor reads it into the prompt line. With the
/// terminal's echo it showed twice (exploratory testing): echoed where the cursor was, then
/// again in the prompt. The editor turns its raw mode on and off around each line and goes
/// back to this; dropping it restores the terminal as it was.
pub struct NoEcho {
    saved: Termios,
}

impl NoEcho {
    /// Turns echo off on stdin's terminal; None when stdin is no terminal or it cannot.
    pub fn on_stdin() -> Option<NoEcho> {
        let stdin = std::io::stdin();
        let saved = termios::tcgetattr(&stdin).ok()?;
        let mut quiet = saved.clone();
        quiet.local_flags.remove(LocalFlags::ECHO | LocalFlags::ECHONL);
        termios::tcsetattr(&stdin, SetArg::TCSANOW, &quiet).ok()?;
        Some(NoEcho { saved })
    }
}

impl Drop for NoEcho {
    fn drop(&mut self) {
        let _ = termios::tcsetattr(std::io::stdin(), SetArg::TCSANOW, &self.saved);
    }
}

fn editor_config() -> rustyline::Result<Config> {
    Ok(Config::builder()
        .max_history_size(MAX_HISTORY_LINES)?
        .history_ignore_dups(true)?
        .history_ignore_space(true)
        .auto_add_history(false)
        .completion_type(CompletionType::List)
        .build())
}

fn run_editor(
    history: &Path,
    names: SharedNames,
    prints: mpsc::Receiver<String>,
    prompts: mpsc::Receiver<Ask>,
    tx: Sender<Input>,
) {
    let editor = editor_config().and_then(Editor::<ShellHelper, FileHistory>::with_config);
    let mut editor = match editor {
        Ok(e) => e,
        Err(e) => {
            let _ = tx.blocking_send(Input::Failed(format!("cannot start the line editor: {e}")));
            return;
        }
    };
    editor.set_helper(Some(ShellHelper::new(names)));
    match history::clean_file(history) {
        Ok(true) => {
            let msg = format!(
                "removed message text and unknown lines from {}: it keeps commands only",
                history.display()
            );
            let _ = tx.blocking_send(Input::Notice(msg));
        }
        Ok(false) => {}
        Err(e) => {
            let _ =
                tx.blocking_send(Input::Notice(format!("cannot clean history {}: {e}", history.display())));
        }
    }
    match editor.load_history(history) {
        Ok(()) => {}
        Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => {
            let _ =
                tx.blocking_send(Input::Notice(format!("cannot read history {}: {e}", history.display())));
        }
    }
    // The printer thread ends when the core drops its Printer, before it closes this source.
    let started = match editor.create_external_printer() {
        Ok(p) => printer::spawn_external(p, prints),
        Err(_) => printer::spawn_fallback(prints),
    };
    if let Err(e) = started {
        let _ = tx.blocking_send(Input::Notice(format!("cannot start the printer thread: {e}")));
    }
    let mut history_warned = false;
    while let Ok(Ask { prompt, in_conversation }) = prompts.recv() {
        let input = match editor.readline(&prompt) {
            Ok(line) => {
                if let Some(entry) = history::entry_for(&line, in_conversation) {
                    let kept = editor.add_history_entry(entry);
                    // Appended at once, so a crash or a second terminal keeps the line.
                    if let Err(e) = kept.and_then(|_| editor.append_history(history))
                        && !history_warned
                    {
                        history_warned = true;
                        let msg = format!("cannot write history {}: {e}", history.display());
                        let _ = tx.blocking_send(Input::Notice(msg));
                    }
                }
                Input::Line(line)
            }
            Err(ReadlineError::Interrupted) => Input::Interrupted,
            Err(ReadlineError::Eof) => Input::Eof,
            // A byte that is not utf-8 (a Latin-1 paste, an 8-bit meta key): the line is lost,
            // the shell is not.
            Err(ReadlineError::Io(e)) if e.kind() == std::io::ErrorKind::InvalidData => {
                Input::Bad("the line is not utf-8 text: skipped".into())
            }
            Err(e) => Input::Failed(format!("line editor: {e}")),
        };
        let last = matches!(input, Input::Eof | Input::Failed(_));
        if tx.blocking_send(input).is_err() || last {
            break;
        }
    }
}

fn read_stdin(tx: Sender<Input>) {
    let stdin = std::io::stdin();
    let mut stdin = stdin.lock();
    let mut n = 0usize;
    loop {
        n += 1;
        let input = match read_line_bounded(&mut stdin, MAX_SCRIPT_LINE_BYTES) {
            Ok(Line::End) => Input::Eof,
            Ok(Line::TooLong) => {
                Input::Bad(format!("line {n} is longer than {MAX_SCRIPT_LINE_BYTES} bytes: skipped"))
            }
            Ok(Line::Bytes(buf)) => match String::from_utf8(buf) {
                Ok(s) => Input::Line(s.trim_end_matches(['\n', '\r']).to_string()),
                Err(_) => Input::Bad(format!("line {n} is not utf-8 text: skipped")),
            },
            Err(e) => Input::Failed(format!("cannot read stdin: {e}")),
        };
        let last = matches!(input, Input::Eof | Input::Failed(_));
        if tx.blocking_send(input).is_err() || last {
            return;
        }
    }
}

/// One line read by [`read_line_bounded`].
#[derive(Debug, PartialEq, Eq)]
enum Line {
    /// The line with its newline (none at the end of input).
    Bytes(Vec<u8>),
    /// Longer than the bound: read to its end and dropped.
    TooLong,
    /// Nothing more to read.
    End,
}

/// Reads one line holding at most `max` bytes of it in memory: a longer one is consumed up to
/// its newline, a buffer at a time, and reported [`Line::TooLong`].
fn read_line_bounded(r: &mut impl BufRead, max: usize) -> std::io::Result<Line> {
    let mut buf = Vec::new();
    let mut too_long = false;
    loop {
        let chunk = match r.fill_buf() {
            Ok(c) => c,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if chunk.is_empty() {
            return Ok(match (too_long, buf.is_empty()) {
                (true, _) => Line::TooLong,
                (false, true) => Line::End,
                (false, false) => Line::Bytes(buf),
            });
        }
        let (take, done) = match chunk.iter().position(|&b| b == b'\n') {
            Some(i) => (i + 1, true),
            None => (chunk.len(), false),
        };
        if !too_long {
            if buf.len() + take > max {
                too_long = true;
                buf = Vec::new();
            } else {
                buf.extend_from_slice(chunk.get(..take).unwrap_or(chunk));
            }
        }
        r.consume(take);
        if done {
            return Ok(if too_long { Line::TooLong } else { Line::Bytes(buf) });
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_read_within_a_bound_and_a_longer_one_is_skipped_whole() {
        let input = b"short\n0123456789abcdef\nnext\nlast";
        // A small buffer, so that the long line spans several fills.
        let mut r = std::io::BufReader::with_capacity(4, &input[..]);
        let mut lines = Vec::new();
        loop {
            let line = read_line_bounded(&mut r, 8).unwrap();
            if line == Line::End {
                break;
            }
            lines.push(line);
        }
        assert_eq!(
            lines,
            [
                Line::Bytes(b"short\n".to_vec()),
                Line::TooLong,
                Line::Bytes(b"next\n".to_vec()),
                Line::Bytes(b"last".to_vec()),
            ]
        );
        let mut endless = std::io::Read::take(std::io::repeat(b'x'), 1 << 20);
        let mut endless = std::io::BufReader::new(&mut endless);
        assert_eq!(read_line_bounded(&mut endless, 1024).unwrap(), Line::TooLong);
    }
}
