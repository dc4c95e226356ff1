//! Server settings: command-line flags > `QPQ_*` environment > `qpq-server.toml` > defaults.
//!
//! clap already merges flags with their environment variables; this module layers the optional
//! TOML file (in the data dir, or `--config FILE`) and the defaults under that.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use super::ratelimit::{Rate, RateLimits};
use crate::clock::Clock;
use crate::limits;

/// Name of the optional config file in the data dir.
pub const CONFIG_FILE: &str = "qpq-server.toml";

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "0.0.0.0:7000";

/// Largest config file read.
const MAX_CONFIG_BYTES: u64 = 64 * 1024;

/// Errors resolving the configuration.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("invalid config {path}: {reason}")]
    Parse { path: PathBuf, reason: String },
    #[error("invalid listen address {0:?}: expected HOST:PORT such as 0.0.0.0:7000 or localhost:7000")]
    Listen(String),
    #[error("cannot resolve listen address {0:?}")]
    Resolve(String),
    #[error("invalid setting {name}: {reason}")]
    Invalid { name: &'static str, reason: String },
    #[error("no data dir: pass --data-dir or set QPQ_DATA_DIR (no home directory to default to)")]
    NoDataDir,
    #[error("cert and key must be given together (--cert and --key, or cert and key in the config file)")]
    CertKeyPair,
    #[error("invalid store {0:?}: expected \"redb\" or a postgres://USER@HOST:PORT/DB url")]
    Store(String),
}

/// Where the server keeps its state: `store = ...` in `qpq-server.toml`, `--store`, `QPQ_STORE`.
#[derive(Clone, PartialEq, Eq, Default)]
pub enum StoreLocation {
    /// `qpq.db` in the data dir (the default).
    #[default]
    Redb,
    /// A PostgreSQL database shared by every node of the service (the URL may hold a password).
    Postgres(String),
}

impl StoreLocation {
    pub fn parse(s: &str) -> Result<StoreLocation, ConfigError> {
        let t = s.trim();
        if t.is_empty() || t == "redb" {
            Ok(StoreLocation::Redb)
        } else if t.starts_with("postgres://") || t.starts_with("postgresql://") {
            Ok(StoreLocation::Postgres(t.to_string()))
        } else {
            // Said without the text, which may hold a password.
            Err(ConfigError::Store(t.chars().take_while(|c| *c != ':').collect()))
        }
    }
}

/// Never prints a URL (it may hold a password).
impl std::fmt::Debug for StoreLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            StoreLocation::Redb => f.write_str("Redb"),
            StoreLocation::Postgres(_) => f.write_str("Postgres(..)"),
        }
    }
}

/// The settings as given on the command line or in the environment (all optional).
#[derive(Debug, Default, Clone)]
pub struct Overrides {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub config: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub store: Option<String>,
}

/// `IP:PORT` as is, or `HOST:PORT` through the system resolver (its first answer, the one a
/// client on this machine resolving the same name also tries first). Start-up is synchronous,
/// so the blocking lookup is fine here.
fn resolve_listen(s: &str) -> Result<SocketAddr, ConfigError> {
    if let Ok(a) = s.parse::<SocketAddr>() {
        return Ok(a);
    }
    let Some((host, port)) = s.rsplit_once(':') else { return Err(ConfigError::Listen(s.to_string())) };
    if host.is_empty() || port.parse::<u16>().is_err() {
        return Err(ConfigError::Listen(s.to_string()));
    }
    std::net::ToSocketAddrs::to_socket_addrs(s)
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| ConfigError::Resolve(s.to_string()))
}

