//! What travels inside a hybrid envelope on the DS, and inside an MLS application message.
//!
//! The server sees only envelopes (`crypto::hybrid`), addressed by recipient key and tagged with
//! a channel id (the MLS group id, for ordering). Inside, a [`Frame`] is either a Welcome (with
//! the group's name, so a joining member learns it) or an MLS message of a group. Inside an MLS
//! application message, an [`AppMessage`] carries the text and the sender's clock.
//!
//! Encoding: postcard, prefixed by a format byte ([`FRAME_VERSION`]) so later versions can
//! change the layout. Decoding is bounded by the envelope size and never panics.

use serde::{Deserialize, Serialize};

use crate::client::messenger::MAX_TEXT_BYTES;
use crate::client::state::GroupKind;

/// Format byte in front of every encoded frame.
pub const FRAME_VERSION: u8 = 1;

/// Longest group name accepted from a Welcome.
pub const MAX_GROUP_NAME: usize = 64;

/// Errors decoding frames.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FrameError {
    #[error("empty frame")]
    Empty,
    #[error("unsupported frame version {0}")]
    Version(u8),
    #[error("malformed frame: {0}")]
    Malformed(String),
}

/// The plaintext of one envelope.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// An invitation: join with the MLS Welcome.
    Welcome { welcome: Vec<u8>, group_name: String, kind: GroupKind, inviter: [u8; 32] },
    /// An MLS message (commit, proposal or application) of a group.
    Mls { group_id: Vec<u8>, message: Vec<u8> },
}

/// The plaintext of an MLS application message.
#[derive(Serialize, Deserialize, Debug, Clone, PartialEq, Eq)]
pub struct AppMessage {
    pub text: String,
    /// Sender's clock, ms since the Unix epoch.
    pub sent_at_ms: u64,
}

fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    let mut out = vec![FRAME_VERSION];
    // Serializing these plain structs into a Vec cannot fail.
    out.extend(postcard::to_allocvec(v).unwrap_or_default());
    out
}

fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, FrameError> {
    let (&v, rest) = bytes.split_first().ok_or(FrameError::Empty)?;
    if v != FRAME_VERSION {
        return Err(FrameError::Version(v));
    }
    postcard::from_bytes(rest).map_err(|e| FrameError::Malformed(e.to_string()))
}

impl Frame {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    pub fn decode(bytes: &[u8]) -> Result<Frame, FrameError> {
        let f: Frame = decode(bytes)?;
        if let Frame::Welcome { group_name, .. } = &f
            && group_name.len() > MAX_GROUP_NAME
        {
            return Err(FrameError::Malformed("group name too long".into()));
        }
        Ok(f)
    }
}

impl AppMessage {
    pub fn encode(&self) -> Vec<u8> {
        encode(self)
    }

    /// Text longer than [`MAX_TEXT_BYTES`] is malformed: our clients never send it, and a
    /// peer's client that does would otherwise flood the terminal and the history with up to a
    /// whole payload (4 MiB) per message.
    pub fn decode(bytes: &[u8]) -> Result<AppMessage, FrameError> {
        let app: AppMessage = decode(bytes)?;
        if app.text.len() > MAX_TEXT_BYTES {
            return Err(FrameError::Malformed(format!(
                "text too long: {} > {MAX_TEXT_BYTES} bytes",
                app.text.len()
            )));
        }
        Ok(app)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_garbage_is_an_error() {
        let f = Frame::Welcome {
            welcome: vec![1, 2, 3],
            group_name: "team".into(),
            kind: GroupKind::Direct { peer: [7; 32] },
            inviter: [8; 32],
        };
        assert_eq!(Frame::decode(&f.encode()).unwrap(), f);
        let m = Frame::Mls { group_id: vec![1; 16], message: vec![5; 100] };
        assert_eq!(Frame::decode(&m.encode()).unwrap(), m);
        assert_eq!(Frame::decode(&[]), Err(FrameError::Empty));
        assert_eq!(Frame::decode(&[9, 0]), Err(FrameError::Version(9)));
        let enc = m.encode();
        for n in 1..enc.len() {
            assert!(Frame::decode(&enc[..n]).is_err(), "truncated at {n}");
        }
        let a = AppMessage { text: "hi ✓".into(), sent_at_ms: 42 };
        assert_eq!(AppMessage::decode(&a.encode()).unwrap(), a);
        let longest = AppMessage { text: "x".repeat(MAX_TEXT_BYTES), sent_at_ms: 42 };
        assert_eq!(AppMessage::decode(&longest.encode()).unwrap(), longest);
        let over = AppMessage { text: "x".repeat(MAX_TEXT_BYTES + 1), sent_at_ms: 42 };
        let e = AppMessage::decode(&over.encode()).unwrap_err();
        assert_eq!(
            e.to_string(),
            format!("malformed frame: text too long: {} > {MAX_TEXT_BYTES} bytes", MAX_TEXT_BYTES + 1)
        );
    }
}
