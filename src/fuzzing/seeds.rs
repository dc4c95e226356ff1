//! The seed corpus: real inputs for every target, made by the real code paths (a recorded RPC
//! session, sealed envelopes, a sealed state file, MLS exports, KeyPackages and Welcomes), plus a
//! few edge cases. [`write_corpus`] writes them to `fuzz/corpus/<target>/`; the ignored test
//! `regenerate_seed_corpus` in `tests/fuzz_smoke.rs` calls it.

use std::cell::RefCell;
use std::path::Path;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use capnp_rpc::{RpcSystem, rpc_twoparty_capnp, twoparty};
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

use super::{
    AUTH_CHALLENGE, ENVELOPE_HYBRID_SEED, ENVELOPE_IDENTITY_SEED, STORAGE_OWNER_SEED, WELCOME_JOINER_SEED,
};
use crate::client::frame::{AppMessage, Frame};
use crate::client::state::{GroupKind, Secrets, State};
use crate::clock::Clock;
use crate::crypto::hybrid::{self, HybridSecretKey, SignedHybridKey};
use crate::crypto::identity::Identity;
use crate::crypto::statefile::{self, KdfParams, StateKey};
use crate::mls::MlsClient;
use crate::proto::node_capnp::node_service;

type Seeds = Vec<(String, Vec<u8>)>;

/// Writes every target's seeds under `corpus_root/<target>/` and the joiner storage the
/// `welcome` target needs to `joiner_storage`.
pub fn write_corpus(corpus_root: &Path, joiner_storage: &Path) -> anyhow::Result<()> {
    let (joiner, welcomes) = welcome_seeds()?;
    std::fs::write(joiner_storage, joiner)?;
    let all: Vec<(&str, Seeds)> = vec![
        ("rpc_entry", rpc_seeds()?),
        ("hybrid_open", envelope_seeds()),
        ("frame_decode", frame_seeds()),
        ("state_file", state_seeds()?),
        ("mls_storage", storage_seeds()?),
        ("key_package", key_package_seeds()?),
        ("welcome", welcomes),
        ("shell_line", shell_seeds()),
    ];
    for (target, seeds) in all {
        let dir = corpus_root.join(target);
        std::fs::create_dir_all(&dir)?;
        for (name, bytes) in seeds {
            std::fs::write(dir.join(format!("seed-{name}")), bytes)?;
        }
    }
    Ok(())
}

fn seed(name: &str, bytes: impl Into<Vec<u8>>) -> (String, Vec<u8>) {
    (name.to_string(), bytes.into())
}

fn envelope_seeds() -> Seeds {
    let identity = Identity::from_seed(&ENVELOPE_IDENTITY_SEED).public().0;
    let pk = HybridSecretKey::from_seed(ENVELOPE_HYBRID_SEED).public_key();
    let frame = Frame::Mls { group_id: vec![7; 16], message: vec![1; 40] }.encode();
    let sealed = hybrid::seal(&identity, &pk, &frame);
    let mut tampered = sealed.clone();
    if let Some(last) = tampered.last_mut() {
        *last ^= 1;
    }
    let other = HybridSecretKey::from_seed([0x99; 32]).public_key();
    vec![
        seed("frame", sealed.clone()),
        seed("empty-plaintext", hybrid::seal(&identity, &pk, b"")),
        seed("tampered-tag", tampered),
        seed("other-key", hybrid::seal(&identity, &other, b"not for us")),
        seed("header-only", sealed.get(..6).unwrap_or_default()),
        seed(
            "sealed-many",
            crate::crypto::sealmany::seal(&[([0x42; 32], &other), (identity, &pk)], &frame)
                .unwrap_or_default(),
        ),
    ]
}

fn frame_seeds() -> Seeds {
    let welcome = Frame::Welcome {
        welcome: vec![0; 64],
        group_name: "team".into(),
        kind: GroupKind::Group,
        inviter: [8; 32],
    };
    let direct = Frame::Welcome {
        welcome: vec![1; 8],
        group_name: "bob".into(),
        kind: GroupKind::Direct { peer: [3; 32] },
        inviter: [4; 32],
    };
    vec![
        seed("welcome", welcome.encode()),
        seed("direct-welcome", direct.encode()),
        seed("mls", Frame::Mls { group_id: vec![5; 16], message: vec![6; 100] }.encode()),
        seed(
            "group-parcel",
            crate::client::parcel::Parcel::Group(
                &Frame::Mls { group_id: vec![5; 16], message: vec![6; 100] }.encode(),
            )
            .encode(),
        ),
        seed("app-message", AppMessage { text: "hi ✓".into(), sent_at_ms: 1_700_000_000_000 }.encode()),
        seed("bad-version", vec![9, 0, 0]),
    ]
}

