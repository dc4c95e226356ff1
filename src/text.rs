//! Peer text made safe to print: the one sanitiser every printer of peer-supplied strings uses.
//!
//! Anything a peer sends (message text, and anything that may one day carry a name they chose)
//! reaches a terminal. Raw, it is a remote control: `ESC ] 0 ; ... BEL` retitles the window,
//! `ESC [ 2 J` clears the screen, `CR` returns to column 0 and overwrites what we printed, a
//! right-to-left override (U+202E) reorders the rest of the line, and a newline followed by
//! `bob: ...` forges a whole message. This module turns such strings into text that shows what
//! was sent and does nothing else (compare the "Trojan Source" advisory, CVE-2021-42574, and
//! xterm's control sequences, ECMA-48).
//!
//! # What is escaped
//! Visibly, never dropped and never passed raw:
//! - C0 controls (U+0000–U+001F), DEL (U+007F): `\x1b`, `\x00`, `\x07`, `\x7f`; tab, CR and LF
//!   as `\t`, `\r`, `\n` where they are not given a layout (below).
//! - C1 controls (U+0080–U+009F, e.g. the 8-bit CSI U+009B): `\u{9b}`.
//! - Bidi controls: embeddings and overrides U+202A–U+202E, isolates U+2066–U+2069, marks
//!   U+200E, U+200F and U+061C: `\u{202e}`.
//! - Other invisible format characters that can hide or fake text: soft hyphen U+00AD,
//!   Mongolian vowel separator U+180E, zero width space U+200B, word joiner and invisible
//!   operators U+2060–U+2064, deprecated format controls U+206A–U+206F, BOM U+FEFF, interlinear
//!   annotation U+FFF9–U+FFFB, the line and paragraph separators U+2028 and U+2029, Hangul
//!   fillers U+115F, U+1160, U+3164, U+FFA0, shorthand format controls U+1BCA0–U+1BCA3, musical
//!   format controls U+1D173–U+1D17A and the language tag U+E0001.
//!
//! Kept as they are: everything else, so accents, CJK, combining marks and emoji survive, with
//! the joiners emoji and Indic/Persian scripts need (ZWNJ U+200C, ZWJ U+200D), variation
//! selectors, and the tag characters U+E0020–U+E007F of subdivision flags. A backslash is not
//! doubled: the escapes are for eyes, and `recv --json` carries the exact text.
//!
//! # Where it applies
//! - [`Shown`] (a `Display` wrapper) and [`shown`]: one-line strings such as names and event
//!   lines; newlines are escaped too.
//! - [`message`]: a message under its header. Lines of a multi-line text are continued on
//!   lines indented by the header's width (on a terminal, at most half of its width), so a
//!   continuation never starts at column 0 and cannot pose as another sender; CRLF counts as
//!   one line break, a lone CR is escaped, a tab becomes [`TAB_SPACES`] spaces.
//! - [`guard`]: the last pass over whole blocks of output (the shell's printer, `recv`): like
//!   [`Shown`] but newlines stay. It is idempotent (an escape is plain ASCII), so text made safe
//!   earlier passes unchanged.
//! - [`json_line`]: JSON with every escaped character written as a `\uXXXX` escape, so the
//!   exact text round-trips and the line is safe on a terminal too.

use std::borrow::Cow;
use std::fmt;

/// Spaces a tab in a message becomes: wide enough to read as indentation, and fixed because the
/// column a tab would reach depends on the terminal and the header.
pub const TAB_SPACES: usize = 4;

/// True for a character that must not reach a terminal as is.
pub fn is_unsafe(c: char) -> bool {
    matches!(c,
        '\u{0}'..='\u{1f}' | '\u{7f}'..='\u{9f}'
        | '\u{ad}' | '\u{61c}' | '\u{115f}' | '\u{1160}' | '\u{180e}'
        | '\u{200b}' | '\u{200e}' | '\u{200f}' | '\u{2028}'..='\u{202e}'
        | '\u{2060}'..='\u{2064}' | '\u{2066}'..='\u{206f}'
        | '\u{3164}' | '\u{feff}' | '\u{ffa0}' | '\u{fff9}'..='\u{fffb}'
        | '\u{1bca0}'..='\u{1bca3}' | '\u{1d173}'..='\u{1d17a}' | '\u{e0001}')
}

