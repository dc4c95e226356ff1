//! Who people are, for people: the names printers show, and the short key forms a person may
//! type back.
//!
//! Three kinds of name, in order of trust: our own contact names (we chose them), the display
//! name a member signed into their MLS leaf (a claim, see [`crate::mls::valid_display_name`]
//! and the `profile` module of [`crate::mls`]), and the key itself. A claimed name is always
//! shown marked, with the start of the key it came with: `~Alice (304b-9934)`, so that nobody
//! can pass for a contact by claiming their name; a contact's local name wins over any claim.
//!
//! Short keys: wherever a person is expected, the short form qpq prints (`304b-9934-b339-081f`)
//! or a prefix of it of at least [`MIN_SHORT_KEY_HEX`] hex digits (`304b-9934`, as in the
//! marked form) is accepted when exactly one key this home knows starts with it: contacts,
//! members of our groups, senders of message requests, blocked keys and our own. Dashes are
//! ignored.

use std::collections::BTreeSet;

use crate::client::messenger::{ClientError, Event, Messenger};
use crate::client::state::GroupKind;
use crate::crypto::identity::PublicKey;

/// Fewest hex digits accepted as a short key: 32 bits, as many as the marked form shows, so a
/// typed prefix is rarely ambiguous among the keys one home knows.
pub const MIN_SHORT_KEY_HEX: usize = 8;

/// Most hex digits of a short key: the whole short form qpq prints (`304b-9934-b339-081f`);
/// longer strings are meant as whole keys and get the whole-key errors.
pub const MAX_SHORT_KEY_HEX: usize = 16;

/// Hex digits of the key shown after a claimed name.
const MARK_HEX: usize = 8;

/// The key as shown after a claimed name: `304b-9934`.
pub fn key_mark(key: &[u8; 32]) -> String {
    // Invariant: MARK_HEX / 2 = 4 bytes of a 32-byte key give 8 hex digits, split after 4.
    const _: () = assert!(MARK_HEX == 8);
    let h = hex::encode(&key[..MARK_HEX / 2]);
    format!("{}-{}", &h[..4], &h[4..])
}

/// `~name (304b-9934)`: a name someone claimed, marked as a claim.
pub fn marked(name: &str, key: &[u8; 32]) -> String {
    format!("~{name} ({})", key_mark(key))
}

/// The lowercase hex digits of `s` if it reads as a short key (hex digits and dashes, enough
/// digits, at most the printed short form), else None.
pub fn short_key_digits(s: &str) -> Option<String> {
    if !s.bytes().all(|b| b.is_ascii_hexdigit() || b == b'-') {
        return None;
    }
    let digits: String = s.chars().filter(|c| *c != '-').map(|c| c.to_ascii_lowercase()).collect();
    (MIN_SHORT_KEY_HEX..=MAX_SHORT_KEY_HEX).contains(&digits.len()).then_some(digits)
}

impl Messenger {
    /// The display name `key` signed into its leaf in one of our groups (the direct
    /// conversation with them first), if any.
    pub fn claimed_name(&self, key: &[u8; 32]) -> Option<String> {
        let groups = &self.home.state.groups;
        let direct = groups.iter().filter(|(_, g)| g.kind == GroupKind::Direct { peer: *key });
        let others = groups.iter().filter(|(_, g)| g.kind != GroupKind::Direct { peer: *key });
        direct
            .chain(others)
            .filter_map(|(id, _)| hex::decode(id).ok())
            .find_map(|id| self.mls.member_name(&id, key))
    }

    /// [`Self::claimed_name`], looking in the group `group_id` first (a message's own group has
    /// its sender's leaf, and one group is cheaper to read than all).
    pub fn claimed_name_in(&self, group_id: &[u8], key: &[u8; 32]) -> Option<String> {
        self.mls.member_name(group_id, key).or_else(|| self.claimed_name(key))
    }

    /// [`Messenger::display_name`] for a message of the group `group_id`.
    pub fn display_name_in(&self, group_id: &[u8], key: &[u8; 32]) -> String {
        self.name_for_people(key, || self.claimed_name_in(group_id, key))
    }

    /// "me", the contact name, the `claimed` name marked, or the short key: the first there is
    /// (`claimed` is looked up only when needed, as it reads group state).
    pub(crate) fn name_for_people(&self, key: &[u8; 32], claimed: impl FnOnce() -> Option<String>) -> String {
        if *key == self.identity.public().0 {
            return "me".to_string();
        }
        if let Some(n) = self.contact_name(key) {
            return n.to_string();
        }
        match claimed() {
            Some(n) => marked(&n, key),
            None => PublicKey(*key).short(),
        }
    }

