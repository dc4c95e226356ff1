//! Compiles `schemas/node.capnp` into Rust at build time.
//!
//! No system `capnp` tool is needed: `capnpc-embedded` runs the Cap'n Proto schema compiler
//! (built to WebAssembly) in-process, and `capnpc` turns its `CodeGeneratorRequest` into Rust.
//! A fresh machine with only cargo builds this crate.

fn main() {
    println!("cargo:rerun-if-changed=schemas/node.capnp");
    println!("cargo:rerun-if-changed=.git/HEAD");
    println!("cargo:rerun-if-changed=.git/refs/heads");
    println!("cargo:rerun-if-env-changed=QPQ_GIT_COMMIT");
    // `--version` names the commit when built from a git checkout, "unknown" otherwise.
    let commit = std::env::var("QPQ_GIT_COMMIT").ok().or_else(|| {
        std::process::Command::new("git")
            .args(["rev-parse", "--short=12", "HEAD"])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .map(|s| s.trim().to_string())
    });
    println!("cargo:rustc-env=QPQ_GIT_COMMIT={}", commit.unwrap_or_else(|| "unknown".into()));
    let request = match capnpc_embedded::CompileCommand::new()
        .file("schemas/node.capnp")
        .src_prefix("schemas")
        .compile()
    {
        Ok(r) => r,
        Err(e) => panic!("compiling schemas/node.capnp failed: {e}"),
    };
    let out = std::env::var("OUT_DIR").expect("cargo sets OUT_DIR for build scripts");
    capnpc::codegen::CodeGenerationCommand::new()
        .output_directory(out)
        .default_parent_module(vec!["proto".into()])
        .run(&request[..])
        .expect("generating rust code from the schema failed");
}
