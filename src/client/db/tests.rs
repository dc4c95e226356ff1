//! The client database's format, keys and bad input; the openmls store over it.

use std::sync::Arc;

use openmls::prelude::*;
use openmls_basic_credential::SignatureKeyPair;
use openmls_traits::OpenMlsProvider;
use openmls_traits::storage::StorageProvider as _;
use redb::ReadableTableMetadata;
use tls_codec::{Deserialize as _, Serialize as _};

use super::mls::{
    DbProvider, MlsStore, PAST_LEAVES_LABEL, PAST_MEMBER_LABEL, TREE_NODE_LABEL, past_member_key,
};
use super::past_members;
use super::*;
use crate::crypto::statefile::KdfParams;

/// Cheap Argon2id parameters: the tests are about the format, not the cost.
const FAST: KdfParams = KdfParams { m_cost_kib: 8, t_cost: 1, p_cost: 1 };

fn new_db() -> (tempfile::TempDir, StateKey, ClientDb) {
    let dir = tempfile::tempdir().unwrap();
    let key = StateKey::from_passphrase(b"correct horse", FAST).unwrap();
    let db = ClientDb::create(dir.path(), &key, &DbKey::of(&key)).unwrap();
    (dir, key, db)
}

fn count(db: &ClientDb, table: Table) -> u64 {
    let txn = db.raw().as_ref().unwrap().begin_read().unwrap();
    txn.open_table(table.def()).unwrap().len().unwrap()
}

/// Writes `format` into the `meta` record, as an older qpq left the file.
pub(super) fn set_format(db: &ClientDb, format: u32) {
    let txn = db.raw().as_ref().unwrap().begin_write().unwrap();
    txn.open_table(META).unwrap().insert(META_FORMAT, format.to_le_bytes().as_slice()).unwrap();
    txn.commit().unwrap();
}

/// The bytes of the `meta` format record.
pub(super) fn stored_format(db: &ClientDb) -> Vec<u8> {
    let txn = db.raw().as_ref().unwrap().begin_read().unwrap();
    txn.open_table(META).unwrap().get(META_FORMAT).unwrap().unwrap().value().to_vec()
}

/// Checks that the `meta` format record says the current format (after an upgrade).
fn assert_current_format(db: &ClientDb) {
    let format = stored_format(db);
    assert_eq!(format, DB_FORMAT_VERSION.to_le_bytes(), "the format record says {DB_FORMAT_VERSION}");
}

/// Writes `records` (the MLS records as an older format wrote them) into `db`, marks it format
/// `format`, closes it and opens it again, which upgrades it; checks the upgraded format record.
fn reopened_as_format(
    db: ClientDb,
    dir: &tempfile::TempDir,
    key: &StateKey,
    records: Vec<super::mls::MlsRecord>,
    format: u32,
) -> Arc<ClientDb> {
    let old = MlsStore::memory();
    old.restore(records);
    flush_commit(&db, &old);
    set_format(&db, format);
    drop(db);
    // An older format opens with the passphrase, which proves the key the upgrade writes under.
    let _ = key;
    let db = Arc::new(ClientDb::unlock(dir.path(), Some(b"correct horse")).unwrap().1);
    assert_current_format(&db);
    db
}

#[test]
fn records_round_trip_and_nothing_readable_reaches_the_file() {
    let (dir, key, db) = new_db();
    let mut w = db.write().unwrap();
    w.put(Table::State, b"contacts", b"bob=secret-contact-name").unwrap();
    w.put_history(b"group-id-in-clear", HistoryKey { at_ms: 1, index: 0 }, b"a very private message")
        .unwrap();
    assert_eq!(w.commit().unwrap(), 1, "first write is generation 1");
    assert_eq!(db.get(Table::State, b"contacts").unwrap().unwrap().as_slice(), b"bob=secret-contact-name");
    assert_eq!(db.get(Table::Mls, b"contacts").unwrap(), None, "tables are separate");
    drop(db);
    let bytes = std::fs::read(dir.path().join(DB_FILE)).unwrap();
    for needle in [&b"secret-contact-name"[..], b"contacts", b"group-id-in-clear", b"very private"] {
        assert!(
            !bytes.windows(needle.len()).any(|w| w == needle),
            "{:?} on disk",
            String::from_utf8_lossy(needle)
        );
    }
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join(DB_FILE)).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);
    }
    let db = ClientDb::open(dir.path(), &DbKey::of(&key)).unwrap();
    assert_eq!(db.generation().unwrap(), 1);
    assert_eq!(db.get(Table::State, b"contacts").unwrap().unwrap().as_slice(), b"bob=secret-contact-name");
}

#[test]
fn the_passphrase_unlocks_and_a_wrong_or_missing_one_is_refused_by_name() {
    let (dir, _key, db) = new_db();
    drop(db);
    assert!(ClientDb::is_passphrase_protected(dir.path()).unwrap());
    let (_, db) = ClientDb::unlock(dir.path(), Some(b"correct horse")).unwrap();
    drop(db);
    let err = ClientDb::unlock(dir.path(), Some(b"wrong")).unwrap_err();
    assert_eq!(err.to_string(), "wrong passphrase or corrupted state file");
    let err = ClientDb::unlock(dir.path(), None).unwrap_err();
    assert!(err.to_string().starts_with("state file is encrypted with a passphrase"), "{err}");
    // A key from another derivation (another salt) is not taken for this home's.
    let other = StateKey::from_passphrase(b"correct horse", FAST).unwrap();
    assert!(matches!(ClientDb::open(dir.path(), &DbKey::of(&other)), Err(DbError::KeyChanged(_))));
    // The unprotected mode needs nothing.
    let plain = tempfile::tempdir().unwrap();
    drop(ClientDb::create(plain.path(), &StateKey::unprotected(), &DbKey::random()).unwrap());
    assert!(!ClientDb::is_passphrase_protected(plain.path()).unwrap());
    assert!(ClientDb::unlock(plain.path(), None).is_ok());
}

#[test]
fn a_newer_or_older_format_is_refused_by_name() {
    for (found, word) in [(DB_FORMAT_VERSION + 1, "newer"), (0, "older"), (1, "older")] {
        let (dir, key, db) = new_db();
        set_format(&db, found);
        drop(db);
        let err = ClientDb::open(dir.path(), &DbKey::of(&key)).unwrap_err();
        assert!(err.to_string().contains(&format!("client database format {found}, {word} than")), "{err}");
    }
}

/// Fails without the upgrade: format 2 is then refused as older.
#[test]
fn a_format_2_database_is_upgraded_in_place_and_keeps_its_records() {
    let (dir, key, db) = new_db();
    let mut w = db.write().unwrap();
    w.put(Table::State, b"contacts", b"bob").unwrap();
    w.commit().unwrap();
    set_format(&db, UPGRADED_FORMAT);
    drop(db);
    let _ = key;
    let db = ClientDb::unlock(dir.path(), Some(b"correct horse")).unwrap().1;
    assert_eq!(db.get(Table::State, b"contacts").unwrap().unwrap().as_slice(), b"bob");
    assert_current_format(&db);
    assert_eq!(db.generation().unwrap(), 1, "the upgrade changes no record");
}

