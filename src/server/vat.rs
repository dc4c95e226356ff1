//! capnp-rpc's two-party network with the server's memory accounting around it: every outgoing
//! message counts as unwritten until the write queue has written it, and no call is read while
//! the peer leaves too many replies unread (see [`super::memory`]).
//!
//! capnp-rpc's write queue is an unbounded channel inside `twoparty::VatNetwork`, so it cannot be
//! bounded from outside; its `OutgoingMessage::send` hands back a promise that resolves once the
//! message is written and flushed, which is where the count is given back. One task per
//! connection ([`give_back`]) awaits those promises oldest first, instead of one spawned task per
//! outgoing message (an allocation and a scheduling round per reply, issue 14).
//!
//! It also counts the connection's open calls ([`OpenCalls`]): capnp-rpc keeps every answer
//! that was not sent with `noFinishNeeded` (an error, or results holding a capability) until
//! the peer sends `Finish`, so a peer that never does could grow that table call by call.

use std::cell::{Cell, RefCell};
use std::collections::{HashSet, VecDeque};
use std::rc::Rc;

use capnp::Error;
use capnp::capability::Promise;
use capnp_rpc::rpc_twoparty_capnp::Side;
use capnp_rpc::{Connection, IncomingMessage, OutgoingMessage, VatNetwork, twoparty};
use futures::future::Shared;
use futures::{FutureExt, TryFutureExt};

use super::memory::{ConnMemory, Received, Unsent};
use crate::limits;

/// A `twoparty::VatNetwork` whose connection is metered by `conn`.
pub struct MeteredNetwork<R: futures::AsyncRead + Unpin + 'static> {
    inner: twoparty::VatNetwork<R>,
    conn: Rc<ConnMemory>,
}

impl<R: futures::AsyncRead + Unpin + 'static> MeteredNetwork<R> {
    pub fn new(inner: twoparty::VatNetwork<R>, conn: Rc<ConnMemory>) -> MeteredNetwork<R> {
        MeteredNetwork { inner, conn }
    }
}

impl<R: futures::AsyncRead + Unpin + 'static> VatNetwork<Side> for MeteredNetwork<R> {
    fn connect(&mut self, host_id: Side) -> Option<Box<dyn Connection<Side>>> {
        let conn = self.conn.clone();
        self.inner.connect(host_id).map(|c| MeteredConnection::boxed(c, conn))
    }

    fn accept(&mut self) -> Promise<Box<dyn Connection<Side>>, Error> {
        let conn = self.conn.clone();
        Promise::from_future(self.inner.accept().map_ok(move |c| MeteredConnection::boxed(c, conn)))
    }

    fn drive_until_shutdown(&mut self) -> Promise<(), Error> {
        self.inner.drive_until_shutdown()
    }
}

struct MeteredConnection {
    inner: Rc<RefCell<Box<dyn Connection<Side>>>>,
    conn: Rc<ConnMemory>,
    unwritten: Rc<Unwritten>,
    open: Rc<OpenCalls>,
}

impl MeteredConnection {
    fn boxed(inner: Box<dyn Connection<Side>>, conn: Rc<ConnMemory>) -> Box<dyn Connection<Side>> {
        let unwritten = Rc::new(Unwritten::default());
        // Every connection is served inside a LocalSet (see `serve_rpc`), so spawn_local has one.
        tokio::task::spawn_local(give_back(unwritten.clone()));
        let open = Rc::new(OpenCalls::default());
        Box::new(MeteredConnection { inner: Rc::new(RefCell::new(inner)), conn, unwritten, open })
    }
}

/// The question ids of the peer's calls (and bootstrap requests) that capnp-rpc still holds an
/// answer for: added when the call is read; removed by the peer's `Finish`, or by our `Return`
/// when it says `noFinishNeeded`. Bounded by [`limits::MAX_OPEN_CALLS_PER_CONNECTION`]: the
/// call that would pass it ends the connection, which frees them all.
#[derive(Default)]
struct OpenCalls {
    ids: RefCell<HashSet<u32>>,
}

