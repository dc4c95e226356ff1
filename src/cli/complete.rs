//! Dynamic shell completion (clap_complete's `CompleteEnv`): the script `qpq completions SHELL`
//! prints makes the shell run `COMPLETE=SHELL qpq -- qpq send b` at each TAB, and contact and
//! group names come from the home, so `qpq send b<TAB>` completes `bob`.
//!
//! Names are private and live in the encrypted state. Completion reads them only when the home
//! needs no passphrase or QPQ_PASSPHRASE is set; it never prompts (a TAB cannot answer one) and
//! otherwise offers nothing. The home is QPQ_HOME or the default one (`--home` on the line being
//! completed is not seen by the completers).

use clap_complete::engine::CompletionCandidate;

use crate::client::state::{self, GroupKind, Home, State};

/// Runs the completion request and exits when the shell made one (the COMPLETE variable is set);
/// returns for a normal run.
pub fn complete_if_asked() {
    clap_complete::CompleteEnv::with_factory(crate::cli::command).complete();
}

/// The script that registers qpq's completion with `shell`.
pub fn write_registration(shell: clap_complete::Shell, out: &mut dyn std::io::Write) -> anyhow::Result<()> {
    let name = shell.to_string();
    let shells = clap_complete::env::Shells::builtins();
    let completer =
        shells.completer(&name).ok_or_else(|| anyhow::anyhow!("no dynamic completion for {name}"))?;
    completer.write_registration("COMPLETE", "qpq", "qpq", "qpq", out)?;
    Ok(())
}

/// The home's state, if it can be read without asking anything.
fn quiet_state() -> Option<Home> {
    let dir = match std::env::var_os("QPQ_HOME") {
        Some(h) => h.into(),
        None => state::default_home().ok()?,
    };
    if !state::exists(&dir) {
        return None;
    }
    if state::needs_passphrase(&dir).ok()? {
        let pass = crate::cli::client::env_passphrase()?;
        Home::open(&dir, Some(pass.as_bytes())).ok()
    } else {
        Home::open(&dir, None).ok()
    }
}

/// Contact names.
pub fn contacts() -> Vec<CompletionCandidate> {
    quiet_state().map(|h| contact_names(&h.state)).unwrap_or_default()
}

/// Names of the groups we are in (without `#`, as the group verbs take them).
pub fn groups() -> Vec<CompletionCandidate> {
    quiet_state().map(|h| group_names(&h.state, "")).unwrap_or_default()
}

/// What `send` takes: contact names and `#group`s.
pub fn targets() -> Vec<CompletionCandidate> {
    quiet_state()
        .map(|h| {
            let mut all = contact_names(&h.state);
            all.extend(group_names(&h.state, "#"));
            all
        })
        .unwrap_or_default()
}

fn contact_names(s: &State) -> Vec<CompletionCandidate> {
    s.contacts.keys().map(|n| CompletionCandidate::new(n.as_str()).help(Some("contact".into()))).collect()
}

fn group_names(s: &State, prefix: &str) -> Vec<CompletionCandidate> {
    s.groups
        .values()
        .filter(|g| g.active && g.kind == GroupKind::Group)
        .map(|g| CompletionCandidate::new(format!("{prefix}{}", g.name)).help(Some("group".into())))
        .collect()
}
