//! openmls's ratchet tree stored one record per node, so that a commit rewrites the nodes it
//! changed instead of the whole tree (issue 12).
//!
//! openmls writes a group's `TreeSync` after every commit it sends or merges:
//! `{ tree: ABinaryTree { leaf_nodes, parent_nodes, default_leaf, default_parent }, tree_hash }`.
//! At 128 members that is about 190 KB (every leaf carries an X-Wing public key of 1216 bytes),
//! while a commit changes one leaf and the parents on its path. [`split`] encodes the value
//! with serializers that follow its shape: every leaf and parent node is encoded on its own
//! (a *node record*), everything else goes into the *main* record exactly as postcard would
//! write it, with the nodes left out. The caller then writes only the node records whose bytes
//! changed. [`join`] puts the postcard bytes back together: postcard writes a struct as its
//! fields in order and a sequence as a varint length and its items, so the whole value is the
//! main body with the leaves and the parents spliced in at the two offsets the main record
//! names.
//!
//! Main record: [`SPLIT_TAG`] ‖ u32 LE leaf count ‖ u32 LE leaves offset ‖ u32 LE parent count ‖
//! u32 LE parents offset ‖ body. Node record: [`super::mls::VALUE_TAG`] ‖ postcard of the node.
//! A value of another shape (a later openmls) is refused by [`split`] with [`ShapeError`]: the
//! caller then stores it whole. The tree holds public keys only, but its buffers are
//! [`Zeroizing`] like every other plaintext of the store.

use serde::Serialize;
use serde::ser::{self, Impossible};
use zeroize::Zeroizing;

use super::mls::VALUE_TAG;
use super::past_leaves::{ShapeError, Wiping, refuse, refuse_rest};

/// First byte of a split tree's main record; neither [`VALUE_TAG`], the past-leaves tag nor
/// the first byte of JSON text.
pub const SPLIT_TAG: u8 = 0xb3;

/// Length of the main record's header: tag and four u32.
const HEADER_LEN: usize = 1 + 4 * 4;

/// The two kinds of node, each numbered from 0 in openmls's arrays.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NodeKind {
    Leaf,
    Parent,
}

/// What [`split`] produced.
pub struct Split {
    /// The main record, [`SPLIT_TAG`] first.
    pub main: Zeroizing<Vec<u8>>,
    /// The node records of the leaves, in order, [`VALUE_TAG`] first.
    pub leaves: Vec<Zeroizing<Vec<u8>>>,
    /// The node records of the parents, in order.
    pub parents: Vec<Zeroizing<Vec<u8>>>,
}

/// Encodes a `TreeSync` as a main record and one record per node.
pub fn split<V: Serialize + ?Sized>(value: &V) -> Result<Split, ShapeError> {
    let mut enc = Encoder {
        body: Zeroizing::new(Vec::new()),
        scratch: Zeroizing::new(Vec::new()),
        leaves: None,
        parents: None,
    };
    value.serialize(Shaped { enc: &mut enc, level: Level::TreeSync })?;
    let (Some((leaf_off, leaves)), Some((parent_off, parents))) = (enc.leaves, enc.parents) else {
        return Err(ShapeError);
    };
    let u32_of = |n: usize| u32::try_from(n).map_err(|_| ShapeError);
    let mut main = Wiping::with_capacity(HEADER_LEN + enc.body.len());
    main.extend(&[SPLIT_TAG]);
    for n in [leaves.len(), leaf_off, parents.len(), parent_off] {
        main.extend(&u32_of(n)?.to_le_bytes());
    }
    main.extend(&enc.body);
    Ok(Split { main: main.0, leaves, parents })
}

/// The node counts a main record names: (leaves, parents); None when `main` is not a
/// well-formed split record.
pub fn counts(main: &[u8]) -> Option<(usize, usize)> {
    let h = header(main)?;
    Some((h.leaves, h.parents))
}

struct Header<'a> {
    leaves: usize,
    leaf_off: usize,
    parents: usize,
    parent_off: usize,
    body: &'a [u8],
}