impl OpenCalls {
    /// Notes one incoming message (its frame `frame_bytes` long); whether it is a call (not a
    /// bootstrap request), or an error that ends the connection: one call too many, or a
    /// message no qpq client sends ([`rpc_kind`], [`takes_large_params`]).
    fn read(&self, m: &dyn IncomingMessage, frame_bytes: usize) -> Result<bool, Error> {
        let mut ids = self.ids.borrow_mut();
        match rpc_kind(m.get_body()) {
            Some(Kind::Opens { call: Some((interface, method)), .. })
                if frame_bytes > limits::UNBUDGETED_FRAME_BYTES && !takes_large_params(interface, method) =>
            {
                // Its parameters would live, unbudgeted, as long as the call (a parked fetchWait:
                // a minute); no such call needs more than a few hundred bytes.
                Err(Error::failed(format!(
                    "protocol violation: a {frame_bytes}-byte message for a call that takes small parameters"
                )))
            }
            Some(Kind::Opens { id, call }) => {
                ids.insert(id);
                if ids.len() > limits::MAX_OPEN_CALLS_PER_CONNECTION {
                    return Err(Error::failed(format!(
                        "too many open calls on this connection (over {}): finish them",
                        limits::MAX_OPEN_CALLS_PER_CONNECTION
                    )));
                }
                Ok(call.is_some())
            }
            Some(Kind::Finishes(id)) => {
                ids.remove(&id);
                Ok(false)
            }
            Some(Kind::Other) => Ok(false),
            // The server asks the client nothing, so there is nothing to answer.
            Some(Kind::Returns { .. }) => {
                Err(Error::failed("protocol violation: a return message".to_string()))
            }
            Some(Kind::Refused(why)) => Err(Error::failed(format!("protocol violation: {why}"))),
            None => Err(Error::failed("protocol violation: not an rpc message".to_string())),
        }
    }

    /// Notes one outgoing message.
    fn sent(&self, body: capnp::Result<capnp::any_pointer::Reader<'_>>) {
        if let Some(Kind::Returns { id, no_finish_needed: true }) = rpc_kind(body) {
            self.ids.borrow_mut().remove(&id);
        }
    }
}