/// Fails without the upgrade: format 3 is then refused as older.
#[test]
fn a_format_3_database_is_upgraded_in_place_and_its_whole_tree_still_loads() {
    let (dir, key, db) = new_db();
    let (alice, signer, cred) = member(MlsStore::memory());
    let group = MlsGroup::new(&alice, &signer, &create_config(), cred).unwrap();
    let group_id = group.group_id().clone();
    // The records as format 3 wrote them: the tree whole, no node records.
    let whole = alice.storage().whole_tree(&serde_json::to_vec(&group_id).unwrap()).unwrap();
    let records: Vec<_> = alice
        .storage()
        .snapshot()
        .into_iter()
        .filter(|(k, _)| !k.starts_with(TREE_NODE_LABEL))
        .map(|(k, v)| if k.starts_with(b"Tree") { (k, whole.clone()) } else { (k, v) })
        .collect();
    let db = reopened_as_format(db, &dir, &key, records, 3);
    assert!(node_records(&db).is_empty());
    let store = MlsStore::memory();
    store.attach(db.clone());
    let alice = DbProvider::new(store);
    let mut group = MlsGroup::load(alice.storage(), &group_id).unwrap().expect("loads from its whole tree");
    assert_eq!(group.members().count(), 1);
    // The next commit writes the tree one record per node.
    group.self_update(&alice, &signer, LeafNodeParameters::default()).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    flush_commit(&db, alice.storage());
    assert_eq!(node_records(&db).len(), 1, "a one-member tree: one leaf, no parent");
}

#[test]
fn truncated_corrupted_and_foreign_files_give_clear_errors_not_panics() {
    let (dir, key, db) = new_db();
    let mut w = db.write().unwrap();
    for i in 0..50u32 {
        w.put(Table::State, &i.to_be_bytes(), &[7; 300]).unwrap();
    }
    w.commit().unwrap();
    drop(db);
    let path = dir.path().join(DB_FILE);
    let good = std::fs::read(&path).unwrap();
    let check = |bytes: &[u8], what: &str| {
        std::fs::write(&path, bytes).unwrap();
        // Any error will do, as long as it is an error with a lowercase sentence and no panic;
        // a damaged record must not read as another value.
        match ClientDb::open(dir.path(), &DbKey::of(&key)) {
            Err(e) => {
                let msg = e.to_string();
                assert!(msg.chars().next().is_some_and(|c| !c.is_uppercase()), "{what}: {msg}");
            }
            Ok(db) => {
                for i in 0..50u32 {
                    if let Ok(Some(v)) = db.get(Table::State, &i.to_be_bytes()) {
                        assert_eq!(v.as_slice(), &[7; 300], "{what}");
                    }
                }
            }
        }
    };
    check(&good[..good.len() / 2], "truncated to half");
    check(&good[..100], "truncated to 100 bytes");
    check(&[], "empty");
    check(b"SQLite format 3\0 and then some more bytes of a foreign file", "foreign");
    for at in (0..good.len()).step_by(good.len() / 64 + 1) {
        let mut bad = good.clone();
        bad[at] ^= 0x55;
        check(&bad, &format!("byte {at} flipped"));
    }
    // A redb file of another program: no meta table.
    std::fs::remove_file(&path).unwrap();
    let foreign = redb::Database::create(&path).unwrap();
    let txn = foreign.begin_write().unwrap();
    txn.open_table(TableDefinition::<&str, &str>::new("other")).unwrap().insert("a", "b").unwrap();
    txn.commit().unwrap();
    drop(foreign);
    let err = ClientDb::open(dir.path(), &DbKey::of(&key)).unwrap_err();
    assert!(err.to_string().contains("is not a qpq client database or is damaged"), "{err}");
    std::fs::remove_file(&path).unwrap();
    assert!(matches!(ClientDb::open(dir.path(), &DbKey::of(&key)), Err(DbError::Missing(_))));
}

#[test]
fn a_write_not_committed_leaves_nothing_and_commits_bump_the_generation() {
    let (_dir, _key, db) = new_db();
    let mut w = db.write().unwrap();
    w.put(Table::State, b"a", b"1").unwrap();
    drop(w);
    assert_eq!(db.get(Table::State, b"a").unwrap(), None);
    assert_eq!(db.generation().unwrap(), 0);
    let mut w = db.write().unwrap();
    w.put(Table::State, b"a", b"1").unwrap();
    w.commit().unwrap();
    let mut w = db.write().unwrap();
    w.delete(Table::State, b"a").unwrap();
    assert_eq!(w.commit().unwrap(), 2);
    assert_eq!(db.get(Table::State, b"a").unwrap(), None);
    assert_eq!(count(&db, Table::State), 0, "a delete removes the record");
}

#[test]
fn a_sealed_record_copied_into_another_slot_does_not_open() {
    let (_dir, _key, db) = new_db();
    let mut w = db.write().unwrap();
    w.put(Table::State, b"a", b"alice's").unwrap();
    w.put(Table::State, b"b", b"bob's").unwrap();
    w.commit().unwrap();
    let (sa, sb) = (db.keys.slot(b"state", b"a"), db.keys.slot(b"state", b"b"));
    let txn = db.raw().as_ref().unwrap().begin_write().unwrap();
    {
        let mut t = txn.open_table(Table::State.def()).unwrap();
        let a = t.get(sa.as_slice()).unwrap().unwrap().value().to_vec();
        t.insert(sb.as_slice(), a.as_slice()).unwrap();
    }
    txn.commit().unwrap();
    assert!(matches!(db.get(Table::State, b"b"), Err(DbError::Record(_))));
}

#[test]
fn history_pages_backwards_per_conversation_in_one_range() {
    let (_dir, _key, db) = new_db();
    let at = |at_ms: u64, index: u64| HistoryKey { at_ms, index };
    let mut w = db.write().unwrap();
    for seq in 1..=300u64 {
        w.put_history(b"conv-a", at(1000 + seq, seq), format!("a{seq}").as_bytes()).unwrap();
        w.put_history(b"conv-b", at(1000 + seq, seq), format!("b{seq}").as_bytes()).unwrap();
    }
    w.commit().unwrap();
    let all = HistoryKey::MIN..=HistoryKey::MAX;
    let page = db.history_page(b"conv-a", all.clone(), 3).unwrap();
    let seqs: Vec<u64> = page.iter().map(|(k, _)| k.index).collect();
    assert_eq!(seqs, [300, 299, 298]);
    assert_eq!(page[0].1.as_slice(), b"a300");
    let below = at(1256, 256).below().unwrap();
    let before = db.history_page(b"conv-a", HistoryKey::MIN..=below, 2).unwrap();
    assert_eq!(before.iter().map(|(k, _)| k.index).collect::<Vec<_>>(), [255, 254], "big-endian order");
    assert_eq!(db.history_page(b"conv-b", all.clone(), 1000).unwrap().len(), 300);
    assert!(db.history_page(b"conv-c", all.clone(), 10).unwrap().is_empty());
    assert_eq!(db.history_oldest(b"conv-b").unwrap(), Some(at(1001, 1)));
    assert_eq!(db.history_newest(b"conv-b").unwrap(), Some(at(1300, 300)));
    assert_eq!(db.history_newest(b"conv-c").unwrap(), None);
    // Expiry is one range: conv-a's entries received before 1101, and no one else's.
    let mut w = db.write().unwrap();
    assert_eq!(w.delete_history_before(b"conv-a", 1101).unwrap(), 100);
    w.commit().unwrap();
    assert_eq!(db.history_oldest(b"conv-a").unwrap(), Some(at(1101, 101)));
    assert_eq!(db.history_page(b"conv-b", all, 1000).unwrap().len(), 300);
}

