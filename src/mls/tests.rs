//! Tests of the MLS wrapper with real openmls crypto.

use openmls::prelude::{Credential, CredentialType, KeyPackageIn, Lifetime, ProtocolVersion};
use openmls::schedule::{ExternalPsk, PreSharedKeyId, Psk};

use super::*;
use crate::clock::Clock;

fn client() -> MlsClient {
    MlsClient::new(&rand::random()).unwrap()
}

fn key_package(c: &MlsClient) -> Vec<u8> {
    c.key_packages(1).unwrap().remove(0).bytes
}

/// Validation as of the system clock's now.
fn validate_key_package(bytes: &[u8]) -> Result<ValidatedKeyPackage, KeyPackageError> {
    super::validate_key_package(bytes, Clock::system().now_secs())
}

/// `adder` commits the addition of `newcomer`, the existing `others`
/// process that commit, and `newcomer` joins from the Welcome.
fn add(group: &[u8], adder: &mut MlsClient, others: &mut [&mut MlsClient], newcomer: &mut MlsClient) {
    let kp = key_package(newcomer);
    let pending = adder.add_members(group, &[kp]).unwrap();
    assert!(adder.has_pending(group));
    adder.merge_pending(group).unwrap();
    assert!(!adder.has_pending(group));
    for other in others.iter_mut() {
        match other.process(group, &pending.commit).unwrap() {
            Incoming::Commit { sender, added, .. } => {
                assert_eq!(sender, adder.identity());
                assert_eq!(added, vec![newcomer.identity()]);
            }
            other => panic!("expected a commit, got {other:?}"),
        }
    }
    let joined = newcomer.join(&pending.welcome.unwrap()).unwrap();
    assert_eq!(joined, group);
}

/// Alice's group with Bob in it.
fn pair() -> (MlsClient, MlsClient, Vec<u8>) {
    let (mut alice, mut bob) = (client(), client());
    let group = b"group-0123456789".to_vec();
    alice.create_group(&group).unwrap();
    add(&group, &mut alice, &mut [], &mut bob);
    (alice, bob, group)
}

/// `from` sends `text`; every receiver decrypts it with the right sender.
fn send(group: &[u8], from: &mut MlsClient, to: &mut [&mut MlsClient], text: &[u8]) {
    let ciphertext = from.encrypt(group, text).unwrap();
    for receiver in to.iter_mut() {
        assert_eq!(
            receiver.process(group, &ciphertext).unwrap(),
            Incoming::Application { sender: from.identity(), plaintext: text.to_vec() }
        );
    }
}

fn trio() -> (MlsClient, MlsClient, MlsClient, Vec<u8>) {
    let (mut alice, mut bob, group) = pair();
    let mut carol = client();
    add(&group, &mut alice, &mut [&mut bob], &mut carol);
    (alice, bob, carol, group)
}

#[test]
fn client_can_move_between_threads() {
    fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<MlsClient>();
}

#[test]
fn two_members_exchange_messages_both_ways() {
    let (mut alice, mut bob, group) = pair();
    assert_eq!(alice.epoch(&group).unwrap(), 1);
    assert_eq!(bob.epoch(&group).unwrap(), 1);
    send(&group, &mut alice, &mut [&mut bob], b"hello bob");
    send(&group, &mut bob, &mut [&mut alice], b"hello alice");
    send(&group, &mut bob, &mut [&mut alice], b"");
}

#[test]
fn three_members_agree_on_epoch_and_members() {
    let (mut alice, mut bob, mut carol, group) = trio();
    let expected = vec![alice.identity(), bob.identity(), carol.identity()];
    for c in [&alice, &bob, &carol] {
        assert_eq!(c.epoch(&group).unwrap(), 2);
        assert_eq!(c.members(&group).unwrap(), expected);
        assert!(c.is_active(&group).unwrap());
    }
    send(&group, &mut carol, &mut [&mut alice, &mut bob], b"hi all");
    send(&group, &mut bob, &mut [&mut alice, &mut carol], b"hi carol");
}

#[test]
fn removed_member_learns_it_and_cannot_decrypt_later_messages() {
    let (mut alice, mut bob, mut carol, group) = trio();
    let pending = alice.remove_members(&group, &[carol.identity()]).unwrap();
    assert!(pending.welcome.is_none());
    alice.merge_pending(&group).unwrap();
    let carol_id = carol.identity();
    for c in [&mut bob, &mut carol] {
        match c.process(&group, &pending.commit).unwrap() {
            Incoming::Commit { sender, epoch, added, removed, left, self_removed } => {
                assert_eq!(sender, alice.identity());
                assert_eq!(epoch, 3);
                assert!(added.is_empty());
                assert_eq!(removed, vec![carol_id]);
                assert!(left.is_empty(), "a removal is not a leave");
                assert_eq!(self_removed, c.identity() == carol_id);
            }
            other => panic!("expected a commit, got {other:?}"),
        }
    }
    assert!(!carol.is_active(&group).unwrap());
    assert!(bob.is_active(&group).unwrap());
    assert_eq!(alice.members(&group).unwrap(), vec![alice.identity(), bob.identity()]);
    assert_eq!(bob.members(&group).unwrap(), alice.members(&group).unwrap());

    let later = alice.encrypt(&group, b"carol must not read this").unwrap();
    assert!(matches!(carol.process(&group, &later), Err(MlsError::NotMember)));
    // Not just our guard: openmls itself has no keys for it either.
    let mut stale = carol.load_group(&group).unwrap();
    let message = parse_message(&later).unwrap().try_into_protocol_message().unwrap();
    assert!(stale.process_message(&carol.provider, message).is_err());
    assert!(matches!(carol.encrypt(&group, b"x"), Err(MlsError::NotMember)));
    assert_eq!(
        bob.process(&group, &later).unwrap(),
        Incoming::Application { sender: alice.identity(), plaintext: b"carol must not read this".to_vec() }
    );
    // The removed member's stale state is forgettable.
    carol.delete_group(&group).unwrap();
    assert!(matches!(carol.epoch(&group), Err(MlsError::UnknownGroup)));
    assert!(carol.group_ids().is_empty());
}

#[test]
fn removed_member_can_be_added_again() {
    let (mut alice, mut bob, group) = pair();
    let pending = alice.remove_members(&group, &[bob.identity()]).unwrap();
    alice.merge_pending(&group).unwrap();
    bob.process(&group, &pending.commit).unwrap();
    assert!(!bob.is_active(&group).unwrap());
    // The inactive copy is replaced by the new Welcome.
    add(&group, &mut alice, &mut [], &mut bob);
    assert!(bob.is_active(&group).unwrap());
    assert_eq!(bob.epoch(&group).unwrap(), alice.epoch(&group).unwrap());
    send(&group, &mut alice, &mut [&mut bob], b"welcome back");
}

