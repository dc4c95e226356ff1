//! Servers the bench runs as child processes, so what they use (memory, CPU time, context
//! switches) is theirs alone and not shared with the load generator in this process.
//!
//! CPU time is read from `/proc/PID/task/*/schedstat` (nanoseconds on CPU per thread, see
//! `Documentation/scheduler/sched-stats.rst`), summed over the child's threads; where that file is
//! missing, from `utime + stime` of `/proc/PID/stat` in `USER_HZ` ticks (proc(5)). The server's
//! threads (runtime workers, RPC workers, the store writer) live as long as the server, so a
//! difference of two readings is the CPU the server spent in between.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use anyhow::Context as _;

use super::{echo, proc_kib};
use crate::transport::Fingerprint;

/// Ticks per second of `utime`/`stime` in `/proc/PID/stat`: `USER_HZ`, 100 on every Linux ABI.
const USER_HZ: u64 = 100;

/// A child process that dies with the bench: killed on drop.
pub struct ChildServer {
    child: Child,
    pub addr: SocketAddr,
    pub fingerprint: Fingerprint,
    _dir: Option<tempfile::TempDir>,
    /// Exits by itself when its stdin closes (the echo server).
    exits_on_eof: bool,
}

/// What a child has used so far: CPU time and context switches of all its threads.
#[derive(Debug, Clone, Copy)]
pub struct Usage {
    pub cpu_ns: u64,
    pub context_switches: u64,
}

impl ChildServer {
    /// `qpq serve` (this executable) on 127.0.0.1:0 in a fresh temp data dir. Every connection
    /// comes from 127.0.0.1, so the config file lifts the per-address cap (and with it the QUIC
    /// Retry past half of it) that a real server applies; the total cap is the default.
    pub fn serve() -> anyhow::Result<ChildServer> {
        ChildServer::serve_with(&std::env::current_exe()?, "")
    }

    /// `exe serve` like [`ChildServer::serve`], with `extra_config` appended to its config file.
    pub fn serve_with(exe: &Path, extra_config: &str) -> anyhow::Result<ChildServer> {
        let dir = tempfile::Builder::new().prefix("qpq-bench-serve-").tempdir()?;
        std::fs::write(
            dir.path().join(crate::server::config::CONFIG_FILE),
            format!("max_connections_per_ip = {}\n{extra_config}", crate::limits::DEFAULT_MAX_CONNECTIONS),
        )?;
        let mut cmd = Command::new(exe);
        cmd.args(["serve", "--listen", "127.0.0.1:0", "--data-dir"]).arg(dir.path());
        for var in ["QPQ_CONFIG", "QPQ_CERT", "QPQ_KEY"] {
            cmd.env_remove(var);
        }
        ChildServer::spawn(cmd.env("QPQ_LOG", "warn"), Some(dir), false)
    }

    /// `qpq bench --echo-server`, which exits when its stdin closes.
    pub fn echo() -> anyhow::Result<ChildServer> {
        let mut cmd = Command::new(std::env::current_exe()?);
        cmd.args(["bench", "--echo-server"]).env_remove("QPQ_SERVER");
        ChildServer::spawn(&mut cmd, None, true)
    }

    fn spawn(
        cmd: &mut Command,
        dir: Option<tempfile::TempDir>,
        exits_on_eof: bool,
    ) -> anyhow::Result<ChildServer> {
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("cannot start the server child")?;
        let stdout = child.stdout.take().context("child stdout is piped")?;
        let mut stdout = std::io::BufReader::new(stdout);
        let banner = echo::read_child_banner(&mut stdout);
        // Keep draining stdout so the child never blocks on a full pipe.
        std::thread::spawn(move || std::io::copy(&mut stdout, &mut std::io::sink()));
        match banner {
            Ok((addr, fingerprint)) => Ok(ChildServer { child, addr, fingerprint, _dir: dir, exits_on_eof }),
            Err(e) => {
                let _ = child.kill();
                let _ = child.wait();
                Err(e)
            }
        }
    }

