//! The wire contract: Rust code generated from `schemas/node.capnp` at build time (see
//! `build.rs`), plus small helpers shared by the client and server ends.

#[allow(clippy::all, clippy::pedantic, unused, missing_docs)]
pub mod node_capnp {
    include!(concat!(env!("OUT_DIR"), "/node_capnp.rs"));
}

pub mod wire_error;
