//! A throwaway PostgreSQL cluster per test binary, and a fresh database per test.
//!
//! The cluster is initdb'd in a temp dir and served on a free loopback port (TCP only, trust
//! auth). initdb refuses to run as root, so under root it runs as `nobody` (`runuser`), with
//! the dir chowned to it. `postgres` runs under a small shell that waits for its stdin to close:
//! when the test binary exits, however it exits, the pipe closes and the shell stops the
//! server (fast shutdown) and deletes the dir. Binaries: `QPQ_PG_BIN`, else PostgreSQL 15's.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, OnceLock};

/// Where Debian's postgresql-15 puts initdb and postgres.
const DEFAULT_BIN: &str = "/usr/lib/postgresql/15/bin";

/// The unprivileged user the cluster runs as when the tests run as root.
const UNPRIVILEGED: &str = "nobody";

pub struct Cluster {
    pub port: u16,
    bin: PathBuf,
    /// The shell holding postgres; its stdin is the lifeline (see the module docs).
    _keeper: Mutex<Child>,
}

static CLUSTER: OnceLock<Cluster> = OnceLock::new();
static NEXT_DB: AtomicU32 = AtomicU32::new(1);

fn bin_dir() -> PathBuf {
    let dir = std::env::var_os("QPQ_PG_BIN").map(PathBuf::from).unwrap_or_else(|| DEFAULT_BIN.into());
    assert!(
        dir.join("initdb").exists(),
        "no initdb in {}: install postgresql-15 (apt-get install postgresql-15) or set QPQ_PG_BIN",
        dir.display()
    );
    dir
}

fn running_as_root() -> bool {
    std::fs::metadata("/proc/self").map(|m| m.uid() == 0).unwrap_or(false)
}

/// `program args...`, as the unprivileged user when we are root.
fn command(program: &std::path::Path) -> Command {
    if running_as_root() {
        let mut c = Command::new("runuser");
        c.args(["-u", UNPRIVILEGED, "--"]).arg(program);
        c
    } else {
        Command::new(program)
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Cluster {
    /// The cluster of this test binary, started on first use.
    pub fn get() -> &'static Cluster {
        CLUSTER.get_or_init(Cluster::start)
    }

    /// A cluster of the caller's own (a test that changes cluster-wide settings), stopped and
    /// deleted when dropped.
    pub fn private() -> Cluster {
        Cluster::start()
    }

    fn start() -> Cluster {
        let bin = bin_dir();
        // Kept past this function: the keeper shell deletes it when postgres stops.
        let dir = tempfile::Builder::new().prefix("qpq-pg-").tempdir().expect("temp dir").keep();
        let data = dir.join("data");
        if running_as_root() {
            let ok = Command::new("chown").arg(UNPRIVILEGED).arg(&dir).status().expect("chown");
            assert!(ok.success(), "chown {} to {UNPRIVILEGED}", dir.display());
        }
        let out = command(&bin.join("initdb"))
            .args(["--auth=trust", "--username=qpq", "--encoding=UTF8", "--no-sync", "-D"])
            .arg(&data)
            .output()
            .expect("run initdb");
        assert!(out.status.success(), "initdb failed: {}", String::from_utf8_lossy(&out.stderr));
        let port = free_port();
        let script = format!(
            "'{postgres}' -D '{data}' -p {port} -c listen_addresses=127.0.0.1 -c unix_socket_directories= \
             -c max_connections=300 & pid=$!; cat >/dev/null; kill -INT $pid; wait $pid; rm -rf '{dir}'",
            postgres = bin.join("postgres").display(),
            data = data.display(),
            dir = dir.display(),
        );
        let mut keeper = command(std::path::Path::new("/bin/sh"))
            .args(["-c", &script])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start postgres");
        let stderr = keeper.stderr.take().expect("piped stderr");
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut ready = Some(tx);
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if line.contains("ready to accept connections") {
                    if let Some(tx) = ready.take() {
                        let _ = tx.send(Ok(()));
                    }
                } else if (line.contains("FATAL") || line.contains("could not"))
                    && let Some(tx) = ready.as_ref()
                {
                    let _ = tx.send(Err(line.clone()));
                }
            }
        });
        match rx.recv_timeout(super::LINE_TIMEOUT) {
            Ok(Ok(())) => {}
            Ok(Err(line)) => panic!("postgres did not start: {line}"),
            Err(_) => panic!("postgres did not say it was ready"),
        }
        Cluster { port, bin, _keeper: Mutex::new(keeper) }
    }

    /// A new empty database and its URL.
    pub fn fresh_database(&self) -> String {
        let name = format!("qpq_{}_{}", std::process::id(), NEXT_DB.fetch_add(1, Ordering::Relaxed));
        self.psql(&format!("CREATE DATABASE {name}"));
        self.url(&name)
    }

    pub fn url(&self, db: &str) -> String {
        format!("postgres://qpq@127.0.0.1:{}/{db}", self.port)
    }

    /// A connection to `url` named `application_name` that stays open, idle, until the
    /// returned psql's stdin is closed (see [`Cluster::close_idle`]); returns once PostgreSQL
    /// lists it.
    pub fn idle_connection(&self, url: &str, application_name: &str) -> Child {
        let child = Command::new(self.bin.join("psql"))
            .args(["-d", url, "-q"])
            .env("PGAPPNAME", application_name)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .expect("run psql");
        self.wait_for_connections(url, application_name, 1);
        child
    }

    /// Closes a connection of [`Cluster::idle_connection`] and returns once PostgreSQL no
    /// longer lists it.
    pub fn close_idle(&self, url: &str, application_name: &str, mut child: Child) {
        drop(child.stdin.take());
        child.wait().expect("psql exits at the end of its input");
        self.wait_for_connections(url, application_name, 0);
    }

    /// Polls until `n` connections named `application_name` are open in `url`'s database.
    fn wait_for_connections(&self, url: &str, application_name: &str, n: usize) {
        let sql = format!(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = '{application_name}'"
        );
        for _ in 0..1000 {
            if self.query(url, &sql) == n.to_string() {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(10));
        }
        panic!("{application_name}: never {n} connection(s)");
    }

    /// The value(s) one SQL query returns in the database at `url`, unaligned (`psql -At`).
    pub fn query(&self, url: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args(["-d", url, "-v", "ON_ERROR_STOP=1", "-At", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
        String::from_utf8_lossy(&out.stdout).trim().to_string()
    }

    /// Runs one SQL command as the superuser in the `postgres` database.
    pub fn psql(&self, sql: &str) {
        let out = Command::new(self.bin.join("psql"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "qpq", "-d", "postgres"])
            .args(["-v", "ON_ERROR_STOP=1", "-q", "-c", sql])
            .output()
            .expect("run psql");
        assert!(out.status.success(), "psql {sql:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
}
