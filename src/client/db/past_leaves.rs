//! openmls's message secrets stored in two parts, so that sending or receiving one message
//! does not re-encode the member lists of the past epochs (issues 11 and 12).
//!
//! openmls rewrites a group's `MessageSecretsStore` after every message it sends or receives:
//! `{ max_epochs, past_epoch_trees: [EpochTree { epoch, message_secrets, leaves }], message_secrets }`.
//! Each past epoch carries the whole member list of that epoch (`leaves`, with every member's
//! X-Wing public key, which serde writes byte by byte): at 1000 members and 5 past epochs,
//! about 6.5 MB per message. A past epoch's member list never changes, so [`split`] encodes the
//! value with serializers that follow its shape: everything but the `leaves` goes into the
//! *main* record exactly as postcard would write it, and each epoch's `leaves` are encoded,
//! one member at a time, only the first time that epoch is seen (the caller says which epochs
//! already have one); the caller stores them as records shared between epochs
//! ([`super::past_members`]). [`join`] puts the postcard bytes back together: postcard writes a
//! struct as its fields in order and a sequence as a varint length and its items, so the whole
//! value is the main body with each epoch's leaves spliced in at the offset the main record
//! names.
//!
//! Main record: [`SPLIT_TAG`] ‖ u32 LE count ‖ count × (u64 LE epoch ‖ u32 LE body offset) ‖
//! body. An epoch's leaves as [`join`] takes them: [`super::mls::VALUE_TAG`] ‖ postcard of the
//! epoch's `Vec<Member>` (how format 4 stored them; [`super::past_members::join`] rebuilds it).
//! A value of another shape (a later openmls) is refused by [`split`] with [`ShapeError`]: the
//! caller then stores it whole, as before.
//!
//! Every buffer that may hold secrets is a [`Zeroizing`] grown by copying ([`Wiping`]), so no
//! reallocation leaves a stale copy of a secret behind.

use postcard::ser_flavors::Flavor;
use serde::Serialize;
use serde::ser::{self, Impossible};
use zeroize::Zeroizing;

use super::mls::VALUE_TAG;

/// First byte of a split main record; neither [`VALUE_TAG`] nor the first byte of JSON text.
pub const SPLIT_TAG: u8 = 0xb2;

/// The value is not a `MessageSecretsStore` of the shape openmls 0.9 writes.
#[derive(Debug, thiserror::Error)]
#[error("message secrets of an unexpected shape")]
pub struct ShapeError;

impl ser::Error for ShapeError {
    fn custom<T: std::fmt::Display>(_: T) -> Self {
        ShapeError
    }
}

/// What [`split`] produced.
pub struct Split {
    /// The main record, [`SPLIT_TAG`] first.
    pub main: Zeroizing<Vec<u8>>,
    /// The epochs of the past epoch trees, in order.
    pub epochs: Vec<u64>,
    /// The members of the epochs not already stored (`known` was false), in order, each
    /// [`VALUE_TAG`] ‖ postcard of one member.
    pub new_leaves: Vec<(u64, Vec<Zeroizing<Vec<u8>>>)>,
}

/// Encodes a `MessageSecretsStore` as a main record and the members of the past epochs for
/// which `known(epoch)` is false; the others' leaves are not encoded at all.
pub fn split<V: Serialize + ?Sized>(value: &V, known: &dyn Fn(u64) -> bool) -> Result<Split, ShapeError> {
    let mut enc = Encoder {
        body: Zeroizing::new(Vec::new()),
        scratch: Zeroizing::new(Vec::new()),
        points: Vec::new(),
        new_leaves: Vec::new(),
        known,
    };
    value.serialize(StoreSer { enc: &mut enc })?;
    let mut main = Wiping::with_capacity(5 + 12 * enc.points.len() + enc.body.len());
    let count = u32::try_from(enc.points.len()).map_err(|_| ShapeError)?;
    main.extend(&[SPLIT_TAG]);
    main.extend(&count.to_le_bytes());
    for &(epoch, offset) in &enc.points {
        main.extend(&epoch.to_le_bytes());
        main.extend(&offset.to_le_bytes());
    }
    main.extend(&enc.body);
    let epochs = enc.points.iter().map(|&(e, _)| e).collect();
    Ok(Split { main: main.0, epochs, new_leaves: enc.new_leaves })
}