#[test]
fn self_update_advances_epoch_for_everyone() {
    let (mut alice, mut bob, mut carol, group) = trio();
    let pending = bob.self_update(&group).unwrap();
    assert!(pending.welcome.is_none());
    assert_eq!(bob.epoch(&group).unwrap(), 2, "pending commits are not applied");
    bob.merge_pending(&group).unwrap();
    for c in [&mut alice, &mut carol] {
        assert!(matches!(
            c.process(&group, &pending.commit).unwrap(),
            Incoming::Commit { epoch: 3, self_removed: false, .. }
        ));
    }
    for c in [&alice, &bob, &carol] {
        assert_eq!(c.epoch(&group).unwrap(), 3);
    }
    send(&group, &mut bob, &mut [&mut alice, &mut carol], b"fresh keys");
}

#[test]
fn leave_proposal_is_committed_by_another_member() {
    let (mut alice, mut bob, mut carol, group) = trio();
    let proposal = bob.leave_group(&group).unwrap();
    // Every remaining member must see the proposal before the commit
    // that references it.
    for c in [&mut alice, &mut carol] {
        assert_eq!(c.process(&group, &proposal).unwrap(), Incoming::LeaveRequest { sender: bob.identity() });
    }
    assert!(matches!(alice.encrypt(&group, b"x"), Err(MlsError::PendingProposals)));
    let pending = alice.commit_pending_proposals(&group).unwrap().unwrap();
    // A leave is told apart from a removal, by the committer and by the others (issue 10, bug 2).
    let left_only = Changes { added: vec![], removed: vec![], left: vec![bob.identity()] };
    assert_eq!(alice.pending_changes(&group).unwrap(), left_only);
    alice.merge_pending(&group).unwrap();
    assert!(alice.commit_pending_proposals(&group).unwrap().is_none());
    assert!(matches!(
        carol.process(&group, &pending.commit).unwrap(),
        Incoming::Commit { ref removed, ref left, self_removed: false, .. }
            if removed.is_empty() && *left == vec![bob.identity()]
    ));
    assert!(matches!(
        bob.process(&group, &pending.commit).unwrap(),
        Incoming::Commit { self_removed: true, .. }
    ));
    assert!(!bob.is_active(&group).unwrap());
    let expected = vec![alice.identity(), carol.identity()];
    assert_eq!(alice.members(&group).unwrap(), expected);
    assert_eq!(carol.members(&group).unwrap(), expected);
    send(&group, &mut carol, &mut [&mut alice], b"bye bob");
}

/// A member's proposal is committed by whoever commits next, so only a request to leave is
/// queued: anything else would let one member block or break the group for everyone.
#[test]
fn proposals_other_than_a_leave_are_refused_and_nothing_is_queued() {
    let (mut alice, mut bob, mut carol, group) = trio();
    let mut dave = client();
    add(&group, &mut alice, &mut [&mut bob, &mut carol], &mut dave);
    let epoch = alice.epoch(&group).unwrap();
    let members = alice.members(&group).unwrap();
    // Bob is hostile: he skips our wrapper and proposes through openmls directly.
    let mut raw = bob.load_group(&group).unwrap();
    let erin = client();
    let erin_kp = KeyPackageIn::tls_deserialize_exact(key_package(&erin))
        .unwrap()
        .validate(bob.provider.crypto(), ProtocolVersion::Mls10)
        .unwrap();
    let (add, _) = raw.propose_add_member(&bob.provider, &bob.signer, &erin_kp).unwrap();
    let carol_leaf = raw.members().find(|m| m.signature_key == carol.identity()).unwrap().index;
    let (remove_carol, _) = raw.propose_remove_member(&bob.provider, &bob.signer, carol_leaf).unwrap();
    for (proposal, kind) in [(add, "an add"), (remove_carol, "a removal of someone else")] {
        let proposal = to_bytes(&proposal).unwrap();
        for receiver in [&mut alice, &mut dave] {
            let refused = receiver.process(&group, &proposal);
            assert!(matches!(refused, Err(MlsError::RefusedProposal(k)) if k == kind), "{refused:?}");
        }
    }
    // A commit of the refused proposals (by reference) fails like any invalid commit.
    let (commit, _, _) = raw.commit_to_pending_proposals(&bob.provider, &bob.signer).unwrap();
    let commit = to_bytes(&commit).unwrap();
    for receiver in [&mut alice, &mut dave] {
        assert!(receiver.process(&group, &commit).is_err());
        assert_eq!(receiver.epoch(&group).unwrap(), epoch, "the commit was not merged");
        assert_eq!(receiver.members(&group).unwrap(), members);
    }
    // Carol, hostile too, proposes a PSK nobody has: stored, it would break every later commit.
    let mut raw = carol.load_group(&group).unwrap();
    let psk = Psk::External(ExternalPsk::new(b"a psk nobody has".to_vec()));
    let psk = PreSharedKeyId::new(CIPHERSUITE, carol.provider.rand(), psk).unwrap();
    let (psk, _) = raw.propose_pre_shared_key(&carol.provider, &carol.signer, psk).unwrap();
    let psk = to_bytes(&psk).unwrap();
    for receiver in [&mut alice, &mut dave] {
        let refused = receiver.process(&group, &psk);
        assert!(matches!(refused, Err(MlsError::RefusedProposal("a pre-shared key"))), "{refused:?}");
    }
    // Nothing was queued: Alice still sends, and her commits go through.
    assert!(alice.commit_pending_proposals(&group).unwrap().is_none());
    send(&group, &mut alice, &mut [&mut dave], b"still here");
    let update = alice.self_update(&group).unwrap();
    alice.merge_pending(&group).unwrap();
    assert!(matches!(dave.process(&group, &update.commit).unwrap(), Incoming::Commit { .. }));
    assert_eq!(dave.epoch(&group).unwrap(), epoch + 1);
    send(&group, &mut dave, &mut [&mut alice], b"fresh epoch");
    // A request to leave is still queued and committed.
    let leave = dave.leave_group(&group).unwrap();
    assert_eq!(alice.process(&group, &leave).unwrap(), Incoming::LeaveRequest { sender: dave.identity() });
    assert!(alice.commit_pending_proposals(&group).unwrap().is_some());
    let left = Changes { added: vec![], removed: vec![], left: vec![dave.identity()] };
    assert_eq!(alice.pending_changes(&group).unwrap(), left);
}