/// Writes the visible escape of an unsafe character.
fn write_escape(out: &mut impl fmt::Write, c: char) -> fmt::Result {
    match c {
        '\t' => out.write_str("\\t"),
        '\r' => out.write_str("\\r"),
        '\n' => out.write_str("\\n"),
        c if (c as u32) < 0x80 => write!(out, "\\x{:02x}", c as u32),
        c => write!(out, "\\u{{{:x}}}", c as u32),
    }
}

/// Writes `s` with every unsafe character escaped, except those `keep` lets through.
fn write_escaped(out: &mut impl fmt::Write, s: &str, keep: impl Fn(char) -> bool) -> fmt::Result {
    let mut rest = s;
    while let Some((i, c)) = rest.char_indices().find(|&(_, c)| is_unsafe(c) && !keep(c)) {
        out.write_str(&rest[..i])?;
        write_escape(out, c)?;
        rest = &rest[i + c.len_utf8()..];
    }
    out.write_str(rest)
}

/// A string shown on one line with everything unsafe escaped, newlines included:
/// `format!("{} joined", Shown(name))`.
#[derive(Debug, Clone, Copy)]
pub struct Shown<'a>(pub &'a str);

impl fmt::Display for Shown<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_escaped(f, self.0, |_| false)
    }
}

/// [`Shown`] as a `String`.
pub fn shown(s: &str) -> String {
    Shown(s).to_string()
}

/// At most the first `max_chars` characters of `s`, [`Shown`]: a stranger's sentence (a server's
/// error or close reason) as one line of bounded length.
pub fn shown_at_most(s: &str, max_chars: usize) -> String {
    let start = s.char_indices().nth(max_chars).and_then(|(end, _)| s.get(..end)).unwrap_or(s);
    shown(start)
}

/// How much of what someone typed an error quotes back.
pub const TYPED_SHOWN_CHARS: usize = 64;

/// What someone typed, to quote back in an error: its first [`TYPED_SHOWN_CHARS`] characters,
/// and `…` when there was more (a pasted page read back in full buries the sentence). Not
/// escaped: the error's own display does that.
pub fn clipped(s: &str) -> Cow<'_, str> {
    match s.char_indices().nth(TYPED_SHOWN_CHARS) {
        Some((end, _)) => Cow::Owned(format!("{}\u{2026}", s.get(..end).unwrap_or(s))),
        None => Cow::Borrowed(s),
    }
}

/// Whole lines of output with everything unsafe escaped but their line breaks kept.
pub fn guard(s: &str) -> Cow<'_, str> {
    if !s.chars().any(|c| is_unsafe(c) && c != '\n') {
        return Cow::Borrowed(s);
    }
    let mut out = String::with_capacity(s.len() + 16);
    // Writing into a String cannot fail.
    let _ = write_escaped(&mut out, s, |c| c == '\n');
    Cow::Owned(out)
}

/// A message as lines for people: `header` (made of safe parts by the caller, e.g. `bob: `)
/// followed by `body`, whose further lines are indented by the header's width (at least two
/// columns), so none of them starts at column 0.
pub fn message(header: &str, body: &str) -> String {
    message_for_width(header, body, None)
}

