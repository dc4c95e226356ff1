//! What a DS payload is: a kind byte, then either a hybrid envelope or a group frame in the clear
//! of the envelope. Parsed here, once, at the boundary; an unknown kind is an error.
//!
//! Why two kinds: a group's MLS messages (application messages, commits, proposals) are already
//! sealed by MLS with a post-quantum suite, so they travel once, unwrapped, through
//! `enqueueFanout`, and cost the same whatever the group's size. Direct conversations are MLS
//! groups of two and go the same way. Only Welcomes keep the hybrid envelope (`crypto::hybrid`):
//! their frame carries the group's name and the inviter outside MLS. A Welcome is sealed once
//! for all its new members (`crypto::sealmany`: the body once, a small envelope of its key per
//! member) and fanned out as one stored copy; a per-recipient envelope (0x10) is still read.
//!
//! What the server learns from a group parcel that the envelope hid: the MLS PrivateMessage
//! header (group id, epoch, content type: application, commit or proposal; RFC 9420 section
//! 6.3) and that every recipient of the fanout got the same bytes. It already saw the group id
//! as the channel id, the recipients and the sizes. The sender stays hidden (MLS encrypts the
//! sender data, and enqueueing is anonymous), and so does the content.
//!
//! ```text
//! 0x10 (sealed) || hybrid envelope (its plaintext is a Frame)
//! 0x11 (group)  || Frame::Mls encoding (frame version byte || postcard)
//! 0x12 (sealed once) || crypto::sealmany payload (its plaintext is a Frame)
//! ```
//!
//! The kinds start at 0x10 so that a bare envelope queued by an earlier qpq (its first byte is
//! the envelope version, 1 or 2) is refused by name, never read as a parcel. A new layout gets
//! a new kind byte.

/// Kind byte of a parcel holding a hybrid envelope.
pub const KIND_SEALED: u8 = 0x10;
/// Kind byte of a parcel holding a group's MLS frame, sealed by MLS alone.
pub const KIND_GROUP: u8 = 0x11;
/// Kind byte of a parcel sealed once for several recipients ([`crate::crypto::sealmany`]).
pub const KIND_SEALED_MANY: u8 = 0x12;

/// A DS payload by kind, borrowing its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parcel<'a> {
    /// A hybrid envelope for this recipient.
    Sealed(&'a [u8]),
    /// An encoded [`Frame::Mls`](super::frame::Frame::Mls), the same for every recipient.
    Group(&'a [u8]),
    /// A frame sealed once for several recipients, this one among them.
    SealedMany(&'a [u8]),
}

/// A payload that is no parcel this qpq reads.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ParcelError {
    #[error("empty payload")]
    Empty,
    #[error("unknown payload kind 0x{0:02x} (this qpq reads 0x10 sealed, 0x11 group and 0x12 sealed once)")]
    UnknownKind(u8),
}

impl<'a> Parcel<'a> {
    pub fn parse(payload: &'a [u8]) -> Result<Parcel<'a>, ParcelError> {
        match payload.split_first() {
            None => Err(ParcelError::Empty),
            Some((&KIND_SEALED, body)) => Ok(Parcel::Sealed(body)),
            Some((&KIND_GROUP, body)) => Ok(Parcel::Group(body)),
            Some((&KIND_SEALED_MANY, body)) => Ok(Parcel::SealedMany(body)),
            Some((&kind, _)) => Err(ParcelError::UnknownKind(kind)),
        }
    }

    pub fn encode(&self) -> Vec<u8> {
        let (kind, body) = match self {
            Parcel::Sealed(b) => (KIND_SEALED, b),
            Parcel::Group(b) => (KIND_GROUP, b),
            Parcel::SealedMany(b) => (KIND_SEALED_MANY, b),
        };
        let mut out = Vec::with_capacity(1 + body.len());
        out.push(kind);
        out.extend_from_slice(body);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parcels_round_trip_and_unknown_kinds_are_refused_by_name() {
        for p in
            [Parcel::Sealed(b"env"), Parcel::Group(b"frame"), Parcel::Group(b""), Parcel::SealedMany(b"x")]
        {
            assert_eq!(Parcel::parse(&p.encode()), Ok(p));
        }
        assert_eq!(Parcel::parse(&[]), Err(ParcelError::Empty));
        // A bare envelope of an earlier qpq starts with its version byte.
        let err = Parcel::parse(&[2, 1, 0]).unwrap_err();
        assert_eq!(err, ParcelError::UnknownKind(2));
        assert!(err.to_string().starts_with("unknown payload kind 0x02"), "{err}");
    }
}