fn header(main: &[u8]) -> Option<Header<'_>> {
    let rest = main.strip_prefix(&[SPLIT_TAG])?;
    let (head, body) = rest.split_at_checked(HEADER_LEN - 1)?;
    let field = |i: usize| -> Option<usize> {
        let bytes = head.get(4 * i..4 * i + 4)?;
        Some(u32::from_le_bytes(bytes.try_into().ok()?) as usize)
    };
    let h =
        Header { leaves: field(0)?, leaf_off: field(1)?, parents: field(2)?, parent_off: field(3)?, body };
    // Offsets in order and inside the body. The counts are not bounded here: [`join`] asks for
    // the nodes one by one and stops at the first missing one.
    (h.leaf_off <= h.parent_off && h.parent_off <= body.len()).then_some(h)
}

/// The postcard bytes of the whole value: `main`'s body with every node record (as `node`
/// returns it, [`VALUE_TAG`] first) spliced in. `Ok(None)` when a record is damaged or
/// missing; an error of `node` (reading a record) is returned as it is.
pub fn join<E>(
    main: &[u8],
    mut node: impl FnMut(NodeKind, usize) -> Result<Option<Zeroizing<Vec<u8>>>, E>,
) -> Result<Option<Zeroizing<Vec<u8>>>, E> {
    let Some(h) = header(main) else { return Ok(None) };
    let mut leaves = Vec::with_capacity(h.leaves.min(main.len()));
    for i in 0..h.leaves {
        let Some(n) = node(NodeKind::Leaf, i)? else { return Ok(None) };
        leaves.push(n);
    }
    let mut parents = Vec::with_capacity(h.parents.min(main.len()));
    for i in 0..h.parents {
        let Some(n) = node(NodeKind::Parent, i)? else { return Ok(None) };
        parents.push(n);
    }
    let nodes_len: usize = leaves.iter().chain(&parents).map(|n| n.len()).sum();
    let mut out = Wiping::with_capacity(h.body.len() + nodes_len);
    let (Some(before), Some(between), Some(after)) =
        (h.body.get(..h.leaf_off), h.body.get(h.leaf_off..h.parent_off), h.body.get(h.parent_off..))
    else {
        return Ok(None);
    };
    out.extend(before);
    for n in &leaves {
        let Some(bytes) = n.strip_prefix(&[VALUE_TAG]) else { return Ok(None) };
        out.extend(bytes);
    }
    out.extend(between);
    for n in &parents {
        let Some(bytes) = n.strip_prefix(&[VALUE_TAG]) else { return Ok(None) };
        out.extend(bytes);
    }
    out.extend(after);
    Ok(Some(out.0))
}

/// Appends the postcard encoding of `value` to `buf`.
fn append<T: Serialize + ?Sized>(buf: &mut Zeroizing<Vec<u8>>, value: &T) -> Result<(), ShapeError> {
    let taken = Wiping(std::mem::take(buf));
    *buf = postcard::serialize_with_flavor(value, taken).map_err(|_| ShapeError)?;
    Ok(())
}

/// One node record: [`VALUE_TAG`] ‖ postcard, encoded in `scratch` (kept between nodes, so
/// it grows to the largest node once) and copied out at its exact size.
fn node_record<T: Serialize + ?Sized>(
    scratch: &mut Zeroizing<Vec<u8>>,
    value: &T,
) -> Result<Zeroizing<Vec<u8>>, ShapeError> {
    scratch.clear();
    scratch.push(VALUE_TAG);
    append(scratch, value)?;
    Ok(Zeroizing::new(scratch.to_vec()))
}

struct Encoder {
    body: Zeroizing<Vec<u8>>,
    /// Where each node is encoded before it is copied into its record.
    scratch: Zeroizing<Vec<u8>>,
    /// (offset in `body` where the leaves belong, their records).
    leaves: Option<(usize, Vec<Zeroizing<Vec<u8>>>)>,
    parents: Option<(usize, Vec<Zeroizing<Vec<u8>>>)>,
}

/// Field names of openmls 0.9's `TreeSync` and `ABinaryTree`, in declaration order.
const TREESYNC_FIELDS: [&str; 2] = ["tree", "tree_hash"];
const BINARY_TREE_FIELDS: [&str; 4] = ["leaf_nodes", "parent_nodes", "default_leaf", "default_parent"];

/// Where in the shape a serializer stands.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Level {
    /// The `TreeSync` struct.
    TreeSync,
    /// Its `tree` field, an `ABinaryTree` struct.
    BinaryTree,
    /// One of the node sequences.
    Nodes(NodeKind),
}

