//! Shared test fixtures: real servers on 127.0.0.1:0 in temp dirs, real clients.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};

use qpq::client::session::Session;
use qpq::crypto::identity::Identity;
use qpq::server::{self, RunningServer, ServerConfig};
use qpq::transport::{Fingerprint, Pin};

/// An in-process server in its own temp dir.
pub async fn start_server(dir: &Path) -> RunningServer {
    let cfg = ServerConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    server::start(cfg).await.expect("server starts")
}

pub async fn start_server_with(cfg: ServerConfig) -> RunningServer {
    server::start(cfg).await.expect("server starts")
}

/// A connection pinned to the server's certificate.
pub async fn connect(server: &RunningServer) -> Session {
    Session::connect(&server.local_addr().to_string(), Pin::Fingerprint(server.fingerprint()))
        .await
        .expect("connects")
}

/// A connection authenticated as `id`.
pub async fn login(server: &RunningServer, id: &Identity) -> Session {
    let mut s = connect(server).await;
    s.authenticate(id).await.expect("authenticates");
    s
}

/// Runs `f` inside a LocalSet (capnp-rpc is !Send).
pub async fn local<F: std::future::Future>(f: F) -> F::Output {
    tokio::task::LocalSet::new().run_until(f).await
}

pub fn tofu() -> Pin {
    Pin::FirstUse(Arc::new(Mutex::new(None)))
}

/// The real `qpq serve` binary, started on 127.0.0.1:0 with `data_dir`.
pub struct ServerProcess {
    pub child: Child,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    pub data_dir: PathBuf,
}

impl ServerProcess {
    pub fn start(data_dir: &Path) -> ServerProcess {
        Self::start_on(data_dir, "127.0.0.1:0")
    }

    /// Started on `listen`: a restart on the address a port-0 server got (same data dir, so
    /// the same certificate).
    pub fn start_on(data_dir: &Path, listen: &str) -> ServerProcess {
        let mut child = Command::new(env!("CARGO_BIN_EXE_qpq"))
            .args(["serve", "--listen", listen, "--data-dir"])
            .arg(data_dir)
            .env_remove("QPQ_CONFIG")
            .env("QPQ_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qpq serve");
        let stdout = child.stdout.take().expect("piped stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut fingerprint = None;
        let addr = loop {
            let line = lines.next().expect("server printed its address").expect("utf-8 line");
            if let Some(f) = line.strip_prefix("certificate fingerprint ") {
                fingerprint = Some(Fingerprint::parse(f).expect("fingerprint"));
            }
            if let Some(a) = line.strip_prefix("listening on ") {
                break a.parse().expect("socket address");
            }
        };
        // Keep draining stdout so the server never blocks on a full pipe.
        std::thread::spawn(move || for _ in lines {});
        ServerProcess {
            child,
            addr,
            fingerprint: fingerprint.expect("fingerprint line"),
            data_dir: data_dir.to_path_buf(),
        }
    }

    pub fn pin(&self) -> Pin {
        Pin::Fingerprint(self.fingerprint)
    }

    pub fn kill9(mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM, then the exit status.
    pub fn terminate(mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        Command::new("kill").args(["-TERM", &pid]).status().expect("kill -TERM");
        self.child.wait().expect("wait")
    }
}

impl Drop for ServerProcess {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