/// The past epochs a main record names, with the body offsets of their leaves; None when
/// `main` is not a well-formed split record.
pub fn points(main: &[u8]) -> Option<(Vec<(u64, usize)>, &[u8])> {
    let rest = main.strip_prefix(&[SPLIT_TAG])?;
    let (count, mut rest) = rest.split_at_checked(4)?;
    let count = u32::from_le_bytes(count.try_into().ok()?) as usize;
    // Each point takes 12 bytes: a count the record cannot hold is damage, not an allocation.
    if count > rest.len() / 12 {
        return None;
    }
    let mut points = Vec::with_capacity(count);
    for _ in 0..count {
        let (point, r) = rest.split_at_checked(12)?;
        let (epoch, offset) = point.split_at(8);
        points.push((
            u64::from_le_bytes(epoch.try_into().ok()?),
            u32::from_le_bytes(offset.try_into().ok()?) as usize,
        ));
        rest = r;
    }
    // Offsets in order and inside the body.
    let mut last = 0;
    for &(_, offset) in &points {
        if offset < last || offset > rest.len() {
            return None;
        }
        last = offset;
    }
    Some((points, rest))
}

/// The epochs a main record names (empty for a value stored whole).
pub fn epochs(main: &[u8]) -> Vec<u64> {
    points(main).map(|(p, _)| p.into_iter().map(|(e, _)| e).collect()).unwrap_or_default()
}

/// The postcard bytes of the whole value: `main`'s body with each epoch's leaves (the
/// records `leaves` returns, [`VALUE_TAG`] first) spliced in. `Ok(None)` when a record is
/// damaged or missing; an error of `leaves` (reading a record) is returned as it is.
pub fn join<E>(
    main: &[u8],
    mut leaves: impl FnMut(u64) -> Result<Option<Zeroizing<Vec<u8>>>, E>,
) -> Result<Option<Zeroizing<Vec<u8>>>, E> {
    let Some((points, body)) = points(main) else { return Ok(None) };
    let mut parts = Vec::with_capacity(points.len());
    for &(epoch, _) in &points {
        let Some(part) = leaves(epoch)? else { return Ok(None) };
        parts.push(part);
    }
    Ok(splice(&points, body, &parts))
}

fn splice(points: &[(u64, usize)], body: &[u8], parts: &[Zeroizing<Vec<u8>>]) -> Option<Zeroizing<Vec<u8>>> {
    let total = body.len() + parts.iter().map(|p| p.len()).sum::<usize>();
    let mut out = Wiping::with_capacity(total);
    let mut at = 0;
    for (&(_, offset), part) in points.iter().zip(parts) {
        out.extend(body.get(at..offset)?);
        out.extend(part.strip_prefix(&[VALUE_TAG])?);
        at = offset;
    }
    out.extend(body.get(at..)?);
    Some(out.0)
}

/// A postcard output that wipes every buffer it outgrows.
pub struct Wiping(pub Zeroizing<Vec<u8>>);

impl Wiping {
    pub fn with_capacity(n: usize) -> Wiping {
        Wiping(Zeroizing::new(Vec::with_capacity(n)))
    }

    fn reserve(&mut self, more: usize) {
        if self.0.capacity() - self.0.len() < more {
            let want = (self.0.len() + more).max(self.0.capacity() * 2).max(64);
            let mut grown = Zeroizing::new(Vec::with_capacity(want));
            grown.extend_from_slice(&self.0);
            // The old buffer is wiped (whole capacity) as it drops.
            self.0 = grown;
        }
    }

    pub fn extend(&mut self, data: &[u8]) {
        self.reserve(data.len());
        self.0.extend_from_slice(data);
    }
}

impl Flavor for Wiping {
    type Output = Zeroizing<Vec<u8>>;

    // postcard writes a byte string that serde presents as a sequence (every `Vec<u8>` of
    // openmls) one byte at a time: the common case, room left, must stay a plain push.
    #[inline]
    fn try_push(&mut self, data: u8) -> postcard::Result<()> {
        if self.0.len() == self.0.capacity() {
            self.reserve(1);
        }
        self.0.push(data);
        Ok(())
    }