#[test]
fn storage_round_trip_preserves_groups() {
    let (seed_alice, seed_bob) = (rand::random(), rand::random());
    let mut alice = MlsClient::new(&seed_alice).unwrap();
    let mut bob = MlsClient::new(&seed_bob).unwrap();
    let group = b"persisted group".to_vec();
    alice.create_group(&group).unwrap();
    add(&group, &mut alice, &mut [], &mut bob);
    send(&group, &mut alice, &mut [&mut bob], b"before export");
    let exported = alice.export_storage().unwrap();
    assert_eq!(exported, alice.export_storage().unwrap(), "deterministic");
    let mut alice = MlsClient::from_storage(&seed_alice, &exported).unwrap();
    let mut bob = MlsClient::from_storage(&seed_bob, &bob.export_storage().unwrap()).unwrap();
    assert_eq!(alice.group_ids(), vec![group.clone()]);
    assert_eq!(alice.epoch(&group).unwrap(), bob.epoch(&group).unwrap());
    send(&group, &mut alice, &mut [&mut bob], b"after export");
    send(&group, &mut bob, &mut [&mut alice], b"reply after export");
    let pending = bob.self_update(&group).unwrap();
    // A pending commit survives a round trip too.
    let mut bob = MlsClient::from_storage(&seed_bob, &bob.export_storage().unwrap()).unwrap();
    assert!(bob.has_pending(&group));
    bob.merge_pending(&group).unwrap();
    alice.process(&group, &pending.commit).unwrap();
    assert_eq!(alice.epoch(&group).unwrap(), 2);
    assert_eq!(bob.epoch(&group).unwrap(), 2);

    // Someone else's storage, and damaged exports, are refused.
    assert!(matches!(MlsClient::from_storage(&seed_bob, &exported), Err(MlsError::Storage(_))));
    for len in 0..exported.len().min(200) {
        assert!(MlsClient::from_storage(&seed_alice, &exported[..len]).is_err());
    }
    let mut trailing = exported.clone();
    trailing.push(0);
    assert!(MlsClient::from_storage(&seed_alice, &trailing).is_err());
    let empty = client().export_storage().unwrap();
    assert!(MlsClient::from_storage(&seed_alice, &empty).unwrap().group_ids().is_empty());
}

#[test]
fn losing_commit_is_cleared_and_the_winner_processed() {
    let (mut alice, mut bob, group) = pair();
    let carol = client();
    let alice_pending = alice.add_members(&group, &[key_package(&carol)]).unwrap();
    let bob_pending = bob.self_update(&group).unwrap();
    assert!(matches!(alice.self_update(&group), Err(MlsError::PendingCommit)));
    // The server ordered Bob's commit first: probe whether openmls lets
    // Alice process it while her own commit is still pending.
    bob.merge_pending(&group).unwrap();
    assert!(matches!(alice.process(&group, &bob_pending.commit).unwrap(), Incoming::Commit { epoch: 2, .. }));
    // Merging someone else's commit discards ours; clearing is harmless.
    assert!(!alice.has_pending(&group));
    alice.clear_pending(&group).unwrap();
    assert!(!alice.has_pending(&group));
    assert!(bob.process(&group, &alice_pending.commit).is_err());
    assert_eq!(alice.epoch(&group).unwrap(), 2);
    assert_eq!(bob.epoch(&group).unwrap(), 2);
    send(&group, &mut alice, &mut [&mut bob], b"after the race");
    send(&group, &mut bob, &mut [&mut alice], b"indeed");
}

#[test]
fn clear_pending_before_processing_the_winner() {
    let (mut alice, mut bob, group) = pair();
    let _lost = alice.self_update(&group).unwrap();
    let won = bob.self_update(&group).unwrap();
    bob.merge_pending(&group).unwrap();
    alice.clear_pending(&group).unwrap();
    assert!(matches!(alice.merge_pending(&group), Err(MlsError::NoPendingCommit)));
    assert!(matches!(alice.process(&group, &won.commit).unwrap(), Incoming::Commit { epoch: 2, .. }));
    send(&group, &mut alice, &mut [&mut bob], b"in sync");
}

#[test]
fn application_message_of_previous_epoch_still_decrypts() {
    let (mut alice, mut bob, group) = pair();
    let old = alice.encrypt(&group, b"sent in epoch 1").unwrap();
    assert_eq!(MlsClient::peek(&old).unwrap().epoch, 1);
    let pending = bob.self_update(&group).unwrap();
    bob.merge_pending(&group).unwrap();
    assert_eq!(bob.epoch(&group).unwrap(), 2);
    assert_eq!(
        bob.process(&group, &old).unwrap(),
        Incoming::Application { sender: alice.identity(), plaintext: b"sent in epoch 1".to_vec() }
    );
    alice.process(&group, &pending.commit).unwrap();
    // Several epochs later (within MAX_PAST_EPOCHS) as well.
    let older = alice.encrypt(&group, b"sent in epoch 2").unwrap();
    for _ in 0..3 {
        let p = bob.self_update(&group).unwrap();
        bob.merge_pending(&group).unwrap();
        alice.process(&group, &p.commit).unwrap();
    }
    assert!(matches!(bob.process(&group, &older).unwrap(), Incoming::Application { .. }));
}

/// openmls opens a message of a past epoch and names its sender from that epoch: a removed
/// member could go on posting in the group until five more commits.
#[test]
fn a_removed_members_message_of_an_older_epoch_is_refused() {
    let (mut alice, mut bob, mut carol, group) = trio();
    let after_removal = carol.encrypt(&group, b"still here?").unwrap();
    let in_flight = bob.encrypt(&group, b"sent before the commit").unwrap();
    let pending = alice.remove_members(&group, &[carol.identity()]).unwrap();
    alice.merge_pending(&group).unwrap();
    bob.process(&group, &pending.commit).unwrap();
    assert!(matches!(bob.process(&group, &after_removal), Err(MlsError::FormerMember(_))));
    // A member's message of the epoch before still counts.
    assert_eq!(
        alice.process(&group, &in_flight).unwrap(),
        Incoming::Application { sender: bob.identity(), plaintext: b"sent before the commit".to_vec() }
    );
}

#[test]
fn reordered_messages_within_an_epoch_decrypt() {
    let (mut alice, mut bob, group) = pair();
    let messages: Vec<_> = (0..20u8).map(|i| alice.encrypt(&group, &[i]).unwrap()).collect();
    for (i, m) in messages.iter().enumerate().rev() {
        assert_eq!(
            bob.process(&group, m).unwrap(),
            Incoming::Application { sender: alice.identity(), plaintext: vec![i as u8] }
        );
    }
}

#[test]
fn own_and_foreign_messages_give_clear_errors() {
    let (mut alice, mut bob, group) = pair();
    let mine = alice.encrypt(&group, b"echo").unwrap();
    assert!(matches!(alice.process(&group, &mine), Err(MlsError::OwnMessage)));
    let pending = alice.self_update(&group).unwrap();
    assert!(matches!(alice.process(&group, &pending.commit), Err(MlsError::OwnMessage)));
    alice.merge_pending(&group).unwrap();
    bob.process(&group, &pending.commit).unwrap();
    assert!(matches!(bob.process(b"other group", &mine), Err(MlsError::WrongGroup)));
    assert!(matches!(client().process(&group, &mine), Err(MlsError::UnknownGroup)));
    assert!(matches!(bob.process(&group, b"junk"), Err(MlsError::Malformed(_))));
    assert!(matches!(alice.remove_members(&group, &[[9; 32]]), Err(MlsError::UnknownMember(_))));
    assert!(matches!(alice.remove_members(&group, &[alice.identity()]), Err(MlsError::CannotRemoveSelf)));
    assert!(matches!(alice.add_members(&group, &[key_package(&bob)]), Err(MlsError::AlreadyMember(_))));
    assert!(matches!(alice.create_group(&group), Err(MlsError::GroupExists)));
    assert!(matches!(alice.create_group(b""), Err(MlsError::EmptyGroupId)));
    assert!(!client().has_pending(&group));
}

