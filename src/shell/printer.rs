//! Where shell output goes, so that a message arriving while someone types never mangles their
//! half-written line.
//!
//! Command output is written straight to stdout: the core loop runs a command only after the
//! editor returned its line and shows the next prompt only after the output, so nothing is
//! being edited meanwhile. Things that arrive on their own (messages, membership events,
//! connection status) go through rustyline's `ExternalPrinter` while a prompt is up: it clears
//! the input line, prints above it, and redraws the prompt with the typed text intact.
//!
//! The external printer can block (its queue holds one message until the editor reads it), so
//! it lives on a thread of its own fed by a channel: the core loop never waits on the terminal.
//! Without a terminal (scripts, tests) there is no editor: everything is a plain line, with
//! errors and status on stderr so stdout stays data.
//!
//! Every line passes [`crate::text::guard`] on its way out, terminal or not: whatever a caller
//! forgot to escape (an error quoting peer data, a name) reaches the screen as visible escapes,
//! never as control sequences. Messages are laid out before ([`crate::text::message`]).

use std::cell::Cell;
use std::io::Write;
use std::sync::mpsc;

use crate::text::guard;

/// How the shell talks to its user.
pub struct Printer {
    mode: Mode,
    /// True while the editor shows a prompt (set by the core loop).
    editing: Cell<bool>,
}

enum Mode {
    /// A terminal with a line editor; the channel feeds the external-printer thread.
    Terminal(mpsc::Sender<String>),
    /// Lines on stdout and stderr.
    Plain,
}

/// The kind of a line, which decides its stream without a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Command output and messages: stdout.
    Data,
    /// `error: ...` lines, connection status, notices: stderr without a terminal.
    Status,
}

impl Printer {
    /// Plain lines for scripts.
    pub fn plain() -> Printer {
        Printer { mode: Mode::Plain, editing: Cell::new(false) }
    }

    /// A terminal whose asynchronous lines go to `external`.
    pub fn terminal(external: mpsc::Sender<String>) -> Printer {
        Printer { mode: Mode::Terminal(external), editing: Cell::new(false) }
    }

    /// The core loop says whether a prompt is up.
    pub fn set_editing(&self, editing: bool) {
        self.editing.set(editing);
    }

    /// Prints `text` (one or more lines, without the final newline), escaped by the guard.
    pub fn line(&self, kind: Kind, text: &str) {
        let text = format!("{}\n", guard(text.trim_end_matches('\n')));
        match &self.mode {
            Mode::Terminal(tx) if self.editing.get() => {
                if tx.send(text.clone()).is_err() {
                    // The printer thread is gone (the editor failed): plain output still works.
                    write_out(&text);
                }
            }
            Mode::Terminal(_) => write_out(&text),
            Mode::Plain => match kind {
                Kind::Data => write_out(&text),
                Kind::Status => {
                    let mut err = std::io::stderr().lock();
                    let _ = err.write_all(text.as_bytes());
                    let _ = err.flush();
                }
            },
        }
    }

    pub fn data(&self, text: &str) {
        self.line(Kind::Data, text);
    }

    pub fn status(&self, text: &str) {
        self.line(Kind::Status, &format!("* {text}"));
    }

    pub fn error(&self, text: &str) {
        self.line(Kind::Status, &format!("error: {text}"));
    }
}

fn write_out(text: &str) {
    let mut out = std::io::stdout().lock();
    // A closed stdout (`qpq shell | head`) must not kill the shell mid-command.
    let _ = out.write_all(text.as_bytes());
    let _ = out.flush();
}

/// Runs the external printer until the core drops its sender.
pub fn spawn_external(
    mut printer: impl rustyline::ExternalPrinter + Send + 'static,
    lines: mpsc::Receiver<String>,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("qpq-printer".into()).spawn(move || {
        for text in lines {
            if printer.print(text.clone()).is_err() {
                write_out(&text);
            }
        }
    })
}

/// Without an external printer (the terminal refused one), asynchronous lines are written as is.
pub fn spawn_fallback(lines: mpsc::Receiver<String>) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new().name("qpq-printer".into()).spawn(move || {
        for text in lines {
            write_out(&text);
        }
    })
}
