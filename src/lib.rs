//! qpq: an end-to-end encrypted group messenger built on MLS (RFC 9420) with a hybrid
//! post-quantum envelope, and the self-hosted server it talks to.
//!
//! One binary, `qpq`, runs both ends. `qpq serve` is the NodeService: an Authentication Service
//! (single-use MLS KeyPackages and identity-signed hybrid keys) and a Delivery Service
//! (store-and-forward queues of opaque ciphertext, keyed by the recipient's Ed25519 key) behind
//! one QUIC endpoint speaking Cap'n Proto RPC. Clients run MLS for group keys, forward secrecy and
//! post-compromise security, wrap every payload in an X-Wing envelope, and keep their state in an
//! encrypted file. The server never sees plaintext or group keys.
//!
//! # Layout
//! - [`limits`]: every limit, with its reason.
//! - [`proto`]: code generated from `schemas/node.capnp`, the wire contract.
//! - [`transport`]: QUIC/TLS 1.3 configuration, certificate generation and pinning, the
//!   connection-bound authentication challenge.
//! - [`store`]: the server's state behind one trait ([`store::DeliveryStore`]): the redb tables and
//!   their group-commit writer (the default), or a PostgreSQL database shared by several nodes.
//! - [`server`]: `qpq serve`: accept loop, per-connection RPC, AS and DS handlers.
//! - [`crypto`]: identity, hybrid envelope, state-file encryption (no I/O).
//! - [`mls`]: the openmls wrapper (client groups, server KeyPackage validation).
//! - [`fsutil`]: crash-safe file writes and the home lock; [`failpoint`]: crash points for tests.
//! - [`clock`]: time as an input (a shiftable clock for everything with a lifetime);
//!   [`localtime`]: times shown to people, in the local zone.
//! - [`client`]: session with the server, the messenger core, encrypted client state.
//! - [`cli`]: clap definitions and the one-shot commands; [`shell`]: the interactive REPL.
//! - [`text`]: the one sanitiser peer-supplied text passes before it reaches a terminal.
//! - [`logthrottle`]: log lines about floods of one event (refusals, an outage), one per interval.
//! - [`bench`]: `qpq bench`, every figure measured against a reference from the same run.
//! - `fuzzing` (hidden): one fuzz target per decoder a stranger reaches, for `fuzz/` and the
//!   stable smoke run.

#![forbid(unsafe_code)]

pub mod bench;
pub mod cli;
pub mod client;
pub mod clock;
pub mod crypto;
pub mod failpoint;
pub mod fsutil;
pub mod fuzzing;
pub mod limits;
pub mod localtime;
pub mod logthrottle;
pub mod mls;
pub mod proto;
pub mod server;
pub mod shell;
pub mod store;
pub mod text;
pub mod transport;