// ----- the openmls store -----

fn member(store: MlsStore) -> (DbProvider, SignatureKeyPair, CredentialWithKey) {
    let provider = DbProvider::new(store);
    let signer = SignatureKeyPair::new(CIPHERSUITE.signature_algorithm()).unwrap();
    signer.store(provider.storage()).unwrap();
    let credential = CredentialWithKey {
        credential: BasicCredential::new(signer.public().to_vec()).into(),
        signature_key: signer.public().into(),
    };
    (provider, signer, credential)
}

use crate::mls::CIPHERSUITE;

fn flush_commit(db: &ClientDb, store: &MlsStore) -> usize {
    let mut w = db.write().unwrap();
    let n = store.flush(&mut w).unwrap();
    w.commit().unwrap();
    n
}

fn create_config() -> MlsGroupCreateConfig {
    MlsGroupCreateConfig::builder().ciphersuite(CIPHERSUITE).use_ratchet_tree_extension(true).build()
}

#[test]
fn an_mls_group_survives_in_the_database_and_a_message_writes_only_a_few_records() {
    let (_dir, _key, db) = new_db();
    let db = Arc::new(db);
    let store = MlsStore::memory();
    store.attach(db.clone());
    let (alice, alice_signer, alice_cred) = member(store);
    let (bob, bob_signer, bob_cred) = member(MlsStore::memory());
    let bob_kp = KeyPackage::builder().build(CIPHERSUITE, &bob, &bob_signer, bob_cred).unwrap();
    let mut group = MlsGroup::new(&alice, &alice_signer, &create_config(), alice_cred).unwrap();
    let (_commit, welcome, _) =
        group.add_members(&alice, &alice_signer, &[bob_kp.key_package().clone()]).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    let written = flush_commit(&db, alice.storage());
    assert!(written > 5, "the group's records were written ({written})");
    let records = count(&db, Table::Mls);

    let welcome = MlsMessageIn::tls_deserialize_exact(welcome.tls_serialize_detached().unwrap()).unwrap();
    let MlsMessageBodyIn::Welcome(welcome) = welcome.extract() else { panic!("a welcome") };
    let join = MlsGroupJoinConfig::builder().use_ratchet_tree_extension(true).build();
    let mut bob_group =
        StagedWelcome::new_from_welcome(&bob, &join, welcome, None).unwrap().into_group(&bob).unwrap();

    // A fresh store over the same database: the group loads from its records alone.
    let group_id = group.group_id().clone();
    let reopened = MlsStore::memory();
    reopened.attach(db.clone());
    let alice = DbProvider::new(reopened);
    let mut group =
        MlsGroup::load(alice.storage(), &group_id).unwrap().expect("the group is in the database");
    let out = group.create_message(&alice, &alice_signer, b"hi bob").unwrap();
    let changed = flush_commit(&db, alice.storage());
    assert!((1..=3).contains(&changed), "a message changes a few records, not the state ({changed})");
    assert_eq!(count(&db, Table::Mls), records, "and adds none");
    let msg = MlsMessageIn::tls_deserialize_exact(out.tls_serialize_detached().unwrap()).unwrap();
    let processed = bob_group.process_message(&bob, msg.try_into_protocol_message().unwrap()).unwrap();
    let ProcessedMessageContent::ApplicationMessage(m) = processed.into_content() else {
        panic!("app message")
    };
    assert_eq!(m.into_bytes(), b"hi bob");
}

#[test]
fn deleting_a_group_or_a_used_key_package_deletes_their_records() {
    let (_dir, _key, db) = new_db();
    let db = Arc::new(db);
    let store = MlsStore::memory();
    store.attach(db.clone());
    let (alice, signer, cred) = member(store);
    let before = {
        flush_commit(&db, alice.storage());
        count(&db, Table::Mls)
    };
    let kp = KeyPackage::builder().build(CIPHERSUITE, &alice, &signer, cred.clone()).unwrap();
    let hash_ref = kp.key_package().hash_ref(alice.crypto()).unwrap();
    let mut group = MlsGroup::new(&alice, &signer, &create_config(), cred).unwrap();
    flush_commit(&db, alice.storage());
    assert!(count(&db, Table::Mls) > before + 5);
    assert_eq!(alice.storage().group_config_keys().unwrap().len(), 1);

    group.delete(alice.storage()).unwrap();
    alice.storage().delete_key_package(&hash_ref).unwrap();
    alice.storage().delete_encryption_key_pair(kp.key_package().leaf_node().encryption_key()).unwrap();
    flush_commit(&db, alice.storage());
    assert!(alice.storage().group_config_keys().unwrap().is_empty());
    // What is left: the signature key and the (now empty) group index.
    assert_eq!(count(&db, Table::Mls), before + 1, "group and key package records are gone");
}

#[test]
fn clearing_the_proposal_queue_deletes_the_queued_proposals() {
    // openmls_memory_storage 0.6 deletes an unprefixed key here, so proposals outlived their
    // queue; ours are gone.
    let store = MlsStore::memory();
    let gid = GroupId::from_slice(b"g");
    let proposal_ref = vec![1u8, 2, 3];
    store.queue_proposal(&gid, &Ref(proposal_ref.clone()), &Ref(vec![9u8; 4])).unwrap();
    assert_eq!(store.snapshot().len(), 2, "the proposal and the queue");
    store.clear_proposal_queue::<GroupId, Ref>(&gid).unwrap();
    assert!(store.snapshot().is_empty(), "nothing is left");
}

/// A stand-in for openmls's typed keys and values (they are serde types).
#[derive(serde::Serialize, serde::Deserialize, Clone)]
struct Ref(Vec<u8>);
impl openmls_traits::storage::Key<{ openmls_traits::storage::CURRENT_VERSION }> for Ref {}
impl openmls_traits::storage::Entity<{ openmls_traits::storage::CURRENT_VERSION }> for Ref {}
impl openmls_traits::storage::traits::ProposalRef<{ openmls_traits::storage::CURRENT_VERSION }> for Ref {}
impl openmls_traits::storage::traits::QueuedProposal<{ openmls_traits::storage::CURRENT_VERSION }> for Ref {}

#[test]
fn a_forgotten_overlay_leaves_the_database_as_it_was() {
    let (_dir, _key, db) = new_db();
    let db = Arc::new(db);
    let store = MlsStore::memory();
    store.attach(db.clone());
    let (alice, signer, cred) = member(store);
    flush_commit(&db, alice.storage());
    let before = count(&db, Table::Mls);
    let _group = MlsGroup::new(&alice, &signer, &create_config(), cred).unwrap();
    assert!(alice.storage().is_dirty());
    alice.storage().forget();
    assert!(!alice.storage().is_dirty());
    flush_commit(&db, alice.storage());
    assert_eq!(count(&db, Table::Mls), before);
    assert!(alice.storage().group_config_keys().unwrap().is_empty(), "reads come from the database again");
}