/// `qpq-server.toml`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileConfig {
    pub listen: Option<String>,
    pub data_dir: Option<PathBuf>,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    pub store: Option<String>,
    pub max_payload_bytes: Option<usize>,
    pub max_queue_messages: Option<u64>,
    pub max_queue_bytes: Option<u64>,
    pub max_connections: Option<usize>,
    pub max_connections_per_ip: Option<usize>,
    pub message_ttl_secs: Option<u64>,
    pub max_stored_bytes: Option<u64>,
    pub max_key_bytes: Option<u64>,
    pub max_buffered_bytes: Option<usize>,
    pub stall_timeout_ms: Option<u64>,
    pub allow_classical_kx: Option<bool>,
    pub rate_limits: Option<RateLimitsFile>,
}

/// `[rate_limits.*]` tables of `qpq-server.toml`, each `{ per_sec = 200.0, burst = 400 }`.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RateLimitsFile {
    pub enqueue_per_connection: Option<Rate>,
    pub enqueue_per_address: Option<Rate>,
    pub key_package_per_connection: Option<Rate>,
    pub key_package_per_address: Option<Rate>,
    pub key_package_per_target: Option<Rate>,
    pub lookup_per_connection: Option<Rate>,
    pub lookup_per_address: Option<Rate>,
    pub key_upload_per_connection: Option<Rate>,
    pub key_upload_per_address: Option<Rate>,
    pub key_bytes_per_network: Option<Rate>,
    pub enqueue_bytes_per_network: Option<Rate>,
}

/// The resolved settings the server runs with.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub data_dir: PathBuf,
    pub cert: Option<PathBuf>,
    pub key: Option<PathBuf>,
    /// redb in the data dir, or a shared PostgreSQL database.
    pub store: StoreLocation,
    pub max_payload: usize,
    pub max_queue_messages: u64,
    pub max_queue_bytes: u64,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub message_ttl_secs: u64,
    pub max_stored_bytes: u64,
    /// Bytes of key material (KeyPackages, hybrid keys) of all identities together.
    pub max_key_bytes: u64,
    /// Bytes the server buffers for peers at most (unwritten replies, large frames being read).
    pub max_buffered_bytes: usize,
    /// How long a connection may leave replies unread, or take over a large frame.
    pub stall_timeout_ms: u64,
    pub rate_limits: RateLimits,
    /// Accept clients offering only classical X25519 TLS key exchange (default: hybrid only).
    pub allow_classical_kx: bool,
    /// The server's clock ([`Clock::from_env`] for the binary; tests share one and move it).
    pub clock: Clock,
}

impl ServerConfig {
    /// Defaults for a data dir, listening on `listen` (tests use `127.0.0.1:0`).
    pub fn new(data_dir: PathBuf, listen: SocketAddr) -> ServerConfig {
        ServerConfig {
            listen,
            data_dir,
            cert: None,
            key: None,
            store: StoreLocation::Redb,
            max_payload: limits::DEFAULT_MAX_PAYLOAD,
            max_queue_messages: limits::DEFAULT_MAX_QUEUE_MESSAGES,
            max_queue_bytes: limits::DEFAULT_MAX_QUEUE_BYTES,
            max_connections: limits::DEFAULT_MAX_CONNECTIONS,
            max_connections_per_ip: limits::DEFAULT_MAX_CONNECTIONS_PER_IP,
            message_ttl_secs: limits::DEFAULT_MESSAGE_TTL_SECS,
            max_stored_bytes: limits::DEFAULT_MAX_STORED_BYTES,
            max_key_bytes: limits::DEFAULT_MAX_KEY_BYTES,
            max_buffered_bytes: limits::DEFAULT_MAX_BUFFERED_BYTES,
            stall_timeout_ms: limits::DEFAULT_STALL_TIMEOUT_MS,
            rate_limits: RateLimits::default(),
            allow_classical_kx: false,
            clock: Clock::system(),
        }
    }