    pub fn rss_kib(&self) -> anyhow::Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        proc_kib(&status, "VmRSS:").context("no VmRSS in /proc/PID/status")
    }

    /// CPU time and context switches of every thread of the child so far.
    pub fn usage(&self) -> anyhow::Result<Usage> {
        let proc_dir = PathBuf::from(format!("/proc/{}", self.child.id()));
        let mut schedstat_ns = Some(0u64);
        let mut context_switches = 0u64;
        let tasks = std::fs::read_dir(proc_dir.join("task")).context("cannot list the child's threads")?;
        for task in tasks {
            let task = task?.path();
            // A thread may end between the listing and the read; it then counts for nothing.
            if let Ok(status) = std::fs::read_to_string(task.join("status")) {
                context_switches += proc_count(&status, "voluntary_ctxt_switches:").unwrap_or(0)
                    + proc_count(&status, "nonvoluntary_ctxt_switches:").unwrap_or(0);
            }
            schedstat_ns = match (schedstat_ns, std::fs::read_to_string(task.join("schedstat"))) {
                (Some(sum), Ok(s)) => {
                    s.split_whitespace().next().and_then(|n| n.parse::<u64>().ok()).map(|n| sum + n)
                }
                _ => None,
            };
        }
        let cpu_ns = match schedstat_ns {
            Some(ns) => ns,
            None => stat_cpu_ns(&std::fs::read_to_string(proc_dir.join("stat"))?)?,
        };
        Ok(Usage { cpu_ns, context_switches })
    }
}

/// How long a child that exits when its stdin closes gets to do so (and remove its temp dir)
/// before it is killed.
const EXIT_ON_EOF_GRACE: std::time::Duration = std::time::Duration::from_secs(2);

impl Drop for ChildServer {
    fn drop(&mut self) {
        // The echo child exits when its stdin closes and then removes the temp dir holding its
        // key; killed at once, it left that dir behind on every run.
        if self.exits_on_eof {
            drop(self.child.stdin.take());
            let deadline = std::time::Instant::now() + EXIT_ON_EOF_GRACE;
            while std::time::Instant::now() < deadline {
                match self.child.try_wait() {
                    Ok(Some(_)) | Err(_) => return,
                    Ok(None) => std::thread::sleep(std::time::Duration::from_millis(5)),
                }
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `name:\t123` line of a /proc status file.
fn proc_count(text: &str, name: &str) -> Option<u64> {
    text.lines().find_map(|l| l.strip_prefix(name)).and_then(|r| r.trim().parse().ok())
}

/// `utime + stime` of a `/proc/PID/stat` line, in nanoseconds. The command name (field 2) may
/// hold spaces and parentheses, so fields are counted after its last `)`.
fn stat_cpu_ns(stat: &str) -> anyhow::Result<u64> {
    let rest = stat.rsplit_once(')').map(|(_, r)| r).context("no command name in /proc/PID/stat")?;
    // After the name: field 3 (state) is index 0, utime (field 14) index 11, stime index 12.
    let mut fields = rest.split_whitespace().skip(11);
    let mut tick = || -> anyhow::Result<u64> {
        fields.next().and_then(|f| f.parse().ok()).context("short /proc/PID/stat")
    };
    let ticks = tick()? + tick()?;
    Ok(ticks * (1_000_000_000 / USER_HZ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_cpu_time_is_utime_plus_stime_after_the_name() {
        let line = "42 (qpq (serve) x) S 1 42 42 0 -1 4194560 100 0 0 0 7 3 0 0 20 0 9 0 1 2 3";
        assert_eq!(stat_cpu_ns(line).unwrap(), 10 * 10_000_000);
        assert!(stat_cpu_ns("42 (x) S 1").is_err());
    }

    #[test]
    fn status_counts_are_read_by_name() {
        let s = "voluntary_ctxt_switches:\t12\nnonvoluntary_ctxt_switches:\t3\n";
        assert_eq!(proc_count(s, "voluntary_ctxt_switches:"), Some(12));
        assert_eq!(proc_count(s, "nonvoluntary_ctxt_switches:"), Some(3));
    }
}
