//! A read gate under capnp's stream reader: a large frame's body is read only once its size
//! is held in the server's [`MemoryBudget`](super::memory::MemoryBudget), and must arrive within the stall timeout.
//!
//! capnp allocates a whole frame as soon as it has read the frame's segment table, so a peer
//! that announces a 16 MiB segment and sends most of it makes the server hold 16 MiB for as long
//! as it likes. The gate parses the same segment table first (Cap'n Proto "serialization over a
//! stream": a u32 segment count minus one, a u32 word count per segment, padding to 8 bytes;
//! <https://capnproto.org/encoding.html#serialization-over-a-stream>), holds the announced size
//! before it passes the table on, and gives it back when the last body byte has been handed up
//! (capnp owns the frame from then on, counted by the call budgets). Frames up to
//! [`limits::UNBUDGETED_FRAME_BYTES`] pass without a reservation; a table capnp itself refuses
//! (too many segments, past the traversal limit) passes unchanged, so capnp reports the error.

use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, ready};

use futures::AsyncRead;

use super::memory::{ConnMemory, Held};
use crate::limits;

/// Largest segment table: capnp refuses 512 segments or more (4 bytes each, plus the count).
const MAX_TABLE_BYTES: usize = 4 + 4 * 512;

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
    /// Ends a reservation wait or a reserved body that takes longer than the stall timeout.
    deadline: Option<Pin<Box<tokio::time::Sleep>>>,
}

enum State {
    /// Reading the segment table.
    Table,
    /// Waiting for room for a body of this many bytes.
    Reserving(Reserving, u64),
    /// Passing the table on (from `sent`), then a body of `left` bytes (None: a table capnp
    /// refuses, then everything else untouched).
    Emit { sent: usize, left: Option<u64>, held: Option<Held> },
    /// Passing the body on.
    Body { left: u64, held: Option<Held> },
    /// A table capnp will refuse: pass the rest through untouched.
    Through,
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
        }
    }

    fn arm_deadline(&mut self) {
        self.deadline = Some(Box::pin(tokio::time::sleep(self.conn.stall)));
    }

    /// Err once the deadline has passed (and marks the connection for closing).
    fn check_deadline(&mut self, cx: &mut Context<'_>, what: &'static str) -> io::Result<()> {
        if let Some(d) = self.deadline.as_mut()
            && d.as_mut().poll(cx).is_ready()
        {
            self.conn.kill(what);
            return Err(io::Error::new(io::ErrorKind::TimedOut, what));
        }
        Ok(())
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
                        this.state = State::Through;
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
                            this.state = State::Emit { sent: 0, left: None, held: None };
                            this.need = this.have;
                            continue;
                        }
                        // The count word and one word per segment, padded to 8 bytes.
                        this.need = (4 + 4 * count).next_multiple_of(8);
                        if this.have < this.need {
                            continue;
                        }
                    }
                    match this.body_size() {
                        None => {
                            this.state = State::Emit { sent: 0, left: None, held: None };
                        }
                        Some(left) if left <= limits::UNBUDGETED_FRAME_BYTES as u64 => {
                            this.state = State::Emit { sent: 0, left: Some(left), held: None };
                        }
                        Some(left) => {
                            let bytes = usize::try_from(left).unwrap_or(usize::MAX);
                            this.arm_deadline();
                            this.state =
                                State::Reserving(Box::pin(this.conn.global.clone().reserve(bytes)), left);
                        }
                    }
                }
                State::Reserving(fut, left) => {
                    let left = *left;
                    match fut.as_mut().poll(cx) {
                        Poll::Ready(held) => {
                            this.state = State::Emit { sent: 0, left: Some(left), held: Some(held) };
                        }
                        Poll::Pending => {
                            this.check_deadline(cx, "server memory budget busy for too long")?;
                            return Poll::Pending;
                        }
                    }
                }
                State::Emit { sent, left, held } => {
                    let table = this.table.get(*sent..this.need).unwrap_or_default();
                    if table.is_empty() {
                        this.state = match (*left, held.take()) {
                            (Some(left), held) => State::Body { left, held },
                            (None, _) => State::Through,
                        };
                        continue;
                    }
                    let n = table.len().min(buf.len());
                    buf[..n].copy_from_slice(&table[..n]); // n <= both lengths
                    *sent += n;
                    return Poll::Ready(Ok(n));
                }
                State::Body { left, held } => {
                    if *left == 0 {
                        drop(held.take());
                        this.deadline = None;
                        this.state = State::Table;
                        this.have = 0;
                        this.need = 8;
                        continue;
                    }
                    let want = usize::try_from(*left).unwrap_or(usize::MAX).min(buf.len());
                    let dst = &mut buf[..want]; // want <= buf.len()
                    match Pin::new(&mut this.inner).poll_read(cx, dst) {
                        Poll::Ready(Ok(0)) => return Poll::Ready(Err(io::ErrorKind::UnexpectedEof.into())),
                        Poll::Ready(Ok(n)) => {
                            *left -= n as u64;
                            if *left == 0 {
                                // Handed off whole: capnp owns it now.
                                drop(held.take());
                                this.deadline = None;
                            }
                            return Poll::Ready(Ok(n));
                        }
                        Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                        Poll::Pending => {
                            this.check_deadline(cx, "frame not completed within the stall timeout")?;
                            return Poll::Pending;
                        }
                    }
                }
                State::Through => return Pin::new(&mut this.inner).poll_read(cx, buf),
            }
        }
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
        assert_eq!(sink.len(), part.len(), "everything sent was passed on");
        drop(gate);
        assert_eq!(budget.used(), 0);
        assert_eq!(conn.watchdog().await, "frame not completed within the stall timeout");
        drop(tx);
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