/// Not a check: prints what opening the database per lock hold costs (see the module header).
#[test]
#[ignore = "measurement: cargo test --lib measure_open_cost -- --ignored --nocapture"]
fn measure_open_cost() {
    let dir = tempfile::tempdir().unwrap();
    let key = StateKey::unprotected();
    let db = ClientDb::create(dir.path(), &key, &DbKey::of(&key)).unwrap();
    let mut w = db.write().unwrap();
    for i in 0..5000u32 {
        w.put(Table::Mls, &i.to_be_bytes(), &[7; 2000]).unwrap();
    }
    w.commit().unwrap();
    drop(db);
    let rounds = 100;
    let start = std::time::Instant::now();
    for _ in 0..rounds {
        let db = ClientDb::open(dir.path(), &DbKey::of(&key)).unwrap();
        db.generation().unwrap();
    }
    let open = start.elapsed() / rounds;
    let db = ClientDb::open(dir.path(), &DbKey::of(&key)).unwrap();
    let start = std::time::Instant::now();
    for i in 0..rounds {
        let mut w = db.write().unwrap();
        w.put(Table::Mls, &i.to_be_bytes(), &[8; 2000]).unwrap();
        w.commit().unwrap();
    }
    let commit = start.elapsed() / rounds;
    let start = std::time::Instant::now();
    let all = db.scan(Table::Mls).unwrap();
    println!(
        "10 MB database: open + generation {open:?}, one-record durable commit {commit:?}, scan of {} records {:?}",
        all.len(),
        start.elapsed()
    );
}

/// The storage keys of every tree node record in `db`.
fn node_records(db: &ClientDb) -> Vec<Vec<u8>> {
    let all = MlsStore::memory();
    all.load_all(db).unwrap();
    all.snapshot().into_iter().map(|(k, _)| k).filter(|k| k.starts_with(TREE_NODE_LABEL)).collect()
}

/// The storage keys of every past-epoch leaves record in `db`.
fn leaves_records(db: &ClientDb) -> Vec<Vec<u8>> {
    let all = MlsStore::memory();
    all.load_all(db).unwrap();
    all.snapshot().into_iter().map(|(k, _)| k).filter(|k| k.starts_with(PAST_LEAVES_LABEL)).collect()
}

/// A message sent or received rewrites the group's message secrets; the member lists of the
/// past epochs are stored once per epoch in records of their own (issues 11 and 12), dropped as
/// their epoch leaves the window and with the group, and read back whole after a reopen (a
/// past epoch's message needs its sender's leaf). Fails without the deletion of the epochs that
/// left the window (6 records instead of 3).
#[test]
fn past_epoch_leaves_are_written_once_dropped_with_their_epoch_and_read_back_after_reopen() {
    const KEPT: usize = 3;
    let (dir, key, db) = new_db();
    let db = Arc::new(db);
    let store = MlsStore::memory();
    store.attach(db.clone());
    let (alice, alice_signer, alice_cred) = member(store);
    let (bob, bob_signer, bob_cred) = member(MlsStore::memory());
    let bob_kp = KeyPackage::builder().build(CIPHERSUITE, &bob, &bob_signer, bob_cred).unwrap();
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(KEPT)
        .build();
    let mut group = MlsGroup::new(&alice, &alice_signer, &config, alice_cred).unwrap();
    let (_, welcome, _) = group.add_members(&alice, &alice_signer, &[bob_kp.key_package().clone()]).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    flush_commit(&db, alice.storage());
    let welcome = MlsMessageIn::tls_deserialize_exact(welcome.tls_serialize_detached().unwrap()).unwrap();
    let MlsMessageBodyIn::Welcome(welcome) = welcome.extract() else { panic!("a welcome") };
    let join = MlsGroupJoinConfig::builder().use_ratchet_tree_extension(true).max_past_epochs(KEPT).build();
    let mut bob_group =
        StagedWelcome::new_from_welcome(&bob, &join, welcome, None).unwrap().into_group(&bob).unwrap();
    let incoming = |m: MlsMessageOut| {
        MlsMessageIn::tls_deserialize_exact(m.tls_serialize_detached().unwrap())
            .unwrap()
            .try_into_protocol_message()
            .unwrap()
    };

    // 2 * KEPT commits: the window moves past the first epochs.
    let mut late = None;
    for i in 0..2 * KEPT {
        if i == 2 * KEPT - 1 {
            late = Some(bob_group.create_message(&bob, &bob_signer, b"sent before the last commit").unwrap());
        }
        let bundle = group.self_update(&alice, &alice_signer, LeafNodeParameters::default()).unwrap();
        group.merge_pending_commit(&alice).unwrap();
        flush_commit(&db, alice.storage());
        let processed = bob_group.process_message(&bob, incoming(bundle.into_commit())).unwrap();
        let ProcessedMessageContent::StagedCommitMessage(staged) = processed.into_content() else {
            panic!("a commit")
        };
        bob_group.merge_staged_commit(&bob, *staged).unwrap();
    }
    let epoch = group.epoch().as_u64();
    let group_id = group.group_id().clone();
    let expected: Vec<Vec<u8>> = (epoch - KEPT as u64..epoch)
        .map(|e| {
            let mut k = PAST_LEAVES_LABEL.to_vec();
            k.extend_from_slice(&serde_json::to_vec(&group_id).unwrap());
            k.extend_from_slice(e.to_string().as_bytes());
            k.extend_from_slice(&openmls_traits::storage::CURRENT_VERSION.to_be_bytes());
            k
        })
        .collect();
    let mut found = leaves_records(&db);
    found.sort();
    let text =
        |keys: &[Vec<u8>]| keys.iter().map(|k| String::from_utf8_lossy(k).into_owned()).collect::<Vec<_>>();
    assert_eq!(text(&found), text(&expected), "one leaves record per kept past epoch, none stale");

    // A message rewrites the message secrets, not the leaves.
    let out = bob_group.create_message(&bob, &bob_signer, b"current").unwrap();
    group.process_message(&alice, incoming(out)).unwrap();
    let dirty = alice.storage().dirty_keys();
    assert!(dirty.iter().any(|k| k.starts_with(b"MessageSecrets")), "{dirty:?}");
    assert!(!dirty.iter().any(|k| k.starts_with(PAST_LEAVES_LABEL)), "leaves rewritten");
    flush_commit(&db, alice.storage());

    // Close, reopen: a message of the previous epoch finds its sender in that epoch's leaves.
    drop((group, alice));
    let db = Arc::into_inner(db).expect("one handle");
    drop(db);
    let db = Arc::new(ClientDb::open(dir.path(), &DbKey::of(&key)).unwrap());
    let reopened = MlsStore::memory();
    reopened.attach(db.clone());
    let alice = DbProvider::new(reopened);
    let mut group = MlsGroup::load(alice.storage(), &group_id).unwrap().expect("stored");
    let processed = group.process_message(&alice, incoming(late.unwrap())).unwrap();
    assert_eq!(processed.epoch().as_u64(), epoch - 1);
    let ProcessedMessageContent::ApplicationMessage(m) = processed.into_content() else {
        panic!("an application message")
    };
    assert_eq!(m.into_bytes(), b"sent before the last commit");
    flush_commit(&db, alice.storage());
    assert_eq!(leaves_records(&db).len(), KEPT);

    // Deleting the group deletes its leaves records.
    group.delete(alice.storage()).unwrap();
    flush_commit(&db, alice.storage());
    assert!(leaves_records(&db).is_empty());
    let all = MlsStore::memory();
    all.load_all(&db).unwrap();
    assert!(!all.snapshot().iter().any(|(k, _)| k.starts_with(b"MessageSecrets")));
}