/// [`message`] for a terminal `width` columns wide (None: not a terminal). A line that would
/// not fit is broken where the terminal would wrap it, onto a continuation line indented like
/// the others: left to the terminal, the wrapped part starts at column 0, and a peer padding a
/// line to the width could start it with `alice: ` and pass for another message.
///
/// Widths are over-estimated, never under: a character counts its wider (East Asian) width,
/// one followed by U+FE0F (emoji presentation, `❤️`) counts two, as terminals draw it, and
/// every character counts at least one but a few known to be drawn as nothing (joiners,
/// variation selectors, tags, Latin combining accents). A row broken early is harmless; one
/// the terminal wraps is the spoof. The indent is at most half the terminal's width (and at
/// least two columns), so every continuation row keeps at least half its width for text.
pub fn message_for_width(header: &str, body: &str, width: Option<usize>) -> String {
    let header = guard(header);
    let header_cols = columns(&header);
    // On a terminal, at most half its width: under a header nearly as wide (a long claimed
    // name in a long group name) each row would hold a few columns of text, and a long message
    // would become many times its size in indent and rows.
    let indent_cols = match width {
        Some(w) => header_cols.min(w / 2).max(2),
        None => header_cols.max(2),
    };
    let indent = " ".repeat(indent_cols);
    let mut out = String::with_capacity(header.len() + body.len() + 16);
    // A header wider than the terminal (a long claimed name in a long group name) is broken
    // like the body: wrapped by the terminal, its rest would start at column 0.
    let mut header_end = match width {
        Some(w) => push_rows(&mut out, &header, 0, &indent, w),
        None => {
            out.push_str(&header);
            header_cols
        }
    };
    let mut line_buf = String::new();
    for (n, line) in body.split('\n').enumerate() {
        if n > 0 {
            out.push('\n');
            out.push_str(&indent);
            header_end = indent.len();
        }
        // CRLF is a line break like LF; any other CR is escaped below.
        let line = line.strip_suffix('\r').unwrap_or(line);
        let line = line.replace('\t', &" ".repeat(TAB_SPACES));
        line_buf.clear();
        let _ = write_escaped(&mut line_buf, &line, |_| false);
        match width {
            Some(w) => {
                push_rows(&mut out, &line_buf, header_end, &indent, w);
            }
            None => out.push_str(&line_buf),
        }
    }
    out
}

/// Pushes `text` (escaped: no control characters) onto `out` from column `used` of a row
/// `width` columns wide, breaking onto a new row that starts with `indent` before any
/// character the row has no room for; returns the column after it. A new row always takes at
/// least one character, so a terminal narrower than a character still makes progress.
fn push_rows(out: &mut String, text: &str, mut used: usize, indent: &str, width: usize) -> usize {
    let mut fresh_row = used == 0;
    let mut chars = text.chars().peekable();
    while let Some(c) = chars.next() {
        let w = char_columns(c, chars.peek() == Some(&'\u{fe0f}'));
        if used + w > width && !fresh_row {
            out.push('\n');
            out.push_str(indent);
            used = indent.len();
        }
        out.push(c);
        used += w;
        fresh_row = false;
    }
    used
}

/// Columns `s` takes on a terminal (escaped text: no control characters), over-estimated as
/// [`message_for_width`] does.
fn columns(s: &str) -> usize {
    let mut chars = s.chars().peekable();
    let mut n = 0;
    while let Some(c) = chars.next() {
        n += char_columns(c, chars.peek() == Some(&'\u{fe0f}'));
    }
    n
}

/// The most columns a terminal may give `c`: its East Asian width where that is wider, two
/// when an emoji presentation selector (U+FE0F) follows it, and at least one unless it is
/// [`drawn_as_nothing`].
fn char_columns(c: char, emoji_presentation: bool) -> usize {
    use unicode_width::UnicodeWidthChar;
    if drawn_as_nothing(c) {
        return 0;
    }
    // Not unicode-width's 0: it gives none to characters terminals draw one column wide
    // (prepend characters such as U+0D4E and U+A8FA, unassigned default-ignorables
    // such as U+2065 and U+FFF0-U+FFF8, marks newer than the terminal's tables), and a line
    // padded with them would fit here and wrap there.
    let w = c.width().unwrap_or(0).max(c.width_cjk().unwrap_or(0)).max(1);
    if emoji_presentation { w.max(2) } else { w }
}