#[test]
fn peek_reports_routing_information() {
    let (mut alice, mut bob, group) = pair();
    let message = alice.encrypt(&group, b"x").unwrap();
    assert_eq!(
        MlsClient::peek(&message).unwrap(),
        MessageInfo { group_id: group.clone(), epoch: 1, kind: WireKind::PrivateMessage, application: true }
    );
    let carol = client();
    let pending = alice.add_members(&group, &[key_package(&carol)]).unwrap();
    let commit_info = MlsClient::peek(&pending.commit).unwrap();
    assert_eq!(commit_info.kind, WireKind::PrivateMessage);
    assert_eq!(commit_info.epoch, 1);
    assert!(!commit_info.application, "a commit is a handshake message");
    let welcome = pending.welcome.unwrap();
    assert_eq!(MlsClient::peek(&welcome).unwrap().kind, WireKind::Welcome);
    assert!(matches!(bob.join(&welcome), Err(MlsError::NoMatchingKeyPackage)));
    assert!(matches!(bob.join(&message), Err(MlsError::UnexpectedMessage(_))));
    assert!(matches!(bob.process(&group, &welcome), Err(MlsError::UnexpectedMessage(_))));
    for len in 0..message.len() {
        assert!(MlsClient::peek(&message[..len]).is_err());
    }
    for _ in 0..2000 {
        let len = rand::random::<usize>() % 300;
        let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        let _ = MlsClient::peek(&bytes);
        let _ = bob.process(&group, &bytes);
        let _ = bob.join(&bytes);
    }
}

#[test]
fn validate_accepts_real_key_packages() {
    let c = client();
    let one_time = validate_key_package(&key_package(&c)).unwrap();
    assert_eq!(one_time.identity, c.identity());
    assert!(!one_time.last_resort);
    assert_eq!(one_time.hash_ref.len(), 32);
    let last_resort = validate_key_package(&c.last_resort_key_package().unwrap().bytes).unwrap();
    assert_eq!(last_resort.identity, c.identity());
    assert!(last_resort.last_resort);
    assert_ne!(last_resort.hash_ref, one_time.hash_ref);
    let batch = c.key_packages(3).unwrap();
    assert_eq!(batch.len(), 3);
    assert!(batch.iter().all(|kp| validate_key_package(&kp.bytes).is_ok()));
}

#[test]
fn validate_rejects_random_truncated_and_flipped_input() {
    let kp = key_package(&client());
    for len in 0..kp.len() {
        assert!(validate_key_package(&kp[..len]).is_err(), "prefix {len}");
    }
    let mut trailing = kp.clone();
    trailing.push(0);
    assert_eq!(validate_key_package(&trailing), Err(KeyPackageError::TrailingBytes));
    for i in 0..kp.len() {
        let mut flipped = kp.clone();
        flipped[i] ^= 0x01;
        assert!(validate_key_package(&flipped).is_err(), "flip at {i}");
    }
    let mut bad_signature = kp.clone();
    let last = bad_signature.len() - 1;
    bad_signature[last] ^= 0x80;
    assert_eq!(validate_key_package(&bad_signature), Err(KeyPackageError::BadSignature));
    assert_eq!(KeyPackageError::BadSignature.to_string(), "invalid key package: signature does not verify");
    for _ in 0..2000 {
        let len = rand::random::<usize>() % 400;
        let bytes: Vec<u8> = (0..len).map(|_| rand::random()).collect();
        assert!(validate_key_package(&bytes).is_err());
    }
}

/// A KeyPackage signed by `c` with arbitrary contents.
fn custom_key_package(
    c: &MlsClient,
    ciphersuite: Ciphersuite,
    credential: Credential,
    lifetime: Option<Lifetime>,
) -> Vec<u8> {
    let capabilities = Capabilities::builder()
        .extensions(vec![ExtensionType::LastResort])
        .credentials(vec![CredentialType::Basic, CredentialType::X509])
        .build();
    let now = Clock::system().now_secs();
    let lifetime = lifetime.unwrap_or(Lifetime::init(now - 60, now + limits::KEY_PACKAGE_LIFETIME_SECS));
    let builder = KeyPackage::builder().leaf_node_capabilities(capabilities).key_package_lifetime(lifetime);
    let credential = CredentialWithKey { credential, signature_key: c.signer.public().into() };
    builder
        .build(ciphersuite, &c.provider, &c.signer, credential)
        .unwrap()
        .key_package()
        .tls_serialize_detached()
        .unwrap()
}

#[test]
fn validate_rejects_convention_and_policy_violations() {
    let c = client();
    let own = || BasicCredential::new(c.identity().to_vec()).into();
    let other_suite =
        custom_key_package(&c, Ciphersuite::MLS_128_DHKEMX25519_CHACHA20POLY1305_SHA256_Ed25519, own(), None);
    assert_eq!(validate_key_package(&other_suite), Err(KeyPackageError::UnsupportedCiphersuite(0x0003)));
    let mismatch = custom_key_package(&c, CIPHERSUITE, BasicCredential::new(vec![7; 32]).into(), None);
    assert_eq!(validate_key_package(&mismatch), Err(KeyPackageError::IdentityMismatch));
    assert_eq!(
        KeyPackageError::IdentityMismatch.to_string(),
        "invalid key package: credential identity does not match its signature key"
    );
    let x509 = custom_key_package(
        &c,
        CIPHERSUITE,
        Credential::new(CredentialType::X509, c.identity().to_vec()),
        None,
    );
    assert_eq!(validate_key_package(&x509), Err(KeyPackageError::NotBasicCredential));
    let expired = custom_key_package(&c, CIPHERSUITE, own(), Some(Lifetime::init(0, 1)));
    assert!(matches!(validate_key_package(&expired), Err(KeyPackageError::Expired { not_after: 1, .. })));
    let too_long = custom_key_package(&c, CIPHERSUITE, own(), Some(Lifetime::new(10 * 365 * 86400)));
    assert!(matches!(validate_key_package(&too_long), Err(KeyPackageError::LifetimeTooLong { .. })));

    // Clients refuse such packages too, whatever the server let through.
    let mut alice = client();
    alice.create_group(b"g").unwrap();
    assert!(matches!(
        alice.add_members(b"g", &[mismatch]),
        Err(MlsError::KeyPackage(KeyPackageError::IdentityMismatch))
    ));
    assert!(!alice.has_pending(b"g"));
}

