//! The member lists of a group's past epochs stored as references to member records shared
//! between epochs, so that a commit writes the members that changed and a short list instead of
//! the ended epoch's whole member list (issue 12: 165 KB per processed commit at 128 members).
//!
//! [`super::past_leaves`] hands over each new past epoch's member list one member at a time,
//! each as a *member record*: [`VALUE_TAG`] ‖ postcard of openmls's `Member` (index,
//! credential, X-Wing encryption key, signature key). A member record is stored under its
//! *reference*, the SHA-256 of the record, so two epochs that hold the same member hold the same
//! record: consecutive epochs share every member but the committer's changed leaf (and those
//! added or removed). An epoch's leaves record becomes a *list*: [`LIST_TAG`] ‖ u32 LE count ‖
//! count × 32-byte reference (4 KB at 128 members). [`join`] gives back the leaves record as
//! format 4 stored it, [`VALUE_TAG`] ‖ postcard of the `Vec<Member>`: postcard writes a
//! sequence as a varint length and its items, so that is the count and the members' bytes in
//! order. A leaves record of format 4 (tagged [`VALUE_TAG`], members inline) is still read as it
//! is and references nothing.
//!
//! # Garbage collection
//! Member records belong to one group (its id is in their storage key) and nothing counts them.
//! A group's *live set* is the union of the references in the lists of the past epochs its
//! message secrets' main record names. Invariant: the group's member records are exactly its
//! live set. It holds for a new group (no past epoch, no member record), and every write of the
//! message secrets that changes which epochs are named moves from the old live set to the new
//! one ([`changes`]): it writes the new lists and the members that were not live, and deletes
//! the lists of the epochs no longer named and the members no longer live, all in the overlay
//! that lands in the same transaction as the main record ([`super::mls::MlsStore::flush`]); a
//! failed operation forgets the whole overlay. The epochs of a main record change only through
//! such a write, so:
//! - an epoch leaving openmls's window (`max_past_epochs`): its list is deleted, and with it
//!   every member no kept epoch references;
//! - a group deleted: openmls deletes its message secrets, the new live set is empty, every
//!   member record of the group is deleted;
//! - a value stored whole (an unexpected shape) names no epoch: same as deleted;
//! - the whole home: one database file, deleted whole.
//!
//! A write that changes no epoch (every message sent or received) reads no list; one that does
//! (a commit) reads the group's lists, cached since the group was loaded. With no count there is
//! no count to get wrong. A damaged list cannot say what it referenced, so a write that would
//! drop it is an error rather than a silent leak.

use std::collections::BTreeSet;

use sha2::{Digest, Sha256};
use zeroize::Zeroizing;

use super::mls::VALUE_TAG;
use super::past_leaves::{ShapeError, Wiping};

/// First byte of a past epoch's list of member references; neither [`VALUE_TAG`], the other
/// split tags nor the first byte of JSON text.
pub const LIST_TAG: u8 = 0xb4;

/// A member record's reference: the SHA-256 of the record.
pub type MemberRef = [u8; 32];

/// Length of a list's header: tag and u32 count.
const LIST_HEADER_LEN: usize = 1 + 4;

/// The reference of a member record.
pub fn reference(record: &[u8]) -> MemberRef {
    Sha256::digest(record).into()
}

/// A list record naming `refs` in order.
pub fn list(refs: &[MemberRef]) -> Result<Zeroizing<Vec<u8>>, ShapeError> {
    let count = u32::try_from(refs.len()).map_err(|_| ShapeError)?;
    let mut out = Zeroizing::new(Vec::with_capacity(LIST_HEADER_LEN + 32 * refs.len()));
    out.push(LIST_TAG);
    out.extend_from_slice(&count.to_le_bytes());
    for r in refs {
        out.extend_from_slice(r);
    }
    Ok(out)
}

/// True when `record` is a list (rather than a leaves record with its members inline).
pub fn is_list(record: &[u8]) -> bool {
    record.first() == Some(&LIST_TAG)
}

/// The references a list names, in order; None when `record` is not a well-formed list.
pub fn refs(record: &[u8]) -> Option<Vec<MemberRef>> {
    let rest = record.strip_prefix(&[LIST_TAG])?;
    let (count, rest) = rest.split_at_checked(4)?;
    let count = u32::from_le_bytes(count.try_into().ok()?) as usize;
    // Exactly the references the count announces: a longer or shorter record is damage.
    if rest.len() != count.checked_mul(32)? {
        return None;
    }
    rest.chunks_exact(32).map(|c| c.try_into().ok()).collect()
}

/// The leaves record of format 4 ([`VALUE_TAG`] ‖ postcard of the member list) made of
/// `members` (each [`VALUE_TAG`] ‖ postcard of one member); None when one is not tagged.
pub fn whole<M: AsRef<[u8]>>(members: &[M]) -> Option<Zeroizing<Vec<u8>>> {
    let size = 1 + 10 + members.iter().map(|m| m.as_ref().len()).sum::<usize>();
    let mut out = Wiping::with_capacity(size);
    out.extend(&[VALUE_TAG]);
    // postcard writes a sequence's length as it writes a usize: a varint.
    let len = postcard::to_stdvec(&members.len()).ok()?;
    out.extend(&len);
    for m in members {
        out.extend(m.as_ref().strip_prefix(&[VALUE_TAG])?);
    }
    Some(out.0)
}