/// True for the few characters every terminal draws as nothing, joined to the one before:
/// the joiners ZWNJ and ZWJ, variation selectors, the tag characters of subdivision flags,
/// and the Latin, Greek and Cyrillic combining diacritics (U+0300-U+036F, assigned since
/// Unicode 4.1, e.g. the accents of decomposed text). Every other character counts a column
/// or more: other combining marks (Indic vowel signs, Arabic harakat) then break a line early,
/// which is harmless.
fn drawn_as_nothing(c: char) -> bool {
    matches!(c,
        '\u{200c}' | '\u{200d}' | '\u{fe00}'..='\u{fe0f}' | '\u{e0100}'..='\u{e01ef}'
        | '\u{e0020}'..='\u{e007f}' | '\u{300}'..='\u{36f}')
}

/// `value` as one line of JSON in which every character [`is_unsafe`] marks is a `\uXXXX`
/// escape (RFC 8259 section 7), so the exact text round-trips and nothing raw reaches a terminal.
pub fn json_line(value: &serde_json::Value) -> String {
    let mut buf = Vec::new();
    let mut ser = serde_json::Serializer::with_formatter(&mut buf, SafeJson);
    match serde::Serialize::serialize(value, &mut ser) {
        // The formatter writes only ASCII escapes and whole UTF-8 fragments.
        Ok(()) => String::from_utf8(buf).unwrap_or_default(),
        Err(_) => String::new(),
    }
}

/// serde_json's compact formatter, but with unsafe characters escaped as well (serde_json
/// escapes only C0, `"` and `\`).
struct SafeJson;

impl serde_json::ser::Formatter for SafeJson {
    fn write_string_fragment<W: ?Sized + std::io::Write>(
        &mut self,
        writer: &mut W,
        fragment: &str,
    ) -> std::io::Result<()> {
        let mut rest = fragment;
        while let Some((i, c)) = rest.char_indices().find(|&(_, c)| is_unsafe(c)) {
            writer.write_all(&rest.as_bytes()[..i])?;
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                write!(writer, "\\u{:04x}", unit)?;
            }
            rest = &rest[i + c.len_utf8()..];
        }
        writer.write_all(rest.as_bytes())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_was_typed_is_quoted_back_clipped() {
        assert_eq!(clipped("bob"), "bob");
        let exact = "\u{e9}".repeat(TYPED_SHOWN_CHARS);
        assert_eq!(clipped(&exact), exact);
        let long = format!("{exact}tail");
        assert_eq!(clipped(&long), format!("{exact}\u{2026}"));
    }

    #[test]
    fn terminal_controls_are_escaped_visibly() {
        assert_eq!(shown("\x1b]0;title\x07"), "\\x1b]0;title\\x07");
        assert_eq!(shown("\x1b[2J"), "\\x1b[2J");
        assert_eq!(shown("a\0b\x7fc"), "a\\x00b\\x7fc");
        assert_eq!(shown("\u{9b}31m"), "\\u{9b}31m");
        assert_eq!(shown("\u{85}"), "\\u{85}");
        assert_eq!(shown("a\tb\rc\nd"), "a\\tb\\rc\\nd");
    }

    #[test]
    fn bidi_and_invisible_format_characters_are_escaped() {
        for (c, esc) in [
            ('\u{202a}', "\\u{202a}"),
            ('\u{202e}', "\\u{202e}"),
            ('\u{2066}', "\\u{2066}"),
            ('\u{2069}', "\\u{2069}"),
            ('\u{200e}', "\\u{200e}"),
            ('\u{200f}', "\\u{200f}"),
            ('\u{61c}', "\\u{61c}"),
            ('\u{200b}', "\\u{200b}"),
            ('\u{feff}', "\\u{feff}"),
            ('\u{ad}', "\\u{ad}"),
            ('\u{2028}', "\\u{2028}"),
            ('\u{e0001}', "\\u{e0001}"),
        ] {
            assert_eq!(shown(&format!("x{c}y")), format!("x{esc}y"), "{:x}", c as u32);
        }
    }

