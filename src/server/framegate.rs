//! A read gate under capnp's stream reader: a large frame's body is read into the server's
//! [`MemoryBudget`](super::memory::MemoryBudget) as it arrives, a chunk at a time, and handed to
//! capnp only once it is complete; it must keep arriving.
//!
//! capnp allocates a whole frame as soon as it has read the frame's segment table, so a peer
//! that announces a 16 MiB segment and sends most of it makes the server hold 16 MiB for as long
//! as it likes. The gate parses the same segment table first (Cap'n Proto "serialization over a
//! stream": a u32 segment count minus one, a u32 word count per segment, padding to 8 bytes;
//! <https://capnproto.org/encoding.html#serialization-over-a-stream>) and keeps it back. A body
//! over [`limits::UNBUDGETED_FRAME_BYTES`] is then read in [`CHUNK`]s, each held in the budget's
//! share for frames ([`MemoryBudget::reserve_frame`](super::memory::MemoryBudget::reserve_frame))
//! before it is read; once the body is whole, the table and the body go to capnp, and the room
//! is given back as the last byte is handed up (capnp owns the frame from then on, counted by
//! the call budgets). Smaller frames pass straight through; a table capnp itself refuses (too
//! many segments, past the traversal limit) passes unchanged, so capnp reports the error.
//!
//! Why hold what arrived, not what was announced: holding the announced size let a peer hold
//! 16 MiB for the price of an 8-byte header, and four such peers held the whole default budget
//! for the stall timeout, again and again (a review of this code). Now holding memory costs a
//! peer the bytes themselves. The frames' share is half the budget, so fetch pages and replies
//! keep the other half whatever peers upload.
//!
//! Deadlines: a chunk must arrive within the stall timeout of the previous one (so a slow
//! uplink sending a large frame steadily is not cut, as it was when the whole frame had one
//! stall timeout), and room for it must be found within twice that. So frames whose senders
//! stopped end before the frames waiting for the room they hold. Known limit: live uploads
//! that together need more than the share (three 16 MiB frames on the default 64 MiB budget)
//! wait for each other until the oldest wait ends its connection, and its client retries.

use std::collections::VecDeque;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use futures::AsyncRead;

use super::memory::{ConnMemory, Held};
use crate::limits;

/// Largest segment table: capnp refuses 512 segments or more (4 bytes each, plus the count).
const MAX_TABLE_BYTES: usize = 4 + 4 * 512;

/// Bytes of a large frame's body held and read at a time.
pub const CHUNK: usize = 64 * 1024;

type Reserving = Pin<Box<dyn Future<Output = Held>>>;

/// See the module docs.
pub struct FrameGate<R> {
    inner: R,
    conn: Rc<ConnMemory>,
    table: Vec<u8>,
    /// Bytes of `table` read so far, and how many the table has (known after 8 bytes).
    have: usize,
    need: usize,
    state: State,
    /// Ends a wait for room or for the next chunk that takes longer than the stall timeout.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
    /// The size of the frame being passed on (table and body), told to `conn` once whole.
    frame_bytes: usize,
}

/// A large frame's body as it arrives: whole chunks, then the one being filled.
struct Body {
    chunks: VecDeque<Vec<u8>>,
    /// Bytes of the last chunk filled so far (the rest of it is room already held).
    filled: usize,
    /// Body bytes not yet read.
    left: u64,
    held: Option<Held>,
    /// Room being found for the next chunk.
    reserving: Option<Reserving>,
}

enum State {
    /// Reading the segment table.
    Table,
    /// Reading a large frame's body into memory held for it; the table waits.
    Buffering(Body),
    /// Passing the table on (from `sent`), then what comes next.
    Emit { sent: usize, next: Next },
    /// Passing a small frame's body on, `left` bytes.
    Through { left: u64 },
    /// Handing a buffered body up, from `at` in its first chunk.
    Drain { chunks: VecDeque<Vec<u8>>, at: usize, held: Option<Held> },
    /// A table capnp will refuse: pass the rest through untouched.
    Raw,
}

enum Next {
    Through(u64),
    Drain(VecDeque<Vec<u8>>, Option<Held>),
    Raw,
}

