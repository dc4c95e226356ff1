//! Coalesced reads: the queue fetches waiting at one moment share one statement.
//!
//! Why (issue 13): at 16 senders, one PostgreSQL node's delivery spent half of its round trips
//! on fetches, one statement per woken `fetchWait` carrying about two messages, while each
//! enqueue commit wakes every recipient it wrote to at once. A round trip is a wake-up of a
//! backend and of this process on a machine whose cores the senders, the nodes and PostgreSQL
//! share; the index scans themselves are cheap.
//!
//! How, like the group commit ([`super::batch`]): [`limits::PG_FETCH_WORKERS`] tasks per node
//! each take every fetch waiting (up to [`limits::PG_FETCH_OPS`]) and run them as one
//! autocommit statement, a `LATERAL` page per request, on one pooled connection. Each request
//! gets exactly what its own statement returned before: its recipient's unexpired entries after
//! its seq, in seq order, cut at its limit and byte budget. A read that runs a little later
//! than asked only sees more: every caller subscribed for wake-ups before asking.

use std::sync::Arc;
use std::sync::atomic::Ordering;

use deadpool_postgres::Object;
use tokio::sync::{Mutex, mpsc, oneshot};

use super::{Inner, TxError, batch, ops, unavailable};
use crate::limits;
use crate::store::{IdentityKey, StoreError, StoredMessage};

/// Messages found and whether more are waiting beyond the request's limits.
pub(super) type Page = (Vec<StoredMessage>, bool);

/// One waiting fetch and where its answer goes.
pub(super) struct Request {
    pub who: IdentityKey,
    /// Below `i64::MAX` (the caller answers larger ones itself: nothing can follow them).
    pub after: u64,
    pub limit: u32,
    pub max_bytes: usize,
    pub reply: oneshot::Sender<Result<Page, StoreError>>,
}