    #[test]
    fn ordinary_unicode_is_kept() {
        for s in [
            "café naïve Ωμέγα",
            "日本語のテキスト",
            "שלום עולם", // right-to-left script itself is fine; only the override controls are not
            "👍🏽 👨\u{200d}👩\u{200d}👧 ❤\u{fe0f}",
            "می\u{200c}خواهم",
            "🏴\u{e0067}\u{e0062}\u{e0073}\u{e0063}\u{e0074}\u{e007f}",
            "back\\slash \\x1b stays as typed",
        ] {
            assert_eq!(shown(s), s);
            assert!(matches!(guard(s), Cow::Borrowed(_)));
            assert_eq!(message("bob: ", s), format!("bob: {s}"));
        }
    }

    #[test]
    fn guard_keeps_line_breaks_and_is_idempotent() {
        let once = guard("one\x1b[2J\ntwo\u{202e}");
        assert_eq!(once, "one\\x1b[2J\ntwo\\u{202e}");
        assert_eq!(guard(&once), once);
        assert_eq!(guard(&shown("\x00\u{9b}")), shown("\x00\u{9b}"));
    }

    #[test]
    fn continuation_lines_cannot_pose_as_another_sender() {
        let m = message("bob: ", "see you\nbob: I never said this\n");
        assert_eq!(m, "bob: see you\n     bob: I never said this\n     ");
        for line in m.lines().skip(1) {
            assert!(line.starts_with("  "), "{line:?}");
        }
        // Without a header the indent is still two columns.
        assert_eq!(message("", "a\nb"), "a\n  b");
        let g = message("[#team] alice: ", "x\ny");
        assert_eq!(g, "[#team] alice: x\n               y");
    }

    #[test]
    fn a_line_longer_than_the_terminal_is_broken_onto_an_indented_line() {
        // Padded so that, soft-wrapped by an 20-column terminal, `alice: hi` would start a row.
        let body = format!("{}alice: hi", " ".repeat(15));
        let m = message_for_width("bob: ", &body, Some(20));
        assert_eq!(m, format!("bob: {}\n     alice: hi", " ".repeat(15)));
        for row in m.lines() {
            assert!(columns(row) <= 20, "{row:?}");
        }
        for row in m.lines().skip(1) {
            assert!(row.starts_with("     "), "{row:?}");
        }
        // Wide characters count two columns and are never split; escapes count as shown.
        let m = message_for_width("b: ", "日本語日本語\x1b", Some(9));
        assert_eq!(m, "b: 日本語\n   日本語\n   \\x1b");
        // Not a terminal: nothing is broken.
        assert_eq!(message_for_width("bob: ", &body, None), format!("bob: {body}"));
        // A terminal no wider than the header: the header is broken too, and continuations
        // are indented two columns.
        assert_eq!(message_for_width("bob: ", "abc", Some(4)), "bob:\n   a\n  bc");
        assert_eq!(message_for_width("bob: ", "abc", Some(5)), "bob: \n  abc");
        // Emoji with a presentation selector are drawn two columns wide, and so counted.
        let m = message_for_width("b: ", "\u{2764}\u{fe0f}\u{2764}\u{fe0f}\u{2764}\u{fe0f}x", Some(9));
        assert_eq!(m, "b: \u{2764}\u{fe0f}\u{2764}\u{fe0f}\u{2764}\u{fe0f}\n   x");
    }

    /// The header was left to the terminal: a claimed name padded to wrap it at a guessed
    /// width put the rest of the header, `14:03 alice: ok`, at column 0 of the next row.
    #[test]
    fn a_header_wider_than_the_terminal_is_broken_onto_indented_rows() {
        let header = format!("[#{}] ~{}14:03 alice: ok (304b): ", "g".repeat(32), " ".repeat(37));
        let m = message_for_width(&header, "hi", Some(80));
        let rows: Vec<&str> = m.split('\n').collect();
        assert!(rows.len() > 1, "{m:?}");
        for row in &rows {
            assert!(columns(row) <= 80, "{row:?}");
        }
        for row in &rows[1..] {
            assert!(row.starts_with("  "), "{row:?}");
        }
        assert!(m.ends_with("hi"), "{m:?}");
    }