    fn try_extend(&mut self, data: &[u8]) -> postcard::Result<()> {
        self.extend(data);
        Ok(())
    }

    fn finalize(self) -> postcard::Result<Zeroizing<Vec<u8>>> {
        Ok(self.0)
    }
}

/// Appends the postcard encoding of `value` to `buf`.
/// `prefix` ‖ the postcard encoding of `value`, in a buffer of exactly that length; every buffer
/// it grew through is wiped as it is dropped (`postcard::to_allocvec` and friends free them
/// unwiped, with the secrets inside).
pub fn encode_wiping<T: Serialize + ?Sized>(
    prefix: &[u8],
    value: &T,
) -> postcard::Result<Zeroizing<Vec<u8>>> {
    let mut buf = Wiping::with_capacity(prefix.len() + 64);
    buf.extend(prefix);
    let full = postcard::serialize_with_flavor(value, buf)?;
    let mut exact = Zeroizing::new(Vec::with_capacity(full.len()));
    exact.extend_from_slice(&full);
    Ok(exact)
}

fn append<T: Serialize + ?Sized>(buf: &mut Zeroizing<Vec<u8>>, value: &T) -> Result<(), ShapeError> {
    let taken = Wiping(std::mem::take(buf));
    *buf = postcard::serialize_with_flavor(value, taken).map_err(|_| ShapeError)?;
    Ok(())
}

struct Encoder<'k> {
    body: Zeroizing<Vec<u8>>,
    /// Where each member is encoded before it is copied into its record.
    scratch: Zeroizing<Vec<u8>>,
    /// (epoch, offset in `body` where its leaves belong).
    points: Vec<(u64, u32)>,
    new_leaves: Vec<(u64, Vec<Zeroizing<Vec<u8>>>)>,
    known: &'k dyn Fn(u64) -> bool,
}

/// Field names of openmls 0.9's `MessageSecretsStore` and `EpochTree`, in declaration order.
const STORE_FIELDS: [&str; 3] = ["max_epochs", "past_epoch_trees", "message_secrets"];
const TREE_FIELDS: [&str; 3] = ["epoch", "message_secrets", "leaves"];

/// Refuses every serializer method but the ones a shape-following serializer implements.
macro_rules! refuse {
    ($($name:ident($($t:ty),*);)*) => {
        $(fn $name(self, $(_: $t),*) -> Result<(), ShapeError> { Err(ShapeError) })*
    };
}

/// Refuses the rest of `serde::Serializer` (everything but `serialize_seq`/`serialize_struct`).
macro_rules! refuse_rest {
    () => {
        refuse! {
            serialize_bool(bool); serialize_i8(i8); serialize_i16(i16); serialize_i32(i32);
            serialize_i64(i64); serialize_u8(u8); serialize_u16(u16); serialize_u32(u32);
            serialize_u64(u64); serialize_f32(f32); serialize_f64(f64); serialize_char(char);
            serialize_str(&str); serialize_bytes(&[u8]); serialize_none(); serialize_unit();
            serialize_unit_struct(&'static str);
            serialize_unit_variant(&'static str, u32, &'static str);
        }

        fn serialize_some<T: Serialize + ?Sized>(self, _: &T) -> Result<(), ShapeError> {
            Err(ShapeError)
        }

        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: &T,
        ) -> Result<(), ShapeError> {
            Err(ShapeError)
        }

        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: &T,
        ) -> Result<(), ShapeError> {
            Err(ShapeError)
        }

        fn serialize_tuple(self, _: usize) -> Result<Impossible<(), ShapeError>, ShapeError> {
            Err(ShapeError)
        }

        fn serialize_tuple_struct(
            self,
            _: &'static str,
            _: usize,
        ) -> Result<Impossible<(), ShapeError>, ShapeError> {
            Err(ShapeError)
        }

        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Impossible<(), ShapeError>, ShapeError> {
            Err(ShapeError)
        }

        fn serialize_map(self, _: Option<usize>) -> Result<Impossible<(), ShapeError>, ShapeError> {
            Err(ShapeError)
        }

        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Impossible<(), ShapeError>, ShapeError> {
            Err(ShapeError)
        }
    };
}
// Shared with `tree_nodes`, whose serializer follows a shape the same way.
pub(super) use {refuse, refuse_rest};