#[test]
fn commits_and_welcomes_breaking_the_convention_are_refused() {
    let (alice, mut bob, group) = pair();
    let carol = client();
    let forged =
        custom_key_package(&carol, CIPHERSUITE, BasicCredential::new(bob.identity().to_vec()).into(), None);
    // A misbehaving client that skips our checks and uses openmls directly.
    let mut raw = alice.load_group(&group).unwrap();
    let forged = KeyPackageIn::tls_deserialize_exact(&forged)
        .unwrap()
        .validate(alice.provider.crypto(), ProtocolVersion::Mls10)
        .unwrap();
    let (commit, welcome, _) = raw.add_members(&alice.provider, &alice.signer, &[forged]).unwrap();
    let epoch = bob.epoch(&group).unwrap();
    assert!(matches!(bob.process(&group, &to_bytes(&commit).unwrap()), Err(MlsError::InvalidMember(_))));
    assert_eq!(bob.epoch(&group).unwrap(), epoch, "refused commit not merged");
    let mut carol = carol;
    assert!(matches!(carol.join(&to_bytes(&welcome).unwrap()), Err(MlsError::InvalidMember(_))));
}

#[test]
fn last_resort_key_package_joins_several_groups() {
    let mut alice = client();
    let mut bob = client();
    let last_resort = bob.last_resort_key_package().unwrap().bytes;
    for group in [b"first group".as_slice(), b"second group"] {
        alice.create_group(group).unwrap();
        let pending = alice.add_members(group, std::slice::from_ref(&last_resort)).unwrap();
        alice.merge_pending(group).unwrap();
        assert_eq!(bob.join(&pending.welcome.unwrap()).unwrap(), group);
        send(group, &mut alice, &mut [&mut bob], b"hi");
        send(group, &mut bob, &mut [&mut alice], b"hi back");
    }
    assert_eq!(bob.group_ids(), vec![b"first group".to_vec(), b"second group".to_vec()]);

    // A one-time package, by contrast, is consumed by its first Welcome.
    let one_time = key_package(&bob);
    let mut welcomes = Vec::new();
    for group in [b"third group".as_slice(), b"fourth group"] {
        alice.create_group(group).unwrap();
        let pending = alice.add_members(group, std::slice::from_ref(&one_time)).unwrap();
        alice.merge_pending(group).unwrap();
        welcomes.push(pending.welcome.unwrap());
    }
    bob.join(&welcomes[0]).unwrap();
    assert!(matches!(bob.join(&welcomes[1]), Err(MlsError::NoMatchingKeyPackage)));
}

const DAY: u64 = 24 * 3600;

/// A client whose clock runs a year behind the system clock.
fn client_a_year_ago() -> MlsClient {
    client().with_clock(Clock::with_offset_ms(-365 * DAY as i64 * 1000))
}

#[test]
fn key_packages_carry_qpqs_lifetime_from_the_clients_clock() {
    let c = client_a_year_ago();
    let now = c.now_secs();
    let kp = c.key_packages(1).unwrap().remove(0);
    assert_eq!(kp.not_after, now + limits::KEY_PACKAGE_LIFETIME_SECS, "not openmls's 84-day default");
    let parsed = KeyPackageIn::tls_deserialize_exact(&kp.bytes).unwrap();
    let json = serde_json::to_value(&parsed).unwrap();
    let lifetime = &json["payload"]["leaf_node"]["payload"]["leaf_node_source"]["KeyPackage"];
    assert_eq!(lifetime["not_before"], now - limits::KEY_PACKAGE_NOT_BEFORE_MARGIN_SECS);
    assert_eq!(lifetime["not_after"], now + limits::KEY_PACKAGE_LIFETIME_SECS);
}

#[test]
fn lifetimes_are_judged_by_the_given_clock_not_the_system_clock() {
    // Made a year ago by the maker's clock: expired for openmls, valid as of that clock.
    let c = client_a_year_ago();
    let then = c.now_secs();
    let kp = c.key_packages(1).unwrap().remove(0);
    let v = super::validate_key_package(&kp.bytes, then).unwrap();
    assert_eq!(v.identity, c.identity());
    assert!(!v.last_resort);
    assert_eq!(v.hash_ref, kp.hash_ref, "the converted package is the one that was signed");
    assert_eq!(v.not_after, kp.not_after);
    let lr = c.last_resort_key_package().unwrap();
    let v = super::validate_key_package(&lr.bytes, then).unwrap();
    assert!(v.last_resort);
    assert_eq!(v.hash_ref, lr.hash_ref);
    // The same packages as of the system clock's now, and as of just before they begin.
    assert!(matches!(validate_key_package(&kp.bytes), Err(KeyPackageError::Expired { .. })));
    let early = then - limits::KEY_PACKAGE_NOT_BEFORE_MARGIN_SECS - 1;
    assert!(matches!(
        super::validate_key_package(&kp.bytes, early),
        Err(KeyPackageError::NotYetValid { .. })
    ));
    // A fresh package is not yet valid for a verifier whose clock is a year behind.
    let fresh = key_package(&client());
    assert!(matches!(super::validate_key_package(&fresh, then), Err(KeyPackageError::NotYetValid { .. })));
}

#[test]
fn a_package_expired_by_the_system_clock_still_needs_valid_signatures() {
    // openmls reports a lifetime error only after every other check; a tampered old package
    // must still fail on its signature, never pass on our clock's say-so.
    let c = client_a_year_ago();
    let then = c.now_secs();
    let kp = c.key_packages(1).unwrap().remove(0).bytes;
    let mut bad = kp.clone();
    let last = bad.len() - 1;
    bad[last] ^= 0x80;
    assert_eq!(super::validate_key_package(&bad, then), Err(KeyPackageError::BadSignature));
    for i in 0..kp.len() {
        let mut flipped = kp.clone();
        flipped[i] ^= 0x01;
        if let Ok(v) = super::validate_key_package(&flipped, then) {
            panic!("flip at {i} accepted: {v:?}");
        }
    }
}

#[test]
fn lifetimes_longer_than_qpqs_maximum_are_refused() {
    let c = client();
    let own = || BasicCredential::new(c.identity().to_vec()).into();
    let now = Clock::system().now_secs();
    let max = limits::MAX_KEY_PACKAGE_LIFETIME_RANGE_SECS;
    let at_max = custom_key_package(&c, CIPHERSUITE, own(), Some(Lifetime::init(now - 10, now - 10 + max)));
    assert!(validate_key_package(&at_max).is_ok());
    let longer = custom_key_package(&c, CIPHERSUITE, own(), Some(Lifetime::init(now - 10, now - 9 + max)));
    assert_eq!(validate_key_package(&longer), Err(KeyPackageError::LifetimeTooLong { range: max + 1, max }));
}

#[test]
fn a_deleted_key_package_can_no_longer_be_joined() {
    let mut alice = client();
    let bob = client();
    let kp = bob.key_packages(1).unwrap().remove(0);
    assert!(bob.has_key_package(&kp.hash_ref));
    alice.create_group(b"g").unwrap();
    let pending = alice.add_members(b"g", std::slice::from_ref(&kp.bytes)).unwrap();
    bob.delete_key_package(&kp.hash_ref).unwrap();
    assert!(!bob.has_key_package(&kp.hash_ref));
    let exported = bob.export_storage().unwrap();
    let mut bob = MlsClient::from_storage(&rand::random(), &exported).unwrap();
    assert!(matches!(bob.join(&pending.welcome.unwrap()), Err(MlsError::NoMatchingKeyPackage)));
    bob.delete_key_package(&kp.hash_ref).expect("deleting twice is fine");
}