fn sample_state() -> anyhow::Result<State> {
    let mut state =
        State::new(Secrets::new([1; 32], [2; 32]), Some("alice".into()), Some("127.0.0.1:7000".into()));
    state.contacts.insert("bob".into(), [3; 32]);
    state.mls_storage = MlsClient::new(&[1; 32])?.export_storage()?;
    Ok(state)
}

fn state_seeds() -> anyhow::Result<Seeds> {
    let plain = sample_state()?.encode()?;
    let fast = KdfParams { m_cost_kib: 64, t_cost: 1, p_cost: 1 };
    let protected = statefile::seal(&StateKey::from_passphrase(b"passphrase", fast)?, &plain);
    Ok(vec![
        seed("unprotected", statefile::seal(&StateKey::unprotected(), &plain)),
        seed("passphrase", protected),
        seed("plaintext", plain.to_vec()),
    ])
}

fn storage_seeds() -> anyhow::Result<Seeds> {
    let mut owner = MlsClient::new(&STORAGE_OWNER_SEED)?;
    let empty = owner.export_storage()?.to_vec();
    let bob = MlsClient::new(&[0x66; 32])?;
    owner.create_group(&[1; 16])?;
    owner.add_members(&[1; 16], &kp_bytes(bob.key_packages(1)?))?;
    owner.merge_pending(&[1; 16])?;
    let _ = bob.key_packages(1)?;
    Ok(vec![seed("empty", empty), seed("one-group", owner.export_storage()?.to_vec())])
}

fn key_package_seeds() -> anyhow::Result<Seeds> {
    let client = MlsClient::new(&[0x77; 32])?.with_clock(super::fuzz_clock());
    let mut seeds = Vec::new();
    for (i, kp) in client.key_packages(2)?.into_iter().enumerate() {
        seeds.push(seed(&format!("regular-{i}"), kp.bytes));
    }
    seeds.push(seed("last-resort", client.last_resort_key_package()?.bytes));
    Ok(seeds)
}

/// The joiner's storage and Welcomes to it: a two-member group and a three-member group.
fn welcome_seeds() -> anyhow::Result<(Vec<u8>, Seeds)> {
    let joiner = MlsClient::new(&WELCOME_JOINER_SEED)?;
    let packages = kp_bytes(joiner.key_packages(2)?);
    let mut alice = MlsClient::new(&[0x88; 32])?;
    let carol = MlsClient::new(&[0x99; 32])?;
    alice.create_group(&[2; 16])?;
    let pair = alice.add_members(&[2; 16], &packages[..1])?;
    alice.create_group(&[3; 32])?;
    let mut three = packages[1..].to_vec();
    three.extend(kp_bytes(carol.key_packages(1)?));
    let trio = alice.add_members(&[3; 32], &three)?;
    let welcome = |p: crate::mls::Pending| p.welcome.ok_or_else(|| anyhow::anyhow!("no welcome"));
    Ok((joiner.export_storage()?.to_vec(), vec![seed("pair", welcome(pair)?), seed("trio", welcome(trio)?)]))
}

fn shell_seeds() -> Seeds {
    [
        "@bob hello there",
        "#team lunch?",
        "/say hi",
        "group create team",
        "/group add team bob carol",
        "/contact add bob 0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "/history 5",
        "/chat #team",
        "help group",
        "/send --help",
        "'unterminated \"quote",
        "/quit",
    ]
    .iter()
    .enumerate()
    .map(|(i, line)| seed(&format!("line-{i}"), line.as_bytes()))
    .collect()
}

/// Copies everything the client writes, so a real session becomes a server-side input.
struct Recorder<W> {
    inner: W,
    log: Rc<RefCell<Vec<u8>>>,
}