/// Not a check: what one durable commit of an application message writes, for strace and
/// callgrind (issue 12). `QPQ_MEASURE_MEMBERS` (default 128) members; the creator sends
/// `QPQ_MEASURE_MESSAGES` (default 50) messages to the member at the last leaf, both saving
/// to a database of their own after each, as `qpq bench --scenario mls` does. The timed loop
/// is framed by `MARK` lines on stderr (visible in `strace -e trace=write`), then the same
/// number of bare one-record commits on the creator's file. Run:
/// `strace -f -e trace=pwrite64,write,fsync,fdatasync,ftruncate,fallocate target/debug/deps/qpq-HASH
/// measure_app_message_commit --ignored --nocapture`.
#[test]
#[ignore = "measurement: cargo test --lib measure_app_message_commit -- --ignored --nocapture"]
fn measure_app_message_commit() {
    use crate::mls::{Incoming, MlsClient};
    let env = |k: &str, d: usize| std::env::var(k).ok().and_then(|v| v.parse().ok()).unwrap_or(d);
    let n = env("QPQ_MEASURE_MEMBERS", 128);
    let m = env("QPQ_MEASURE_MESSAGES", 50);
    let key = StateKey::unprotected();
    let (cdir, rdir) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let (cdb, rdb) = (
        ClientDb::create(cdir.path(), &key, &DbKey::of(&key)).unwrap(),
        ClientDb::create(rdir.path(), &key, &DbKey::of(&key)).unwrap(),
    );
    let save = |db: &ClientDb, c: &MlsClient| {
        let mut w = db.write().unwrap();
        let k = c.store().dirty_keys();
        c.store().flush(&mut w).unwrap();
        w.commit().unwrap();
        k
    };
    let mut creator = MlsClient::new(&rand::random()).unwrap();
    let mut members: Vec<MlsClient> = (1..n).map(|_| MlsClient::new(&rand::random()).unwrap()).collect();
    let kps: Vec<Vec<u8>> = members.iter().map(|m| m.key_packages(1).unwrap().remove(0).bytes).collect();
    let gid = b"measure".to_vec();
    creator.create_group(&gid).unwrap();
    let welcome = creator.add_members(&gid, &kps).unwrap().welcome.unwrap();
    creator.merge_pending(&gid).unwrap();
    save(&cdb, &creator);
    let receiver = members.last_mut().unwrap();
    save(&rdb, receiver);
    receiver.join(&welcome).unwrap();
    save(&rdb, receiver);
    let text = vec![0x61u8; 64];
    let describe = |who: &str, db: &ClientDb, keys: Vec<Vec<u8>>| {
        for k in keys {
            let label: String =
                k.iter().take_while(|b| b.is_ascii_alphabetic()).map(|&b| b as char).collect();
            let size = db.get(Table::Mls, &k).unwrap().map_or(0, |v| v.len());
            eprintln!("{who}: record {label} ({} key bytes): {size} plaintext bytes", k.len());
        }
    };
    let file_len = |d: &tempfile::TempDir| std::fs::metadata(d.path().join(DB_FILE)).unwrap().len();
    // One message outside the loop, described.
    let ct = creator.encrypt(&gid, &text).unwrap();
    describe("sender", &cdb, save(&cdb, &creator));
    receiver.process(&gid, &ct).unwrap();
    describe("receiver", &rdb, save(&rdb, receiver));
    eprintln!("file sizes before: sender {} receiver {}", file_len(&cdir), file_len(&rdir));
    eprintln!("MARK messages start");
    let start = std::time::Instant::now();
    for _ in 0..m {
        let ct = creator.encrypt(&gid, &text).unwrap();
        save(&cdb, &creator);
        let incoming = receiver.process(&gid, &ct).unwrap();
        save(&rdb, receiver);
        assert!(matches!(incoming, Incoming::Application { .. }));
    }
    let per_message = start.elapsed() / m as u32;
    eprintln!("MARK messages end");
    eprintln!("file sizes after: sender {} receiver {}", file_len(&cdir), file_len(&rdir));
    eprintln!("MARK bare start");
    let start = std::time::Instant::now();
    for i in 0..m {
        let mut w = cdb.write().unwrap();
        w.put(Table::State, b"bare", &(i as u64).to_le_bytes()).unwrap();
        w.commit().unwrap();
    }
    let bare = start.elapsed() / m as u32;
    eprintln!("MARK bare end");
    // The same commit straight on redb: one record only, then one record plus the generation.
    let raw = |with_meta: bool| {
        let start = std::time::Instant::now();
        for i in 0..m {
            let guard = cdb.raw();
            let txn = guard.as_ref().unwrap().begin_write().unwrap();
            {
                let mut t = txn.open_table(Table::State.def()).unwrap();
                t.insert(b"raw".as_slice(), (i as u64).to_le_bytes().as_slice()).unwrap();
            }
            if with_meta {
                let mut meta = txn.open_table(META).unwrap();
                meta.insert(META_GENERATION, (i as u64).to_le_bytes().as_slice()).unwrap();
            }
            txn.commit().unwrap();
        }
        start.elapsed() / m as u32
    };
    eprintln!("raw redb commit: one record {:?}, one record + generation {:?}", raw(false), raw(true));
    eprintln!("{n} members: message with two durable saves {per_message:?}, bare one-record commit {bare:?}");
}

