//! `make demo` from the repository, as a new user runs it (but with the
//! binaries `cargo test` built, see `TIDEMARK_DEMO_NO_BUILD`): the pipeline
//! comes up, the staged incident loses 8 changes, the audit finds them, one
//! `window --yes` repairs them and verifies itself, and the last audit is
//! clean. `dev/demo` fails if that last audit is not; this test also reads
//! what it printed.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ROOT: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/../..");

/// Runs `dev/demo ARGS` and returns (success, stdout + stderr).
fn demo(args: &[&str], limit: Duration) -> (bool, String) {
    let root = Path::new(ROOT);
    let log = std::env::temp_dir().join(tidemark_testkit::unique_name("demo_log"));
    let file = std::fs::File::create(&log).expect("demo log");
    let mut child = Command::new(root.join("dev/demo"))
        .args(args)
        .current_dir(root)
        // `cargo test` built the three binaries already (every stage has
        // integration tests); building them again with the demo's own
        // feature set recompiled half the tree during the test run.
        .env("TIDEMARK_DEMO_NO_BUILD", "1")
        .stdin(Stdio::null())
        .stdout(file.try_clone().expect("log"))
        .stderr(file)
        .spawn()
        .expect("run dev/demo");
    let deadline = Instant::now() + limit;
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for dev/demo") {
            break Some(status);
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            break None;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let out = std::fs::read_to_string(&log).unwrap_or_default();
    let _ = std::fs::remove_file(&log);
    match status {
        Some(status) => (status.success(), out),
        None => panic!("dev/demo did not finish in {} s:\n{out}", limit.as_secs()),
    }
}

#[test]
fn the_demo_stages_an_incident_and_its_last_audit_is_clean() {
    let (ok, out) = demo(&[], Duration::from_secs(600));
    let (stopped, stop_out) = demo(&["stop"], Duration::from_secs(60));
    assert!(ok, "dev/demo failed:\n{out}");
    assert!(stopped, "dev/demo stop failed:\n{stop_out}");
    // The incident is real: the first audit finds the 8 lost changes.
    let first_audit = out
        .split("== Audit: the table against its index")
        .nth(1)
        .expect("the first audit ran");
    assert!(
        first_audit.contains("5 missing, 1 extra, 2 stale"),
        "the first audit did not find the staged drift:\n{first_audit}"
    );
    // One window repairs it and says it checked.
    assert!(
        out.contains("found       8 changes of 8 keys"),
        "the window did not find the incident's changes:\n{out}"
    );
    assert!(
        out.contains("verified: 8 clean, 0 still differ"),
        "the repair did not verify clean:\n{out}"
    );
    let last_audit = out
        .split("== Audit again (must be clean)")
        .nth(1)
        .expect("the last audit ran");
    assert!(
        last_audit.contains("0 missing, 0 extra, 0 stale"),
        "the last audit is not clean:\n{last_audit}"
    );
}