impl<W: futures::AsyncWrite + Unpin> futures::AsyncWrite for Recorder<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let poll = Pin::new(&mut self.inner).poll_write(cx, buf);
        if let Poll::Ready(Ok(n)) = poll {
            self.log.borrow_mut().extend_from_slice(buf.get(..n).unwrap_or_default());
        }
        poll
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }
    fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_close(cx)
    }
}

/// Real client sessions against the real RPC system over an in-memory stream, recorded.
fn rpc_seeds() -> anyhow::Result<Seeds> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build()?;
    let local = tokio::task::LocalSet::new();
    local.block_on(&rt, async {
        let mut seeds = Vec::new();
        for scenario in [
            Scenario::Anonymous,
            Scenario::Account,
            Scenario::BadSignature,
            Scenario::Fanout,
            Scenario::FanoutRefused,
        ] {
            seeds.push(seed(scenario.name(), record(scenario).await?));
        }
        Ok(seeds)
    })
}

#[derive(Clone, Copy)]
enum Scenario {
    /// The unauthenticated NodeService methods.
    Anonymous,
    /// `authenticate` with a valid signature over [`AUTH_CHALLENGE`], then every Account method.
    Account,
    BadSignature,
    /// `enqueueFanout` of one payload to three recipients, then a second payload to two of them
    /// on the same channel.
    Fanout,
    /// `enqueueFanout` calls the server refuses: no recipients, a repeated recipient, a key of the
    /// wrong length, an empty payload.
    FanoutRefused,
}

impl Scenario {
    fn name(self) -> &'static str {
        match self {
            Scenario::Anonymous => "anonymous",
            Scenario::Account => "account",
            Scenario::BadSignature => "bad-signature",
            Scenario::Fanout => "fanout",
            Scenario::FanoutRefused => "fanout-refused",
        }
    }
}

async fn record(scenario: Scenario) -> anyhow::Result<Vec<u8>> {
    let shared = super::rpc_shared().ok_or_else(|| anyhow::anyhow!("no fuzz store"))?;
    let (client_end, server_end) = tokio::io::duplex(1 << 20);
    let (server_read, server_write) = tokio::io::split(server_end);
    let server = tokio::task::spawn_local(crate::server::serve_rpc(
        server_read.compat(),
        server_write.compat_write(),
        shared,
        AUTH_CHALLENGE,
        super::LOOPBACK,
    ));
    let (client_read, client_write) = tokio::io::split(client_end);
    let log = Rc::new(RefCell::new(Vec::new()));
    let network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(client_read.compat()),
        futures::io::BufWriter::new(Recorder { inner: client_write.compat_write(), log: log.clone() }),
        rpc_twoparty_capnp::Side::Client,
        capnp::message::ReaderOptions::new(),
    );
    let mut rpc = RpcSystem::new(Box::new(network), None);
    let node: node_service::Client = rpc.bootstrap(rpc_twoparty_capnp::Side::Server);
    let disconnector = rpc.get_disconnector();
    let client = tokio::task::spawn_local(rpc);
    run_calls(scenario, &node).await?;
    drop(node);
    disconnector.await?;
    let _ = client.await;
    let _ = server.await;
    Ok(log.take())
}