/// Not a check: prints the records one processed commit at 128 members writes, by label, with
/// their plaintext sizes (issue 12).
#[test]
#[ignore = "measurement: cargo test --lib measure_commit_records -- --ignored --nocapture"]
fn measure_commit_records() {
    use crate::mls::MlsClient;
    const N: usize = 128;
    let mut creator = MlsClient::new(&[1; 32]).unwrap();
    let mut members: Vec<MlsClient> = (1..N).map(|i| MlsClient::new(&[i as u8 + 1; 32]).unwrap()).collect();
    let kps: Vec<Vec<u8>> = members.iter().map(|m| m.key_packages(1).unwrap().remove(0).bytes).collect();
    let gid = b"measure".to_vec();
    creator.create_group(&gid).unwrap();
    let pending = creator.add_members(&gid, &kps).unwrap();
    creator.merge_pending(&gid).unwrap();
    let receiver = members.last_mut().unwrap();
    receiver.join(&pending.welcome.unwrap()).unwrap();
    let (_dir, _key, db) = new_db();
    let flush = |store: &MlsStore| {
        let mut w = db.write().unwrap();
        store.flush(&mut w).unwrap();
        w.commit().unwrap();
    };
    flush(receiver.store());
    for round in 0..2 {
        let pending = creator.self_update(&gid).unwrap();
        creator.merge_pending(&gid).unwrap();
        receiver.process(&gid, &pending.commit).unwrap();
        let snapshot: std::collections::BTreeMap<_, _> = receiver.store().snapshot().into_iter().collect();
        // Per label: (records written, their bytes, records deleted).
        let mut by_label = std::collections::BTreeMap::<String, (usize, usize, usize)>::new();
        let mut total = 0;
        for key in receiver.store().dirty_keys() {
            let label: String =
                String::from_utf8_lossy(&key).chars().take_while(|c| *c != '[' && *c != '"').collect();
            let entry = by_label.entry(label).or_default();
            match snapshot.get(&key) {
                Some(v) => {
                    total += v.len();
                    entry.0 += 1;
                    entry.1 += v.len();
                }
                None => entry.2 += 1,
            }
        }
        for (label, (n, bytes, deleted)) in by_label {
            println!("round {round}: {label:<24} {n:>4} written {bytes:>8} bytes, {deleted} deleted");
        }
        println!("round {round}: total {total} bytes");
        flush(receiver.store());
    }
    // What loading the group afresh reads (a one-shot command's first use of the group).
    let db = Arc::new(db);
    let store = MlsStore::memory();
    store.attach(db.clone());
    let fresh = MlsClient::from_store_lazy(&[N as u8; 32], store).unwrap();
    let opened = seal::records_opened_on_this_thread();
    let start = std::time::Instant::now();
    fresh.epoch(&gid).unwrap();
    println!(
        "loading the group afresh: {} records opened, {:?} (debug build)",
        seal::records_opened_on_this_thread() - opened,
        start.elapsed()
    );
}

/// A group's tree is stored one record per node: a commit rewrites the nodes it changed (the
/// committer's leaf and the parents on its path), the tree loads whole after a reopen, and
/// deleting the group deletes every node. Fails without the comparison in `MlsStore::set`
/// (every node is rewritten: 7 records instead of 3).
#[test]
fn a_commit_rewrites_only_the_tree_nodes_it_changed_and_the_tree_survives_a_reopen() {
    let (dir, key, db) = new_db();
    let db = Arc::new(db);
    let store = MlsStore::memory();
    store.attach(db.clone());
    let (alice, signer, cred) = member(store);
    let kps: Vec<KeyPackage> = (0..3)
        .map(|_| {
            let (p, s, c) = member(MlsStore::memory());
            KeyPackage::builder().build(CIPHERSUITE, &p, &s, c).unwrap().key_package().clone()
        })
        .collect();
    let mut group = MlsGroup::new(&alice, &signer, &create_config(), cred).unwrap();
    group.add_members(&alice, &signer, &kps).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    flush_commit(&db, alice.storage());
    assert_eq!(node_records(&db).len(), 4 + 3, "4 leaves and 3 parents");

    group.self_update(&alice, &signer, LeafNodeParameters::default()).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    let nodes = alice.storage().dirty_keys().into_iter().filter(|k| k.starts_with(TREE_NODE_LABEL)).count();
    assert_eq!(nodes, 3, "leaf 0 and the 2 parents on its path");
    flush_commit(&db, alice.storage());
    let group_id = group.group_id().clone();
    let tree = group.export_ratchet_tree();
    drop((group, alice));
    drop(Arc::into_inner(db).expect("one handle"));

    let db = Arc::new(ClientDb::open(dir.path(), &DbKey::of(&key)).unwrap());
    let store = MlsStore::memory();
    store.attach(db.clone());
    let alice = DbProvider::new(store);
    let mut group = MlsGroup::load(alice.storage(), &group_id).unwrap().expect("stored");
    assert_eq!(group.members().count(), 4);
    assert_eq!(group.export_ratchet_tree(), tree, "the same tree");
    group.delete(alice.storage()).unwrap();
    flush_commit(&db, alice.storage());
    assert!(node_records(&db).is_empty(), "deleting the group deletes its nodes");
}

/// Checks that the member records of the group `gid` (JSON) in `db` are exactly those the lists
/// of its past epochs name (no orphan, none missing), each the record that hashes to its
/// reference; returns (lists, members inline in format-4 leaves records, member records).
fn assert_members_are_the_live_set(db: &ClientDb, gid: &[u8]) -> (usize, usize, usize) {
    let all = MlsStore::memory();
    all.load_all(db).unwrap();
    let snapshot = all.snapshot();
    let (mut lists, mut inline) = (0, 0);
    let mut live = std::collections::BTreeSet::new();
    for (k, v) in &snapshot {
        if k.starts_with(PAST_LEAVES_LABEL) {
            if past_members::is_list(v) {
                lists += 1;
                live.extend(past_members::refs(v).expect("a well-formed list"));
            } else {
                inline += 1;
            }
        }
    }
    let expected: std::collections::BTreeSet<Vec<u8>> =
        live.iter().map(|r| past_member_key(gid, r).unwrap()).collect();
    let found: std::collections::BTreeMap<Vec<u8>, Zeroizing<Vec<u8>>> =
        snapshot.into_iter().filter(|(k, _)| k.starts_with(PAST_MEMBER_LABEL)).collect();
    let text = |keys: &mut dyn Iterator<Item = &Vec<u8>>| {
        keys.map(|k| String::from_utf8_lossy(k).into_owned()).collect::<std::collections::BTreeSet<_>>()
    };
    assert_eq!(text(&mut found.keys()), text(&mut expected.iter()), "member records");
    for r in &live {
        assert_eq!(past_members::reference(&found[&past_member_key(gid, r).unwrap()]), *r);
    }
    (lists, inline, found.len())
}

/// The message secrets the reader gets back from `db` are byte for byte what openmls wrote.
fn assert_secrets_read_back(db: &Arc<ClientDb>, writer: &MlsStore, gid: &[u8], step: &str) {
    let reader = MlsStore::memory();
    reader.attach(db.clone());
    let (written, read) = writer.secrets_written_and_read(gid, &reader).unwrap();
    assert!(written.len() > 100, "{step}: captured");
    assert_eq!(written.as_slice(), read.as_slice(), "{step}: joined bytes differ from what was written");
}

