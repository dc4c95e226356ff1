//! Shared test fixtures: real servers on 127.0.0.1:0 in temp dirs, real clients.
#![allow(dead_code)]

pub mod pg;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::Duration;

use qpq::client::session::Session;
use qpq::crypto::identity::Identity;
use qpq::server::{self, RunningServer, ServerConfig};
use qpq::transport::{Fingerprint, Pin};

/// Longest a test waits for the next line from a child process: far beyond any healthy step on
/// a slow machine, so hitting it means something hangs, and the test fails instead of hanging.
pub const LINE_TIMEOUT: Duration = Duration::from_secs(90);

/// Lines of a child's output, read on a thread so a test can wait for one with a timeout. The
/// thread drains the pipe to its end, so the child never blocks on a full pipe.
pub struct Lines(mpsc::Receiver<String>);

impl Lines {
    pub fn of(pipe: impl std::io::Read + Send + 'static) -> Lines {
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines().map_while(Result::ok) {
                let _ = tx.send(line);
            }
        });
        Lines(rx)
    }

    /// The next line; None at the end of the output. Panics after [`LINE_TIMEOUT`] without one.
    pub fn next_line(&mut self) -> Option<String> {
        match self.0.recv_timeout(LINE_TIMEOUT) {
            Ok(line) => Some(line),
            Err(mpsc::RecvTimeoutError::Disconnected) => None,
            Err(mpsc::RecvTimeoutError::Timeout) => panic!("no output line within {LINE_TIMEOUT:?}"),
        }
    }

    /// Every line until the end of the output.
    pub fn rest(mut self) -> Vec<String> {
        std::iter::from_fn(|| self.next_line()).collect()
    }
}

/// The store a test's servers use: redb in their data dir, or a PostgreSQL database.
#[derive(Clone, Debug)]
pub enum Backend {
    Redb,
    /// The URL of a fresh database in this test binary's cluster ([`pg::Cluster`]).
    Postgres(String),
}

impl Backend {
    /// A fresh database in the shared cluster (started on first use).
    pub fn postgres() -> Backend {
        Backend::Postgres(pg::Cluster::get().fresh_database())
    }

    /// The value of `--store` / `QPQ_STORE`.
    pub fn store_arg(&self) -> String {
        match self {
            Backend::Redb => "redb".to_string(),
            Backend::Postgres(url) => url.clone(),
        }
    }
}

thread_local! {
    /// The backend of the test running on this thread (a `#[tokio::test]`'s body is polled on
    /// its own thread); [`Backend::Redb`] unless the test chose another.
    static BACKEND: std::cell::RefCell<Backend> = const { std::cell::RefCell::new(Backend::Redb) };
}

/// Makes every server this test starts through the fixtures use `backend`.
pub fn use_backend(backend: Backend) {
    BACKEND.with(|b| *b.borrow_mut() = backend);
}

/// The backend the running test chose.
pub fn backend() -> Backend {
    BACKEND.with(|b| b.borrow().clone())
}

/// Defaults for a server in `dir` on 127.0.0.1:0, on the running test's backend.
pub fn server_config(dir: &Path) -> ServerConfig {
    let mut cfg = ServerConfig::new(dir.to_path_buf(), "127.0.0.1:0".parse().unwrap());
    if let Backend::Postgres(url) = backend() {
        cfg.store = server::StoreLocation::Postgres(url);
    }
    cfg
}

