//! What every Tidemark binary does around its work: no transparent huge
//! pages, structured logging to stderr, waiting for SIGTERM or Ctrl-C, and
//! printing an error with its causes once each. [`Binary::main`] is the
//! one `main` of all three binaries; [`http`] their one health endpoint.

pub mod http;

use std::error::Error;
use std::io::IsTerminal;
use std::process::ExitCode;

/// Turns transparent huge pages off for this process (first thing in
/// `main`). mimalloc, the allocator of all three binaries, asks for huge
/// pages on its memory; where the kernel's THP `defrag` setting is
/// `madvise` (the Debian and Ubuntu default), such a page fault may compact
/// memory on the spot. On `tidemark-replay window` over 100,000 keys this
/// took 0.63-0.98 s of system CPU; without huge pages 0.29-0.33 s, and peak
/// RSS fell from 196-247 MB to 175-189 MB. Refused by the kernel (too old),
/// it changes nothing.
pub fn no_transparent_huge_pages() {
    #[cfg(target_os = "linux")]
    let _ = rustix::thread::disable_transparent_huge_pages(true);
}

/// Logs to stderr through `tracing`, filtered by `RUST_LOG` (else
/// `default_filter`), as JSON lines when `TIDEMARK_LOG_FORMAT=json`, with
/// colours only on a terminal.
pub fn init_logging(default_filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal());
    if std::env::var("TIDEMARK_LOG_FORMAT").as_deref() == Ok("json") {
        builder.json().init();
    } else {
        builder.init();
    }
}

/// A Tidemark binary, as its `main` runs it.
#[derive(Debug, Clone, Copy)]
pub struct Binary {
    /// The binary's name, the prefix of its error line.
    pub name: &'static str,
    /// The log filter when `RUST_LOG` is unset.
    pub default_log: &'static str,
    /// Whether a fatal error is also logged through `tracing` (services,
    /// whose logs are collected), besides the line on stderr.
    pub log_fatal: bool,
}

impl Binary {
    /// The whole `main`: transparent huge pages off, the arguments parsed
    /// (`parse`, which exits on `--help` or a usage error), logging, the
    /// runtime, then `body`. An error ends the process with exit code 2 and
    /// one line `name: error: causes` on stderr; `body`'s own exit code
    /// otherwise.
    pub fn main<A, E, F>(self, parse: impl FnOnce() -> A, body: impl FnOnce(A) -> F) -> ExitCode
    where
        E: AsRef<dyn Error + Send + Sync>,
        F: Future<Output = Result<ExitCode, E>>,
    {
        no_transparent_huge_pages();
        let args = parse();
        init_logging(self.default_log);
        let runtime = match tokio::runtime::Runtime::new() {
            Ok(runtime) => runtime,
            Err(e) => {
                eprintln!("{}: cannot start the async runtime: {e}", self.name);
                return ExitCode::from(2);
            }
        };
        match runtime.block_on(body(args)) {
            Ok(code) => code,
            Err(e) => {
                let text = report(e.as_ref());
                if self.log_fatal {
                    tracing::error!("{text}");
                }
                eprintln!("{}: {text}", self.name);
                ExitCode::from(2)
            }
        }
    }
}

/// Returns when the process gets SIGTERM or Ctrl-C (SIGINT).
pub async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut term =
            match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
                Ok(term) => term,
                Err(_) => {
                    let _ = ctrl_c.await;
                    return;
                }
            };
        tokio::select! {
            _ = ctrl_c => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = ctrl_c.await;
    }
}

/// An error and its causes on one line, `: `-separated, leaving out a cause
/// whose text the line already holds: many errors print their cause in
/// their own message, and a chain printed naively says it twice or more.
pub fn report(error: &(dyn Error + 'static)) -> String {
    let mut line = error.to_string();
    let mut cause = error.source();
    while let Some(next) = cause {
        let text = next.to_string();
        if !line.contains(&text) {
            line.push_str(": ");
            line.push_str(&text);
        }
        cause = next.source();
    }
    line
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug)]
    struct Failure {
        text: &'static str,
        cause: Option<Box<Failure>>,
    }

    impl std::fmt::Display for Failure {
        fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str(self.text)
        }
    }

    impl Error for Failure {
        fn source(&self) -> Option<&(dyn Error + 'static)> {
            self.cause.as_deref().map(|c| c as &(dyn Error + 'static))
        }
    }

    fn chain(texts: &[&'static str]) -> Failure {
        let mut cause = None;
        for text in texts.iter().rev() {
            cause = Some(Box::new(Failure { text, cause }));
        }
        *cause.expect("at least one")
    }

    #[test]
    fn causes_already_said_are_not_repeated() {
        // As rdkafka's errors and ours chain: each message embeds its cause.
        let error = chain(&[
            "Kafka did not accept the record for t (commit LSN 0/10): production error: TooLarge",
            "production error: TooLarge",
            "TooLarge",
        ]);
        assert_eq!(
            report(&error),
            "Kafka did not accept the record for t (commit LSN 0/10): production error: TooLarge"
        );
    }

    #[test]
    fn new_causes_are_appended_in_order() {
        let error = chain(&["config file x.toml", "kafka.brokers", "missing"]);
        assert_eq!(report(&error), "config file x.toml: kafka.brokers: missing");
    }
}