/// The past epochs' members are records shared between epochs (issue 12): over adds, an
/// update, a remove and epochs leaving the window, the message secrets read back byte for
/// byte, a commit writes only the members that changed, the member records are exactly those
/// the kept epochs name, and deleting the group leaves none. The shared-writes check fails when
/// every member is written with its epoch (3 member records instead of 1); the live-set checks
/// fail without the deletion of the members no epoch names.
#[test]
fn past_members_are_shared_between_epochs_read_back_whole_and_none_outlives_its_epochs() {
    const KEPT: usize = 3;
    let (_dir, _key, db) = new_db();
    let db = Arc::new(db);
    let store = MlsStore::memory();
    store.attach(db.clone());
    let (alice, signer, cred) = member(store);
    flush_commit(&db, alice.storage());
    let before = count(&db, Table::Mls);
    let others: Vec<_> = (0..3).map(|_| member(MlsStore::memory())).collect();
    let kp = |i: usize| {
        let (p, s, c) = &others[i];
        KeyPackage::builder().build(CIPHERSUITE, p, s, c.clone()).unwrap().key_package().clone()
    };
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(KEPT)
        .build();
    let mut group = MlsGroup::new(&alice, &signer, &config, cred).unwrap();
    let gid = serde_json::to_vec(group.group_id()).unwrap();
    let written_members = || {
        let dirty = alice.storage().dirty_keys();
        let snapshot: std::collections::BTreeMap<_, _> = alice.storage().snapshot().into_iter().collect();
        dirty.iter().filter(|k| k.starts_with(PAST_MEMBER_LABEL) && snapshot.contains_key(*k)).count()
    };
    let step = |name: &str, written: usize| {
        flush_commit(&db, alice.storage());
        assert_secrets_read_back(&db, alice.storage(), &gid, name);
        let (lists, inline, members) = assert_members_are_the_live_set(&db, &gid);
        println!("{name}: {written} member records written, {lists} lists, {members} member records");
        assert_eq!(inline, 0);
        (lists, members)
    };

    // Epoch 0 -> 1: bob and carol join; epoch 0 (alice alone) is archived.
    group.add_members(&alice, &signer, &[kp(0), kp(1)]).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    assert_eq!(step("add two", written_members()), (1, 1));
    // 1 -> 2: alice updates; epoch 1 is archived: all new (openmls's add commit carried a
    // path, so alice's leaf changed too).
    group.self_update(&alice, &signer, LeafNodeParameters::default()).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    let written = written_members();
    assert_eq!(written, 3, "alice, bob and carol");
    assert_eq!(step("update", written), (2, 4));
    // 2 -> 3: dave joins; epoch 2 differs from epoch 1 by alice's updated leaf only.
    group.add_members(&alice, &signer, &[kp(2)]).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    let written = written_members();
    assert_eq!(written, 1, "alice's updated leaf; bob and carol are shared");
    assert_eq!(step("add", written), (3, 5));
    // 3 -> 4: carol is removed; epoch 0 and its alice leave the window.
    let carol = others[1].1.public();
    let carol = group.members().find(|m| m.signature_key == carol).unwrap().index;
    group.remove_members(&alice, &signer, &[carol]).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    let written = written_members();
    assert_eq!(written, 2, "alice's leaf of epoch 3 and dave");
    assert_eq!(step("remove", written), (KEPT, 6));
    // Updates until every epoch that held carol, and alice's first leaf, has left the window.
    for i in 0..KEPT + 1 {
        group.self_update(&alice, &signer, LeafNodeParameters::default()).unwrap();
        group.merge_pending_commit(&alice).unwrap();
        let written = written_members();
        assert!(written <= 1, "update {i}: {written} member records written");
        step(&format!("update {i}"), written);
    }
    let (_, _, members) = assert_members_are_the_live_set(&db, &gid);
    assert_eq!(members, 2 + KEPT, "bob, dave, and alice's leaf of each kept epoch");

    group.delete(alice.storage()).unwrap();
    flush_commit(&db, alice.storage());
    assert_eq!(assert_members_are_the_live_set(&db, &gid), (0, 0, 0));
    assert_eq!(count(&db, Table::Mls), before + 1, "only the signature key and the (empty) group index");
}

/// Fails without the upgrade: format 4 is then refused as older. A format-4 home holds each
/// past epoch's members inline; they are read as they are, and dropped with their epochs.
#[test]
fn a_format_4_database_is_upgraded_in_place_and_its_inline_members_read_then_dropped() {
    const KEPT: usize = 2;
    let (dir, key, db) = new_db();
    let (alice, signer, cred) = member(MlsStore::memory());
    let (bob, bob_signer, bob_cred) = member(MlsStore::memory());
    let bob_kp = KeyPackage::builder().build(CIPHERSUITE, &bob, &bob_signer, bob_cred).unwrap();
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .max_past_epochs(KEPT)
        .build();
    let mut group = MlsGroup::new(&alice, &signer, &config, cred).unwrap();
    group.add_members(&alice, &signer, &[bob_kp.key_package().clone()]).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    for _ in 0..KEPT {
        group.self_update(&alice, &signer, LeafNodeParameters::default()).unwrap();
        group.merge_pending_commit(&alice).unwrap();
    }
    let group_id = group.group_id().clone();
    let gid = serde_json::to_vec(&group_id).unwrap();
    // The records as format 4 wrote them: each past epoch's members inline, no member records.
    let snapshot = alice.storage().snapshot();
    let by_key: std::collections::BTreeMap<_, _> = snapshot.iter().cloned().collect();
    let member_of =
        |r: &past_members::MemberRef| Ok::<_, ()>(by_key.get(&past_member_key(&gid, r).unwrap()).cloned());
    let records: Vec<_> = snapshot
        .iter()
        .filter(|(k, _)| !k.starts_with(PAST_MEMBER_LABEL))
        .map(|(k, v)| match k.starts_with(PAST_LEAVES_LABEL) {
            true => (k.clone(), past_members::join(v, member_of).unwrap().expect("every member")),
            false => (k.clone(), v.clone()),
        })
        .collect();
    let db = reopened_as_format(db, &dir, &key, records, 4);
    assert_eq!(assert_members_are_the_live_set(&db, &gid), (0, KEPT, 0), "members inline, as written");
    let store = MlsStore::memory();
    store.attach(db.clone());
    let alice = DbProvider::new(store);
    let mut group = MlsGroup::load(alice.storage(), &group_id).unwrap().expect("loads with members inline");
    assert_eq!(group.members().count(), 2);
    // One commit: a list joins the inline epochs, which read back alongside it.
    group.self_update(&alice, &signer, LeafNodeParameters::default()).unwrap();
    group.merge_pending_commit(&alice).unwrap();
    flush_commit(&db, alice.storage());
    assert_secrets_read_back(&db, alice.storage(), &gid, "inline and list");
    assert_eq!(assert_members_are_the_live_set(&db, &gid), (1, KEPT - 1, 2));
    // The inline epochs leave the window.
    for _ in 0..KEPT {
        group.self_update(&alice, &signer, LeafNodeParameters::default()).unwrap();
        group.merge_pending_commit(&alice).unwrap();
    }
    flush_commit(&db, alice.storage());
    assert_secrets_read_back(&db, alice.storage(), &gid, "lists only");
    let (lists, inline, _) = assert_members_are_the_live_set(&db, &gid);
    assert_eq!((lists, inline), (KEPT, 0));
    group.delete(alice.storage()).unwrap();
    flush_commit(&db, alice.storage());
    assert_eq!(assert_members_are_the_live_set(&db, &gid), (0, 0, 0));
}

