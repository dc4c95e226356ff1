# qpq wire contract, protocol version 2: ALPN `qpq/2` (the QUIC ALPN carries the version; any
# incompatible change to this file changes it). A server accepts ALPN `qpq/1` in the handshake
# only to answer every NodeService call with "badRequest: this server speaks qpq/2; your client
# speaks qpq/1: upgrade qpq" and then close the connection with application code 3 and that
# reason. A server without `qpq/2` fails the handshake with TLS alert no_application_protocol
# (QUIC crypto error 0x178), which a client reports as an older server.
#
# What protects what:
#   TLS 1.3        key exchange X25519MLKEM768 (hybrid, post-quantum); the server authenticates
#                  with its certificate, which clients pin (sha256 fingerprint). Protects all of
#                  this RPC traffic, metadata included, from the network.
#   MLS            suite 0x004f, MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519 (X-Wing HPKE,
#                  post-quantum): group secrets and every group message (application messages,
#                  commits, proposals), end to end. Signatures are Ed25519.
#   envelope       X-Wing + HKDF-SHA256 + ChaCha20-Poly1305 (envelope version 3), sealed to the
#                  recipient's identity-signed hybrid key: Welcomes and, where used, direct
#                  messages (frames that carry what MLS does not cover, like a group's name).
#   the server     sees recipient keys, channel ids, sizes, times and network addresses; never
#                  plaintext, group keys or the sender of a message (see README, Security model).
#
# One bidirectional QUIC stream per connection carries Cap'n Proto RPC (two-party, the client is
# the Client side). The bootstrap capability is a NodeService. It is two logical services:
#
#   Authentication Service (AS): single-use MLS KeyPackages and identity-signed hybrid public keys
#   Delivery Service (DS):       store-and-forward queues of opaque ciphertext per recipient key
#
# What protects what: TLS (X25519MLKEM768) hides everything below from the network. A group's MLS
# messages (application messages, commits, proposals) are sealed once by MLS with a post-quantum
# suite and enqueued once for all members (enqueueFanout); Welcomes, whose frame carries the
# group's name and inviter outside MLS, are each sealed for their recipient with an X-Wing
# envelope (enqueue, enqueueBatch). The client marks which is which in the payload's first byte;
# the server does not look.
#
# Identities are raw 32-byte Ed25519 public keys. The server never sees plaintext or group keys.
# Every method that acts on "my" data lives on `Account`, which only `authenticate` hands out, so
# no method can act on a key the connection has not proven it holds.
#
# Errors are RPC exceptions (type "failed") whose text is  "<code>: <text for people>",  where
# <code> is the name of an ErrorCode enumerant below, e.g.
#   "tooLarge: payload too large: 300000 > 262144 bytes"
# Clients branch on the code, never on the text. Codes that ask the caller to come back later
# (rateLimited, overQuota, busy) end their text with " (retry after <N> ms)"; a client waits
# that long before retrying, a bounded number of times. Text without a known code prefix is
# code `unknown`. A bad call is answered with an error and the connection stays up. The
# connection is closed instead (a call the server did not read, or will not, cannot be
# answered) for: a message larger than the server's read limit (the largest legal call plus
# framing, see enqueueBatch); a message over 64 KiB for a method other than enqueue,
# enqueueBatch, enqueueFanout and uploadKeyPackages (the others take a few hundred bytes); more
# than 4096 calls open at once; and Cap'n Proto messages a client never needs to send (Return,
# Resolve, Disembargo, Unimplemented, a call carrying capabilities), since the server asks the
# client nothing.
#
# Transport (QUIC), as a client must know it:
#   - the client opens the one bidirectional stream within 10 s of the handshake, else the
#     server closes the connection with application code 1 ("no rpc stream opened");
#   - the server's QUIC idle timeout is 120 s and it sends no keep-alives: a client keeps a
#     quiet connection open with its own (qpq's client sends one every 3 s);
#   - application close codes: 0 bye or shutdown, 1 a protocol or internal failure, 2 an idle
#     connection evicted to make room for a new one from the same address or network (one
#     nothing arrived on for 10 s; a parked fetchWait counts as idle once it is that old, so a
#     client sees its poll end with the connection and reconnects), 3 an old client (above);
#   - per connection at most 4 fetchWait calls parked at once, and 4 fetch calls read at once
#     ("busy", with a retry hint; "busy" also answers when the server's memory budget for calls
#     in flight is full).
#
# Sequence numbers are increasing, not dense: a recipient's next seq, or a channel's next
# channelSeq, may jump (the redb store starts an emptied queue or a quiet channel from a
# server-wide floor). A gap is not a lost message; messages are lost only by expiry (the
# message TTL, 30 days by default, after which an unfetched message is deleted unacked).

