//! A server is a stranger too: a real qpq client session against a hostile server on
//! 127.0.0.1:0 that speaks raw capnp-rpc messages over qpq's QUIC and TLS. The server guards
//! itself against clients (tests/budgets.rs); these check the client's side
//! (`qpq::client::vat`).

mod common;

use capnp_rpc::rpc_capnp::message;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{Connection, VatNetwork, twoparty};
use common::{local, tofu};
use qpq::client::session::{Session, SessionError};
use qpq::transport;
use tokio_util::compat::{TokioAsyncReadCompatExt, TokioAsyncWriteCompatExt};

/// What the hostile server sends once it has read the client's first message (its bootstrap
/// request, question 0).
#[derive(Clone, Copy, Debug)]
enum Hostile {
    /// Asks the client for its bootstrap capability.
    Bootstrap,
    /// Calls the answer to a question the client never asked.
    Call,
    /// Answers the bootstrap request with a result carrying two capabilities.
    ReturnTwoCaps,
    /// Sends a message of a type no rpc.capnp has (union discriminant 99).
    UnknownType,
}

/// A message whose union says type 99: written as a bootstrap request, then its discriminant
/// (the first 16 bits of the root struct's data, after the 8-byte segment table and the 8-byte
/// root pointer of the one-segment flat form) patched. The generated builders cannot write it.
fn unknown_type_message() -> capnp::message::Reader<capnp::serialize::OwnedSegments> {
    let mut b = capnp::message::Builder::new_default();
    b.init_root::<message::Builder<'_>>().init_bootstrap().set_question_id(0);
    let mut words = capnp::serialize::write_message_to_words(&b);
    assert_eq!(u16::from_le_bytes([words[16], words[17]]), 8, "bootstrap is @8 in rpc.capnp");
    words[16..18].copy_from_slice(&99u16.to_le_bytes());
    let r =
        capnp::serialize::read_message(&mut words.as_slice(), capnp::message::ReaderOptions::new()).unwrap();
    assert!(matches!(r.get_root::<message::Reader<'_>>().unwrap().which(), Err(capnp::NotInSchema(99))));
    r
}

fn write(conn: &mut Box<dyn Connection<Side>>, hostile: Hostile) {
    let mut out = conn.new_outgoing_message(64);
    if let Hostile::UnknownType = hostile {
        let raw = unknown_type_message();
        let root = raw.get_root::<capnp::any_pointer::Reader<'_>>().unwrap();
        out.get_body().unwrap().set_as(root).unwrap();
    } else {
        build(out.get_body().unwrap().init_as::<message::Builder<'_>>(), hostile);
    }
    let _ = out.send();
}

fn build(m: message::Builder<'_>, hostile: Hostile) {
    match hostile {
        Hostile::Bootstrap => m.init_bootstrap().set_question_id(0),
        Hostile::Call => {
            let mut call = m.init_call();
            call.set_question_id(0);
            call.set_interface_id(0x1234);
            call.set_method_id(0);
            // A question the client never asked: capnp-rpc answers such a call with an error
            // and keeps the answer until a Finish.
            call.reborrow().init_target().init_promised_answer().set_question_id(5);
            call.init_params();
        }
        Hostile::ReturnTwoCaps => {
            let mut ret = m.init_return();
            ret.set_answer_id(0);
            let mut results = ret.init_results();
            results.reborrow().init_content();
            let mut caps = results.init_cap_table(2);
            caps.reborrow().get(0).set_sender_hosted(0);
            caps.get(1).set_sender_hosted(1);
        }
        Hostile::UnknownType => unreachable!("not built with the generated builders"),
    }
}

/// Serves one connection as `hostile`; returns the kinds of message the client sent after it
/// (until a `Return` of its own or the end of the connection). The client's own pipelined
/// call may come before or after.
async fn serve_hostile(server: quinn::Endpoint, hostile: Hostile) -> Vec<&'static str> {
    let conn = server.accept().await.expect("a connection").await.expect("handshake");
    let (send, recv) = conn.accept_bi().await.expect("a stream");
    let mut network = twoparty::VatNetwork::new(
        futures::io::BufReader::new(recv.compat()),
        futures::io::BufWriter::new(send.compat_write()),
        Side::Server,
        capnp::message::ReaderOptions::new(),
    );
    let mut c = network.accept().await.expect("the client's connection");
    let driver = network.drive_until_shutdown();
    tokio::task::spawn_local(async move {
        let _ = driver.await;
    });
    let first = c.receive_incoming_message().await.expect("a message").expect("not the end");
    let first = first.get_body().unwrap().get_as::<message::Reader<'_>>().unwrap();
    assert!(matches!(first.which(), Ok(message::Bootstrap(_))), "the client starts with its bootstrap");
    write(&mut c, hostile);
    let mut seen = Vec::new();
    loop {
        let Ok(Some(m)) = c.receive_incoming_message().await else { break };
        let kind = match m.get_body().unwrap().get_as::<message::Reader<'_>>().unwrap().which() {
            Ok(message::Return(_)) => "return",
            Ok(message::Call(_)) => "call",
            Ok(message::Abort(_)) => "abort",
            Ok(message::Finish(_)) => "finish",
            Ok(message::Release(_)) => "release",
            _ => "other",
        };
        seen.push(kind);
        if kind == "return" {
            break;
        }
    }
    seen
}

/// A client exports nothing, so a server has nothing to call; capnp-rpc answered every
/// bootstrap request or call a server sent and kept each answer until the server's `Finish`,
/// which a hostile server never sends: a long-lived client (`recv --follow`, the shell) grew
/// with each. Likewise each capability in a return became an import entry before our code saw
/// it. Now the client ends the connection at the first such message, answers nothing, and its
/// pending call fails with "protocol violation". Fails without `GuardedNetwork`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_server_that_calls_the_client_or_returns_extra_capabilities_loses_the_connection() {
    let dir = tempfile::tempdir().unwrap();
    let id = transport::load_or_generate_identity(dir.path()).unwrap();
    for hostile in [Hostile::Bootstrap, Hostile::Call, Hostile::ReturnTwoCaps, Hostile::UnknownType] {
        let server =
            quinn::Endpoint::server(transport::server_config(&id).unwrap(), "127.0.0.1:0".parse().unwrap())
                .unwrap();
        let addr = server.local_addr().unwrap();
        local(async {
            let seen = tokio::task::spawn_local(serve_hostile(server, hostile));
            let session = Session::connect(&addr.to_string(), tofu()).await.unwrap();
            let err = session.health().await.expect_err("a hostile server's health");
            session.close().await;
            let seen = seen.await.unwrap();
            assert!(!seen.contains(&"return"), "{hostile:?}: the client answered: {seen:?}");
            // Not an answer refusing the call (which would drop the work it carries): no answer.
            assert!(matches!(err, SessionError::Disconnected(_)), "{hostile:?}: {err:?}");
            let text = err.to_string();
            assert!(text.contains("protocol violation: the server sent"), "{hostile:?}: {text}");
            assert!(!text.chars().any(char::is_uppercase), "{hostile:?}: lowercase: {text}");
        })
        .await;
    }
}