/// What an RPC message does to the open calls (rpc.capnp `Message`).
enum Kind {
    /// A `Call` (`call`: its interface and method) or a `Bootstrap` request.
    Opens {
        id: u32,
        call: Option<(u64, u16)>,
    },
    Finishes(u32),
    Returns {
        id: u32,
        no_finish_needed: bool,
    },
    /// Releases an export or aborts the connection: allowed, nothing to count.
    Other,
    /// A message a qpq client never sends and the server must not act on (see [`rpc_kind`]).
    Refused(&'static str),
}

/// What `body` (an rpc.capnp `Message`) is; None when it is not one.
///
/// A client may send Bootstrap, Call, Finish, Release and Abort, nothing else: the server calls
/// no client capability, so a client has nothing to Return, Resolve or Disembargo, and our
/// schema takes no capability as a parameter. Everything else is refused before capnp-rpc acts
/// on it, because it would act first and budget nothing: every capability descriptor in a
/// call's table becomes an import entry (and later a Release message) before our code sees the
/// call, so one 17 MiB frame could make a million of them.
fn rpc_kind(body: capnp::Result<capnp::any_pointer::Reader<'_>>) -> Option<Kind> {
    use capnp_rpc::rpc_capnp::message;
    let message = body.ok()?.get_as::<message::Reader<'_>>().ok()?;
    Some(match message.which().ok()? {
        message::Call(c) => {
            let c = c.ok()?;
            // A call whose parameters cannot be read is left to capnp-rpc, which answers it with
            // an error; one that carries capabilities is refused here.
            if c.get_params().ok().and_then(|p| p.get_cap_table().ok()).is_some_and(|t| !t.is_empty()) {
                return Some(Kind::Refused("a call carrying capabilities"));
            }
            Kind::Opens { id: c.get_question_id(), call: Some((c.get_interface_id(), c.get_method_id())) }
        }
        message::Bootstrap(b) => Kind::Opens { id: b.ok()?.get_question_id(), call: None },
        message::Finish(f) => Kind::Finishes(f.ok()?.get_question_id()),
        message::Return(r) => {
            let r = r.ok()?;
            Kind::Returns { id: r.get_answer_id(), no_finish_needed: r.get_no_finish_needed() }
        }
        message::Release(_) | message::Abort(_) => Kind::Other,
        message::Resolve(_) => Kind::Refused("a resolve message"),
        message::Disembargo(_) => Kind::Refused("a disembargo message"),
        message::Unimplemented(_) => Kind::Refused("an unimplemented message"),
        message::Provide(_)
        | message::Accept(_)
        | message::Join(_)
        | message::ObsoleteSave(_)
        | message::ObsoleteDelete(_) => Kind::Refused("a three-party or obsolete message"),
    })
}

/// Whether a call of `method` on `interface` may arrive in a frame over
/// [`limits::UNBUDGETED_FRAME_BYTES`]: the enqueues (their payloads) and KeyPackage uploads
/// (up to 100 packages of 16 KiB); each counts its parameters in the connection's in-flight
/// budget once read.
fn takes_large_params(interface: u64, method: u16) -> bool {
    use crate::proto::node_capnp::{account, node_service};
    use capnp::traits::HasTypeId;
    const ENQUEUE: u16 = 4;
    const ENQUEUE_BATCH: u16 = 5;
    const ENQUEUE_FANOUT: u16 = 6;
    const UPLOAD_KEY_PACKAGES: u16 = 1;
    (interface == node_service::Client::TYPE_ID && matches!(method, ENQUEUE | ENQUEUE_BATCH | ENQUEUE_FANOUT))
        || (interface == account::Client::TYPE_ID && method == UPLOAD_KEY_PACKAGES)
}

impl Drop for MeteredConnection {
    fn drop(&mut self) {
        self.unwritten.closed.set(true);
        self.unwritten.pushed.notify_one();
    }
}

/// A connection's outgoing messages not yet written, oldest first, each with its count.
#[derive(Default)]
struct Unwritten {
    queue: RefCell<VecDeque<(Shared<Promise<(), Error>>, Unsent)>>,
    /// Woken when the queue gets its first entry, or when the connection is dropped.
    pushed: tokio::sync::Notify,
    closed: Cell<bool>,
}

impl Unwritten {
    fn push(&self, written: Shared<Promise<(), Error>>, unsent: Unsent) {
        let mut queue = self.queue.borrow_mut();
        queue.push_back((written, unsent));
        if queue.len() == 1 {
            self.pushed.notify_one();
        }
    }
}

/// Gives each message's count back once the write queue has written it, or has been dropped
/// with the connection (an error). The queue writes in order, so waiting for the oldest first
/// never holds a count much longer than its write. Ends with the connection, once every
/// message it queued is settled.
async fn give_back(unwritten: Rc<Unwritten>) {
    loop {
        // The borrow ends before any await: `push` runs between our polls.
        let oldest = unwritten.queue.borrow().front().map(|(w, _)| w.clone());
        match oldest {
            Some(written) => {
                let _ = written.await;
                let settled = unwritten.queue.borrow_mut().pop_front();
                drop(settled);
            }
            None if unwritten.closed.get() => return,
            // notify_one keeps its permit, so a push between the check and here is not missed.
            None => unwritten.pushed.notified().await,
        }
    }
}

impl Connection<Side> for MeteredConnection {
    fn get_peer_vat_id(&self) -> Side {
        self.inner.borrow().get_peer_vat_id()
    }