    /// Resolves flags/env over the config file over defaults.
    pub fn resolve(o: Overrides) -> Result<ServerConfig, ConfigError> {
        let default_dir = || dirs::data_dir().map(|d| d.join("qpq-server"));
        // The file is found via --config, else in the data dir given by flag/env/default.
        let pre_dir = o.data_dir.clone().or_else(default_dir);
        let (file, file_path) = match (&o.config, &pre_dir) {
            (Some(p), _) => (read_file(p)?, Some(p.clone())),
            (None, Some(d)) if d.join(CONFIG_FILE).exists() => {
                let p = d.join(CONFIG_FILE);
                (read_file(&p)?, Some(p))
            }
            _ => (FileConfig::default(), None),
        };
        let base = file_path.as_deref().and_then(Path::parent).map(Path::to_path_buf);
        let rel = |p: PathBuf| match &base {
            Some(b) if p.is_relative() => b.join(p),
            _ => p,
        };
        let data_dir = o
            .data_dir
            .or_else(|| file.data_dir.clone().map(rel))
            .or_else(default_dir)
            .ok_or(ConfigError::NoDataDir)?;
        let listen_s = o.listen.or(file.listen.clone()).unwrap_or_else(|| DEFAULT_LISTEN.to_string());
        let listen = resolve_listen(&listen_s)?;
        let cert = o.cert.or_else(|| file.cert.clone().map(rel));
        let key = o.key.or_else(|| file.key.clone().map(rel));
        if cert.is_some() != key.is_some() {
            return Err(ConfigError::CertKeyPair);
        }
        let mut cfg = ServerConfig::new(data_dir, listen);
        cfg.clock = Clock::from_env();
        cfg.cert = cert;
        cfg.key = key;
        if let Some(s) = o.store.as_deref().or(file.store.as_deref()) {
            cfg.store = StoreLocation::parse(s)?;
        }
        if let Some(v) = file.max_payload_bytes {
            if v == 0 || v > limits::MAX_BATCH_BYTES {
                return Err(ConfigError::Invalid {
                    name: "max_payload_bytes",
                    reason: format!("must be 1..={}", limits::MAX_BATCH_BYTES),
                });
            }
            cfg.max_payload = v;
        }
        if let Some(v) = file.max_queue_messages {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    name: "max_queue_messages",
                    reason: "must be > 0".into(),
                });
            }
            cfg.max_queue_messages = v;
        }
        if let Some(v) = file.max_queue_bytes {
            // A queue must hold at least one message of the largest size accepted (a Welcome
            // can be that large) with its entry's header and longest channel id, or such
            // messages are refused as `queueFull` for ever.
            let extra = (limits::QUEUE_ENTRY_HEADER_BYTES + limits::MAX_CHANNEL_ID_LEN) as u64;
            let least = cfg.max_payload as u64 + extra;
            if v < least {
                return Err(ConfigError::Invalid {
                    name: "max_queue_bytes",
                    reason: format!("must be at least max_payload_bytes + {extra} ({least})"),
                });
            }
            cfg.max_queue_bytes = v;
        }
        if let Some(v) = file.max_connections {
            if v == 0 {
                return Err(ConfigError::Invalid { name: "max_connections", reason: "must be > 0".into() });
            }
            cfg.max_connections = v;
        }
        if let Some(v) = file.max_connections_per_ip {
            if v == 0 {
                return Err(ConfigError::Invalid {
                    name: "max_connections_per_ip",
                    reason: "must be > 0".into(),
                });
            }
            cfg.max_connections_per_ip = v;
        }
        if let Some(v) = file.message_ttl_secs {
            if v == 0 {
                return Err(ConfigError::Invalid { name: "message_ttl_secs", reason: "must be > 0".into() });
            }
            cfg.message_ttl_secs = v;
        }
        if let Some(v) = file.max_stored_bytes {
            if v == 0 {
                return Err(ConfigError::Invalid { name: "max_stored_bytes", reason: "must be > 0".into() });
            }
            cfg.max_stored_bytes = v;
        }
        if let Some(v) = file.max_key_bytes {
            if v == 0 {
                return Err(ConfigError::Invalid { name: "max_key_bytes", reason: "must be > 0".into() });
            }
            cfg.max_key_bytes = v;
        }
        if let Some(v) = file.max_buffered_bytes {
            // One full batch must fit, or it would wait for room forever.
            let least = limits::MAX_BATCH_BYTES;
            if v < least {
                return Err(ConfigError::Invalid {
                    name: "max_buffered_bytes",
                    reason: format!("must be >= {least} (one full batch)"),
                });
            }
            cfg.max_buffered_bytes = v;
        }
        // A fetch holds a message twice (loaded and answered): a largest one must fit.
        let least = cfg.max_payload.saturating_add(limits::FETCH_MESSAGE_OVERHEAD_BYTES).saturating_mul(2);
        if cfg.max_buffered_bytes < least {
            return Err(ConfigError::Invalid {
                name: "max_buffered_bytes",
                reason: format!(
                    "must be >= {least}: 2 x (max_payload_bytes + 64), a largest message loaded and answered"
                ),
            });
        }
        if let Some(v) = file.stall_timeout_ms {
            if v == 0 {
                return Err(ConfigError::Invalid { name: "stall_timeout_ms", reason: "must be > 0".into() });
            }
            cfg.stall_timeout_ms = v;
        }
        if let Some(v) = file.allow_classical_kx {
            cfg.allow_classical_kx = v;
        }
        if let Some(r) = &file.rate_limits {
            let set = |name: &'static str, given: Option<Rate>, into: &mut Rate| match given {
                Some(rate) => match rate.invalid() {
                    Some(reason) => Err(ConfigError::Invalid { name, reason }),
                    None => {
                        *into = rate;
                        Ok(())
                    }
                },
                None => Ok(()),
            };
            let l = &mut cfg.rate_limits;
            set(
                "rate_limits.enqueue_per_connection",
                r.enqueue_per_connection,
                &mut l.enqueue_per_connection,
            )?;
            set("rate_limits.enqueue_per_address", r.enqueue_per_address, &mut l.enqueue_per_address)?;
            set(
                "rate_limits.key_package_per_connection",
                r.key_package_per_connection,
                &mut l.key_package_per_connection,
            )?;
            set(
                "rate_limits.key_package_per_address",
                r.key_package_per_address,
                &mut l.key_package_per_address,
            )?;
            set(
                "rate_limits.key_package_per_target",
                r.key_package_per_target,
                &mut l.key_package_per_target,
            )?;
            set("rate_limits.lookup_per_connection", r.lookup_per_connection, &mut l.lookup_per_connection)?;
            set("rate_limits.lookup_per_address", r.lookup_per_address, &mut l.lookup_per_address)?;
            set(
                "rate_limits.key_upload_per_connection",
                r.key_upload_per_connection,
                &mut l.key_upload_per_connection,
            )?;
            set(
                "rate_limits.key_upload_per_address",
                r.key_upload_per_address,
                &mut l.key_upload_per_address,
            )?;
            set("rate_limits.key_bytes_per_network", r.key_bytes_per_network, &mut l.key_bytes_per_network)?;
            set(
                "rate_limits.enqueue_bytes_per_network",
                r.enqueue_bytes_per_network,
                &mut l.enqueue_bytes_per_network,
            )?;
        }
        cfg.clock = Clock::from_env();
        Ok(cfg)
    }
}