/// The pages of `$1` (recipients), after `$2`, at most `$3` rows each, cut where the payload
/// bytes before a row pass `$4`, entries enqueued at or after `$5`; `o` is the request's
/// 1-based index. A page's second row is always returned, without its body when past the cut,
/// so that a first message larger than `$4` still says more are waiting.
///
/// `over` marks the rows, from the second request on, after `$6` payload bytes of the
/// statement's pages (in request order): they come without a body, and their requests go again
/// in another statement ([`FETCH_STATEMENT_BYTES`]). A large body stays a TOAST pointer until it
/// is sent (`octet_length` reads its length from the pointer), so rows past the cut cost
/// PostgreSQL neither the reading nor the sending of their bodies.
const FETCH_PAGES: &str = "SELECT o, seq, channel_id, channel_seq,
            CASE WHEN before <= max_bytes AND NOT over THEN body END, enqueued_at_ms, over
     FROM (
         SELECT r.o, r.max_bytes, x.seq, x.channel_id, x.channel_seq, x.body, x.enqueued_at_ms, x.before,
                r.o > 1 AND coalesce(sum(CASE WHEN x.before <= r.max_bytes THEN octet_length(x.body) END)
                    OVER (ORDER BY r.o, x.seq ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) > $6 AS over
         FROM unnest($1::bytea[], $2::bigint[], $3::bigint[], $4::bigint[]) WITH ORDINALITY
              AS r(who, after, lim, max_bytes, o)
         CROSS JOIN LATERAL (
             SELECT * FROM (
                 SELECT page.*, coalesce(sum(octet_length(page.body)) OVER (ORDER BY page.seq
                     ROWS BETWEEN UNBOUNDED PRECEDING AND 1 PRECEDING), 0) AS before,
                     row_number() OVER (ORDER BY page.seq) AS rn
                 FROM (
                     SELECT e.seq, coalesce(e.channel_id, p.channel_id) AS channel_id,
                            coalesce(e.channel_seq, p.channel_seq) AS channel_seq,
                            coalesce(e.body, p.body) AS body, e.enqueued_at_ms
                     FROM qpq_entries e LEFT JOIN qpq_payloads p ON p.id = e.payload_id
                     WHERE e.recipient = r.who AND e.seq > r.after AND e.enqueued_at_ms >= $5
                     ORDER BY e.seq LIMIT r.lim
                 ) page
             ) cut WHERE cut.before <= r.max_bytes OR cut.rn = 2
         ) x
     ) s
     ORDER BY o, seq";

/// One worker: takes what is waiting, reads it in one statement, answers, until the queue
/// closes.
pub(super) async fn run_worker(inner: Arc<Inner>, queue: Arc<Mutex<mpsc::Receiver<Request>>>) {
    loop {
        let Some(requests) = batch::take_waiting(&queue, limits::PG_FETCH_OPS).await else { return };
        // Expiry by the deletion clock: mail a clock stepped ahead would call expired stays
        // visible until it is really deleted.
        let now = inner.deletion.now().0;
        let mut requests = requests;
        // Each statement answers a prefix of the requests (at least one); the rest go again.
        while !requests.is_empty() {
            let read = async {
                let client = inner.pool.get().await.map_err(|e| unavailable(e.into()))?;
                inner.reads.fetch_add(1, Ordering::Relaxed);
                let pages = inner.answered(fetch_pages(&client, &inner, now, &requests)).await;
                inner.settle(client, pages)
            };
            match read.await {
                Ok(pages) => {
                    let rest = requests.split_off(pages.len().min(requests.len()));
                    for (request, page) in requests.into_iter().zip(pages) {
                        // The caller may have gone (its call was cancelled): nothing to tell.
                        let _ = request.reply.send(Ok(page));
                    }
                    requests = rest;
                }
                Err(e) => {
                    for request in requests.drain(..) {
                        let _ = request.reply.send(Err(batch::same_error(&e)));
                    }
                }
            }
        }
    }
}

/// Most payload bytes one coalesced statement sends (see [`FETCH_PAGES`]'s `over`): the pages
/// of up to [`limits::PG_FETCH_OPS`] requests of up to [`limits::MAX_FETCH_BYTES`] each would
/// be about a GiB per worker, loaded before the memory budget is asked for any of it. A
/// statement's first request is always sent whole (its page alone is bounded), so each
/// statement answers at least one.
const FETCH_STATEMENT_BYTES: usize = 2 * limits::MAX_FETCH_BYTES;

/// Reads the requests' pages in one statement, in request order: all of them, or the first
/// ones, up to where the statement passed [`FETCH_STATEMENT_BYTES`] (never within the first
/// request).
async fn fetch_pages(
    client: &Object,
    inner: &Inner,
    now: u64,
    requests: &[Request],
) -> Result<Vec<Page>, TxError> {
    let oldest = ops::big(now.saturating_sub(inner.limits.ttl_ms));
    let who: Vec<&[u8]> = requests.iter().map(|r| &r.who[..]).collect();
    let after: Vec<i64> = requests.iter().map(|r| ops::big(r.after)).collect();
    // One row more than the limit tells whether more are waiting.
    let rows_max: Vec<i64> = requests.iter().map(|r| i64::from(r.limit) + 1).collect();
    let max_bytes: Vec<i64> = requests.iter().map(|r| ops::big(r.max_bytes as u64)).collect();
    let stmt = client.prepare_cached(FETCH_PAGES).await?;
    let budget = ops::big(FETCH_STATEMENT_BYTES as u64);
    let params: [&(dyn tokio_postgres::types::ToSql + Sync); 6] =
        [&who, &after, &rows_max, &max_bytes, &oldest, &budget];
    let rows = client.query_raw(&stmt, params).await?;
    futures::pin_mut!(rows);
    let mut pages: Vec<Page> = requests.iter().map(|_| (Vec::new(), false)).collect();
    let mut bytes = vec![0usize; requests.len()];
    let mut loaded = 0usize;
    while let Some(row) = futures::TryStreamExt::try_next(&mut rows).await? {
        let o: i64 = row.get(0);
        // `o` is an index into `requests`, 1-based, as sent: anything else is a damaged answer.
        let i = usize::try_from(o - 1)
            .ok()
            .filter(|i| *i < requests.len())
            .ok_or_else(|| TxError::Store(StoreError::Db(format!("fetch: unexpected request index {o}"))))?;
        if i > 0 && row.get::<_, bool>(6) {
            // Past the statement's bytes: request i and the ones after it go again in another
            // statement (the rest of these rows, bodiless, are discarded as they arrive).
            pages.truncate(i);
            inner.largest_read.fetch_max(loaded, Ordering::Relaxed);
            return Ok(pages);
        }
        let (out, more) = &mut pages[i];
        if *more {
            continue;
        }
        // No body: the row is past the byte cut (see FETCH_PAGES).
        let Some(payload) = row.get::<_, Option<Vec<u8>>>(4) else {
            *more = true;
            continue;
        };
        let r = &requests[i];
        if out.len() as u32 >= r.limit || (!out.is_empty() && bytes[i] + payload.len() > r.max_bytes) {
            *more = true;
            continue;
        }
        bytes[i] += payload.len();
        loaded += payload.len();
        out.push(StoredMessage {
            seq: ops::unbig(row.get(1)),
            channel_id: row.get(2),
            channel_seq: ops::unbig(row.get(3)),
            payload,
            enqueued_at_ms: ops::unbig(row.get(5)),
        });
    }
    inner.largest_read.fetch_max(loaded, Ordering::Relaxed);
    Ok(pages)
}
