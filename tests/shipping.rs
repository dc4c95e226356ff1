//! Shipping qpq (issue 5): checked-in man pages, completions, `--version`, the README's quick
//! start run end to end with the real binary, install.sh, and .ci/run.

mod common;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};

const QPQ: &str = env!("CARGO_BIN_EXE_qpq");

fn repo() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn qpq(args: &[&str]) -> Output {
    Command::new(QPQ).args(args).output().expect("run qpq")
}

fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// `*.1` files of a directory, by name.
fn man_pages(dir: &Path) -> BTreeMap<String, Vec<u8>> {
    let mut pages = BTreeMap::new();
    for entry in std::fs::read_dir(dir).unwrap_or_else(|e| panic!("read {}: {e}", dir.display())) {
        let path = entry.expect("dir entry").path();
        if path.extension().is_some_and(|x| x == "1") {
            let name = path.file_name().expect("file name").to_string_lossy().into_owned();
            pages.insert(name, std::fs::read(&path).expect("read page"));
        }
    }
    pages
}

#[test]
fn checked_in_man_pages_match_the_clap_definitions() {
    let fresh = tempfile::tempdir().unwrap();
    let written = qpq::cli::write_man_pages(fresh.path()).expect("render man pages");
    assert!(written.len() > 10, "expected qpq.1 and a page per subcommand, got {written:?}");
    let want = man_pages(fresh.path());
    let have = man_pages(&repo().join("man"));
    let regenerate = "regenerate them with: rm -f man/*.1 && cargo run -- man man/";
    let missing: Vec<_> = want.keys().filter(|k| !have.contains_key(*k)).collect();
    let extra: Vec<_> = have.keys().filter(|k| !want.contains_key(*k)).collect();
    let stale: Vec<_> =
        want.iter().filter(|(k, v)| have.get(*k).is_some_and(|h| h != *v)).map(|(k, _)| k).collect();
    assert!(
        missing.is_empty() && extra.is_empty() && stale.is_empty(),
        "man/ is out of date (missing {missing:?}, extra {extra:?}, differing {stale:?}); {regenerate}"
    );
    for name in ["qpq.1", "qpq-serve.1", "qpq-send.1", "qpq-recv.1", "qpq-group-add.1", "qpq-contact-add.1"] {
        assert!(want.contains_key(name), "no {name} among {:?}", want.keys());
    }
    assert!(!want.contains_key("qpq-man.1"), "the hidden man command got a page");
}

#[test]
fn man_pages_name_only_the_crate_version_and_no_date() {
    let dir = tempfile::tempdir().unwrap();
    qpq::cli::write_man_pages(dir.path()).unwrap();
    let page = std::fs::read_to_string(dir.path().join("qpq-send.1")).unwrap();
    let th = page.lines().find(|l| l.starts_with(".TH ")).expect(".TH line");
    assert_eq!(th, format!(".TH qpq-send 1  \"qpq {}\" ", env!("CARGO_PKG_VERSION")));
    // Built from the root: global options are listed and the synopsis names the real command.
    assert!(page.contains("\\fBqpq send\\fR"), "{page}");
    assert!(page.contains("\\fBQPQ_SERVER\\fR environment variable"), "{page}");
    let commit = qpq::cli::VERSION.split(['(', ')']).nth(1).expect("commit in VERSION");
    assert!(!page.contains(commit), "the page names the commit {commit}");
    let again = tempfile::tempdir().unwrap();
    qpq::cli::write_man_pages(again.path()).unwrap();
    assert_eq!(man_pages(dir.path()), man_pages(again.path()), "rendering is not deterministic");
}

#[test]
fn completions_for_each_shell_register_qpq_which_completes_its_subcommands() {
    for shell in ["bash", "zsh", "fish"] {
        let out = qpq(&["completions", shell]);
        assert!(out.status.success(), "{shell}: {}", text(&out.stderr));
        let script = text(&out.stdout);
        assert!(script.len() > 100, "{shell}: suspiciously short script:\n{script}");
        // The script calls back into qpq at each TAB (dynamic completion, issue 10 item 12).
        assert!(script.contains("COMPLETE") && script.contains(shell) && script.contains("qpq"), "{script}");
    }
    let out = Command::new(QPQ).args(["--", "qpq", ""]).env("COMPLETE", "fish").output().unwrap();
    let words = text(&out.stdout);
    for word in ["send", "recv", "group", "contact", "server", "--server-fingerprint"] {
        assert!(words.lines().any(|l| l.starts_with(word)), "completing `qpq ` lacks {word}:\n{words}");
    }
}