@0xf1c1866953ae47a3;

enum ErrorCode {
  unknown @0;            # no code (an error from the RPC layer itself, or an older server)
  badRequest @1;         # a parameter is malformed or out of range; do not retry as is
  tooLarge @2;           # a payload, batch or call is over its size limit
  queueFull @3;          # the recipient's queue is at its message or byte cap (after up to
                         # 16 of its oldest messages, if past the TTL, were deleted to make room)
  noKeyPackages @4;      # fetchKeyPackage: the key has no KeyPackage at all
  noHybridKey @5;        # fetchHybridKey: the key has no hybrid key
  rateLimited @6;        # this connection, address or target key is over its rate (retry hint)
  overQuota @7;          # the server's storage quota is used up (retry hint); or its key
                         # storage (uploads: no hint, key material frees in weeks)
  staleKey @8;           # uploadHybridKey: not newer than the stored key
  authFailed @9;         # authenticate: the signature does not verify
  shuttingDown @10;      # the server is draining; the call had no effect
  busy @11;              # this connection has too much in flight (retry hint)
  poolFull @12;          # uploadKeyPackages: the pool would exceed its cap
  internal @13;          # the server failed (storage); the call had no effect
  unavailable @14;       # the node cannot reach its shared database (retry hint; retry, on this
                         # or another node: a write cut off mid-commit may have taken effect)
}

interface NodeService {
  health @0 () -> (status :Text, version :Text, uptimeSecs :UInt64);
  # Liveness, no authentication. status is "ok" while the server accepts work, "draining" during
  # shutdown.

  authenticate @1 (identityKey :Data, signature :Data) -> (account :Account, instance :UInt64);
  # Proves possession of identityKey (32 bytes, Ed25519) on THIS connection. The signature is
  # Ed25519 over  "qpq/1 authenticate" || 0x00 || exporter,  where exporter is 32 bytes of TLS
  # keying material exported from this connection with label "EXPORTER-qpq/1 authenticate" and no
  # context (RFC 5705 / RFC 8446 section 7.5). Both ends compute it; it differs on every
  # connection, so a signature replayed on another connection fails. instance identifies the
  # server's database (random, fixed at its creation): a client that sees it change knows the
  # per-recipient sequence numbers started over.

  fetchKeyPackage @2 (identityKey :Data) -> (keyPackage :Data, remaining :UInt32, lastResort :Bool);
  # AS, no authentication (anyone may start a conversation with a key), but rate-limited per
  # connection, per source address (IPv4, or IPv6 /64) and per identityKey, so nobody drains a
  # key's pool in a burst (rateLimited, with a retry hint). Atomically removes and
  # returns one of identityKey's single-use KeyPackages (RFC 9420 section 10). When none is left it
  # returns the key's last-resort KeyPackage (kept, not removed) with lastResort = true. remaining
  # counts single-use packages left after this call. Error "no key packages for this key" when the
  # key has neither. Only packages valid for the server's message TTL and a day more are handed
  # out, counted or kept: every member checks an added package's lifetime when it processes the
  # commit that adds it, which may wait that long in its queue (RFC 9420 section 7.2).

  fetchHybridKey @3 (identityKey :Data) -> (hybridKey :Data, signature :Data, createdAtMs :UInt64);
  # AS, no authentication. Returns the key's current hybrid public key (X-Wing: ML-KEM-768 ||
  # X25519, 1216 bytes), the identity's Ed25519 signature over it and its signed creation time,
  # exactly as uploaded. The server cannot forge that signature, so a fetching client detects a
  # swapped key; and since the time is signed too, a client that has seen a newer key detects an
  # old one served again.

