//! `tidemark-test`: what `make test` runs. Builds every test target of the
//! workspace once, then runs the test binaries side by side, longest first.
//!
//! Why not plain `cargo test`: it runs one test binary after another, and
//! most of ours spend their time waiting on servers (a broker restarting, a
//! stall being waited out), not on the CPU. Run side by side they finish in
//! well under the sum of their times. Each binary still runs its own tests
//! the way `cargo test` does (its own threads, its own filters).
//!
//! Promises:
//! - Every test binary and the doctests run, each exactly once, in its
//!   package's directory, as `cargo test` would run them; a binary that
//!   fails, crashes, prints no result or runs longer than 20 minutes fails
//!   the run (exit 1), and its whole output is printed at the end.
//! - Each binary's output is kept in `target/test-logs/<name>.log`; its time
//!   goes to `target/test-durations.tsv`, which orders the next run (longest
//!   first; `dev/test-durations.tsv` is the fallback on a fresh clone).
//!
//! Usage: `tidemark-test [-j N] [-- ARGS]`: at most N binaries at a time
//! (default `TIDEMARK_TEST_JOBS`, else 3; `-j 1` is `cargo test`'s order),
//! ARGS passed to every test binary (a name filter, `--nocapture`).

use std::collections::{BTreeMap, VecDeque};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode, Stdio};
use std::sync::{Arc, Mutex, mpsc};
use std::time::{Duration, Instant};

/// A test binary still running after this long is killed and fails the
/// run: a hung test must not hold CI until its own limit.
const BINARY_LIMIT: Duration = Duration::from_secs(20 * 60);

/// One test binary (or the doctests) to run.
#[derive(Debug, Clone)]
struct Job {
    /// `package-dir/kind/name`, e.g. `replay/test/window`.
    name: String,
    program: PathBuf,
    args: Vec<String>,
    dir: PathBuf,
}

