//! `qpq bench --quick --json`, run as the real binary: every scenario reports positive figures,
//! each next to a positive reference. Nothing here compares a time with a threshold: the figures
//! only have to exist and make sense.

use std::process::Command;

use serde_json::Value;

const SCENARIOS: [&str; 5] = ["transport", "delivery", "mls", "fanout", "connections"];

fn positive(v: &Value) -> bool {
    v.as_f64().is_some_and(|x| x.is_finite() && x > 0.0)
}

#[test]
fn quick_bench_reports_every_scenario_against_a_reference() {
    // Its own temp dir: everything the bench (and its children) made there must be gone after.
    let tmp = tempfile::tempdir().expect("temp dir");
    let out = Command::new(env!("CARGO_BIN_EXE_qpq"))
        .args(["bench", "--quick", "--json", "--duration-ms", "80", "--connections", "8"])
        .env_remove("QPQ_SERVER")
        .env_remove("QPQ_SERVER_FINGERPRINT")
        .env("QPQ_LOG", "warn")
        .env("TMPDIR", tmp.path())
        .output()
        .expect("run qpq bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qpq bench failed: {stderr}");
    // The echo server child, killed at once, left its certificate dir behind on every run.
    let left: Vec<_> = std::fs::read_dir(tmp.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
    assert!(left.is_empty(), "the bench left {left:?} in its temp dir");
    let report: Value = serde_json::from_slice(&out.stdout).expect("stdout is one json document");

    assert_eq!(report["server"], "in-process");
    assert!(report["machine"]["cpus"].as_u64().is_some_and(|n| n >= 1));
    for name in SCENARIOS {
        let rows = report["scenarios"][name].as_array().unwrap_or_else(|| panic!("no {name} scenario"));
        assert!(!rows.is_empty(), "{name} has no rows");
        for row in rows {
            let case = row["case"].as_str().unwrap_or("?");
            assert!(positive(&row["value"]), "{name} / {case}: value {}", row["value"]);
            assert!(
                !row["reference"].as_str().unwrap_or("").is_empty(),
                "{name} / {case}: no reference named"
            );
            // RSS grows in whole pages, so with 8 connections the bare server's slope may be 0.
            if case.starts_with("server RSS") {
                continue;
            }
            assert!(
                positive(&row["reference_value"]),
                "{name} / {case}: reference {}",
                row["reference_value"]
            );
            assert!(positive(&row["ratio"]), "{name} / {case}: ratio {}", row["ratio"]);
        }
    }
    // The group-commit figure needs the in-process store's counter.
    let delivery = report["scenarios"]["delivery"].as_array().unwrap();
    assert!(
        delivery.iter().any(|r| positive(&r["extra"]["msgs_per_commit"])),
        "no messages-per-commit figure"
    );
    // The server's CPU per message comes from a `qpq serve` child, with its context switches.
    let cpu = delivery
        .iter()
        .find(|r| r["case"].as_str().is_some_and(|c| c.starts_with("server cpu per delivered msg")))
        .expect("no server cpu row");
    assert_eq!(cpu["unit"], "us");
    assert!(cpu["extra"]["server_ctx_switches_per_msg"].as_f64().is_some(), "no context switch figure");
    // The latency row is against the disk's fsync p99 plus an echo round trip.
    assert!(
        delivery.iter().any(|r| r["reference"].as_str().is_some_and(|x| x.starts_with("fsync p99"))),
        "no wake-up row against fsync p99"
    );
    // A processed commit is reported again against the floor plus its bytes (issue 12).
    let mls = report["scenarios"]["mls"].as_array().expect("an mls scenario");
    assert!(
        mls.iter().any(|r| r["case"].as_str().is_some_and(|c| c.starts_with("process commit"))
            && r["reference"].as_str().is_some_and(|x| x.starts_with("floor + the commit's bytes"))
            && positive(&r["extra"]["commit_bytes"])
            && positive(&r["extra"]["bytes_ms"])),
        "no process commit row against the floor plus its bytes"
    );
    // The MLS floor is built from primitives measured in this run.
    for primitive in [
        "ed25519_sign_us",
        "ed25519_verify_us",
        "hpke_suite_seal_us",
        "xwing_decaps_us",
        "commit_bytes_per_KiB_us",
    ] {
        assert!(positive(&report["references"][primitive]), "no {primitive} reference");
    }
}

#[test]
fn bench_rejects_an_out_of_range_group_size() {
    let out = Command::new(env!("CARGO_BIN_EXE_qpq"))
        .args(["bench", "--scenario", "mls", "--mls-sizes", "1"])
        .env_remove("QPQ_SERVER")
        .output()
        .expect("run qpq bench");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mls group size out of range: 1"), "stderr: {stderr}");
}

/// Issue 12: `--scenario home` (not in the default set) builds a small large home with
/// `--quick` and reports send and receive, wall and CPU, each against a fresh home.
#[test]
fn quick_home_bench_compares_a_large_home_with_a_fresh_one() {
    let out = Command::new(env!("CARGO_BIN_EXE_qpq"))
        .args(["bench", "--scenario", "home", "--quick", "--json"])
        .env_remove("QPQ_SERVER")
        .env_remove("QPQ_SERVER_FINGERPRINT")
        .env("QPQ_LOG", "warn")
        .output()
        .expect("run qpq bench");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "qpq bench failed: {stderr}");
    let report: Value = serde_json::from_slice(&out.stdout).expect("stdout is one json document");
    let rows = report["scenarios"]["home"].as_array().expect("a home scenario");
    let cases: Vec<&str> = rows.iter().map(|r| r["case"].as_str().unwrap_or("?")).collect();
    assert_eq!(
        cases,
        [
            "send, DM, large home, wall median",
            "send, DM, large home, cpu median",
            "receive, DM, large home, wall median",
            "receive, DM, large home, cpu median"
        ]
    );
    for row in rows {
        assert!(positive(&row["value"]) && positive(&row["reference_value"]), "{row}");
        assert!(row["reference"].as_str().unwrap_or("").starts_with("fresh home"), "{row}");
        assert!(positive(&row["extra"]["state_bytes"]), "{row}");
    }
    assert!(report["scenarios"].get("mls").is_none(), "only the scenario asked for");
}
