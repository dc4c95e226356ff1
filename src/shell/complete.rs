//! Tab completion for the line editor: verbs and sub-verbs (taken from the clap definitions, so
//! they cannot drift), contact names after `@` and wherever a person is expected, `#group` names.
//!
//! The editor runs on its own thread while the messenger lives on the core loop, so names are
//! shared through a [`Names`] snapshot the core refreshes after every command and delivery.

use std::sync::{Arc, Mutex};

use rustyline::completion::{Completer, Pair};
use rustyline::{Context, Helper, Highlighter, Hinter, Validator};

use crate::shell::grammar;

/// Contact and group names as the core last saw them.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Names {
    pub contacts: Vec<String>,
    pub groups: Vec<String>,
}

/// A snapshot the core writes and the completer reads.
pub type SharedNames = Arc<Mutex<Names>>;

/// What the line editor is told about the vocabulary.
#[derive(Helper, Hinter, Highlighter, Validator)]
pub struct ShellHelper {
    names: SharedNames,
    /// Verb (or alias) → its sub-verbs.
    verbs: Vec<(String, Vec<String>)>,
}

impl ShellHelper {
    pub fn new(names: SharedNames) -> ShellHelper {
        ShellHelper { names, verbs: grammar::verb_names() }
    }

    /// Where the word under the cursor starts, and what may replace it.
    pub fn candidates(&self, line: &str, pos: usize) -> (usize, Vec<Pair>) {
        let head = line.get(..pos).unwrap_or(line);
        // The byte after the last whitespace character, however many bytes it takes (a
        // no-break space is two): a char boundary, so both slices below hold.
        let start =
            head.char_indices().rev().find(|(_, c)| c.is_whitespace()).map_or(0, |(i, c)| i + c.len_utf8());
        let (before, word) = head.split_at(start);
        let mut before: Vec<&str> = before.split_whitespace().collect();
        if before.first().is_some_and(|w| w.trim_start_matches('/') == "qpq") {
            before.remove(0);
        }
        // A poisoned lock only means a panic elsewhere; the names are still usable.
        let names = self.names.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let words = match before.first() {
            None => self.first_word(word, &names),
            Some(verb) => self.argument(verb.trim_start_matches('/'), &before[1..], word, &names),
        };
        (start, words)
    }

    fn first_word(&self, word: &str, names: &Names) -> Vec<Pair> {
        if let Some(p) = word.strip_prefix('@') {
            return matching(p, &names.contacts, "@");
        }
        if let Some(p) = word.strip_prefix('#') {
            return matching(p, &names.groups, "#");
        }
        let (slash, p) = match word.strip_prefix('/') {
            Some(p) => ("/", p),
            None => ("", word),
        };
        let mut verbs: Vec<String> = self.verbs.iter().map(|(v, _)| v.clone()).collect();
        if !slash.is_empty() {
            verbs.push("say".into());
        }
        verbs.sort();
        matching(p, &verbs, slash)
    }

    /// Completion of argument `args.len()` (0-based) of `verb`.
    fn argument(&self, verb: &str, args: &[&str], word: &str, names: &Names) -> Vec<Pair> {
        if let Some(p) = word.strip_prefix('#') {
            return matching(p, &names.groups, "#");
        }
        let subs = self.verbs.iter().find(|(v, _)| v == verb).map(|(_, s)| s.as_slice()).unwrap_or(&[]);
        let people_or_groups = || {
            let mut v = matching(word, &names.contacts, "");
            v.extend(matching(word, &names.groups, "#"));
            v
        };
        match (verb, args) {
            (_, []) if !subs.is_empty() => matching(word, subs, ""),
            ("send" | "chat" | "c" | "history" | "tail", []) => people_or_groups(),
            ("help" | "h", []) => {
                let verbs: Vec<String> = self.verbs.iter().map(|(v, _)| v.clone()).collect();
                matching(word, &verbs, "")
            }
            ("contact", ["remove"]) => matching(word, &names.contacts, ""),
            ("group", ["add" | "remove" | "leave" | "update" | "members"]) => {
                matching(word, &names.groups, "")
            }
            ("group", ["add" | "remove", _, ..]) => matching(word, &names.contacts, ""),
            _ => Vec::new(),
        }
    }
}

/// Candidates among `pool` that start with `prefix`, each followed by a space.
fn matching(prefix: &str, pool: &[String], sigil: &str) -> Vec<Pair> {
    pool.iter()
        .filter(|n| n.starts_with(prefix))
        .map(|n| Pair { display: format!("{sigil}{n}"), replacement: format!("{sigil}{n} ") })
        .collect()
}

impl Completer for ShellHelper {
    type Candidate = Pair;

    fn complete(&self, line: &str, pos: usize, _ctx: &Context<'_>) -> rustyline::Result<(usize, Vec<Pair>)> {
        Ok(self.candidates(line, pos))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn helper() -> ShellHelper {
        let names = Names {
            contacts: vec!["bob".into(), "bea".into(), "carol".into()],
            groups: vec!["team".into(), "tea".into()],
        };
        ShellHelper::new(Arc::new(Mutex::new(names)))
    }

    fn complete(line: &str) -> (usize, Vec<String>) {
        let (start, c) = helper().candidates(line, line.len());
        (start, c.into_iter().map(|p| p.replacement).collect())
    }

    #[test]
    fn contact_names_complete_after_at() {
        assert_eq!(complete("@bo"), (0, vec!["@bob ".to_string()]));
        assert_eq!(complete("@b").1, ["@bob ", "@bea "]);
    }

    #[test]
    fn group_names_complete_after_hash_anywhere() {
        assert_eq!(complete("#tea").1, ["#team ", "#tea "]);
        assert_eq!(complete("send #te"), (5, vec!["#team ".to_string(), "#tea ".to_string()]));
    }

    #[test]
    fn verbs_and_sub_verbs_come_from_clap() {
        assert_eq!(complete("who").1, ["whoami "]);
        assert_eq!(complete("/hi").1, ["/history "]);
        assert_eq!(complete("/sa").1, ["/say "]);
        assert_eq!(complete("group cr"), (6, vec!["create ".to_string()]));
        assert_eq!(complete("contact ").1, ["add ", "list ", "remove "]);
    }

    #[test]
    fn people_complete_where_a_person_is_expected() {
        assert_eq!(complete("send ca").1, ["carol "]);
        assert_eq!(complete("/chat b").1, ["bob ", "bea "]);
        assert_eq!(complete("contact remove c").1, ["carol "]);
        assert_eq!(complete("group add team b").1, ["bob ", "bea "]);
        assert_eq!(complete("group members t").1, ["team ", "tea "]);
        assert!(complete("whoami b").1.is_empty());
    }

    /// A whitespace character of several bytes (a no-break space, an ideographic space) before
    /// the word panicked: the word was sliced one byte after its start.
    #[test]
    fn multi_byte_whitespace_before_the_word_completes_without_a_panic() {
        assert_eq!(complete("send\u{a0}ca"), (6, vec!["carol ".to_string()]));
        assert_eq!(complete("send\u{3000}ca"), (7, vec!["carol ".to_string()]));
        assert_eq!(complete("\u{2009}#te").1, ["#team ", "#tea "]);
    }

    #[test]
    fn the_completer_trait_answers_like_the_helper() {
        let h = helper();
        let history = rustyline::history::DefaultHistory::new();
        let ctx = Context::new(&history);
        let (start, c) = h.complete("@ca", 3, &ctx).unwrap();
        assert_eq!((start, c[0].replacement.as_str()), (0, "@carol "));
    }
}
