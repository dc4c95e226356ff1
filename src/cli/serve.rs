//! `qpq serve`: flags, signal handling, and the lines an operator (or a test) reads on start.

use std::path::PathBuf;

use clap::Args;

use crate::server::{self, ServerConfig, config::Overrides};

/// Flags of `qpq serve`; each has a `QPQ_*` variable and a `qpq-server.toml` key.
#[derive(Debug, Args, Clone)]
pub struct ServeArgs {
    /// Address to listen on (UDP); port 0 picks a free port [default: 0.0.0.0:7000]
    #[arg(long, env = "QPQ_LISTEN", value_name = "ADDR")]
    pub listen: Option<String>,
    /// Directory for qpq.db, the certificate and qpq-server.toml [default: ~/.local/share/qpq-server]
    #[arg(long, env = "QPQ_DATA_DIR", value_name = "DIR")]
    pub data_dir: Option<PathBuf>,
    /// Config file [default: DATA_DIR/qpq-server.toml if present]
    #[arg(long, env = "QPQ_CONFIG", value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// Operator's own certificate chain (PEM) instead of the generated self-signed one
    #[arg(long, env = "QPQ_CERT", value_name = "FILE", requires = "key")]
    pub cert: Option<PathBuf>,
    /// Private key (PEM) for --cert
    #[arg(long, env = "QPQ_KEY", value_name = "FILE", requires = "cert")]
    pub key: Option<PathBuf>,
    /// Where to keep messages and keys: "redb" (qpq.db in the data dir) or a postgres://USER@HOST:PORT/DB
    /// url shared by several nodes [default: redb]
    #[arg(long, env = "QPQ_STORE", value_name = "STORE", hide_env_values = true)]
    pub store: Option<String>,
}

/// Runs the server until SIGINT/SIGTERM, then shuts down gracefully.
pub fn run(args: ServeArgs) -> anyhow::Result<()> {
    crate::cli::init_logging("info");
    let cfg = ServerConfig::resolve(Overrides {
        listen: args.listen,
        data_dir: args.data_dir,
        config: args.config,
        cert: args.cert,
        key: args.key,
        store: args.store,
    })?;
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        // Handlers are installed here, before the ready line is printed: a SIGTERM that arrives
        // right after "listening on" must find them, not the default action (kill).
        let signals = Signals::install();
        let running = server::start(cfg.clone()).await?;
        let token = running.shutdown_token();
        tokio::spawn(async move {
            signals.wait().await;
            tracing::info!("shutdown requested");
            token.cancel();
        });
        // stdout: what the operator needs; the last line says the server is ready.
        if running.generated_cert() {
            say(format_args!("generated a self-signed certificate in {}", cfg.data_dir.display()));
        }
        say(format_args!("certificate fingerprint {}", running.fingerprint()));
        say(format_args!("data dir {}", cfg.data_dir.display()));
        // Logged before the ready line, so that line is the last one a start prints.
        let policy = if cfg.allow_classical_kx {
            crate::transport::KeyExchange::AllowClassical
        } else {
            crate::transport::KeyExchange::HybridOnly
        };
        let kx = crate::transport::key_exchange_groups(policy).join(", ");
        tracing::info!(addr = %running.local_addr(), tls = "1.3", key_exchange = %kx, "serving");
        say(format_args!("listening on {}", running.local_addr()));
        running.wait().await?;
        tracing::info!("stopped cleanly");
        anyhow::Ok(())
    })
}

/// Prints a start-up line on stdout. A closed stdout (a supervisor that discards it, `| head`)
/// must not stop the server: `println!` would panic there, leaving a half-started process.
fn say(line: std::fmt::Arguments<'_>) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if let Err(e) = writeln!(out, "{line}").and_then(|()| out.flush()) {
        tracing::warn!(error = %e, "cannot print the start-up line {line} on stdout");
    }
}

/// SIGINT and SIGTERM handlers, registered as soon as this value exists.
struct Signals {
    int: std::io::Result<tokio::signal::unix::Signal>,
    term: std::io::Result<tokio::signal::unix::Signal>,
}

impl Signals {
    fn install() -> Signals {
        use tokio::signal::unix::{SignalKind, signal};
        Signals { int: signal(SignalKind::interrupt()), term: signal(SignalKind::terminate()) }
    }

    async fn wait(self) {
        match (self.int, self.term) {
            (Ok(mut int), Ok(mut term)) => {
                tokio::select! {
                    _ = int.recv() => {}
                    _ = term.recv() => {}
                }
            }
            _ => {
                // Without signal handlers we cannot shut down gracefully; wait for ctrl-c at least.
                let _ = tokio::signal::ctrl_c().await;
            }
        }
    }
}