    fn new_outgoing_message(&mut self, first_segment_word_size: u32) -> Box<dyn OutgoingMessage> {
        let inner = self.inner.borrow_mut().new_outgoing_message(first_segment_word_size);
        Box::new(MeteredMessage {
            inner,
            conn: self.conn.clone(),
            unwritten: self.unwritten.clone(),
            open: self.open.clone(),
        })
    }

    fn receive_incoming_message(&mut self) -> Promise<Option<Box<dyn IncomingMessage>>, Error> {
        let activity = self.conn.activity.clone();
        let open = self.open.clone();
        let conn = self.conn.clone();
        // Only a call counts as use: protocol chatter (Finish, Release) that follows a reply
        // must not keep an otherwise idle connection from being evicted.
        let touched = move |m: Option<Box<dyn IncomingMessage>>| {
            let Some(m) = m else { return Ok(None) };
            let frame_bytes = conn.last_frame.get();
            // One reading of each message serves both.
            if open.read(m.as_ref(), frame_bytes)? {
                activity.touch();
            }
            let received = conn.global.count_received(frame_bytes);
            Ok(Some(Box::new(CountedMessage { inner: m, _received: received }) as Box<dyn IncomingMessage>))
        };
        if !self.conn.paused() {
            return Promise::from_future(
                self.inner.borrow_mut().receive_incoming_message().map(|m| m.and_then(touched)),
            );
        }
        // The peer is not reading its replies: read no further call until it does (the
        // watchdog ends the connection if that takes longer than the stall timeout).
        let (inner, conn) = (self.inner.clone(), self.conn.clone());
        Promise::from_future(async move {
            conn.until_unpaused().await;
            let next = inner.borrow_mut().receive_incoming_message();
            next.await.and_then(touched)
        })
    }

    fn new_stream(&mut self) -> (Box<dyn capnp_rpc::FlowController>, Promise<(), Error>) {
        self.inner.borrow_mut().new_stream()
    }

    fn shutdown(&mut self, result: capnp::Result<()>) -> Promise<(), Error> {
        self.inner.borrow_mut().shutdown(result)
    }
}

/// An incoming message counted in [`super::memory::MemoryBudget::received_bytes`] for as long as
/// capnp-rpc keeps it (a call's message: as long as its parameters).
struct CountedMessage {
    inner: Box<dyn IncomingMessage>,
    _received: Received,
}

impl IncomingMessage for CountedMessage {
    fn get_body(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        self.inner.get_body()
    }
}

struct MeteredMessage {
    inner: Box<dyn OutgoingMessage>,
    conn: Rc<ConnMemory>,
    unwritten: Rc<Unwritten>,
    open: Rc<OpenCalls>,
}

impl OutgoingMessage for MeteredMessage {
    fn get_body(&mut self) -> capnp::Result<capnp::any_pointer::Builder<'_>> {
        self.inner.get_body()
    }

    fn get_body_as_reader(&self) -> capnp::Result<capnp::any_pointer::Reader<'_>> {
        self.inner.get_body_as_reader()
    }

    fn send(
        self: Box<Self>,
    ) -> (Promise<(), Error>, Rc<capnp::message::Builder<capnp::message::HeapAllocator>>) {
        let MeteredMessage { inner, conn, unwritten, open } = *self;
        open.sent(inner.get_body_as_reader());
        let unsent = conn.hold_unsent(inner.size_in_words().saturating_mul(8));
        let (written, message) = inner.send();
        let written = written.shared();
        // capnp-rpc drops most send promises; the connection's `give_back` task keeps the count
        // until the write queue has written the message.
        unwritten.push(written.clone(), unsent);
        (Promise::from_future(written), message)
    }

    fn take(self: Box<Self>) -> capnp::message::Builder<capnp::message::HeapAllocator> {
        self.inner.take()
    }

    fn size_in_words(&self) -> usize {
        self.inner.size_in_words()
    }
}