/// The `MessageSecretsStore` struct itself.
struct StoreSer<'a, 'k> {
    enc: &'a mut Encoder<'k>,
}

struct StoreFields<'a, 'k> {
    enc: &'a mut Encoder<'k>,
    next: usize,
}

impl<'a, 'k> ser::Serializer for StoreSer<'a, 'k> {
    type Ok = ();
    type Error = ShapeError;
    type SerializeSeq = Impossible<(), ShapeError>;
    type SerializeTuple = Impossible<(), ShapeError>;
    type SerializeTupleStruct = Impossible<(), ShapeError>;
    type SerializeTupleVariant = Impossible<(), ShapeError>;
    type SerializeMap = Impossible<(), ShapeError>;
    type SerializeStruct = StoreFields<'a, 'k>;
    type SerializeStructVariant = Impossible<(), ShapeError>;

    refuse_rest!();

    fn serialize_seq(self, _: Option<usize>) -> Result<Impossible<(), ShapeError>, ShapeError> {
        Err(ShapeError)
    }

    fn serialize_struct(self, name: &'static str, len: usize) -> Result<StoreFields<'a, 'k>, ShapeError> {
        if name != "MessageSecretsStore" || len != STORE_FIELDS.len() {
            return Err(ShapeError);
        }
        Ok(StoreFields { enc: self.enc, next: 0 })
    }
}

impl ser::SerializeStruct for StoreFields<'_, '_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ShapeError> {
        if STORE_FIELDS.get(self.next) != Some(&key) {
            return Err(ShapeError);
        }
        self.next += 1;
        if key == "past_epoch_trees" {
            value.serialize(TreesSer { enc: self.enc })
        } else {
            append(&mut self.enc.body, value)
        }
    }

    fn end(self) -> Result<(), ShapeError> {
        if self.next == STORE_FIELDS.len() { Ok(()) } else { Err(ShapeError) }
    }
}

/// The `past_epoch_trees` sequence.
struct TreesSer<'a, 'k> {
    enc: &'a mut Encoder<'k>,
}

struct TreesSeq<'a, 'k> {
    enc: &'a mut Encoder<'k>,
}

impl<'a, 'k> ser::Serializer for TreesSer<'a, 'k> {
    type Ok = ();
    type Error = ShapeError;
    type SerializeSeq = TreesSeq<'a, 'k>;
    type SerializeTuple = Impossible<(), ShapeError>;
    type SerializeTupleStruct = Impossible<(), ShapeError>;
    type SerializeTupleVariant = Impossible<(), ShapeError>;
    type SerializeMap = Impossible<(), ShapeError>;
    type SerializeStruct = Impossible<(), ShapeError>;
    type SerializeStructVariant = Impossible<(), ShapeError>;

    refuse_rest!();

    fn serialize_seq(self, len: Option<usize>) -> Result<TreesSeq<'a, 'k>, ShapeError> {
        // postcard writes a sequence's length first (a varint, as it writes a usize).
        let len = len.ok_or(ShapeError)?;
        append(&mut self.enc.body, &len)?;
        Ok(TreesSeq { enc: self.enc })
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Impossible<(), ShapeError>, ShapeError> {
        Err(ShapeError)
    }
}

impl ser::SerializeSeq for TreesSeq<'_, '_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ShapeError> {
        value.serialize(TreeSer { enc: self.enc })
    }

    fn end(self) -> Result<(), ShapeError> {
        Ok(())
    }
}

/// One `EpochTree`.
struct TreeSer<'a, 'k> {
    enc: &'a mut Encoder<'k>,
}

struct TreeFields<'a, 'k> {
    enc: &'a mut Encoder<'k>,
    next: usize,
    epoch: Option<u64>,
}

impl<'a, 'k> ser::Serializer for TreeSer<'a, 'k> {
    type Ok = ();
    type Error = ShapeError;
    type SerializeSeq = Impossible<(), ShapeError>;
    type SerializeTuple = Impossible<(), ShapeError>;
    type SerializeTupleStruct = Impossible<(), ShapeError>;
    type SerializeTupleVariant = Impossible<(), ShapeError>;
    type SerializeMap = Impossible<(), ShapeError>;
    type SerializeStruct = TreeFields<'a, 'k>;
    type SerializeStructVariant = Impossible<(), ShapeError>;