/// Declares each test twice, in a module named after it: `redb` and `postgres`, each running
/// the same body with every fixture-started server on that backend.
#[macro_export]
macro_rules! on_both_backends {
    () => {};
    ($(#[$m:meta])* async fn $name:ident() $body:block $($rest:tt)*) => {
        mod $name {
            use super::*;
            $(#[$m])* async fn redb() { common::use_backend(common::Backend::Redb); $body }
            $(#[$m])* async fn postgres() { common::use_backend(common::Backend::postgres()); $body }
        }
        on_both_backends!($($rest)*);
    };
    ($(#[$m:meta])* fn $name:ident() $body:block $($rest:tt)*) => {
        mod $name {
            use super::*;
            $(#[$m])* fn redb() { common::use_backend(common::Backend::Redb); $body }
            $(#[$m])* fn postgres() { common::use_backend(common::Backend::postgres()); $body }
        }
        on_both_backends!($($rest)*);
    };
}

/// An in-process server in its own temp dir.
pub async fn start_server(dir: &Path) -> RunningServer {
    server::start(server_config(dir)).await.expect("server starts")
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
        Self::spawn(data_dir, "127.0.0.1:0")
    }

    /// Starts on a port that a later [`ServerProcess::start_on`] can have again: one below the
    /// kernel's ephemeral range, so no socket bound to port 0 (other tests' servers and clients)
    /// can take it while this server is down.
    pub fn start_restartable(data_dir: &Path) -> ServerProcess {
        let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
            .ok()
            .and_then(|s| s.split_whitespace().next()?.parse().ok())
            .unwrap_or(32768);
        let (low, high) = (RESTARTABLE_PORTS_FROM, ephemeral_low.max(RESTARTABLE_PORTS_FROM + 1000));
        for _ in 0..50 {
            let port = rand::Rng::gen_range(&mut rand::thread_rng(), low..high);
            if let Some(p) = Self::try_spawn(data_dir, &format!("127.0.0.1:{port}")) {
                return p;
            }
        }
        panic!("no free port in {low}..{high} after 50 tries");
    }

    /// Starts on 127.0.0.1:0 with `config` (qpq-server.toml text, say raised queue limits).
    pub fn start_with_config(data_dir: &Path, config: &str) -> ServerProcess {
        let file = data_dir.join("qpq-server.toml");
        std::fs::write(&file, config).expect("write server config");
        Self::try_spawn_with(data_dir, "127.0.0.1:0", Some(&file)).expect("qpq serve starts with the config")
    }

    fn spawn(data_dir: &Path, listen: &str) -> ServerProcess {
        Self::try_spawn(data_dir, listen).unwrap_or_else(|| panic!("qpq serve did not start on {listen}"))
    }

    /// None when the server exits before saying where it listens (say, the port is taken; its
    /// stderr, inherited, says why).
    fn try_spawn(data_dir: &Path, listen: &str) -> Option<ServerProcess> {
        Self::try_spawn_with(data_dir, listen, None)
    }

    fn try_spawn_with(data_dir: &Path, listen: &str, config: Option<&Path>) -> Option<ServerProcess> {
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_qpq"));
        if let Some(c) = config {
            cmd.arg("serve").arg("--config").arg(c);
        } else {
            cmd.arg("serve");
        }
        let mut child = cmd
            .args(["--listen", listen, "--data-dir"])
            .arg(data_dir)
            .env_remove("QPQ_CONFIG")
            .env("QPQ_STORE", backend().store_arg())
            .env("QPQ_LOG", "warn")
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn qpq serve");
        let mut lines = Lines::of(child.stdout.take().expect("piped stdout"));
        let mut fingerprint = None;
        let addr = loop {
            let Some(line) = lines.next_line() else {
                let _ = child.wait();
                return None;
            };
            if let Some(f) = line.strip_prefix("certificate fingerprint ") {
                fingerprint = Some(Fingerprint::parse(f).expect("fingerprint"));
            }
            if let Some(a) = line.strip_prefix("listening on ") {
                break a.parse().expect("socket address");
            }
        };
        // `lines`' thread keeps draining stdout, so the server never blocks on a full pipe.
        Some(ServerProcess {
            child,
            addr,
            fingerprint: fingerprint.expect("fingerprint line"),
            data_dir: data_dir.to_path_buf(),
        })
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

impl ServerProcess {
    /// Restarts on a given address (the one a previous instance got from the OS), so clients
    /// that remembered it can reconnect.
    pub fn start_on(data_dir: &Path, addr: SocketAddr) -> ServerProcess {
        Self::spawn(data_dir, &addr.to_string())
    }
}

/// Lowest port [`ServerProcess::start_restartable`] picks.
const RESTARTABLE_PORTS_FROM: u16 = 20_000;

/// Output of one `qpq` run.
pub struct Run {
    pub ok: bool,
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
}

impl From<std::process::Output> for Run {
    fn from(out: std::process::Output) -> Run {
        Run {
            ok: out.status.success(),
            code: out.status.code(),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    }
}

/// A person with their own temp home, driving the real binary.
pub struct User {
    pub home: tempfile::TempDir,
    pub key: String,
    pub name: String,
}

/// A `qpq` command for `home`, isolated from the caller's environment.
pub fn qpq_command(home: &Path) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_qpq"));
    cmd.arg("--home").arg(home);
    for var in ["QPQ_HOME", "QPQ_SERVER", "QPQ_SERVER_FINGERPRINT", "QPQ_PASSPHRASE"] {
        cmd.env_remove(var);
    }
    cmd.env("QPQ_LOG", "warn");
    cmd
}

/// `qpq ARGS` in `home`, held at failpoint `point` (`QPQ_FAILPOINT=pause:POINT`, see
/// src/failpoint.rs): returns once it stopped there, with the rest of its stderr. [`resume`]
/// lets it go on.
pub fn paused_at<S: AsRef<std::ffi::OsStr>>(home: &Path, args: &[S], point: &str) -> (Child, Lines) {
    let mut child = qpq_command(home)
        .args(args)
        .env("QPQ_FAILPOINT", format!("pause:{point}"))
        .stdin(Stdio::piped())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn qpq");
    let mut err = Lines::of(child.stderr.take().expect("piped stderr"));
    assert_eq!(err.next_line(), Some(format!("qpq: failpoint {point}")), "held at {point}");
    (child, err)
}

/// Lets a process held by [`paused_at`] go on.
pub fn resume(child: &mut Child) {
    use std::io::Write;
    child.stdin.take().expect("piped stdin").write_all(b"\n").expect("resume");
}

pub fn qpq_in(home: &Path, args: &[&str], stdin: Option<&str>) -> Run {
    use std::io::Write;
    let mut cmd = qpq_command(home);
    cmd.args(args);
    cmd.stdin(Stdio::piped()).stdout(Stdio::piped()).stderr(Stdio::piped());
    let mut child = cmd.spawn().expect("spawn qpq");
    {
        let mut sin = child.stdin.take().expect("stdin");
        if let Some(s) = stdin {
            sin.write_all(s.as_bytes()).expect("write stdin");
        }
    }
    Run::from(child.wait_with_output().expect("qpq runs"))
}

impl User {
    /// `qpq init` against `server` with no passphrase.
    pub fn init(server: &ServerProcess, name: &str) -> User {
        let home = tempfile::tempdir().expect("temp home");
        let addr = server.addr.to_string();
        let r = qpq_in(home.path(), &["init", "--server", &addr, "--name", name, "--no-passphrase"], None);
        assert!(r.ok, "init {name} failed: {}", r.stderr);
        let key = r.stdout.trim().to_string();
        assert_eq!(key.len(), 64, "init prints the key: {:?}", r.stdout);
        User { home, key, name: name.to_string() }
    }

    /// Starts `qpq ARGS` in this user's home without waiting: stdout and stderr piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        qpq_command(self.home.path())
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn qpq")
    }

    pub fn run(&self, args: &[&str]) -> Run {
        qpq_in(self.home.path(), args, None)
    }

    /// Runs and asserts success; returns stdout and stderr through one pipe, as a terminal
    /// shows them: in the order they were written.
    pub fn merged(&self, args: &[&str]) -> String {
        use std::io::Read;
        let (mut reader, writer) = std::io::pipe().expect("a pipe");
        let mut cmd = qpq_command(self.home.path());
        cmd.args(args).stdin(Stdio::null()).stdout(writer.try_clone().expect("pipe clone")).stderr(writer);
        let mut child = cmd.spawn().expect("spawn qpq");
        // The command holds the pipe's writing ends: the reader ends when the child's do.
        drop(cmd);
        let mut text = String::new();
        reader.read_to_string(&mut text).expect("read the pipe");
        let status = child.wait().expect("qpq runs");
        assert!(status.success(), "{} {:?} failed ({status}): {text}", self.name, args);
        text
    }

    /// Runs and asserts success; returns stdout.
    pub fn ok(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(r.ok, "{} {:?} failed ({:?}): {}", self.name, args, r.code, r.stderr);
        r.stdout
    }

    /// Runs and asserts failure; returns stderr.
    pub fn fails(&self, args: &[&str]) -> String {
        let r = self.run(args);
        assert!(!r.ok, "{} {:?} should fail but printed {:?}", self.name, args, r.stdout);
        r.stderr
    }

    pub fn add_contact(&self, other: &User) {
        self.ok(&["contact", "add", &other.name, &other.key]);
    }

    /// `recv` once; the printed lines without their times ([`untimed`]).
    pub fn recv(&self) -> Vec<String> {
        untimed(&self.ok(&["recv"])).lines().map(str::to_string).collect()
    }

    /// The client database's write counter: unchanged means nothing was written.
    pub fn state_generation(&self) -> u64 {
        qpq::client::db::ClientDb::unlock(self.home.path(), None)
            .expect("client database")
            .1
            .generation()
            .unwrap()
    }

    /// Bytes the client database's records hold (keys, sealed values and b-tree metadata): what
    /// the home keeps, without the free pages redb's file keeps for reuse or the slack of its
    /// power-of-two page allocations.
    pub fn state_stored_bytes(&self) -> u64 {
        use redb::{ReadableDatabase, ReadableTableMetadata};
        let db = redb::Database::open(self.home.path().join("qpq.db")).expect("client database");
        let txn = db.begin_read().unwrap();
        ["mls", "state", "history"]
            .into_iter()
            .map(|name| {
                let t = txn.open_table(redb::TableDefinition::<&[u8], &[u8]>::new(name)).unwrap();
                let stats = t.stats().unwrap();
                stats.stored_bytes() + stats.metadata_bytes()
            })
            .sum()
    }

    pub fn state_bytes(&self) -> Vec<u8> {
        std::fs::read(self.home.path().join("qpq.db")).expect("client database")
    }
}

/// Makes every pair of users contacts of each other.
pub fn introduce(users: &[&User]) {
    for a in users {
        for b in users {
            if a.key != b.key {
                a.add_contact(b);
            }
        }
    }
}

/// alice, a stranger to bob, invites him to her `#team`, writes, adds carol (her contact) and
/// writes again: bob's request holds a message, a commit and a message.
pub fn a_strangers_group_with_a_change_between(alice: &User, bob: &User, carol: &User) {
    introduce(&[alice, carol]);
    alice.ok(&["group", "create", "team"]);
    alice.ok(&["group", "add", "team", &bob.key]);
    alice.ok(&["send", "#team", "hi all"]);
    alice.ok(&["group", "add", "team", "carol"]);
    alice.ok(&["send", "#team", "carol is here"]);
}

/// A server in a temp dir plus people who ran `init` against it and know each other as
/// contacts: the opening of most scenarios.
pub fn cast<const N: usize>(names: [&str; N]) -> (tempfile::TempDir, ServerProcess, [User; N]) {
    let dir = tempfile::tempdir().expect("temp dir");
    // Restartable, because some scenarios stop the server and start it again on its address.
    let server = ServerProcess::start_restartable(dir.path());
    let users = names.map(|n| User::init(&server, n));
    introduce(&users.iter().collect::<Vec<_>>());
    (dir, server, users)
}

/// Issue 9's terminal attacks in one message from bob: a window title (OSC ... BEL), a screen
/// clear, NUL, bidi overrides and isolates, an 8-bit CSI, a CR that would overwrite the header,
/// and continuation lines that would pass for further messages from bob.
pub const TERMINAL_ATTACK: &str = "see you\x1b]0;title\x07\x1b[2J nul\0 \u{202e}evil\u{2069} \u{9b}2J\rbob: \
     overwritten\nbob: I never said this\n\u{200f}bob: nor this";

/// How a plain printer shows [`TERMINAL_ATTACK`] from bob: every control visible, every
/// continuation indented under `bob: `.
pub const TERMINAL_ATTACK_SHOWN: [&str; 3] = [
    "bob: see you\\x1b]0;title\\x07\\x1b[2J nul\\x00 \\u{202e}evil\\u{2069} \\u{9b}2J\\rbob: overwritten",
    "     bob: I never said this",
    "     \\u{200f}bob: nor this",
];

/// Fails if `out` holds a byte sequence a terminal would obey: ESC, NUL, BEL, CR, any other C0
/// control but LF, DEL, an 8-bit C1 control or a bidi/invisible format codepoint (UTF-8).
pub fn assert_inert(out: &[u8]) {
    for (i, &b) in out.iter().enumerate() {
        assert!(
            b >= 0x20 && b != 0x7f || b == b'\n',
            "control byte {b:#04x} at {i} in {:?}",
            String::from_utf8_lossy(out)
        );
    }
    let text = std::str::from_utf8(out).expect("output is utf-8");
    for c in text.chars() {
        let cp = c as u32;
        let bad = (0x80..=0x9f).contains(&cp)
            || (0x202a..=0x202e).contains(&cp)
            || (0x2066..=0x2069).contains(&cp)
            || [0x200e, 0x200f, 0x061c, 0x200b, 0xfeff].contains(&cp);
        assert!(!bad, "raw U+{cp:04X} in {text:?}");
    }
}

/// Width of the time in front of a printed message (`14:03 ` or `2026-11-29 14:03 `), if `line`
/// starts with one.
pub fn time_width(line: &str) -> Option<usize> {
    let b = line.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    let clock = |at: usize| {
        digits(at..at + 2)
            && b.get(at + 2) == Some(&b':')
            && digits(at + 3..at + 5)
            && b.get(at + 5) == Some(&b' ')
    };
    if clock(0) {
        return Some(6);
    }
    let date =
        digits(0..4) && b.get(4) == Some(&b'-') && digits(5..7) && b.get(7) == Some(&b'-') && digits(8..10);
    (date && b.get(10) == Some(&b' ') && clock(11)).then_some(17)
}

/// Printed messages without their times, for scenarios about what was said (tests/names.rs
/// checks the times): a message's time is cut, and so is the same width of the indentation of
/// its continuation lines.
pub fn untimed(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut width = 0;
    for line in text.split_inclusive('\n') {
        if let Some(w) = time_width(line) {
            width = w;
            out.push_str(&line[w..]);
        } else if width > 0 && line.len() > width && line.as_bytes()[..width].iter().all(|&c| c == b' ') {
            out.push_str(&line[width..]);
        } else {
            width = 0;
            out.push_str(line);
        }
    }
    out
}

/// A TLS verifier that accepts any certificate: for tests that build raw rustls/quinn clients.
#[derive(Debug)]
pub struct AcceptAny;

impl rustls::client::danger::ServerCertVerifier for AcceptAny {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &rustls::pki_types::ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn verify_tls13_signature(
        &self,
        _: &[u8],
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        Ok(rustls::client::danger::HandshakeSignatureValid::assertion())
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        rustls::crypto::aws_lc_rs::default_provider().signature_verification_algorithms.supported_schemes()
    }
}