#[test]
fn version_prints_the_crate_version_and_the_commit() {
    let out = qpq(&["--version"]);
    assert!(out.status.success());
    let line = text(&out.stdout);
    let line = line.trim_end();
    let rest = line
        .strip_prefix(&format!("qpq {} (", env!("CARGO_PKG_VERSION")))
        .unwrap_or_else(|| panic!("unexpected --version output {line:?}"));
    let commit = rest.strip_suffix(')').unwrap_or_else(|| panic!("no closing paren in {line:?}"));
    assert!(
        commit == "unknown" || (commit.len() == 12 && commit.bytes().all(|b| b.is_ascii_hexdigit())),
        "commit {commit:?} is neither 12 hex digits nor unknown"
    );
}

/// The ```sh block after the HTML comment `marker` in README.md.
fn readme_block(readme: &str, marker: &str) -> String {
    let after = readme.split_once(marker).unwrap_or_else(|| panic!("README.md has no {marker}")).1;
    let fence =
        after.trim_start().strip_prefix("```sh\n").unwrap_or_else(|| panic!("no ```sh fence after {marker}"));
    let end = fence.find("\n```").unwrap_or_else(|| panic!("unclosed block after {marker}"));
    fence[..end + 1].to_string()
}

fn readme() -> String {
    std::fs::read_to_string(repo().join("README.md")).expect("README.md")
}

/// A `qpq serve` child, its stdout read up to `listening on ADDR`.
struct Server {
    child: Child,
    addr: String,
    fingerprint: String,
}