  enqueue @4 (recipientKey :Data, payload :Data, channelId :Data) -> (seq :UInt64, channelSeq :UInt64);
  # DS, no authentication (a sender need not reveal itself). Stores payload (at most the server's
  # max payload, 4 MiB by default) for recipientKey and returns only after the write is durable
  # on disk. seq is the message's per-recipient sequence number. channelId (0..=64 bytes, empty for
  # none) is opaque to the server; a non-empty one gives the message the next position channelSeq
  # in that channel's total order (0 when channelId is empty). Fails with "queue full: ..." when
  # the recipient's queue is at its message or byte cap, "overQuota: ..." when the server's total
  # storage quota is used up, and "rateLimited: ..." when this connection or its source address
  # (IPv4, or IPv6 /64) sends faster than the server's enqueue rate (enqueue, enqueueBatch
  # and enqueueFanout share that budget, one token per call).

  enqueueBatch @5 (channelId :Data, items :List(Delivery)) -> (channelSeq :UInt64, seqs :List(UInt64));
  # DS, no authentication. Enqueues each item to its own recipient in ONE atomic, durable
  # transaction: all are stored or none is. All items share one channelSeq, so every recipient sees
  # the channel's messages in the same order (the per-group total order clients use to agree on one
  # commit per epoch, RFC 9750 section 5.2). seqs[i] is items[i]'s per-recipient sequence number.
  # At most 4096 items, 16 MiB of payload in all, and each recipient at most once ("badRequest:
  # duplicate recipient: ...").

  struct Delivery {
    recipientKey @0 :Data;
    payload @1 :Data;
  }

  enqueueFanout @6 (channelId :Data, payload :Data, recipients :List(Data), required :Data) -> (channelSeq :UInt64, seqs :List(UInt64));
  # DS, no authentication. Enqueues ONE payload for every key in recipients whose queue can take
  # it, in one atomic, durable transaction, with one channelSeq as in enqueueBatch; seqs[i] is
  # recipients[i]'s per-recipient sequence number, or 0 when recipients[i]'s queue was full and
  # it was skipped (real sequence numbers start at 1, so 0 is never one). Skipped recipients get
  # nothing (not later either: the server keeps no note of them); the others get the message as
  # if the skipped ones had not been named. A full queue skips its recipient instead of
  # refusing the call so that one member (offline for long, or flooded by a stranger who knows
  # their key) cannot stop a whole group's messages and commits. A sender learns from the zeros
  # who did not get it. Each recipient fetches an ordinary Message carrying the payload. This
  # is how a group's MLS messages travel: they are sealed once by MLS (a post-quantum suite) and
  # cost the sender one upload, not one per member.
  # The server stores the payload once, with a small index entry per recipient (under 64 bytes),
  # and deletes it when the last recipient has acked it or when it expires (the same TTL as any
  # message; all its entries expire together).
  # Limits and charges:
  #   - payload: 1 byte up to the server's max payload (4 MiB by default), else "tooLarge";
  #   - recipients: 1 to 10000 keys of 32 bytes, each at most once; an empty list, a duplicate
  #     ("duplicate recipient: item 3 repeats item 0") or a malformed key is "badRequest", too
  #     many is "tooLarge";
  #   - each recipient's queue is charged the whole payload (its view: what it will fetch)
  #     against its message and byte caps; a recipient whose queue has no room for it (at its
  #     message cap, or the payload would pass its byte cap) is skipped (seq 0). When every
  #     recipient is skipped the call fails with "queueFull" and nothing is stored (no
  #     channelSeq is taken);
  #   - required (empty for none, the default, which old clients send) is one recipient that
  #     must not be skipped: a 32-byte key that is one of recipients, else "badRequest". When
  #     its queue has no room for the payload, the call fails with "queueFull" and nothing is
  #     stored for anyone (no channelSeq is taken), as if every queue were full. A committer
  #     names itself: its own copy, in the channel's order, is how it learns that its commit won
  #     the epoch, so a commit its own copy would miss must reach no one (the others would move
  #     to an epoch the committer never learns it created);
  #   - the server's storage quota (and this network's enqueue byte rate) is charged the payload
  #     once plus 48 bytes per stored recipient (its real cost; skipped ones cost nothing), else
  #     "overQuota" (retry hint, nothing stored); so one call can never cost the server more
  #     than payload + 48 bytes x recipients;
  #   - one token of the enqueue rate, shared with enqueue and enqueueBatch ("rateLimited").
  # Every refusal but the full queue of a recipient that is not required (the limits above,
  # "overQuota", "rateLimited") fails the whole call and stores nothing for anyone.
  # What the server learns is what it routes: the recipient keys, the channel id, the time and
  # the size, and that these recipients got the same payload (they share a group). The payload
  # is an MLS PrivateMessage: its group id, epoch and content type are in the clear (RFC 9420
  # section 6.3); sender and content are not.
}