    refuse_rest!();

    fn serialize_seq(self, _: Option<usize>) -> Result<Impossible<(), ShapeError>, ShapeError> {
        Err(ShapeError)
    }

    fn serialize_struct(self, name: &'static str, len: usize) -> Result<TreeFields<'a, 'k>, ShapeError> {
        if name != "EpochTree" || len != TREE_FIELDS.len() {
            return Err(ShapeError);
        }
        Ok(TreeFields { enc: self.enc, next: 0, epoch: None })
    }
}

impl ser::SerializeStruct for TreeFields<'_, '_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ShapeError> {
        if TREE_FIELDS.get(self.next) != Some(&key) {
            return Err(ShapeError);
        }
        self.next += 1;
        match key {
            "epoch" => {
                let bytes = postcard::to_stdvec(value).map_err(|_| ShapeError)?;
                self.epoch = Some(postcard::from_bytes::<u64>(&bytes).map_err(|_| ShapeError)?);
                let mut body = Wiping(std::mem::take(&mut self.enc.body));
                body.extend(&bytes);
                self.enc.body = body.0;
                Ok(())
            }
            "leaves" => {
                let epoch = self.epoch.ok_or(ShapeError)?;
                let offset = u32::try_from(self.enc.body.len()).map_err(|_| ShapeError)?;
                self.enc.points.push((epoch, offset));
                if !(self.enc.known)(epoch) {
                    let mut records = Vec::new();
                    value.serialize(MembersSer { scratch: &mut self.enc.scratch, records: &mut records })?;
                    self.enc.new_leaves.push((epoch, records));
                }
                Ok(())
            }
            _ => append(&mut self.enc.body, value),
        }
    }

    fn end(self) -> Result<(), ShapeError> {
        if self.next == TREE_FIELDS.len() { Ok(()) } else { Err(ShapeError) }
    }
}

/// An epoch's `leaves` sequence: each member encoded on its own, into `records`.
struct MembersSer<'a> {
    scratch: &'a mut Zeroizing<Vec<u8>>,
    records: &'a mut Vec<Zeroizing<Vec<u8>>>,
}

impl<'a> ser::Serializer for MembersSer<'a> {
    type Ok = ();
    type Error = ShapeError;
    type SerializeSeq = MembersSer<'a>;
    type SerializeTuple = Impossible<(), ShapeError>;
    type SerializeTupleStruct = Impossible<(), ShapeError>;
    type SerializeTupleVariant = Impossible<(), ShapeError>;
    type SerializeMap = Impossible<(), ShapeError>;
    type SerializeStruct = Impossible<(), ShapeError>;
    type SerializeStructVariant = Impossible<(), ShapeError>;

    refuse_rest!();

    fn serialize_seq(self, len: Option<usize>) -> Result<MembersSer<'a>, ShapeError> {
        // The length is written back by `past_members::whole`, from the count of records.
        self.records.reserve_exact(len.ok_or(ShapeError)?);
        Ok(self)
    }

    fn serialize_struct(self, _: &'static str, _: usize) -> Result<Impossible<(), ShapeError>, ShapeError> {
        Err(ShapeError)
    }
}