impl Level {
    fn struct_shape(self) -> Option<(&'static str, &'static [&'static str])> {
        match self {
            Level::TreeSync => Some(("TreeSync", &TREESYNC_FIELDS)),
            Level::BinaryTree => Some(("ABinaryTree", &BINARY_TREE_FIELDS)),
            Level::Nodes(_) => None,
        }
    }
}

/// A serializer that follows the shape; refuses whatever does not match it.
struct Shaped<'a> {
    enc: &'a mut Encoder,
    level: Level,
}

struct Fields<'a> {
    enc: &'a mut Encoder,
    level: Level,
    next: usize,
}

struct Nodes<'a> {
    enc: &'a mut Encoder,
    kind: NodeKind,
    records: Vec<Zeroizing<Vec<u8>>>,
}

impl<'a> ser::Serializer for Shaped<'a> {
    type Ok = ();
    type Error = ShapeError;
    type SerializeSeq = Nodes<'a>;
    type SerializeTuple = Impossible<(), ShapeError>;
    type SerializeTupleStruct = Impossible<(), ShapeError>;
    type SerializeTupleVariant = Impossible<(), ShapeError>;
    type SerializeMap = Impossible<(), ShapeError>;
    type SerializeStruct = Fields<'a>;
    type SerializeStructVariant = Impossible<(), ShapeError>;

    refuse_rest!();

    fn serialize_seq(self, len: Option<usize>) -> Result<Nodes<'a>, ShapeError> {
        let Level::Nodes(kind) = self.level else { return Err(ShapeError) };
        // postcard writes a sequence's length first (a varint, as it writes a usize); the
        // nodes follow it.
        let len = len.ok_or(ShapeError)?;
        append(&mut self.enc.body, &len)?;
        Ok(Nodes { enc: self.enc, kind, records: Vec::with_capacity(len) })
    }

    fn serialize_struct(self, name: &'static str, len: usize) -> Result<Fields<'a>, ShapeError> {
        match self.level.struct_shape() {
            Some((expected, fields)) if name == expected && len == fields.len() => {
                Ok(Fields { enc: self.enc, level: self.level, next: 0 })
            }
            _ => Err(ShapeError),
        }
    }
}

impl ser::SerializeStruct for Fields<'_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_field<T: Serialize + ?Sized>(
        &mut self,
        key: &'static str,
        value: &T,
    ) -> Result<(), ShapeError> {
        let fields = self.level.struct_shape().map_or(&[][..], |(_, f)| f);
        if fields.get(self.next) != Some(&key) {
            return Err(ShapeError);
        }
        self.next += 1;
        let inner = match (self.level, key) {
            (Level::TreeSync, "tree") => Level::BinaryTree,
            (Level::BinaryTree, "leaf_nodes") => Level::Nodes(NodeKind::Leaf),
            (Level::BinaryTree, "parent_nodes") => Level::Nodes(NodeKind::Parent),
            _ => return append(&mut self.enc.body, value),
        };
        value.serialize(Shaped { enc: self.enc, level: inner })
    }

    fn end(self) -> Result<(), ShapeError> {
        let fields = self.level.struct_shape().map_or(0, |(_, f)| f.len());
        if self.next == fields { Ok(()) } else { Err(ShapeError) }
    }
}

