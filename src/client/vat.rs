//! capnp-rpc's two-party network on the client's side, guarded against its server.
//!
//! The server guards itself against its clients (`crate::server::vat`); this is the other
//! direction. A client exports no capability (no bootstrap, and no method of our schema takes a
//! capability), so a server has nothing to call. Without this guard capnp-rpc would still answer
//! every `Bootstrap` or `Call` a server sent, and keep each answer until the server's `Finish`:
//! a hostile or broken server could grow a long-lived client (`recv --follow`, the shell) call by
//! call, and make it write an answer for each. Likewise every capability descriptor in a
//! `Return` becomes an import entry before our code sees the result, and only `authenticate`
//! returns a capability.
//!
//! So the connection ends, with "protocol violation: ...", at the first message a qpq server
//! never sends: a call, a bootstrap request, a return carrying more capabilities than any result
//! of our schema, a three-party or obsolete message, or one of a type rpc.capnp's `Message` does
//! not have. The calls in flight then fail as on a lost connection (their outcome is unknown),
//! not as refused: work they carry is kept and tried again.

use capnp::Error;
use capnp::capability::Promise;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{Connection, IncomingMessage, OutgoingMessage, VatNetwork, twoparty};
use futures::TryFutureExt;

/// The most capabilities one of the server's returns may carry: no result of our schema holds
/// more than one (`authenticate`'s Account).
const MAX_CAPS_PER_RETURN: usize = 1;

/// A `twoparty::VatNetwork` whose incoming messages are checked by [`refusal`].
pub struct GuardedNetwork<R: futures::AsyncRead + Unpin + 'static> {
    inner: twoparty::VatNetwork<R>,
}

impl<R: futures::AsyncRead + Unpin + 'static> GuardedNetwork<R> {
    pub fn new(inner: twoparty::VatNetwork<R>) -> GuardedNetwork<R> {
        GuardedNetwork { inner }
    }
}

impl<R: futures::AsyncRead + Unpin + 'static> VatNetwork<Side> for GuardedNetwork<R> {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn Connection<Side>>> {
        self.inner
            .connect(host_id)
            .map(|c| Box::new(GuardedConnection { inner: c }) as Box<dyn Connection<Side>>)
    }

    fn accept(&mut self) -> Promise<Box<dyn Connection<Side>>, Error> {
        Promise::from_future(
            self.inner
                .accept()
                .map_ok(|c| Box::new(GuardedConnection { inner: c }) as Box<dyn Connection<Side>>),
        )
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), Error> {
        self.inner.drive_until_shutdown()
    }
}

struct GuardedConnection {
    inner: Box<dyn Connection<Side>>,
}

impl Connection<Side> for GuardedConnection {
    fn get_peer_vat_id(&self) -> Side {
        self.inner.get_peer_vat_id()
    }

    fn new_outgoing_message(&mut self, first_segment_word_size: u32) -> Box<dyn OutgoingMessage> {
        self.inner.new_outgoing_message(first_segment_word_size)
    }

    fn receive_incoming_message(&mut self) -> Promise<Option<Box<dyn IncomingMessage>>, Error> {
        Promise::from_future(self.inner.receive_incoming_message().and_then(|m| async move {
            match m.as_ref().and_then(|m| refusal(m.get_body())) {
                // Not `failed`, which reads as the server's answer refusing the calls in flight
                // (and would drop the work they carry): the server answered nothing.
                Some(why) => Err(Error::disconnected(format!("protocol violation: the server sent {why}"))),
                None => Ok(m),
            }
        }))
    }

    fn new_stream(&mut self) -> (Box<dyn capnp_rpc::FlowController>, Promise<(), Error>) {
        self.inner.new_stream()
    }

    fn shutdown(&mut self, result: capnp::Result<()>) -> Promise<(), Error> {
        self.inner.shutdown(result)
    }
}

/// Why a message from the server must not reach capnp-rpc; None when it may. A message that
/// cannot be read as an rpc.capnp `Message` is left to capnp-rpc, which ends the connection.
fn refusal(body: capnp::Result<capnp::any_pointer::Reader<'_>>) -> Option<&'static str> {
    use capnp_rpc::rpc_capnp::{message, payload, return_};
    let message = body.ok()?.get_as::<message::Reader<'_>>().ok()?;
    let caps = |p: capnp::Result<payload::Reader<'_>>| {
        p.and_then(|p| p.get_cap_table()).map_or(0, |t| t.len() as usize)
    };
    // capnp-rpc answers a message type it does not know with `Unimplemented`, one reply each;
    // a server of our version never sends one.
    let Ok(which) = message.which() else { return Some("a message of an unknown type") };
    match which {
        message::Call(_) => Some("a call (a client exports nothing)"),
        message::Bootstrap(_) => Some("a bootstrap request (a client exports nothing)"),
        message::Return(r) => match r.ok()?.which().ok()? {
            return_::Results(p) => (caps(p) > MAX_CAPS_PER_RETURN)
                .then_some("a return carrying more capabilities than any result"),
            _ => None,
        },
        message::Provide(_)
        | message::Accept(_)
        | message::Join(_)
        | message::ObsoleteSave(_)
        | message::ObsoleteDelete(_) => Some("a three-party or obsolete message"),
        message::Finish(_)
        | message::Release(_)
        | message::Abort(_)
        | message::Resolve(_)
        | message::Disembargo(_)
        | message::Unimplemented(_) => None,
    }
}