impl ser::SerializeSeq for MembersSer<'_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ShapeError> {
        // Encoded in `scratch` (kept between members, so it grows to the largest once) and
        // copied out at its exact size.
        self.scratch.clear();
        self.scratch.push(VALUE_TAG);
        append(self.scratch, value)?;
        self.records.push(Zeroizing::new(self.scratch.to_vec()));
        Ok(())
    }

    fn end(self) -> Result<(), ShapeError> {
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    // Stand-ins of openmls's private types, with the same names, fields and serde derives.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Member {
        index: u32,
        encryption_key: Vec<u8>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct EpochTree {
        epoch: u64,
        message_secrets: Vec<Option<[u8; 4]>>,
        leaves: Vec<Member>,
    }

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct MessageSecretsStore {
        max_epochs: usize,
        past_epoch_trees: std::collections::VecDeque<EpochTree>,
        message_secrets: Vec<Option<[u8; 4]>>,
    }

    fn store(epochs: std::ops::Range<u64>) -> MessageSecretsStore {
        let tree = |epoch: u64| EpochTree {
            epoch,
            message_secrets: vec![Some([epoch as u8; 4]), None],
            leaves: (0..3)
                .map(|i| Member { index: i, encryption_key: vec![epoch as u8 ^ i as u8; 300] })
                .collect(),
        };
        MessageSecretsStore {
            max_epochs: 5,
            past_epoch_trees: epochs.map(tree).collect(),
            message_secrets: vec![None, Some([9; 4])],
        }
    }

    fn leaves_of(s: &Split) -> impl FnMut(u64) -> Result<Option<Zeroizing<Vec<u8>>>, ()> + '_ {
        |e| {
            Ok(s.new_leaves
                .iter()
                .find(|(x, _)| *x == e)
                .and_then(|(_, m)| super::super::past_members::whole(m)))
        }
    }

    #[test]
    fn split_then_join_gives_the_postcard_bytes() {
        for value in [store(0..0), store(7..8), store(300..305)] {
            let s = split(&value, &|_| false).unwrap();
            assert_eq!(s.epochs, value.past_epoch_trees.iter().map(|t| t.epoch).collect::<Vec<_>>());
            assert_eq!(s.new_leaves.len(), s.epochs.len());
            let joined = join(&s.main, leaves_of(&s)).unwrap().unwrap();
            assert_eq!(joined.as_slice(), postcard::to_stdvec(&value).unwrap().as_slice());
            assert_eq!(postcard::from_bytes::<MessageSecretsStore>(&joined).unwrap(), value);
        }
    }

    #[test]
    fn known_epochs_are_not_encoded_again() {
        let s = split(&store(3..8), &|e| e < 6).unwrap();
        assert_eq!(s.new_leaves.iter().map(|(e, _)| *e).collect::<Vec<_>>(), vec![6, 7]);
        // One record per member, each the postcard of that member.
        let (_, members) = &s.new_leaves[0];
        assert_eq!(members.len(), 3);
        let mut first = vec![VALUE_TAG];
        first.extend(postcard::to_stdvec(&store(6..7).past_epoch_trees[0].leaves[0]).unwrap());
        assert_eq!(members[0].as_slice(), first.as_slice());
        // The main record holds no member's key.
        assert!(s.main.len() < 300);
    }

    #[test]
    fn another_shape_is_refused() {
        #[derive(Serialize)]
        struct MessageSecretsStore {
            max_epochs: usize,
            message_secrets: u8,
        }
        assert!(split(&MessageSecretsStore { max_epochs: 1, message_secrets: 2 }, &|_| false).is_err());
        assert!(split(&7u32, &|_| false).is_err());
    }

    #[test]
    fn leaves_of_another_shape_are_refused() {
        #[derive(Serialize)]
        struct EpochTree {
            epoch: u64,
            message_secrets: u8,
            leaves: [u8; 2],
        }
        #[derive(Serialize)]
        struct MessageSecretsStore {
            max_epochs: usize,
            past_epoch_trees: Vec<EpochTree>,
            message_secrets: u8,
        }
        let tree = EpochTree { epoch: 1, message_secrets: 0, leaves: [1, 2] };
        let value = MessageSecretsStore { max_epochs: 1, past_epoch_trees: vec![tree], message_secrets: 0 };
        assert!(split(&value, &|_| false).is_err(), "a tuple is not a member list");
    }

    #[test]
    fn damaged_main_records_and_missing_leaves_are_refused() {
        let s = split(&store(1..3), &|_| false).unwrap();
        assert!(join(&s.main, |_| Ok::<_, ()>(None)).unwrap().is_none());
        assert_eq!(join(&s.main, |_| Err("read failed")).unwrap_err(), "read failed");
        for cut in [1, 4, 9, 16] {
            assert!(join(&s.main[..cut], leaves_of(&s)).unwrap().is_none(), "cut at {cut}");
        }
        let mut huge = s.main.to_vec();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(join(&huge, leaves_of(&s)).unwrap().is_none());
    }
}