#[test]
fn a_previewed_welcome_keeps_the_key_package_for_a_later_join() {
    let (mut alice, mut bob) = (client(), client());
    let group = b"group-preview-01".to_vec();
    alice.create_group(&group).unwrap();
    let pending = alice.add_members(&group, &[key_package(&bob)]).unwrap();
    alice.merge_pending(&group).unwrap();
    let welcome = pending.welcome.unwrap();
    let hello = alice.encrypt(&group, b"hello bob").unwrap();
    let (joined, mut scratch) = bob.preview_welcome(&welcome).unwrap();
    assert_eq!((joined.group_id.clone(), joined.inviter), (group.clone(), alice.identity()));
    assert_eq!(
        scratch.process(&group, &hello).unwrap(),
        Incoming::Application { sender: alice.identity(), plaintext: b"hello bob".to_vec() }
    );
    assert!(bob.group_ids().is_empty(), "a preview joins nothing");
    // Twice: the preview consumed nothing.
    bob.preview_welcome(&welcome).unwrap();
    assert_eq!(bob.join_welcome(&welcome).unwrap().group_id, group);
    assert!(matches!(bob.process(&group, &hello).unwrap(), Incoming::Application { .. }));
}

#[test]
fn a_discarded_welcome_can_no_longer_be_joined() {
    let (mut alice, mut bob) = (client(), client());
    let group = b"group-discard-01".to_vec();
    alice.create_group(&group).unwrap();
    let welcome = alice.add_members(&group, &[key_package(&bob)]).unwrap().welcome.unwrap();
    bob.discard_welcome_key_packages(&welcome).unwrap();
    assert!(matches!(bob.preview_welcome(&welcome), Err(MlsError::NoMatchingKeyPackage)));
    assert!(matches!(bob.join_welcome(&welcome), Err(MlsError::NoMatchingKeyPackage)));
}

/// Review: discarding a Welcome deleted every one of our packages it named, though joining
/// uses only the first. A co-member who saw one package of bob's could name bob's others in a
/// Welcome of its own and so delete the keys of an invitation waiting as a request.
#[test]
fn a_discarded_welcome_deletes_only_the_package_joining_would_use() {
    use openmls::messages::EncryptedGroupSecrets;
    let (mut alice, mut bob) = (client(), client());
    let group = b"group-discard-02".to_vec();
    alice.create_group(&group).unwrap();
    let other = bob.key_packages(1).unwrap().remove(0);
    let welcome = alice.add_members(&group, &[key_package(&bob)]).unwrap().welcome.unwrap();
    // The same Welcome with a second secret naming bob's other package.
    let MlsMessageBodyIn::Welcome(parsed) = parse_message(&welcome).unwrap().extract() else { panic!() };
    let mut secrets = parsed.secrets().to_vec();
    let header_and_secrets = 6 + secrets.tls_serialize_detached().unwrap().len(); // version, wire format, suite
    let first = secrets[0].tls_serialize_detached().unwrap();
    let first_ref = secrets[0].new_member().tls_serialize_detached().unwrap();
    let mut second = key_package_ref(&other.hash_ref).unwrap().tls_serialize_detached().unwrap();
    second.extend_from_slice(&first[first_ref.len()..]);
    secrets.push(EncryptedGroupSecrets::tls_deserialize_exact(second.as_slice()).unwrap());
    let mut crafted = welcome[..6].to_vec();
    crafted.extend(secrets.tls_serialize_detached().unwrap());
    crafted.extend_from_slice(&welcome[header_and_secrets..]);
    assert!(
        matches!(parse_message(&crafted).unwrap().extract(), MlsMessageBodyIn::Welcome(w) if w.secrets().len() == 2)
    );

    bob.discard_welcome_key_packages(&crafted).unwrap();
    assert!(bob.has_key_package(&other.hash_ref), "the package it names second is kept");
    assert!(matches!(bob.join_welcome(&welcome), Err(MlsError::NoMatchingKeyPackage)), "the first went");
}

/// Found by the `mls_storage` fuzz target: openmls's memory storage unwraps the JSON decoding of
/// its values, so a damaged value in an otherwise well-framed export panicked when the group was
/// loaded. It is an error now.
#[test]
fn damaged_value_in_storage_is_an_error_not_a_panic() {
    let seed = rand::random();
    let mut alice = MlsClient::new(&seed).unwrap();
    alice.create_group(b"damaged").unwrap();
    let mut values = alice.provider.storage().snapshot();
    let (_, tree) = values.iter_mut().find(|(k, _)| k.starts_with(b"Tree")).expect("a stored tree");
    tree[0] = b'!';
    alice.provider.storage().restore(values);
    let damaged = alice.export_storage().unwrap();
    assert!(matches!(MlsClient::from_storage(&seed, &damaged), Err(MlsError::Storage(_))));
}

/// A name is signed into the leaf (KeyPackage or group creation), read by the others from the
/// tree, changed by a self-update, and a leaf claiming an unsafe name reads as no name.
#[test]
fn display_names_travel_in_leaves_and_unsafe_ones_are_ignored() {
    let mut alice = client().with_display_name(Some("Alice"));
    let mut bob = client().with_display_name(Some("Bob"));
    let group = b"named-group-0123".to_vec();
    alice.create_group(&group).unwrap();
    add(&group, &mut alice, &mut [], &mut bob);
    assert_eq!(bob.member_name(&group, &alice.identity()).as_deref(), Some("Alice"), "creator's leaf");
    assert_eq!(alice.member_name(&group, &bob.identity()).as_deref(), Some("Bob"), "key package leaf");

    alice.set_display_name(Some("Alice L."));
    let pending = alice.self_update(&group).unwrap();
    alice.merge_pending(&group).unwrap();
    bob.process(&group, &pending.commit).unwrap();
    assert_eq!(bob.member_name(&group, &alice.identity()).as_deref(), Some("Alice L."), "updated");

    // A client that signs what qpq would never sign: the others see no name at all.
    let mut mallory = client();
    mallory.display_name = Some("bob\u{1b}[2J".into());
    add(&group, &mut alice, &mut [&mut bob], &mut mallory);
    assert_eq!(bob.member_name(&group, &mallory.identity()), None);
    mallory.display_name = Some("x".repeat(crate::limits::MAX_DISPLAY_NAME_BYTES + 1));
    let pending = mallory.self_update(&group).unwrap();
    mallory.merge_pending(&group).unwrap();
    bob.process(&group, &pending.commit).unwrap();
    assert_eq!(bob.member_name(&group, &mallory.identity()), None);
    // And a name nobody signed is None, not an error.
    assert_eq!(bob.member_name(&group, &[7; 32]), None);
    assert_eq!(client().with_display_name(Some("\u{202e}")).display_name, None, "never signed");
}