    /// Changes our display name: saved, signed into a fresh leaf in every group we are in (a
    /// self-update commit each, RFC 9420 section 12.1.2) and into a new pool of KeyPackages for
    /// whoever adds us next. Returns the number of groups updated and what came in meanwhile.
    pub async fn set_display_name(&mut self, name: &str) -> Result<(usize, Vec<Event>), ClientError> {
        // Spaces around a name are nobody's intent (and would show inside its marks).
        let typed = name;
        let name = name.trim();
        if !crate::mls::valid_display_name(name) {
            // As typed: `"   "` says more than `""` (exploratory testing).
            return Err(ClientError::BadDisplayName(typed.to_string()));
        }
        self.connect().await?;
        let _op = self.begin()?;
        self.home.state.name = Some(name.to_string());
        self.mls.set_display_name(Some(name));
        self.persist()?;
        let mut events = self.catch_up().await?;
        let groups: Vec<(Vec<u8>, GroupKind)> = self
            .home
            .state
            .groups
            .iter()
            .filter(|(_, g)| g.active)
            .filter_map(|(id, g)| Some((hex::decode(id).ok()?, g.kind.clone())))
            .collect();
        let mut updated = 0;
        for (group_id, kind) in groups {
            let gid = group_id.clone();
            events.extend(self.commit_change(&group_id, move |m| m.self_update(&gid), &[], kind).await?);
            updated += 1;
        }
        events.extend(self.finish_round().await?);
        self.rotate_key_packages().await?;
        Ok((updated, events))
    }

    /// Signs our name into the groups we joined with a leaf that carries another (a
    /// self-update commit each, as `name set` makes). The server hands out KeyPackages in the
    /// order they came, and `name set` adds a fresh pool to what it holds rather than replacing
    /// it, so whoever adds us next may still take one signed with the old name. Kept in the
    /// state until done, since `requests accept` joins without a connection (the next command
    /// that connects does it). A refusal is said and not tried again: the name is a courtesy,
    /// the next `name set` signs it in.
    pub(crate) async fn sign_name_into_joined_groups(&mut self) -> Result<Vec<Event>, ClientError> {
        let mut events = Vec::new();
        let me = self.identity.public().0;
        for key in self.home.state.name_due.clone() {
            let group = self.home.state.groups.get(&key).filter(|g| g.active).map(|g| g.kind.clone());
            let due = hex::decode(&key)
                .ok()
                .zip(group)
                .filter(|(gid, _)| self.mls.member_name(gid, &me).as_deref() != self.mls.display_name());
            if let Some((group_id, kind)) = due {
                let gid = group_id.clone();
                match self.commit_change(&group_id, move |m| m.self_update(&gid), &[], kind).await {
                    Ok(evs) => events.extend(evs),
                    Err(ClientError::Session(e)) if !e.is_refusal_of_the_call() => return Err(e.into()),
                    Err(e) => events.push(Event::Dropped {
                        reason: format!(
                            "could not sign your name into {}: {e}",
                            self.conversation_name(&group_id)
                        ),
                    }),
                }
            }
            self.home.state.name_due.remove(&key);
            self.persist()?;
        }
        Ok(events)
    }

    /// Every key this home knows: ours, contacts, members of our groups, requests' senders,
    /// blocked keys.
    pub fn known_keys(&self) -> BTreeSet<[u8; 32]> {
        let state = &self.home.state;
        let mut keys: BTreeSet<[u8; 32]> = state.contacts.values().copied().collect();
        keys.insert(self.identity.public().0);
        for (id, g) in &state.groups {
            if let GroupKind::Direct { peer } = g.kind {
                keys.insert(peer);
            }
            if let Ok(members) =
                hex::decode(id).map_err(drop).and_then(|id| self.mls.members(&id).map_err(drop))
            {
                keys.extend(members);
            }
        }
        keys.extend(state.requests.pending.iter().map(|r| r.from));
        keys.extend(state.requests.blocked.iter().copied());
        keys
    }

    /// The one known key that starts with the short key `s` (see the module docs); None when `s`
    /// is not a short key at all.
    pub fn resolve_short_key(&self, s: &str) -> Option<Result<[u8; 32], ClientError>> {
        let digits = short_key_digits(s)?;
        let found: Vec<[u8; 32]> =
            self.known_keys().into_iter().filter(|k| hex::encode(k).starts_with(&digits)).collect();
        Some(match found.as_slice() {
            [one] => Ok(*one),
            [] => Err(ClientError::UnknownShortKey(s.to_string())),
            many => Err(ClientError::AmbiguousKey {
                given: s.to_string(),
                candidates: many.iter().map(|k| self.key_with_name(k)).collect::<Vec<_>>().join(", "),
            }),
        })
    }

    /// `304b-9934-b339-081f (alice)`: a key for a list of candidates.
    fn key_with_name(&self, key: &[u8; 32]) -> String {
        let short = PublicKey(*key).short();
        if *key == self.identity.public().0 {
            return format!("{short} (you)");
        }
        match (self.contact_name(key), self.claimed_name(key)) {
            (Some(n), _) => format!("{short} ({n})"),
            (None, Some(n)) => format!("{short} (~{n})"),
            (None, None) => short,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_keys_are_dashed_hex_prefixes_of_at_least_eight_digits() {
        assert_eq!(short_key_digits("304b-9934-B339-081f").as_deref(), Some("304b9934b339081f"));
        assert_eq!(short_key_digits("304b-9934").as_deref(), Some("304b9934"));
        assert_eq!(short_key_digits("304b99"), None, "too short");
        assert_eq!(short_key_digits("alice"), None);
        assert_eq!(short_key_digits(&"a".repeat(17)), None, "longer than the printed short form");
        assert_eq!(short_key_digits(&"a".repeat(64)), None, "a whole key is not a short one");
        assert_eq!(
            marked(
                "Alice",
                &[
                    0x30, 0x4b, 0x99, 0x34, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
                    0, 0, 0, 0, 0, 0
                ]
            ),
            "~Alice (304b-9934)"
        );
    }
}