/// The leaves record of format 4 for a list: the members `member` returns for each
/// reference, in order. `Ok(None)` when the list is damaged or a member record is missing; an
/// error of `member` (reading a record) is returned as it is.
pub fn join<E>(
    record: &[u8],
    mut member: impl FnMut(&MemberRef) -> Result<Option<Zeroizing<Vec<u8>>>, E>,
) -> Result<Option<Zeroizing<Vec<u8>>>, E> {
    let Some(refs) = refs(record) else { return Ok(None) };
    let mut members = Vec::with_capacity(refs.len());
    for r in &refs {
        let Some(m) = member(r)? else { return Ok(None) };
        members.push(m);
    }
    Ok(whole(&members))
}

/// What moving a group's live set from `old` to `new` takes: (the references to write, those
/// to delete). A reference live before and after is left alone: its record is there.
pub fn changes(old: &BTreeSet<MemberRef>, new: &BTreeSet<MemberRef>) -> (Vec<MemberRef>, Vec<MemberRef>) {
    (new.difference(old).copied().collect(), old.difference(new).copied().collect())
}

#[cfg(test)]
mod tests {
    use serde::{Deserialize, Serialize};

    use super::*;

    #[derive(Serialize, Deserialize, Debug, PartialEq, Clone)]
    struct Member {
        index: u32,
        encryption_key: Vec<u8>,
    }

    fn record(m: &Member) -> Zeroizing<Vec<u8>> {
        Zeroizing::new(postcard::to_extend(m, vec![VALUE_TAG]).unwrap())
    }

    #[test]
    fn a_list_joins_to_the_postcard_bytes_of_the_member_list() {
        for n in [0u32, 1, 127, 128, 300] {
            let members: Vec<Member> =
                (0..n).map(|i| Member { index: i, encryption_key: vec![i as u8; 40] }).collect();
            let records: Vec<_> = members.iter().map(record).collect();
            let refs: Vec<MemberRef> = records.iter().map(|r| reference(r)).collect();
            let l = list(&refs).unwrap();
            assert!(is_list(&l));
            assert_eq!(l.len(), 5 + 32 * n as usize);
            let by_ref = |r: &MemberRef| Ok::<_, ()>(records.iter().find(|m| reference(m) == *r).cloned());
            let joined = join(&l, by_ref).unwrap().unwrap();
            let mut expected = vec![VALUE_TAG];
            expected.extend(postcard::to_stdvec(&members).unwrap());
            assert_eq!(joined.as_slice(), expected.as_slice(), "{n} members");
        }
    }

    #[test]
    fn equal_members_share_a_reference_and_changed_ones_do_not() {
        let a = Member { index: 3, encryption_key: vec![1; 40] };
        let mut b = a.clone();
        assert_eq!(reference(&record(&a)), reference(&record(&b)));
        b.encryption_key[39] = 2;
        assert_ne!(reference(&record(&a)), reference(&record(&b)));
    }

    #[test]
    fn damaged_lists_and_missing_members_are_refused() {
        let records: Vec<_> = (0..3).map(|i| record(&Member { index: i, encryption_key: vec![] })).collect();
        let named: Vec<MemberRef> = records.iter().map(|r| reference(r)).collect();
        let l = list(&named).unwrap();
        let all = |r: &MemberRef| Ok::<_, ()>(records.iter().find(|m| reference(m) == *r).cloned());
        assert!(join(&l, all).unwrap().is_some());
        assert_eq!(join(&l, |_| Ok::<_, ()>(None)).unwrap(), None);
        assert_eq!(
            join(&l, |_| Err::<Option<Zeroizing<Vec<u8>>>, _>("read failed")).unwrap_err(),
            "read failed"
        );
        for cut in [0, 1, 4, 5, 6, l.len() - 1] {
            assert_eq!(refs(&l[..cut]), None, "cut at {cut}");
        }
        let mut long = l.to_vec();
        long.push(0);
        assert_eq!(refs(&long), None);
        let mut huge = l.to_vec();
        huge[1..5].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(refs(&huge), None);
        assert_eq!(refs(&records[0]), None, "a member record is no list");
    }

    #[test]
    fn changes_write_what_became_live_and_delete_what_no_longer_is() {
        let set = |xs: &[u8]| xs.iter().map(|&x| [x; 32]).collect::<BTreeSet<_>>();
        let (put, delete) = changes(&set(&[1, 2, 3]), &set(&[2, 3, 4]));
        assert_eq!((put, delete), (vec![[4; 32]], vec![[1; 32]]));
        let (put, delete) = changes(&set(&[1, 2]), &set(&[]));
        assert_eq!((put, delete), (vec![], vec![[1; 32], [2; 32]]));
        assert_eq!(changes(&set(&[5]), &set(&[5])), (vec![], vec![]));
    }
}