/// Issue 11 weak point: with the hybrid suite a Welcome carries a 1216-byte X-Wing key per
/// leaf, so adding the 200th member made a Welcome above the old 256 KiB payload limit and the
/// group could not grow. The sealed parcel the client enqueues must fit the default limit now
/// (this fails with the old `DEFAULT_MAX_PAYLOAD`), and the joiner can join from it.
#[test]
fn a_welcome_to_a_two_hundred_member_group_fits_the_default_payload_limit() {
    use crate::client::frame::Frame;
    use crate::client::parcel::Parcel;
    use crate::client::state::GroupKind;
    use crate::crypto::hybrid::{self, HybridSecretKey};
    use crate::limits::DEFAULT_MAX_PAYLOAD;

    const OLD_LIMIT: usize = 256 * 1024;
    const MEMBERS: usize = 200;
    let mut creator = client();
    let mut members: Vec<MlsClient> = (1..MEMBERS).map(|_| client()).collect();
    let kps: Vec<Vec<u8>> = members.iter().map(key_package).collect();
    let group = b"group-of-two-hundred".to_vec();
    creator.create_group(&group).unwrap();
    let welcome = creator.add_members(&group, &kps).unwrap().welcome.unwrap();
    creator.merge_pending(&group).unwrap();

    let frame = Frame::Welcome {
        welcome: welcome.clone(),
        group_name: "two hundred".into(),
        kind: GroupKind::Group,
        inviter: creator.identity(),
    }
    .encode();
    let joiner = members.last_mut().unwrap();
    let secret = HybridSecretKey::generate();
    let parcel = Parcel::Sealed(&hybrid::seal(&joiner.identity(), &secret.public_key(), &frame)).encode();
    assert!(parcel.len() > OLD_LIMIT, "{} bytes: the case no longer exceeds the old limit", parcel.len());
    assert!(parcel.len() <= DEFAULT_MAX_PAYLOAD, "{} > {DEFAULT_MAX_PAYLOAD}", parcel.len());
    assert_eq!(joiner.join(&welcome).unwrap(), group);
    assert_eq!(joiner.members(&group).unwrap().len(), MEMBERS);
}

/// Loaded groups are cached between operations; a store whose records are replaced underneath
/// (another process wrote, a reload) must not be answered from the stale cache. Fails with a
/// cache that ignores `MlsStore::version`.
#[test]
fn cached_groups_follow_a_store_replaced_underneath() {
    let (mut alice, mut bob, group) = pair();
    let before = alice.provider.storage().snapshot();
    let epoch = alice.epoch(&group).unwrap();
    alice.self_update(&group).unwrap();
    alice.merge_pending(&group).unwrap();
    assert_eq!(alice.epoch(&group).unwrap(), epoch + 1);
    alice.provider.storage().restore(before);
    assert_eq!(alice.epoch(&group).unwrap(), epoch, "answered from the stale cache");
    // And the group still works from the restored records.
    assert!(!alice.has_pending(&group));
    let text = alice.encrypt(&group, b"after restore").unwrap();
    assert_eq!(
        bob.process(&group, &text).unwrap(),
        Incoming::Application { sender: alice.identity(), plaintext: b"after restore".to_vec() }
    );
}

/// A failed operation drops its checked-out copy: the next one sees what the storage holds.
#[test]
fn a_failed_operation_leaves_the_stored_group_in_charge() {
    let (mut alice, mut bob, group) = pair();
    let message = alice.encrypt(&group, b"once").unwrap();
    bob.process(&group, &message).unwrap();
    assert!(matches!(bob.process(&group, &message), Err(MlsError::Replayed)));
    let again = alice.encrypt(&group, b"twice").unwrap();
    assert_eq!(
        bob.process(&group, &again).unwrap(),
        Incoming::Application { sender: alice.identity(), plaintext: b"twice".to_vec() }
    );
}

/// Values are stored binary (postcard behind a tag byte), except the join config; stores written
/// by earlier builds hold JSON (openmls_memory_storage's encoding, which ours mirrored) and must
/// still load and keep working, their records turning binary as openmls rewrites them.
#[test]
fn json_records_of_earlier_builds_still_load_and_new_writes_are_binary() {
    use crate::client::db::mls::{GROUP_INDEX_KEY, VALUE_TAG};
    use openmls_rust_crypto::OpenMlsRustCrypto;

    let seed: [u8; 32] = rand::random();
    let alice = MlsClient::new(&seed).unwrap();
    // The group made by openmls over its JSON memory storage, as earlier builds stored it.
    let legacy = OpenMlsRustCrypto::default();
    let config = MlsGroupCreateConfig::builder()
        .ciphersuite(CIPHERSUITE)
        .use_ratchet_tree_extension(true)
        .wire_format_policy(PURE_CIPHERTEXT_WIRE_FORMAT_POLICY)
        .build();
    let group = b"legacy-group-012".to_vec();
    MlsGroup::new_with_group_id(
        &legacy,
        &alice.signer,
        &config,
        GroupId::from_slice(&group),
        alice.credential.clone(),
    )
    .unwrap();
    let values: Vec<(Vec<u8>, Zeroizing<Vec<u8>>)> = legacy
        .storage()
        .values
        .read()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), Zeroizing::new(v.clone())))
        .collect();
    assert!(values.iter().all(|(_, v)| v.first() != Some(&VALUE_TAG)), "the fixture is JSON");
    let blob = {
        let scratch = MlsClient::new(&seed).unwrap();
        scratch.provider.storage().restore(values);
        scratch.export_storage().unwrap()
    };
    let mut alice = MlsClient::from_storage(&seed, &blob).unwrap();
    assert_eq!(alice.group_ids(), vec![group.clone()]);
    assert_eq!(alice.epoch(&group).unwrap(), 0);

    let mut bob = client();
    add(&group, &mut alice, &mut [], &mut bob);
    send(&group, &mut alice, &mut [&mut bob], b"from a legacy store");
    for (key, value) in alice.provider.storage().snapshot() {
        let json = key.starts_with(JOIN_CONFIG_LABEL)
            || key.as_slice() == GROUP_INDEX_KEY
            || key.starts_with(b"OwnLeafNodes")
            || key.starts_with(b"ProposalQueueRefs");
        if key.starts_with(b"MessageSecrets") {
            // Stored in two parts (past epochs' leaves apart): `client::db::past_leaves`.
            assert_eq!(value.first(), Some(&crate::client::db::past_leaves::SPLIT_TAG));
        }
        if key.starts_with(b"Tree") {
            // Stored one record per node: `client::db::tree_nodes`.
            assert_eq!(
                value.first(),
                Some(&crate::client::db::tree_nodes::SPLIT_TAG),
                "rewritten split: {}",
                String::from_utf8_lossy(&key)
            );
        }
        if key.starts_with(crate::client::db::mls::TREE_NODE_LABEL) {
            assert_eq!(value.first(), Some(&VALUE_TAG), "node rewritten binary");
        }
        if json {
            assert!(serde_json::from_slice::<serde_json::Value>(&value).is_ok());
        }
    }
    // A binary value that fails to decode is an error, not a panic.
    let mut values = alice.provider.storage().snapshot();
    let (_, secrets) = values.iter_mut().find(|(k, _)| k.starts_with(b"MessageSecrets")).unwrap();
    secrets.truncate(3);
    alice.provider.storage().restore(values);
    let damaged = alice.export_storage().unwrap();
    assert!(matches!(MlsClient::from_storage(&seed, &damaged), Err(MlsError::Storage(_))));
}