impl<R: AsyncRead + Unpin> FrameGate<R> {
    pub fn new(inner: R, conn: Rc<ConnMemory>) -> FrameGate<R> {
        FrameGate {
            inner,
            conn,
            table: vec![0; MAX_TABLE_BYTES],
            have: 0,
            need: 8,
            state: State::Table,
            deadline: None,
            frame_bytes: 0,
        }
    }

    /// What to do once the table is complete: the body size, or None to pass it through.
    fn body_size(&self) -> Option<u64> {
        let table = self.table.get(..self.need)?;
        let count = u32::from_le_bytes(table.get(..4)?.try_into().ok()?).wrapping_add(1) as usize;
        let mut words = 0u64;
        for i in 0..count {
            let at = 4 + 4 * i;
            words += u64::from(u32::from_le_bytes(table.get(at..at + 4)?.try_into().ok()?));
        }
        (words <= limits::RPC_TRAVERSAL_LIMIT_WORDS as u64).then_some(words * 8)
    }

    /// Reads a large frame's body into memory held for it, a chunk at a time: holds room for
    /// the next chunk, then reads into it. Ready once the body is whole.
    fn buffer(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let State::Buffering(body) = &mut self.state else { return Poll::Ready(Ok(())) };
        loop {
            let room = body.chunks.back().map_or(0, |c| c.len() - body.filled);
            if room == 0 {
                if body.left == 0 {
                    return Poll::Ready(Ok(()));
                }
                let fut = match &mut body.reserving {
                    Some(fut) => fut,
                    None => {
                        let holding = body.held.as_ref().map_or(0, Held::bytes);
                        // Below `left`, which is at most the traversal limit: fits a usize.
                        let want = usize::try_from(body.left).unwrap_or(usize::MAX).min(CHUNK);
                        // Room must be found within twice a stall: frames whose senders stopped
                        // (holding room) end first and free it; frames that only wait for each
                        // other (the share full of live uploads) end one at a time, the oldest
                        // wait first.
                        self.deadline = Some(Box::pin(tokio::time::sleep(self.conn.stall * 2)));
                        body.reserving.insert(Box::pin(self.conn.global.clone().reserve_frame(want, holding)))
                    }
                };
                let held = match fut.as_mut().poll(cx) {
                    Poll::Ready(held) => held,
                    Poll::Pending => {
                        check_deadline(
                            &mut self.deadline,
                            &self.conn,
                            cx,
                            "server memory budget busy for too long",
                        )?;
                        return Poll::Pending;
                    }
                };
                body.reserving = None;
                // Room found: the chunk has a stall timeout of its own to arrive in.
                self.deadline = Some(Box::pin(tokio::time::sleep(self.conn.stall)));
                let want = held.bytes();
                match &mut body.held {
                    Some(h) => h.absorb(held),
                    None => body.held = Some(held),
                }
                body.chunks.push_back(vec![0; want]);
                body.filled = 0;
                continue;
            }
            let Some(chunk) = body.chunks.back_mut() else { return Poll::Ready(Ok(())) };
            let dst = &mut chunk[body.filled..]; // filled <= chunk.len()
            match Pin::new(&mut self.inner).poll_read(cx, dst) {
                Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                Poll::Ready(Ok(n)) => {
                    body.filled += n;
                    body.left -= n as u64;
                }
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => {
                    check_deadline(
                        &mut self.deadline,
                        &self.conn,
                        cx,
                        "frame not completed within the stall timeout",
                    )?;
                    return Poll::Pending;
                }
            }
        }
    }
}

/// Err once `deadline` has passed (and marks the connection for closing).
fn check_deadline(
    deadline: &mut Option<Pin<Box<tokio::time::Sleep>>>,
    conn: &ConnMemory,
    cx: &mut Context<'_>,
    what: &'static str,
) -> io::Result<()> {
    if let Some(d) = deadline.as_mut()
        && d.as_mut().poll(cx).is_ready()
    {
        conn.kill(what);
        return Err(io::Error::new(io::ErrorKind::TimedOut, what));
    }
    Ok(())
}