fn read_file(path: &Path) -> Result<FileConfig, ConfigError> {
    let bytes = crate::fsutil::read_bounded(path, MAX_CONFIG_BYTES)
        .map_err(|source| ConfigError::Read { path: path.to_path_buf(), source })?;
    let text = String::from_utf8(bytes)
        .map_err(|_| ConfigError::Parse { path: path.to_path_buf(), reason: "not utf-8".into() })?;
    toml::from_str(&text)
        .map_err(|e| ConfigError::Parse { path: path.to_path_buf(), reason: toml_reason(&text, &e) })
}

/// A TOML error on one line, with where it is: `line 3 (max_queue_bytes): invalid type: string
/// "x", expected u64`. (toml's own rendering spans several lines with a caret.) Only the key is
/// named, never the value: `store`'s may hold the database's password.
fn toml_reason(text: &str, e: &toml::de::Error) -> String {
    let Some(start) = e.span().map(|s| s.start) else { return e.message().to_string() };
    let before = text.get(..start).unwrap_or(text);
    let number = before.matches('\n').count() + 1;
    let line = text.lines().nth(number - 1).unwrap_or("");
    match line.split_once('=') {
        Some((key, _)) => {
            let key: String = key.trim().chars().take(64).collect();
            format!("line {number} ({key}): {}", e.message())
        }
        None => format!("line {number}: {}", e.message()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Found by exploratory testing: "duplicate key" and "invalid type: ..." named neither the
    /// key nor the line.
    #[test]
    fn a_bad_config_file_names_the_line() {
        let dir = tempfile::tempdir().unwrap();
        let reason = |text: &str| {
            let path = dir.path().join(CONFIG_FILE);
            std::fs::write(&path, text).unwrap();
            match read_file(&path) {
                Err(ConfigError::Parse { reason, .. }) => reason,
                other => panic!("{text:?}: {:?}", other.map(|_| ())),
            }
        };
        assert_eq!(
            reason("listen = \"127.0.0.1:7000\"\nmax_queue_bytes = \"x\"\n"),
            "line 2 (max_queue_bytes): invalid type: string \"x\", expected u64"
        );
        let dup = reason("[rate_limits]\nenqueue_per_connection = 1\nenqueue_per_connection = 2\n");
        assert!(dup.starts_with("line 3 (enqueue_per_connection): duplicate key"), "{dup}");
        // Review: the line's value was shown, and a store URL holds the database's password.
        let store = reason("store = \"postgres://qpq:s3cret@db:5432/qpq\nlisten = 1\n");
        assert!(!store.contains("s3cret"), "{store}");
        let bare = reason("store = postgres://qpq:s3cret@db:5432/qpq\n");
        assert!(!bare.contains("s3cret") && bare.starts_with("line 1 (store): "), "{bare}");
    }

    #[test]
    fn flags_override_file_which_overrides_defaults() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "listen = \"127.0.0.1:9999\"\nmax_payload_bytes = 1000\nmessage_ttl_secs = 60\n",
        )
        .unwrap();
        let from_file = ServerConfig::resolve(Overrides {
            data_dir: Some(dir.path().to_path_buf()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(from_file.listen.port(), 9999);
        assert_eq!(from_file.max_payload, 1000);
        assert_eq!(from_file.message_ttl_secs, 60);
        assert_eq!(from_file.max_queue_messages, limits::DEFAULT_MAX_QUEUE_MESSAGES);

        let flagged = ServerConfig::resolve(Overrides {
            data_dir: Some(dir.path().to_path_buf()),
            listen: Some("127.0.0.1:0".into()),
            ..Default::default()
        })
        .unwrap();
        assert_eq!(flagged.listen.port(), 0);
        assert_eq!(flagged.max_payload, 1000);
    }

    #[test]
    fn rate_limits_and_the_storage_quota_come_from_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(
            &p,
            "max_stored_bytes = 1000\nmax_key_bytes = 2000\n[rate_limits]\nkey_package_per_target = { per_sec = 0.5, burst = 4 }\nkey_bytes_per_network = { per_sec = 10.0, burst = 5000 }\n",
        )
        .unwrap();
        let cfg = ServerConfig::resolve(Overrides { config: Some(p.clone()), ..Default::default() }).unwrap();
        assert_eq!(cfg.max_stored_bytes, 1000);
        assert_eq!(cfg.max_key_bytes, 2000);
        assert_eq!(cfg.rate_limits.key_package_per_target, Rate { per_sec: 0.5, burst: 4 });
        assert_eq!(cfg.rate_limits.key_bytes_per_network, Rate { per_sec: 10.0, burst: 5000 });
        assert_eq!(cfg.rate_limits.enqueue_per_address, limits::DEFAULT_ENQUEUE_RATE_PER_ADDRESS);
        std::fs::write(&p, "[rate_limits]\nenqueue_per_address = { per_sec = 0.0, burst = 4 }\n").unwrap();
        let e = ServerConfig::resolve(Overrides { config: Some(p), ..Default::default() }).unwrap_err();
        assert!(e.to_string().starts_with("invalid setting rate_limits.enqueue_per_address: per_sec"), "{e}");
    }

    #[test]
    fn the_memory_budget_must_hold_a_largest_message_loaded_and_answered() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "max_payload_bytes = 16777216\nmax_buffered_bytes = 33554432\n").unwrap();
        let e =
            ServerConfig::resolve(Overrides { config: Some(p.clone()), ..Default::default() }).unwrap_err();
        assert!(e.to_string().starts_with("invalid setting max_buffered_bytes: must be >= 33554560"), "{e}");
        std::fs::write(&p, "max_payload_bytes = 16777216\nmax_buffered_bytes = 33554560\n").unwrap();
        ServerConfig::resolve(Overrides { config: Some(p), ..Default::default() }).unwrap();
    }

    #[test]
    fn the_memory_budget_and_stall_timeout_come_from_the_file_and_are_checked() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let resolve = |text: &str| {
            std::fs::write(&p, text).unwrap();
            ServerConfig::resolve(Overrides { config: Some(p.clone()), ..Default::default() })
        };
        let cfg = resolve("max_buffered_bytes = 33554432\nstall_timeout_ms = 500\n").unwrap();
        assert_eq!((cfg.max_buffered_bytes, cfg.stall_timeout_ms), (32 << 20, 500));
        let cfg = resolve("").unwrap();
        assert_eq!(cfg.max_buffered_bytes, limits::DEFAULT_MAX_BUFFERED_BYTES);
        assert_eq!(cfg.stall_timeout_ms, limits::DEFAULT_STALL_TIMEOUT_MS);
        let e = resolve("max_buffered_bytes = 1000\n").unwrap_err().to_string();
        assert_eq!(e, "invalid setting max_buffered_bytes: must be >= 16777216 (one full batch)");
        let e = resolve("stall_timeout_ms = 0\n").unwrap_err().to_string();
        assert_eq!(e, "invalid setting stall_timeout_ms: must be > 0");
    }

    /// Review: a zero queue cap, or a queue smaller than the largest message accepted, made
    /// every enqueue (or every large Welcome) `queueFull` for ever. Both are refused at start.
    #[test]
    fn queue_caps_that_refuse_every_message_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        let resolve = |text: &str| {
            std::fs::write(&p, text).unwrap();
            ServerConfig::resolve(Overrides { config: Some(p.clone()), ..Default::default() })
        };
        let e = resolve("max_queue_messages = 0\n").unwrap_err().to_string();
        assert_eq!(e, "invalid setting max_queue_messages: must be > 0");
        // The largest payload counts with its entry's header and the longest channel id.
        let e = resolve("max_payload_bytes = 2000\nmax_queue_bytes = 2080\n").unwrap_err().to_string();
        assert_eq!(e, "invalid setting max_queue_bytes: must be at least max_payload_bytes + 81 (2081)");
        let cfg =
            resolve("max_payload_bytes = 2000\nmax_queue_bytes = 2081\nmax_queue_messages = 1\n").unwrap();
        assert_eq!((cfg.max_queue_bytes, cfg.max_queue_messages), (2081, 1));
    }

    #[test]
    fn bad_config_files_are_clear_errors() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.toml");
        std::fs::write(&p, "lisen = \"x\"\n").unwrap();
        let e = ServerConfig::resolve(Overrides { config: Some(p.clone()), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.contains("unknown field"), "{e}");
        std::fs::write(&p, "listen = \"nope\"\n").unwrap();
        let e = ServerConfig::resolve(Overrides { config: Some(p), ..Default::default() })
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("invalid listen address"), "{e}");
    }
}