async fn run_calls(scenario: Scenario, node: &node_service::Client) -> anyhow::Result<()> {
    let me = Identity::from_seed(&[0xaa; 32]);
    let peer = Identity::from_seed(&[0xbb; 32]).public().0;
    match scenario {
        Scenario::Anonymous => {
            node.health_request().send().promise.await?;
            let mut req = node.fetch_key_package_request();
            req.get().set_identity_key(&peer);
            let _ = req.send().promise.await;
            let mut req = node.fetch_hybrid_key_request();
            req.get().set_identity_key(&peer);
            let _ = req.send().promise.await;
            let mut req = node.enqueue_request();
            req.get().set_recipient_key(&peer);
            req.get().set_payload(b"one payload");
            req.get().set_channel_id(&[1; 16]);
            req.send().promise.await?;
            let mut req = node.enqueue_batch_request();
            req.get().set_channel_id(&[2; 16]);
            let mut items = req.get().init_items(2);
            for i in 0..2 {
                let mut item = items.reborrow().get(i);
                // Distinct recipients: the server refuses a batch that names one twice.
                item.set_recipient_key(&recipient(peer, i as u8));
                item.set_payload(b"batched payload");
            }
            req.send().promise.await?;
        }
        Scenario::Account => {
            let mut req = node.authenticate_request();
            req.get().set_identity_key(&me.public().0);
            req.get().set_signature(&me.sign_auth_challenge(&AUTH_CHALLENGE));
            let resp = req.send().promise.await?;
            let account = resp.get()?.get_account()?;
            account.identity_request().send().promise.await?;
            let mls = MlsClient::new(me.seed())?.with_clock(super::fuzz_clock());
            let mut req = account.upload_key_packages_request();
            let packages = mls.key_packages(1)?;
            let mut list = req.get().init_key_packages(1);
            list.set(0, &packages[0].bytes);
            req.get().set_last_resort(&mls.last_resort_key_package()?.bytes);
            req.send().promise.await?;
            account.key_package_count_request().send().promise.await?;
            let signed = SignedHybridKey::sign(
                me.signing_key(),
                Clock::system().now_ms(),
                &HybridSecretKey::generate(),
            );
            let mut req = account.upload_hybrid_key_request();
            req.get().set_hybrid_key(&signed.key);
            req.get().set_signature(&signed.signature);
            req.get().set_created_at_ms(signed.created_at_ms);
            req.send().promise.await?;
            let mut req = account.fetch_request();
            req.get().set_limit(10);
            req.send().promise.await?;
            let mut req = account.fetch_wait_request();
            req.get().set_timeout_ms(1);
            req.get().set_limit(10);
            req.get().set_ack_up_to(0);
            req.send().promise.await?;
            let mut req = account.ack_request();
            req.get().set_up_to_seq(1);
            req.send().promise.await?;
        }
        Scenario::BadSignature => {
            let mut req = node.authenticate_request();
            req.get().set_identity_key(&me.public().0);
            req.get().set_signature(&[0; 64]);
            let _ = req.send().promise.await;
        }
        Scenario::Fanout => {
            let members: Vec<[u8; 32]> = (0..3u8).map(|i| recipient(peer, i)).collect();
            fanout(node, [3; 16], b"one mls message", &members).await?;
            fanout(node, [3; 16], b"the next one", members.get(1..).unwrap_or_default()).await?;
        }
        Scenario::FanoutRefused => {
            let one = [recipient(peer, 0)];
            let refused: [(&[u8], Vec<&[u8]>); 4] = [
                (b"to nobody", vec![]),
                (b"twice to one", vec![&one[0], &one[0]]),
                (b"to a short key", vec![&one[0][..31]]),
                (b"", vec![&one[0]]),
            ];
            for (payload, recipients) in refused {
                let mut req = node.enqueue_fanout_request();
                req.get().set_channel_id(&[4; 16]);
                req.get().set_payload(payload);
                let mut list = req.get().init_recipients(recipients.len() as u32);
                for (i, key) in recipients.iter().enumerate() {
                    list.set(i as u32, key);
                }
                anyhow::ensure!(req.send().promise.await.is_err(), "the server took a bad enqueueFanout");
            }
        }
    }
    Ok(())
}

/// `peer` with its last byte changed by `i`: distinct recipients.
fn recipient(peer: [u8; 32], i: u8) -> [u8; 32] {
    let mut key = peer;
    key[31] ^= i;
    key
}

async fn fanout(
    node: &node_service::Client,
    channel: [u8; 16],
    payload: &[u8],
    recipients: &[[u8; 32]],
) -> anyhow::Result<()> {
    let mut req = node.enqueue_fanout_request();
    req.get().set_channel_id(&channel);
    req.get().set_payload(payload);
    let mut list = req.get().init_recipients(recipients.len() as u32);
    for (i, key) in recipients.iter().enumerate() {
        list.set(i as u32, key);
    }
    let reply = req.send().promise.await?;
    anyhow::ensure!(reply.get()?.get_seqs()?.len() as usize == recipients.len(), "one seq per recipient");
    Ok(())
}

fn kp_bytes(kps: Vec<crate::mls::NewKeyPackage>) -> Vec<Vec<u8>> {
    kps.into_iter().map(|k| k.bytes).collect()
}