/// Every messenger operation attaches that operation's database handle to the store; the
/// decoded group must survive it. It did not (attaching moved the store's version), so each
/// message decoded the whole ratchet tree again: O(members) per message (issue 11). Fails when
/// `MlsStore::attach` moves the version.
#[test]
fn attaching_the_database_again_keeps_the_loaded_group() {
    use std::sync::atomic::Ordering;

    use crate::client::db::ClientDb;
    use crate::crypto::statefile::StateKey;

    let seed: [u8; 32] = rand::random();
    let mut alice = MlsClient::new(&seed).unwrap();
    let mut bob = client();
    let group = b"group-0123456789".to_vec();
    alice.create_group(&group).unwrap();
    add(&group, &mut alice, &mut [], &mut bob);
    let dir = tempfile::tempdir().unwrap();
    let db = std::sync::Arc::new(
        ClientDb::create(dir.path(), &StateKey::unprotected(), &crate::client::db::DbKey::random()).unwrap(),
    );
    let store = MlsStore::memory();
    store.restore(alice.store().snapshot());
    store.attach(db.clone());
    let mut alice = MlsClient::from_store_lazy(&seed, store).unwrap();
    send(&group, &mut alice, &mut [&mut bob], b"loads the group");
    let loads = alice.groups.1.load(Ordering::Relaxed);
    assert_eq!(loads, 1);
    for text in [&b"one"[..], b"two"] {
        alice.store().detach();
        alice.store().attach(db.clone());
        send(&group, &mut alice, &mut [&mut bob], text);
    }
    assert_eq!(alice.groups.1.load(Ordering::Relaxed), loads, "the group was decoded again");
}

/// A Welcome bob already used (kept and replayed, say by the server: his last-resort
/// KeyPackage still opens it) does not put him back into a group he was removed from; a new
/// invitation, after the removal, does.
#[test]
fn a_replayed_welcome_does_not_rejoin_an_old_epoch() {
    let mut alice = client();
    let mut bob = client();
    let group = b"team".as_slice();
    let last_resort = bob.last_resort_key_package().unwrap().bytes;
    alice.create_group(group).unwrap();
    let pending = alice.add_members(group, std::slice::from_ref(&last_resort)).unwrap();
    alice.merge_pending(group).unwrap();
    let old_welcome = pending.welcome.unwrap();
    bob.join(&old_welcome).unwrap();
    let removal = alice.remove_members(group, &[bob.identity()]).unwrap();
    alice.merge_pending(group).unwrap();
    bob.process(group, &removal.commit).unwrap();
    assert!(!bob.is_active(group).unwrap());
    let replayed = bob.rejoin_welcome(&old_welcome, |_| true, false);
    assert!(matches!(replayed, Err(MlsError::StaleWelcome { welcome: 1, ours: _ })), "{replayed:?}");
    assert!(!bob.is_active(group).unwrap(), "still out");

    let pending = alice.add_members(group, std::slice::from_ref(&last_resort)).unwrap();
    alice.merge_pending(group).unwrap();
    bob.rejoin_welcome(&pending.welcome.unwrap(), |_| true, false).unwrap();
    send(group, &mut alice, &mut [&mut bob], b"welcome back");
}

/// alice added bob to "team" and removed him; mallory, never in it, created a group with the
/// same id, committed past bob's epoch and invited him. Returns alice, bob, mallory and
/// mallory's Welcome.
fn mallory_reuses_the_id_of_a_group_bob_left() -> (MlsClient, MlsClient, MlsClient, Vec<u8>) {
    let mut alice = client();
    let mut bob = client();
    let mut mallory = client();
    let group = b"team".as_slice();
    alice.create_group(group).unwrap();
    let kp = bob.key_packages(1).unwrap().remove(0).bytes;
    let pending = alice.add_members(group, &[kp]).unwrap();
    alice.merge_pending(group).unwrap();
    bob.join(&pending.welcome.unwrap()).unwrap();
    let removal = alice.remove_members(group, &[bob.identity()]).unwrap();
    alice.merge_pending(group).unwrap();
    bob.process(group, &removal.commit).unwrap();

    mallory.create_group(group).unwrap();
    for _ in 0..bob.epoch(group).unwrap() {
        mallory.self_update(group).unwrap();
        mallory.merge_pending(group).unwrap();
    }
    let kp = bob.key_packages(1).unwrap().remove(0).bytes;
    let pending = mallory.add_members(group, &[kp]).unwrap();
    mallory.merge_pending(group).unwrap();
    (alice, bob, mallory, pending.welcome.unwrap())
}

/// Group ids are their creator's choice: mallory's Welcome (above) made bob's copy of #team
/// (its name and history in his client) hers. A rejoin must come from a member of the last
/// epoch bob saw.
#[test]
fn a_welcome_reusing_the_id_of_a_group_we_left_must_come_from_one_of_its_members() {
    let (mut alice, mut bob, mallory, mallorys) = mallory_reuses_the_id_of_a_group_bob_left();
    let group = b"team".as_slice();
    let ours = bob.epoch(group).unwrap();
    let taken = bob.rejoin_welcome(&mallorys, |_| true, false);
    assert!(matches!(taken, Err(MlsError::NotFromAMember)), "{taken:?}");
    assert!(!bob.was_member(group, &mallory.identity()) && bob.was_member(group, &alice.identity()));
    assert_eq!(bob.epoch(group).unwrap(), ours, "bob's copy is untouched");
    assert_eq!(bob.members(group).unwrap(), vec![alice.identity()], "still alice's group as bob last saw it");

    let kp = bob.key_packages(1).unwrap().remove(0).bytes;
    let pending = alice.add_members(group, &[kp]).unwrap();
    alice.merge_pending(group).unwrap();
    bob.rejoin_welcome(&pending.welcome.unwrap(), |_| true, false).unwrap();
    send(group, &mut alice, &mut [&mut bob], b"welcome back");
}

/// The person may still take mallory's invitation, knowing she was not a member
/// (`from_anyone`, a request they accepted): bob is then in her group, not alice's.
#[test]
fn a_welcome_from_a_non_member_joins_once_the_person_accepts_it() {
    let (alice, mut bob, mut mallory, mallorys) = mallory_reuses_the_id_of_a_group_bob_left();
    let group = b"team".as_slice();
    let joined = bob.rejoin_welcome(&mallorys, |_| true, true).unwrap();
    assert_eq!(joined.inviter, mallory.identity());
    send(group, &mut mallory, &mut [&mut bob], b"hi from my group");
    assert!(bob.was_member(group, &mallory.identity()) && !bob.was_member(group, &alice.identity()));
}