impl Server {
    fn start(cmd: &mut Command) -> Server {
        let mut child = cmd.stdout(Stdio::piped()).stderr(Stdio::inherit()).spawn().expect("spawn server");
        let mut lines = common::Lines::of(child.stdout.take().expect("stdout"));
        let mut fingerprint = None;
        let addr = loop {
            let line = lines.next_line().expect("server printed `listening on`");
            if let Some(f) = line.strip_prefix("certificate fingerprint ") {
                fingerprint = Some(f.to_string());
            }
            if let Some(a) = line.strip_prefix("listening on ") {
                break a.to_string();
            }
        };
        // `lines`' thread keeps draining stdout.
        Server { child, addr, fingerprint: fingerprint.expect("fingerprint printed before listening") }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Runs the README's server and two-person quick start as written, with `qpq` (on PATH) being
/// the binary under test, the server on 127.0.0.1:0 and everything in a temp dir.
#[test]
fn readme_quickstart_runs_end_to_end() {
    let readme = readme();
    let tmp = tempfile::tempdir().unwrap();
    let bin = tmp.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::os::unix::fs::symlink(QPQ, bin.join("qpq")).unwrap();

    let server_block = readme_block(&readme, "<!-- quickstart:server -->");
    let serve = server_block
        .lines()
        .find_map(|l| l.trim().strip_prefix("cargo run --release -- "))
        .unwrap_or_else(|| panic!("no `cargo run --release -- ...` in the server block:\n{server_block}"));
    let serve_args = shell_words::split(serve).expect("shell words");
    assert_eq!(serve_args.first().map(String::as_str), Some("serve"));
    let data_dir = tmp.path().join("server");
    let server = Server::start(
        Command::new(QPQ)
            .args(&serve_args)
            .args(["--listen", "127.0.0.1:0", "--data-dir"])
            .arg(&data_dir)
            .env_remove("QPQ_CONFIG")
            .env("QPQ_LOG", "warn"),
    );
    assert!(server.fingerprint.starts_with("sha256:"), "{}", server.fingerprint);

    let users_block = readme_block(&readme, "<!-- quickstart:users -->");
    assert!(users_block.contains("recv"), "the users block receives nothing:\n{users_block}");
    let path = format!("{}:{}", bin.display(), std::env::var("PATH").unwrap_or_default());
    let work = tmp.path().join("work");
    std::fs::create_dir(&work).unwrap();
    let out = Command::new("sh")
        .args(["-eux", "-c", &users_block])
        .current_dir(&work)
        .env("PATH", path)
        .env("SERVER", &server.addr)
        .env("QPQ_PASSPHRASE", "correct horse battery staple")
        .env("HOME", tmp.path())
        .env("XDG_DATA_HOME", tmp.path().join("xdg"))
        .env_remove("QPQ_HOME")
        .env_remove("QPQ_SERVER")
        .env_remove("QPQ_SERVER_FINGERPRINT")
        .stdin(Stdio::null())
        .output()
        .expect("run sh");
    let (stdout, stderr) = (text(&out.stdout), text(&out.stderr));
    assert!(out.status.success(), "quick start failed\nstdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    // init prints each person's key; recv prints the message, as the block's comment says.
    assert_eq!(lines.len(), 3, "stdout:\n{stdout}\nstderr:\n{stderr}");
    for key in &lines[..2] {
        assert!(key.len() == 64 && key.bytes().all(|b| b.is_ascii_hexdigit()), "not a key: {key:?}");
    }
    assert_eq!(common::time_width(lines[2]), Some(6), "a time first: {:?}", lines[2]);
    assert_eq!(common::untimed(lines[2]), "alice: hello bob", "stderr:\n{stderr}");
    assert!(users_block.contains("# prints: 14:03 alice: hello bob"));
    // Both pinned the certificate the server printed, as the README tells them to compare.
    let pinned = format!("pinned server certificate {} (trust on first use)", server.fingerprint);
    assert_eq!(stderr.matches(&pinned).count(), 2, "stderr:\n{stderr}");
    assert!(work.join("alice").join("qpq.db").is_file());
    assert!(!tmp.path().join("xdg").exists(), "something used the default home");
}

/// The README's `qpq-server.toml` is accepted as written and states the real defaults.
#[test]
fn readme_config_example_parses_and_shows_the_defaults() {
    use qpq::limits;
    use qpq::server::config::{DEFAULT_LISTEN, Overrides, ServerConfig};
    let readme = readme();
    let start = readme.find("```toml\n").expect("a ```toml block in README.md") + "```toml\n".len();
    let example = &readme[start..start + readme[start..].find("```").expect("closed block")];
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("qpq-server.toml");
    std::fs::write(&path, example).unwrap();
    let cfg = ServerConfig::resolve(Overrides { config: Some(path), ..Default::default() })
        .unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert_eq!(cfg.listen.to_string(), DEFAULT_LISTEN);
    assert_eq!(cfg.data_dir, Path::new("/var/lib/qpq"));
    assert_eq!(cfg.max_payload, limits::DEFAULT_MAX_PAYLOAD);
    assert_eq!(cfg.max_queue_messages, limits::DEFAULT_MAX_QUEUE_MESSAGES);
    assert_eq!(cfg.max_queue_bytes, limits::DEFAULT_MAX_QUEUE_BYTES);
    assert_eq!(cfg.message_ttl_secs, limits::DEFAULT_MESSAGE_TTL_SECS);
    assert_eq!(cfg.max_connections, limits::DEFAULT_MAX_CONNECTIONS);
    assert_eq!(cfg.max_connections_per_ip, limits::DEFAULT_MAX_CONNECTIONS_PER_IP);
    assert_eq!(cfg.max_stored_bytes, limits::DEFAULT_MAX_STORED_BYTES);
    assert_eq!(cfg.max_key_bytes, limits::DEFAULT_MAX_KEY_BYTES);
    assert!(example.contains(&format!("(1 ..= {})", limits::MAX_BATCH_BYTES)), "{example}");
    assert_eq!(cfg.rate_limits, qpq::server::ratelimit::RateLimits::default(), "every rate, as the defaults");
}

#[test]
fn ci_runs_exactly_the_readme_test_command() {
    let command = readme_block(&readme(), "<!-- test-command -->");
    assert_eq!(command, "cargo test --locked\n");
    let ci = std::fs::read_to_string(repo().join(".ci/run")).expect(".ci/run");
    assert!(ci.starts_with("#!/usr/bin/env bash\n"), "{ci}");
    assert!(ci.contains("\nset -euo pipefail\n"), "{ci}");
    // The README's command is the first command .ci/run runs, after installing the PostgreSQL
    // binaries the README names (and showing the free disk space); the fuzz smoke run follows it.
    let first = ci
        .lines()
        .find(|l| {
            !l.trim().is_empty()
                && !l.starts_with('#')
                && !l.starts_with("set ")
                && !l.starts_with("cd ")
                && !l.starts_with("df ")
                && *l != "scripts/ensure-postgres"
        })
        .unwrap_or("");
    assert_eq!(first, command.trim_end(), "the first command of .ci/run");
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(repo().join(".ci/run")).unwrap().permissions().mode();
    assert_eq!(mode & 0o111, 0o111, ".ci/run is not executable: {mode:o}");
}

fn install_sh(prefix: &Path, args: &[&str]) -> Output {
    let out = Command::new(repo().join("install.sh"))
        .args(args)
        .env("PREFIX", prefix)
        .env_remove("SYSTEMD_DIR")
        .output()
        .expect("run install.sh");
    assert!(
        out.status.success(),
        "install.sh {args:?} failed\nstdout:\n{}\nstderr:\n{}",
        text(&out.stdout),
        text(&out.stderr)
    );
    out
}

/// Every file (not directory) under `dir`, relative to it.
fn files_under(dir: &Path) -> Vec<String> {
    fn walk(base: &Path, dir: &Path, out: &mut Vec<String>) {
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.is_dir() {
                walk(base, &path, out);
            } else {
                out.push(path.strip_prefix(base).unwrap().display().to_string());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, dir, &mut out);
    out.sort();
    out
}

#[test]
fn install_sh_help_exits_zero_and_mentions_uninstall() {
    let out = Command::new(repo().join("install.sh")).arg("--help").output().unwrap();
    assert!(out.status.success());
    let help = text(&out.stdout);
    for word in ["--uninstall", "--binary", "--systemd", "PREFIX"] {
        assert!(help.contains(word), "help does not mention {word}:\n{help}");
    }
    let out = Command::new(repo().join("install.sh")).arg("--bogus").output().unwrap();
    assert!(!out.status.success());
    assert_eq!(text(&out.stderr), "install.sh: unknown option --bogus (see --help)\n");
}

#[test]
fn install_sh_installs_twice_and_uninstalls_exactly_what_it_installed() {
    let prefix = tempfile::tempdir().unwrap();
    let p = prefix.path();
    install_sh(p, &["--binary", QPQ]);
    let first = files_under(p);
    let expected = [
        "bin/qpq",
        "share/bash-completion/completions/qpq",
        "share/fish/vendor_completions.d/qpq.fish",
        "share/man/man1/qpq-send.1",
        "share/man/man1/qpq.1",
        "share/qpq/install-manifest",
        "share/zsh/site-functions/_qpq",
    ];
    for f in expected {
        assert!(first.contains(&f.to_string()), "{f} not installed; got {first:?}");
    }
    let pages = first.iter().filter(|f| f.starts_with("share/man/man1/")).count();
    assert_eq!(pages, man_pages(&repo().join("man")).len(), "{first:?}");
    let version = Command::new(p.join("bin/qpq")).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(text(&version.stdout).starts_with(&format!("qpq {} (", env!("CARGO_PKG_VERSION"))));
    let completion = std::fs::read_to_string(p.join("share/bash-completion/completions/qpq")).unwrap();
    assert_eq!(completion, text(&qpq(&["completions", "bash"]).stdout));
    let manifest = std::fs::read_to_string(p.join("share/qpq/install-manifest")).unwrap();
    assert_eq!(manifest.lines().count(), first.len() - 1, "manifest:\n{manifest}");

    // A second run over the first changes nothing.
    install_sh(p, &["--binary", QPQ]);
    assert_eq!(files_under(p), first);
    assert_eq!(std::fs::read_to_string(p.join("share/qpq/install-manifest")).unwrap(), manifest);

    // A file it did not install survives the uninstall.
    std::fs::write(p.join("share/man/man1/other.1"), "not ours").unwrap();
    let out = install_sh(p, &["--uninstall"]);
    assert!(
        text(&out.stdout).contains(&format!("removed {} files", first.len() - 1)),
        "{}",
        text(&out.stdout)
    );
    assert_eq!(files_under(p), ["share/man/man1/other.1"]);
    assert!(!p.join("share/qpq").exists());
}

#[test]
fn install_sh_systemd_writes_the_hardened_unit_and_uninstall_removes_it() {
    let prefix = tempfile::tempdir().unwrap();
    let units = tempfile::tempdir().unwrap();
    let p = prefix.path();
    let out = Command::new(repo().join("install.sh"))
        .args(["--binary", QPQ, "--systemd", "--no-user"])
        .env("PREFIX", p)
        .env("SYSTEMD_DIR", units.path())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    let unit = std::fs::read_to_string(units.path().join("qpq.service")).expect("unit installed");
    let lines: Vec<&str> = unit.lines().collect();
    let exec = format!("ExecStart={}/bin/qpq serve", p.display());
    for want in [
        exec.as_str(),
        "User=qpq",
        "StateDirectory=qpq",
        "Environment=QPQ_DATA_DIR=/var/lib/qpq",
        "Environment=NO_COLOR=1",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "PrivateDevices=yes",
        "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
        "CapabilityBoundingSet=",
        "MemoryDenyWriteExecute=yes",
        "LockPersonality=yes",
        "SystemCallFilter=@system-service",
        "Restart=on-failure",
        "KillSignal=SIGTERM",
        "WantedBy=multi-user.target",
    ] {
        assert!(lines.contains(&want), "unit lacks {want:?}:\n{unit}");
    }
    assert!(!unit.contains("@BINDIR@"), "placeholder left:\n{unit}");
    let manifest = std::fs::read_to_string(p.join("share/qpq/install-manifest")).unwrap();
    assert!(!manifest.contains("user "), "--no-user created a user:\n{manifest}");

    // Reinstalling without --systemd keeps the unit listed, so uninstall still removes it.
    install_sh(p, &["--binary", QPQ]);
    assert!(units.path().join("qpq.service").is_file());
    let out = Command::new(repo().join("install.sh")).arg("--uninstall").env("PREFIX", p).output().unwrap();
    assert!(out.status.success(), "{}", text(&out.stderr));
    assert!(files_under(units.path()).is_empty(), "{:?}", files_under(units.path()));
    assert!(files_under(p).is_empty(), "{:?}", files_under(p));
}

/// Runs install.sh with CARGO set to a stand-in that records its arguments and RUSTFLAGS, then
/// puts the real test binary where cargo would have written it: what install.sh asks of cargo,
/// without a release build. Returns the recorded call.
fn install_sh_with_recording_cargo(args: &[&str]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let (prefix, target, log) =
        (dir.path().join("prefix"), dir.path().join("target"), dir.path().join("log"));
    let fake = dir.path().join("cargo");
    std::fs::write(
        &fake,
        format!(
            "#!/bin/sh\nprintf 'RUSTFLAGS=%s\\nARGS=%s\\n' \"$RUSTFLAGS\" \"$*\" >'{log}'\n\
             sub=release\n\
             while [ $# -gt 0 ]; do [ \"$1\" = --target ] && sub=\"$2/release\"; shift; done\n\
             mkdir -p \"$CARGO_TARGET_DIR/$sub\" && cp '{qpq}' \"$CARGO_TARGET_DIR/$sub/qpq\"\n",
            log = log.display(),
            qpq = QPQ,
        ),
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).unwrap();
    let out = Command::new(repo().join("install.sh"))
        .args(args)
        .env("PREFIX", &prefix)
        .env("CARGO", &fake)
        .env("CARGO_TARGET_DIR", &target)
        .env_remove("RUSTFLAGS")
        .env_remove("SYSTEMD_DIR")
        .output()
        .expect("run install.sh");
    assert!(out.status.success(), "install.sh {args:?}: {}", text(&out.stderr));
    assert!(prefix.join("bin/qpq").exists());
    std::fs::read_to_string(&log).expect("cargo was called")
}

#[test]
fn install_sh_builds_a_static_binary_by_default_and_a_dynamic_one_when_asked() {
    let host = text(&Command::new("rustc").arg("-vV").output().expect("rustc -vV").stdout)
        .lines()
        .find_map(|l| l.strip_prefix("host: ").map(str::to_string))
        .expect("host line");
    let call = install_sh_with_recording_cargo(&[]);
    assert!(call.contains("RUSTFLAGS=-C target-feature=+crt-static\n"), "{call}");
    assert!(call.contains(&format!("--release --locked --target {host} ")), "{call}");
    let call = install_sh_with_recording_cargo(&["--dynamic"]);
    assert!(call.contains("RUSTFLAGS=\n"), "{call}");
    assert!(!call.contains("--target"), "{call}");
}