/// How a job ended.
#[derive(Debug)]
struct Outcome {
    job: Job,
    passed: bool,
    summary: String,
    secs: f64,
    log: PathBuf,
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("tidemark-test: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode, String> {
    let (jobs_wanted, extra) = parse_args(std::env::args().skip(1))?;
    let root = workspace_root()?;
    let target = root.join("target");
    let logs = target.join("test-logs");
    std::fs::create_dir_all(&logs).map_err(|e| format!("cannot create {}: {e}", logs.display()))?;

    let mut jobs = build(&root, &extra)?;
    let durations = read_durations(&target.join("test-durations.tsv"))
        .or_else(|| read_durations(&root.join("dev/test-durations.tsv")))
        .unwrap_or_default();
    // Longest first, so the last to start are the short ones; unknown
    // binaries (new ones) count as long.
    jobs.sort_by(|a, b| {
        let d = |j: &Job| durations.get(&j.name).copied().unwrap_or(f64::MAX);
        d(b).total_cmp(&d(a)).then_with(|| a.name.cmp(&b.name))
    });
    let total = jobs.len();
    eprintln!(
        "tidemark-test: {total} test binaries, up to {jobs_wanted} at a time; logs in {}",
        logs.display()
    );

    let started = Instant::now();
    let queue = Arc::new(Mutex::new(VecDeque::from(jobs)));
    let running = Arc::new(Mutex::new(BTreeMap::<String, Instant>::new()));
    let (tx, rx) = mpsc::channel::<Outcome>();
    let mut workers = Vec::new();
    for _ in 0..jobs_wanted.min(total.max(1)) {
        let (queue, running, tx, logs) = (queue.clone(), running.clone(), tx.clone(), logs.clone());
        workers.push(std::thread::spawn(move || {
            loop {
                let Some(job) = queue.lock().expect("queue").pop_front() else {
                    break;
                };
                running
                    .lock()
                    .expect("running")
                    .insert(job.name.clone(), Instant::now());
                let outcome = run_job(job, &logs);
                running.lock().expect("running").remove(&outcome.job.name);
                if tx.send(outcome).is_err() {
                    break;
                }
            }
        }));
    }
    drop(tx);

    let mut outcomes = Vec::new();
    let mut last_heartbeat = Instant::now();
    while outcomes.len() < total {
        match rx.recv_timeout(Duration::from_secs(5)) {
            Ok(o) => {
                eprintln!(
                    "{} {:<44} {:>6.1} s  {}",
                    if o.passed { "ok  " } else { "FAIL" },
                    o.job.name,
                    o.secs,
                    o.summary
                );
                outcomes.push(o);
            }
            Err(mpsc::RecvTimeoutError::Timeout) => {
                if last_heartbeat.elapsed() >= Duration::from_secs(60) {
                    last_heartbeat = Instant::now();
                    let now = running.lock().expect("running");
                    let list: Vec<String> = now
                        .iter()
                        .map(|(n, t)| format!("{n} ({} s)", t.elapsed().as_secs()))
                        .collect();
                    eprintln!(
                        "tidemark-test: {} of {total} done after {} s; running {}",
                        outcomes.len(),
                        started.elapsed().as_secs(),
                        list.join(", ")
                    );
                }
            }
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    for w in workers {
        let _ = w.join();
    }
    write_durations(&target.join("test-durations.tsv"), &outcomes);

    let failed: Vec<&Outcome> = outcomes.iter().filter(|o| !o.passed).collect();
    for o in &failed {
        eprintln!(
            "\n======== {} (log: {}) ========",
            o.job.name,
            o.log.display()
        );
        if let Ok(text) = std::fs::read_to_string(&o.log) {
            eprint!("{text}");
        }
    }
    let (passed, failed_tests) = outcomes.iter().fold((0u64, 0u64), |(p, f), o| {
        let (a, b) = counts(&o.summary);
        (p + a, f + b)
    });
    eprintln!(
        "\ntidemark-test: {} binaries, {passed} tests passed, {failed_tests} failed, {} binaries failed, in {:.0} s",
        outcomes.len(),
        failed.len(),
        started.elapsed().as_secs_f64()
    );
    if outcomes.len() < total {
        return Err(format!(
            "only {} of {total} binaries reported",
            outcomes.len()
        ));
    }
    Ok(if failed.is_empty() {
        ExitCode::SUCCESS
    } else {
        for o in &failed {
            eprintln!("failed: {}", o.job.name);
        }
        ExitCode::from(1)
    })
}

fn parse_args(mut args: impl Iterator<Item = String>) -> Result<(usize, Vec<String>), String> {
    let from_env = std::env::var("TIDEMARK_TEST_JOBS").ok();
    let mut jobs = match from_env {
        Some(v) => v
            .parse::<usize>()
            .map_err(|_| format!("TIDEMARK_TEST_JOBS={v:?} is not a number of jobs"))?,
        None => 3,
    };
    let mut extra = Vec::new();
    while let Some(a) = args.next() {
        match a.as_str() {
            "-j" | "--jobs" => {
                let v = args.next().ok_or("-j needs a number of jobs")?;
                jobs = v
                    .parse()
                    .map_err(|_| format!("-j {v:?} is not a number of jobs"))?;
            }
            "--" => extra.extend(args.by_ref()),
            other => {
                return Err(format!(
                    "unknown argument {other:?}; usage: tidemark-test [-j N] [-- TEST-ARGS]"
                ));
            }
        }
    }
    if jobs == 0 {
        return Err("-j must be at least 1".into());
    }
    Ok((jobs, extra))
}

fn workspace_root() -> Result<PathBuf, String> {
    // This file is dev/testkit/src/bin/; the workspace is two levels above
    // the package.
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    root.canonicalize()
        .map_err(|e| format!("cannot find the workspace at {}: {e}", root.display()))
}

/// Builds every test target (`cargo test --no-run`) and lists the binaries
/// it made, plus one job for the doctests.
fn build(root: &Path, extra: &[String]) -> Result<Vec<Job>, String> {
    let mut child = Command::new(std::env::var("CARGO").unwrap_or_else(|_| "cargo".into()))
        .args([
            "test",
            "--workspace",
            "--locked",
            "--no-run",
            "--message-format=json-render-diagnostics",
        ])
        .current_dir(root)
        .stdout(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run cargo: {e}"))?;
    let stdout = child.stdout.take().expect("piped");
    let mut jobs = Vec::new();
    for line in BufReader::new(stdout).lines() {
        let line = line.map_err(|e| format!("reading cargo's output: {e}"))?;
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(&line) else {
            continue;
        };
        if msg["reason"] != "compiler-artifact" || msg["profile"]["test"] != true {
            continue;
        }
        let Some(program) = msg["executable"].as_str() else {
            continue;
        };
        let manifest = msg["manifest_path"].as_str().unwrap_or_default();
        let dir = Path::new(manifest)
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| root.to_path_buf());
        let package = dir
            .strip_prefix(root)
            .ok()
            .map(|p| p.display().to_string())
            .filter(|p| !p.is_empty())
            .unwrap_or_else(|| ".".into());
        let kind = msg["target"]["kind"][0].as_str().unwrap_or("?");
        let target = msg["target"]["name"].as_str().unwrap_or("?");
        jobs.push(Job {
            name: format!("{package}/{kind}/{target}"),
            program: program.into(),
            args: extra.to_vec(),
            dir,
        });
    }
    let status = child.wait().map_err(|e| format!("cargo: {e}"))?;
    if !status.success() {
        return Err(format!("building the tests failed ({status})"));
    }
    jobs.push(Job {
        name: "doctests".into(),
        program: std::env::var("CARGO")
            .unwrap_or_else(|_| "cargo".into())
            .into(),
        args: ["test", "--workspace", "--locked", "--doc", "--"]
            .iter()
            .map(|s| s.to_string())
            .chain(extra.iter().cloned())
            .collect(),
        dir: root.to_path_buf(),
    });
    Ok(jobs)
}

fn run_job(job: Job, logs: &Path) -> Outcome {
    let log = logs.join(format!("{}.log", job.name.replace('/', "-")));
    let started = Instant::now();
    let result = std::fs::File::create(&log).and_then(|file| {
        let err = file.try_clone()?;
        let mut child = Command::new(&job.program)
            .args(&job.args)
            .current_dir(&job.dir)
            .stdin(Stdio::null())
            .stdout(file)
            .stderr(err)
            .spawn()?;
        loop {
            if let Some(status) = child.try_wait()? {
                return Ok(status);
            }
            if started.elapsed() > BINARY_LIMIT {
                let _ = child.kill();
                let status = child.wait()?;
                let mut file = std::fs::OpenOptions::new().append(true).open(&log)?;
                writeln!(
                    file,
                    "tidemark-test: {} still running after {} s: killed",
                    job.name,
                    BINARY_LIMIT.as_secs()
                )?;
                return Ok(status);
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    let secs = started.elapsed().as_secs_f64();
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    let results: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("test result: "))
        .collect();
    let (passed, summary) = match result {
        Err(e) => {
            let _ = writeln!(
                std::fs::OpenOptions::new()
                    .append(true)
                    .open(&log)
                    .unwrap_or_else(|_| { std::fs::File::create(&log).expect("log file") }),
                "tidemark-test: cannot run {}: {e}",
                job.program.display()
            );
            (false, format!("cannot run: {e}"))
        }
        Ok(status) if results.is_empty() => (false, format!("no test result ({status})")),
        Ok(status) => {
            let (p, f) = results.iter().fold((0, 0), |(p, f), l| {
                let (a, b) = counts(l);
                (p + a, f + b)
            });
            (
                status.success() && f == 0,
                format!("{p} passed; {f} failed"),
            )
        }
    };
    Outcome {
        job,
        passed,
        summary,
        secs,
        log,
    }
}

/// The passed and failed counts of a `test result:` line (or our summary).
fn counts(line: &str) -> (u64, u64) {
    let number_before = |word: &str| {
        line.split(';')
            .find_map(|part| {
                let part = part.trim().trim_start_matches("test result: ok.").trim();
                let part = part.trim_start_matches("test result: FAILED.").trim();
                part.strip_suffix(word)?.trim().parse::<u64>().ok()
            })
            .unwrap_or(0)
    };
    (number_before("passed"), number_before("failed"))
}

fn read_durations(path: &Path) -> Option<BTreeMap<String, f64>> {
    let text = std::fs::read_to_string(path).ok()?;
    Some(
        text.lines()
            .filter_map(|l| {
                let (name, secs) = l.split_once('\t')?;
                Some((name.to_owned(), secs.trim().parse().ok()?))
            })
            .collect(),
    )
}

fn write_durations(path: &Path, outcomes: &[Outcome]) {
    let mut known = read_durations(path).unwrap_or_default();
    for o in outcomes {
        known.insert(o.job.name.clone(), o.secs);
    }
    let text: String = known
        .iter()
        .map(|(n, s)| format!("{n}\t{s:.1}\n"))
        .collect();
    if let Err(e) = std::fs::write(path, text) {
        eprintln!("tidemark-test: cannot write {}: {e}", path.display());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counts_read_cargo_test_result_lines() {
        assert_eq!(
            counts(
                "test result: ok. 7 passed; 0 failed; 1 ignored; 0 measured; 0 filtered out; finished in 1.2s"
            ),
            (7, 0)
        );
        assert_eq!(
            counts(
                "test result: FAILED. 5 passed; 2 failed; 0 ignored; 0 measured; 0 filtered out"
            ),
            (5, 2)
        );
        assert_eq!(counts("12 passed; 3 failed"), (12, 3));
    }
}