impl<R: AsyncRead + Unpin> AsyncRead for FrameGate<R> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut [u8]) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            // Nothing asked for: not an end of stream, and no state to change.
            return Poll::Ready(Ok(0));
        }
        let this = &mut *self;
        loop {
            match &mut this.state {
                State::Table => {
                    let Some(dst) = this.table.get_mut(this.have..this.need) else {
                        this.state = State::Raw;
                        continue;
                    };
                    let n = ready!(Pin::new(&mut this.inner).poll_read(cx, dst))?;
                    if n == 0 {
                        if this.have == 0 {
                            return Poll::Ready(Ok(0));
                        }
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    this.have += n;
                    if this.have < this.need {
                        continue;
                    }
                    if this.need == 8 {
                        let count = this
                            .table
                            .get(..4)
                            .and_then(|b| b.try_into().ok())
                            .map(|b| u32::from_le_bytes(b).wrapping_add(1) as usize)
                            .unwrap_or(0);
                        if count == 0 || count >= 512 {
                            this.state = State::Emit { sent: 0, next: Next::Raw };
                            this.need = this.have;
                            continue;
                        }
                        // The count word and one word per segment, padded to 8 bytes.
                        this.need = (4 + 4 * count).next_multiple_of(8);
                        if this.have < this.need {
                            continue;
                        }
                    }
                    let body_size = this.body_size();
                    let body_bytes = body_size.map_or(0, |b| usize::try_from(b).unwrap_or(usize::MAX));
                    this.frame_bytes = this.need.saturating_add(body_bytes);
                    this.state = match body_size {
                        None => State::Emit { sent: 0, next: Next::Raw },
                        Some(left) if left <= limits::UNBUDGETED_FRAME_BYTES as u64 => {
                            State::Emit { sent: 0, next: Next::Through(left) }
                        }
                        Some(left) => {
                            this.deadline = Some(Box::pin(tokio::time::sleep(this.conn.stall)));
                            State::Buffering(Body {
                                chunks: VecDeque::new(),
                                filled: 0,
                                left,
                                held: None,
                                reserving: None,
                            })
                        }
                    };
                }
                State::Buffering(_) => {
                    ready!(this.buffer(cx))?;
                    this.deadline = None;
                    let State::Buffering(body) = std::mem::replace(&mut this.state, State::Raw) else {
                        continue;
                    };
                    this.state = State::Emit { sent: 0, next: Next::Drain(body.chunks, body.held) };
                }
                State::Emit { sent, next } => {
                    let table = this.table.get(*sent..this.need).unwrap_or_default();
                    if table.is_empty() {
                        this.state = match std::mem::replace(next, Next::Raw) {
                            Next::Through(left) => State::Through { left },
                            Next::Drain(chunks, held) => State::Drain { chunks, at: 0, held },
                            Next::Raw => State::Raw,
                        };
                        continue;
                    }
                    let n = table.len().min(buf.len());
                    buf[..n].copy_from_slice(&table[..n]); // n <= both lengths
                    *sent += n;
                    return Poll::Ready(Ok(n));
                }
                State::Through { left } => {
                    if *left == 0 {
                        this.next_frame();
                        continue;
                    }
                    let want = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    let dst = &mut buf[..want]; // want <= buf.len()
                    let n = ready!(Pin::new(&mut this.inner).poll_read(cx, dst))?;
                    if n == 0 {
                        return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into()));
                    }
                    *left -= n as u64;
                    if *left == 0 {
                        this.conn.last_frame.set(this.frame_bytes);
                    }
                    return Poll::Ready(Ok(n));
                }
                State::Drain { chunks, at, held } => {
                    let Some(chunk) = chunks.front() else {
                        // Handed off whole: capnp owns it now.
                        drop(held.take());
                        this.next_frame();
                        continue;
                    };
                    let rest = chunk.get(*at..).unwrap_or_default();
                    let n = rest.len().min(buf.len());
                    buf[..n].copy_from_slice(&rest[..n]); // n <= both lengths
                    *at += n;
                    if *at >= chunk.len() {
                        chunks.pop_front();
                        *at = 0;
                    }
                    if chunks.is_empty() {
                        drop(held.take());
                        this.conn.last_frame.set(this.frame_bytes);
                    }
                    return Poll::Ready(Ok(n));
                }
                State::Raw => return Pin::new(&mut this.inner).poll_read(cx, buf),
            }
        }
    }
}

