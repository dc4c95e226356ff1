//! Display names people choose, carried signed in their MLS leaf.
//!
//! Where the name lives: in a leaf node extension of our own type ([`DISPLAY_NAME_EXTENSION`],
//! from the private-use range of RFC 9420 section 17.3). A LeafNode, extensions included, is
//! signed with the member's signature key (RFC 9420 section 7.2), and qpq's identity convention
//! makes that key the identity key (see the module docs of [`crate::mls`]), so a name read from
//! a verified leaf is one that identity signed. It reaches others without any message of its
//! own: in our KeyPackages (section 10) for whoever adds us, in the ratchet tree of a Welcome
//! (section 12.4.3.1) for whoever joins, so a message request already shows the inviter's name.
//! The other options were worse: the BasicCredential's identity bytes are qpq's key everywhere
//! (changing them would break the convention), and a profile frame signed separately would need
//! its own replay and ordering rules, which the tree already gives.
//!
//! A leaf may carry an extension only when its capabilities list it (RFC 9420 section 7.2,
//! openmls check valn0107), so every leaf we make lists ours, named or not.
//!
//! The name is a claim, never an identity: printers mark it (`~alice (304b-9934)`) and a
//! contact's local name wins (see `Messenger::display_name`). A name that is not valid UTF-8,
//! too long ([`MAX_DISPLAY_NAME_BYTES`]) or holds a character [`crate::text::is_unsafe`] marks
//! is ignored on receipt, as if the leaf had none.

use openmls::prelude::{Extension, ExtensionType, Extensions, LeafNode, UnknownExtension};

use crate::limits::MAX_DISPLAY_NAME_BYTES;

/// Extension type of the display name (0xF000-0xFFFF: private use, RFC 9420 section 17.3).
pub const DISPLAY_NAME_EXTENSION: u16 = 0xF0D1;

/// The extension type to list in our capabilities.
pub(super) fn extension_type() -> ExtensionType {
    ExtensionType::Unknown(DISPLAY_NAME_EXTENSION)
}

/// True for a name we sign or accept: 1 to [`MAX_DISPLAY_NAME_BYTES`] bytes of printable text,
/// not blank.
pub fn valid_display_name(name: &str) -> bool {
    !name.trim().is_empty()
        && name.len() <= MAX_DISPLAY_NAME_BYTES
        && !name.chars().any(|c| crate::text::is_unsafe(c) || c.is_control())
}

/// The leaf extensions that carry `name` (none without a name).
pub(super) fn leaf_extensions(name: Option<&str>) -> Extensions<LeafNode> {
    match name {
        Some(n) => {
            let ext = Extension::Unknown(DISPLAY_NAME_EXTENSION, UnknownExtension(n.as_bytes().to_vec()));
            // One extension of a type listed in our capabilities is always a valid set.
            Extensions::single(ext).unwrap_or_default()
        }
        None => Extensions::default(),
    }
}

/// The name a verified leaf claims, if it carries a valid one.
pub(super) fn name_of(leaf: &LeafNode) -> Option<String> {
    let ext = leaf.extensions().unknown(DISPLAY_NAME_EXTENSION)?;
    claimed_name(std::str::from_utf8(&ext.0).ok()?)
}

/// A name as someone signed it, as we show it: without the spaces around it (our own client
/// trims before signing; another may not, and "alice   " should not look unlike "alice" only
/// in its spacing), or None when it is no valid name.
fn claimed_name(signed: &str) -> Option<String> {
    valid_display_name(signed).then(|| signed.trim().to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_bounded_printable_text() {
        assert!(valid_display_name("Alice"));
        assert!(valid_display_name("Zoë Ångström 山田"));
        assert!(valid_display_name(&"x".repeat(MAX_DISPLAY_NAME_BYTES)));
        assert!(!valid_display_name(&"x".repeat(MAX_DISPLAY_NAME_BYTES + 1)));
        assert!(!valid_display_name(""));
        assert!(!valid_display_name("   "));
        assert!(!valid_display_name("al\x1b[2Jice"));
        assert!(!valid_display_name("al\nice"));
        assert!(!valid_display_name("\u{202e}ecila"));
        assert_eq!(claimed_name("  alice  ").as_deref(), Some("alice"));
        assert_eq!(claimed_name("Zoë Ångström").as_deref(), Some("Zoë Ångström"));
        assert_eq!(claimed_name("   "), None);
    }
}