/// A home as `init --no-passphrase` made it before format 6 (records under the keys derived
/// from the public unprotected key, a key check in `key`, no record check, format 5).
fn legacy_unprotected_home(dir: &std::path::Path) {
    use crate::client::state::{Secrets, State};
    let public = StateKey::unprotected();
    let mut state = State::new(Secrets::new([1; 32], [2; 32]), Some("old".into()), None);
    state.contacts.insert("bob".into(), [3; 32]);
    let partial = dir.join(migrate::PARTIAL_FILE);
    migrate::write_new(&partial, &public, &DbKey::of(&public), &state).unwrap();
    migrate::publish(dir, &partial).unwrap();
    let db = redb::Database::open(dir.join(DB_FILE)).unwrap();
    let txn = db.begin_write().unwrap();
    {
        let mut meta = txn.open_table(META).unwrap();
        meta.insert(META_FORMAT, 5u32.to_le_bytes().as_slice()).unwrap();
        meta.insert(META_KEY, statefile::seal(&public, KEY_CHECK).as_slice()).unwrap();
        meta.remove(META_RECORD_CHECK).unwrap();
    }
    txn.commit().unwrap();
}

/// Every sealed value of `table` that opens under `key`'s records keys.
fn opening_under(dir: &std::path::Path, key: &DbKey, table: Table) -> (usize, usize) {
    let keys = RecordKeys::derive(key);
    let db = redb::Database::open(dir.join(DB_FILE)).unwrap();
    let txn = db.begin_read().unwrap();
    let t = txn.open_table(table.def()).unwrap();
    let (mut all, mut open) = (0, 0);
    for item in t.iter().unwrap() {
        let (k, v) = item.unwrap();
        all += 1;
        open += usize::from(keys.open(table.label(), k.value(), v.value()).is_ok());
    }
    (all, open)
}

/// Fails without the re-seal: a passphrase set on a home that had none (here one from before
/// format 6, whose record key is the public constant) would leave every record readable by
/// anyone holding its keys.
#[test]
fn a_passphrase_on_an_old_unprotected_home_reseals_every_record_under_a_new_key() {
    use crate::client::state::{Home, Unlock};
    let dir = tempfile::tempdir().unwrap();
    legacy_unprotected_home(dir.path());
    let public = DbKey::of(&StateKey::unprotected());
    let (all, open) = opening_under(dir.path(), &public, Table::State);
    assert!(all > 10 && open == all, "the old home's records open under the public key");

    let mut home = Home::open(dir.path(), None).unwrap();
    assert_eq!(home.state.contacts.get("bob"), Some(&[3; 32]));
    let change = home.change_passphrase(&Unlock::Passphrase("pw".to_string().into()), false).unwrap();
    let resealed = change.resealed.expect("re-sealed because the record key was public");
    drop(home);
    let (all, open) = opening_under(dir.path(), &public, Table::State);
    assert_eq!(open, 0, "no record opens under the public key any more ({all} records)");
    assert!(resealed >= all as u64);

    assert!(matches!(Home::open(dir.path(), None), Err(crate::client::state::StateError::File(_))));
    let home = Home::open(dir.path(), Some(b"pw")).unwrap();
    assert_eq!(home.state.contacts.get("bob"), Some(&[3; 32]), "the same records, re-sealed");
    assert_eq!(home.state.name.as_deref(), Some("old"));
}

/// A change without a new key leaves the records as they are, so a process holding their keys
/// still opens the home; with one, it is told the key changed instead of reading damage. What
/// the journal held when the key changed is in the new file, re-sealed.
#[test]
fn a_process_keeps_its_keys_across_a_change_but_not_across_a_new_key() {
    let (dir, key, db) = new_db();
    let data = DbKey::of(&key);
    let mut w = db.write().unwrap();
    w.put(Table::State, b"contacts", b"bob").unwrap();
    w.commit().unwrap();
    let old_blob = {
        let txn = db.raw().as_ref().unwrap().begin_read().unwrap();
        txn.open_table(META).unwrap().get(META_KEY).unwrap().unwrap().value().to_vec()
    };
    let other = StateKey::from_passphrase(b"another", FAST).unwrap();
    // A change proved against a key record that is no longer there is refused.
    let stale = statefile::seal(&key, &data.wrapped());
    assert!(matches!(db.change_key(&other, &data, None, &stale), Err(DbError::PassphraseChanged(_))));
    let db = ClientDb::open(dir.path(), &data).unwrap();
    let change = db.change_key(&other, &data, None, &old_blob).unwrap();
    assert_eq!(change.resealed, None);
    drop(db);
    let file = std::fs::read(dir.path().join(DB_FILE)).unwrap();
    assert!(
        !file.windows(old_blob.len()).any(|w| w == old_blob.as_slice()),
        "the keys sealed under the old passphrase are not left in the file"
    );
    assert!(matches!(
        ClientDb::unlock(dir.path(), Some(b"correct horse")),
        Err(DbError::Key(StateFileError::WrongPassphrase))
    ));
    let db = ClientDb::open(dir.path(), &data).unwrap();
    assert_eq!(db.get(Table::State, b"contacts").unwrap().unwrap().as_slice(), b"bob");
    assert_eq!(db.generation().unwrap(), change.generation);
    let mut w = db.write().unwrap();
    w.put(Table::State, b"late", b"journaled").unwrap();
    w.commit().unwrap();
    assert!(!super::journal_tests::frames(dir.path()).is_empty(), "the write is in the journal");

    let next = data.with_new_record_key();
    let change = db.change_key(&other, &data, Some(&next), &db.key_record().unwrap()).unwrap();
    assert!(change.resealed.is_some_and(|n| n >= 2), "{change:?}");
    drop(db);
    assert!(matches!(ClientDb::open(dir.path(), &data), Err(DbError::KeyChanged(_))));
    let (_, db) = ClientDb::unlock(dir.path(), Some(b"another")).unwrap();
    assert_eq!(db.get(Table::State, b"contacts").unwrap().unwrap().as_slice(), b"bob");
    assert_eq!(db.get(Table::State, b"late").unwrap().unwrap().as_slice(), b"journaled");
}

/// Fails without the check of the `key` record: two `qpq passphrase` runs that both proved the
/// first passphrase both reported success, and the later write silently undid the earlier.
#[test]
fn a_passphrase_change_proved_before_another_one_is_refused() {
    use crate::client::state::{Home, Secrets, State, StateError, Unlock};
    let dir = tempfile::tempdir().unwrap();
    let pass = |p: &str| Unlock::Passphrase(p.to_string().into());
    let state = State::new(Secrets::new([1; 32], [2; 32]), None, None);
    drop(Home::create(dir.path(), state, pass("one")).unwrap());
    let mut a = Home::open(dir.path(), Some(b"one")).unwrap();
    let mut b = Home::open(dir.path(), Some(b"one")).unwrap();
    b.change_passphrase(&pass("two"), false).unwrap();
    let err = a.change_passphrase(&pass("three"), false).unwrap_err();
    assert!(matches!(err, StateError::Db(DbError::PassphraseChanged(_))), "{err}");
    assert!(Home::open(dir.path(), Some(b"two")).is_ok(), "the first change stands");
    // The process that made it can change it again.
    b.change_passphrase(&pass("four"), false).unwrap();
    assert!(Home::open(dir.path(), Some(b"four")).is_ok());
}