interface Account {
  # Every method acts only on the key proven by `authenticate`.

  identity @0 () -> (identityKey :Data);

  uploadKeyPackages @1 (keyPackages :List(Data), lastResort :Data) -> (count :UInt32);
  # AS. Each package is parsed as an MLS KeyPackage (RFC 9420), its signature verified, its
  # credential must be a BasicCredential whose identity is this account's key (which must also be
  # its signature key), and its ciphersuite must be MLS_128_MLKEM768X25519_AES128GCM_SHA256_Ed25519.
  # keyPackages must not carry the last_resort extension; lastResort (optional, empty for none)
  # must, and replaces the stored last-resort package. All-or-nothing and durable. count is the
  # number of single-use packages stored afterwards; the pool is capped ("key package pool full").
  # A package valid for less than the message TTL and a day more is stored but never handed out
  # (see fetchKeyPackage), and deleted by the next sweep. A package the account has stored, or
  # names twice, is stored once. One already handed out is not remembered, so a client retrying
  # an upload whose outcome it does not know uploads fresh packages (as qpq's does), never the
  # same ones: those could go to two inviters.
  # Lifetimes (RFC 9420 section 7.2 asks servers to bound them): not_after - not_before at most
  # 63 days + 1 hour + 1 day ("badRequest: ... lifetime too long"; openmls's default 84 days is
  # refused), not_before at most the server's now (clocks more than an hour fast are refused as
  # not yet valid), not_after after it. qpq clients make 63-day packages and replace them after
  # 14 days. At most 100 packages per upload and 16 KiB per package ("tooLarge").

  keyPackageCount @2 () -> (count :UInt32, hasLastResort :Bool);

  uploadHybridKey @3 (hybridKey :Data, signature :Data, createdAtMs :UInt64) -> ();
  # AS. signature is Ed25519 by this account's key over
  #   "qpq/1 hybrid-key" || identityKey || createdAtMs (8 bytes, big-endian) || hybridKey
  # and is verified before the key (1216 bytes) replaces any earlier one. Durable. Clients
  # rotate their key (weekly), so this is called again with a newer createdAtMs. A key whose
  # createdAtMs is not newer than the stored one's is refused ("staleKey: ..."; re-sending the
  # stored key exactly succeeds), and createdAtMs must be nonzero and at most a day ahead of
  # the server's clock ("badRequest: ..."). The server deletes a key not replaced for 400 days
  # from its createdAtMs, less its KeyPackage margin (see uploadKeyPackages): 369 days at the
  # default message TTL.

  fetch @4 (limit :UInt32) -> (messages :List(Message), more :Bool);
  # DS. Returns up to limit (capped by the server, 256) pending messages in seq order WITHOUT
  # deleting them (at-least-once delivery). limit = 0 means "as many as the server allows" (the
  # cap), as does any limit above it. more = true when further messages are waiting. Replies
  # also stop at 8 MiB of payload (at least one message is always returned when one waits).

  fetchWait @5 (timeoutMs :UInt32, limit :UInt32, ackUpTo :UInt64) -> (messages :List(Message), more :Bool, removed :UInt32);
  # DS. Like fetch, but when the queue is empty waits until a message arrives (returns within
  # milliseconds of its enqueue) or timeoutMs passes (then returns empty). timeoutMs at most
  # 60000 ("timeout out of range: ...").
  # ackUpTo > 0 folds an ack into the call: messages with seq <= ackUpTo are deleted as by
  # ack(ackUpTo) (removed counts them) and are never returned by this call. The deletion is
  # committed while the call waits, and is durable before the reply, so a receive loop costs one
  # round trip per batch and no commit stands between an enqueue and its wake-up. 0 acks nothing.

  ack @6 (upToSeq :UInt64) -> (removed :UInt32);
  # DS. Deletes every message with seq <= upToSeq, durably. Nothing is deleted before its ack.

  struct Message {
    seq @0 :UInt64;
    channelId @1 :Data;
    channelSeq @2 :UInt64;
    payload @3 :Data;
    enqueuedAtMs @4 :UInt64;
    # Server clock, milliseconds since the Unix epoch.
  }
}