impl<R> FrameGate<R> {
    /// Ready for the next frame's table.
    fn next_frame(&mut self) {
        self.state = State::Table;
        self.have = 0;
        self.need = 8;
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use futures::AsyncReadExt;

    use super::*;
    use crate::server::memory::MemoryBudget;

    fn frame(words: u32) -> Vec<u8> {
        let mut v = Vec::new();
        v.extend_from_slice(&0u32.to_le_bytes());
        v.extend_from_slice(&words.to_le_bytes());
        v.extend(std::iter::repeat_n(7u8, words as usize * 8));
        v
    }

    #[tokio::test(start_paused = true)]
    async fn frames_pass_unchanged_and_a_large_one_holds_its_size_until_handed_off() {
        let budget = MemoryBudget::new(1 << 30);
        let conn = ConnMemory::new(budget.clone(), Duration::from_secs(5));
        let big_words = (limits::UNBUDGETED_FRAME_BYTES / 8 + 1) as u32;
        let mut input = frame(3);
        input.extend(frame(big_words));
        let mut gate = FrameGate::new(futures::io::Cursor::new(input.clone()), conn);
        let mut out = vec![0u8; 8 + 24];
        gate.read_exact(&mut out).await.unwrap();
        assert_eq!(budget.used(), 0, "a small frame holds nothing");
        let mut head = [0u8; 9];
        gate.read_exact(&mut head).await.unwrap();
        assert_eq!(budget.used(), big_words as usize * 8, "a large frame holds its size while read");
        let mut rest = Vec::new();
        gate.read_to_end(&mut rest).await.unwrap();
        assert_eq!(budget.used(), 0, "given back once handed off");
        out.extend(head);
        out.extend(rest);
        assert_eq!(out, input);
    }

    #[tokio::test(start_paused = true)]
    async fn a_large_frame_that_stalls_is_an_error_after_the_stall_timeout() {
        let budget = MemoryBudget::new(1 << 30);
        let conn = ConnMemory::new(budget.clone(), Duration::from_secs(5));
        let mut part = frame((limits::UNBUDGETED_FRAME_BYTES / 8 * 4) as u32);
        part.truncate(part.len() / 2);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        tokio::io::AsyncWriteExt::write_all(&mut tx, &part).await.unwrap();
        let mut gate = FrameGate::new(tokio_util::compat::TokioAsyncReadCompatExt::compat(rx), conn.clone());
        let mut sink = Vec::new();
        let err = gate.read_to_end(&mut sink).await.unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(sink.is_empty(), "capnp saw nothing of an unfinished large frame");
        assert_eq!(
            budget.used(),
            (part.len() - 8).next_multiple_of(CHUNK),
            "what arrived is held, in chunks"
        );
        drop(gate);
        assert_eq!(budget.used(), 0);
        assert_eq!(conn.watchdog().await, "frame not completed within the stall timeout");
        drop(tx);
    }

    /// Holding what was announced let an 8-byte header hold 16 MiB for the stall timeout: four
    /// strangers held the whole default budget, and every fetch was refused `busy`. Only what
    /// arrived is held, a chunk at a time, and large frames together hold at most half of the
    /// budget, so fetch pages keep the other half.
    #[tokio::test(start_paused = true)]
    async fn a_large_frame_holds_what_arrived_and_frames_hold_at_most_half_the_budget() {
        tokio::task::LocalSet::new().run_until(frames_hold_what_arrived()).await;
    }

    async fn frames_hold_what_arrived() {
        let budget = MemoryBudget::new(8 * CHUNK);
        let mut readers = Vec::new();
        let mut senders = Vec::new();
        for _ in 0..3 {
            let conn = ConnMemory::new(budget.clone(), Duration::from_secs(5));
            let (mut tx, rx) = tokio::io::duplex(1 << 20);
            // A 16 MiB frame announced; a part of its body sent.
            let whole = frame((16 << 20) / 8);
            tokio::io::AsyncWriteExt::write_all(&mut tx, &whole[..8 + 3 * CHUNK]).await.unwrap();
            let mut gate = FrameGate::new(tokio_util::compat::TokioAsyncReadCompatExt::compat(rx), conn);
            readers.push(tokio::task::spawn_local(async move {
                let mut sink = Vec::new();
                let _ = gate.read_to_end(&mut sink).await;
                sink.len()
            }));
            senders.push(tx);
        }
        tokio::time::sleep(Duration::from_secs(1)).await;
        assert_eq!(budget.frames_used(), 4 * CHUNK, "half the budget, not 3 x 16 MiB");
        assert_eq!(budget.used(), 4 * CHUNK);
        assert!(budget.try_reserve(4 * CHUNK).is_some(), "the other half is there for fetch pages");
        // Nobody sends more: the frames waiting for room or data end at their deadlines, and
        // every byte is given back.
        for r in readers {
            assert_eq!(r.await.unwrap(), 0, "capnp saw no unfinished frame");
        }
        assert_eq!(budget.used(), 0);
        drop(senders);
    }

    /// A large frame that keeps arriving, a chunk in less than the stall timeout each, is read
    /// whole however long it takes in all (before, one stall timeout bounded the whole frame,
    /// so a slow uplink could never send a large one).
    #[tokio::test(start_paused = true)]
    async fn a_slow_steady_large_frame_is_read_whole() {
        tokio::task::LocalSet::new().run_until(slow_steady_frame()).await;
    }

    async fn slow_steady_frame() {
        let budget = MemoryBudget::new(1 << 30);
        let conn = ConnMemory::new(budget.clone(), Duration::from_secs(5));
        let input = frame((8 * CHUNK / 8) as u32);
        let (mut tx, rx) = tokio::io::duplex(1 << 20);
        let mut gate = FrameGate::new(tokio_util::compat::TokioAsyncReadCompatExt::compat(rx), conn);
        let reader = tokio::task::spawn_local(async move {
            let mut out = Vec::new();
            gate.read_to_end(&mut out).await.map(|_| out)
        });
        for piece in input.chunks(CHUNK) {
            tokio::io::AsyncWriteExt::write_all(&mut tx, piece).await.unwrap();
            tokio::time::sleep(Duration::from_secs(4)).await;
        }
        drop(tx);
        assert_eq!(reader.await.unwrap().unwrap(), input, "36 s in all, under 5 s a chunk");
        assert_eq!(budget.used(), 0);
    }

    /// Hands out one byte per read, the worst split a stream can have.
    struct Trickle(futures::io::Cursor<Vec<u8>>);

    impl AsyncRead for Trickle {
        fn poll_read(
            mut self: Pin<&mut Self>,
            cx: &mut Context<'_>,
            buf: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let one = buf.len().min(1);
            Pin::new(&mut self.0).poll_read(cx, &mut buf[..one])
        }
    }

    #[tokio::test(start_paused = true)]
    async fn multi_segment_tables_read_a_byte_at_a_time_pass_unchanged() {
        let budget = MemoryBudget::new(1 << 30);
        let conn = ConnMemory::new(budget.clone(), Duration::from_secs(5));
        let mut input = Vec::new();
        for sizes in [&[1u32, 2, 3][..], &[4, 5], &[(limits::UNBUDGETED_FRAME_BYTES / 8) as u32, 1]] {
            input.extend_from_slice(&(sizes.len() as u32 - 1).to_le_bytes());
            for s in sizes {
                input.extend_from_slice(&s.to_le_bytes());
            }
            if sizes.len() % 2 == 0 {
                input.extend_from_slice(&[0; 4]); // padding to a whole word
            }
            let words: u32 = sizes.iter().sum();
            input.extend((0..words * 8).map(|i| i as u8));
        }
        let mut gate = FrameGate::new(Trickle(futures::io::Cursor::new(input.clone())), conn);
        let mut out = Vec::new();
        gate.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        assert_eq!(budget.used(), 0);
    }

    #[tokio::test(start_paused = true)]
    async fn a_table_capnp_refuses_passes_through_unchanged() {
        let budget = MemoryBudget::new(64);
        let conn = ConnMemory::new(budget.clone(), Duration::from_secs(5));
        let mut input = Vec::new();
        input.extend_from_slice(&1000u32.to_le_bytes());
        input.extend_from_slice(&[1u8; 20]);
        let mut gate = FrameGate::new(futures::io::Cursor::new(input.clone()), conn);
        let mut out = Vec::new();
        gate.read_to_end(&mut out).await.unwrap();
        assert_eq!(out, input);
        assert_eq!(budget.used(), 0);
    }
}