impl ser::SerializeSeq for Nodes<'_> {
    type Ok = ();
    type Error = ShapeError;

    fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), ShapeError> {
        self.records.push(node_record(&mut self.enc.scratch, value)?);
        Ok(())
    }

    fn end(self) -> Result<(), ShapeError> {
        let slot = match self.kind {
            NodeKind::Leaf => &mut self.enc.leaves,
            NodeKind::Parent => &mut self.enc.parents,
        };
        if slot.is_some() {
            return Err(ShapeError);
        }
        *slot = Some((self.enc.body.len(), self.records));
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use serde::{Deserialize, Serialize};

    use super::*;

    // Stand-ins of openmls's private types, with the same names, fields and serde derives.
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone, Default)]
    struct TreeSyncLeafNode {
        node: Option<Vec<u8>>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone, Default)]
    struct TreeSyncParentNode {
        node: Option<(Vec<u8>, Vec<u32>)>,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct ABinaryTree {
        leaf_nodes: Vec<TreeSyncLeafNode>,
        parent_nodes: Vec<TreeSyncParentNode>,
        default_leaf: TreeSyncLeafNode,
        default_parent: TreeSyncParentNode,
    }
    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct TreeSync {
        tree: ABinaryTree,
        tree_hash: Vec<u8>,
    }

    fn tree(leaves: u8) -> TreeSync {
        let leaf = |i: u8| TreeSyncLeafNode { node: (i % 3 != 1).then(|| vec![i; 40 + i as usize]) };
        let parent = |i: u8| TreeSyncParentNode { node: (i % 2 == 0).then(|| (vec![i; 30], vec![i.into()])) };
        TreeSync {
            tree: ABinaryTree {
                leaf_nodes: (0..leaves).map(leaf).collect(),
                parent_nodes: (0..leaves.saturating_sub(1)).map(parent).collect(),
                default_leaf: TreeSyncLeafNode::default(),
                default_parent: TreeSyncParentNode::default(),
            },
            tree_hash: vec![0xaa; 32],
        }
    }

    fn records(s: &Split) -> BTreeMap<(u8, usize), Zeroizing<Vec<u8>>> {
        let leaves = s.leaves.iter().enumerate().map(|(i, r)| ((0, i), r.clone()));
        let parents = s.parents.iter().enumerate().map(|(i, r)| ((1, i), r.clone()));
        leaves.chain(parents).collect()
    }

    fn fetch(
        records: &BTreeMap<(u8, usize), Zeroizing<Vec<u8>>>,
    ) -> impl FnMut(NodeKind, usize) -> Result<Option<Zeroizing<Vec<u8>>>, ()> + '_ {
        |kind, i| Ok(records.get(&(u8::from(kind == NodeKind::Parent), i)).cloned())
    }

    #[test]
    fn split_then_join_gives_the_postcard_bytes() {
        for n in [1u8, 2, 5, 130] {
            let value = tree(n);
            let s = split(&value).unwrap();
            assert_eq!((s.leaves.len(), s.parents.len()), (n as usize, n as usize - 1));
            assert_eq!(counts(&s.main), Some((n as usize, n as usize - 1)));
            let whole = join(&s.main, fetch(&records(&s))).unwrap().unwrap();
            assert_eq!(whole.as_slice(), postcard::to_stdvec(&value).unwrap().as_slice());
            assert_eq!(postcard::from_bytes::<TreeSync>(&whole).unwrap(), value);
        }
    }

    #[test]
    fn changing_one_leaf_changes_its_record_and_nothing_else() {
        let before = tree(16);
        let mut after = before.clone();
        after.tree.leaf_nodes[3].node = Some(vec![7; 50]);
        after.tree_hash = vec![0xbb; 32];
        let (a, b) = (records(&split(&before).unwrap()), records(&split(&after).unwrap()));
        let changed: Vec<_> = a.keys().filter(|k| a[k] != b[k]).collect();
        assert_eq!(changed, [&(0, 3)]);
    }

    #[test]
    fn another_shape_is_refused() {
        #[derive(Serialize)]
        struct TreeSync {
            tree: Vec<u8>,
            tree_hash: Vec<u8>,
        }
        assert!(split(&TreeSync { tree: vec![1], tree_hash: vec![] }).is_err());
        assert!(split(&vec![1u8, 2]).is_err());
    }

    #[test]
    fn damaged_main_records_and_missing_nodes_are_refused() {
        let s = split(&tree(4)).unwrap();
        let all = records(&s);
        let mut missing = all.clone();
        missing.remove(&(1, 2));
        assert_eq!(join(&s.main, fetch(&missing)).unwrap(), None);
        for cut in [0, 1, 5, HEADER_LEN - 1] {
            assert_eq!(join(&s.main[..cut], fetch(&all)).unwrap(), None, "cut at {cut}");
        }
        let mut bad = s.main.to_vec();
        bad[5] = 0xff; // leaves offset beyond the body
        assert_eq!(join(&bad, fetch(&all)).unwrap(), None);
        let mut huge = s.main.to_vec();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(join(&huge, fetch(&all)).unwrap(), None, "a missing node ends the join early");
    }
}
