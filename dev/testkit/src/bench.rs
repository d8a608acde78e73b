//! What the benchmarks share: settings from the environment, medians of
//! rounds, and CPU time from /proc (steadier than wall time on a shared
//! machine).

/// `name` from the environment as a number, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The median (NaN for no values).
pub fn median(values: &[f64]) -> f64 {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    match sorted.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => sorted[n / 2],
        n => (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0,
    }
}

/// Whose CPU time to read.
#[derive(Debug, Clone, Copy)]
pub enum Cpu {
    /// A running process.
    Process(u32),
    /// This process's children that were waited for.
    WaitedChildren,
    /// The waited-for children of a running process.
    WaitedChildrenOf(u32),
}

/// CPU seconds (user + system) from `/proc/<pid>/stat`, at 100 ticks/s.
pub fn cpu_seconds(of: Cpu) -> f64 {
    let (path, first) = match of {
        // utime, stime: the 14th and 15th fields of the line.
        Cpu::Process(pid) => (format!("/proc/{pid}/stat"), 11),
        // cutime, cstime: the 16th and 17th.
        Cpu::WaitedChildren => ("/proc/self/stat".to_owned(), 13),
        Cpu::WaitedChildrenOf(pid) => (format!("/proc/{pid}/stat"), 13),
    };
    let tick = |i: usize| stat_field::<f64>(&path, i).unwrap_or(0.0);
    (tick(first) + tick(first + 1)) / 100.0
}

/// Field `i` of a `/proc/.../stat` line, counted from after the
/// parenthesised command name (which may hold spaces), where the line's
/// 3rd field is index 0.
fn stat_field<T: std::str::FromStr>(path: &str, i: usize) -> Option<T> {
    let stat = std::fs::read_to_string(path).ok()?;
    stat.rsplit_once(')')?
        .1
        .split_whitespace()
        .nth(i)?
        .parse()
        .ok()
}

/// CPU seconds the local stack's servers have used so far, read from the
/// pid files `dev/stack up` writes (0 for a server it cannot find). The
/// difference of two samples is what one run cost each server: on a
/// machine this small, the servers' CPU is most of a pipeline's wall time.
#[derive(Debug, Clone, Copy, Default)]
pub struct StackCpu {
    pub opensearch: f64,
    pub kafka: f64,
    /// The postmaster, its live backends and the ones that exited.
    pub postgres: f64,
}

impl StackCpu {
    pub fn sample() -> StackCpu {
        let dir = crate::stack_dir();
        let pid = |file: &str| -> Option<u32> {
            std::fs::read_to_string(dir.join(file))
                .ok()?
                .lines()
                .next()?
                .trim()
                .parse()
                .ok()
        };
        let cpu = |pid: Option<u32>| pid.map_or(0.0, |p| cpu_seconds(Cpu::Process(p)));
        let postgres = pid("postgres/data/postmaster.pid").map_or(0.0, |pm| {
            let backends: f64 = children(pm).map(|c| cpu_seconds(Cpu::Process(c))).sum();
            cpu_seconds(Cpu::Process(pm)) + cpu_seconds(Cpu::WaitedChildrenOf(pm)) + backends
        });
        StackCpu {
            opensearch: cpu(pid("opensearch/pid")),
            kafka: cpu(pid("kafka/pid")),
            postgres,
        }
    }

    /// What was used since `earlier`.
    pub fn since(self, earlier: StackCpu) -> StackCpu {
        StackCpu {
            opensearch: self.opensearch - earlier.opensearch,
            kafka: self.kafka - earlier.kafka,
            postgres: self.postgres - earlier.postgres,
        }
    }
}

impl std::fmt::Display for StackCpu {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "OpenSearch {:.2}, Kafka {:.2}, PostgreSQL {:.2} CPU-s",
            self.opensearch, self.kafka, self.postgres
        )
    }
}

/// The running children of process `parent`.
fn children(parent: u32) -> impl Iterator<Item = u32> {
    std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        // ppid: the line's 4th field.
        .filter(move |&pid| stat_field::<u32>(&format!("/proc/{pid}/stat"), 1) == Some(parent))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), 2.5);
        assert!(median(&[]).is_nan());
    }

    #[test]
    fn stat_fields_count_from_after_the_command_name() {
        let parent = std::os::unix::process::parent_id();
        assert_eq!(stat_field::<u32>("/proc/self/stat", 1), Some(parent));
        assert!(children(parent).any(|pid| pid == std::process::id()));
    }

    #[test]
    fn this_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(Cpu::Process(std::process::id())) > 0.0);
    }
}