    /// unicode-width gives no columns to characters terminals draw one wide (prepend characters
    /// such as U+A8FA, unassigned default-ignorables such as U+2065): a
    /// line padded with them was thought to fit, the terminal wrapped it, and `alice: hi`
    /// started a row at column 0.
    #[test]
    fn characters_unicode_width_calls_empty_still_count_a_column() {
        for pad in ["\u{a8fa}", "\u{d4e}", "\u{2065}", "\u{fff0}", "\u{fff8}", "\u{e0080}"] {
            let m = message_for_width("b: ", &format!("{}alice: hi", pad.repeat(17)), Some(20));
            assert_eq!(
                m,
                format!("b: {}\n   alice: hi", pad.repeat(17)),
                "{:x}",
                pad.chars().next().unwrap() as u32
            );
        }
        // The few drawn as nothing still count none, so the text they join is not broken early.
        assert_eq!(columns("a\u{200d}b\u{200c}c"), 3);
        assert_eq!(columns("a\u{fe0e}b\u{e0100}c"), 3);
        assert_eq!(columns("\u{1f3f4}\u{e0067}\u{e0062}\u{e0073}\u{e0063}\u{e0074}\u{e007f}"), 2);
        assert_eq!(columns("e\u{301}\u{34f}"), 1);
    }

    /// A header just under the terminal's width (a long claimed name in a long group name)
    /// indented every continuation by nearly the whole width: three characters a row, so a
    /// 200 KiB message became megabytes of indent on tens of thousands of rows.
    #[test]
    fn a_header_nearly_as_wide_as_the_terminal_does_not_multiply_a_long_message() {
        let header = format!("[#{}] ~{}: ", "g".repeat(40), "n".repeat(50));
        assert_eq!(columns(&header), 97);
        let body = "x".repeat(200 * 1024);
        let m = message_for_width(&header, &body, Some(100));
        assert!(m.len() <= 4 * body.len(), "{} bytes for a body of {}", m.len(), body.len());
        let rows: Vec<&str> = m.split('\n').collect();
        for row in &rows {
            assert!(columns(row) <= 100, "{row:?}");
        }
        for row in &rows[1..] {
            assert!(row.starts_with("  "), "{row:?}");
        }
        assert_eq!(rows.iter().map(|r| r.matches('x').count()).sum::<usize>(), body.len());
        // An ordinary header still has its continuations under the text.
        let m = message_for_width("14:03 [#team] alice: ", "one\ntwo", Some(80));
        assert_eq!(m, "14:03 [#team] alice: one\n                     two");
    }

    #[test]
    fn tabs_and_carriage_returns_have_a_layout() {
        assert_eq!(message("a: ", "x\ty"), "a: x    y");
        assert_eq!(message("a: ", "one\r\ntwo"), "a: one\n   two");
        // A lone CR would return to column 0 and overwrite the header.
        assert_eq!(message("a: ", "fake\rbob: hi"), "a: fake\\rbob: hi");
        assert_eq!(message("a: ", "\x1b[2J\u{202e}"), "a: \\x1b[2J\\u{202e}");
    }

    #[test]
    fn json_escapes_unsafe_characters_and_round_trips_exactly() {
        let text = "\x1b]0;t\x07\0\x7f\u{9b}\u{202e}\u{2066}\u{e0001}\u{200d}日本 👍\n\t\r\\\"";
        let line = json_line(&serde_json::json!({ "text": text }));
        assert!(!line.chars().any(is_unsafe), "{line}");
        assert!(line.contains("\\u202e") && line.contains("\\udb40\\udc01"), "{line}");
        assert!(line.contains("日本 👍"), "ordinary text stays readable: {line}");
        let back: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(back["text"], text);
    }
}
