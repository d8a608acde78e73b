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
}

/// CPU seconds (user + system) from `/proc/<pid>/stat`, at 100 ticks/s.
pub fn cpu_seconds(of: Cpu) -> f64 {
    let (path, first) = match of {
        // utime, stime: the 14th and 15th fields of the line.
        Cpu::Process(pid) => (format!("/proc/{pid}/stat"), 11),
        // cutime, cstime: the 16th and 17th.
        Cpu::WaitedChildren => ("/proc/self/stat".to_owned(), 13),
    };
    let stat = std::fs::read_to_string(&path).unwrap_or_default();
    // Counted from after the parenthesised command name (which may hold
    // spaces), where the 3rd field of the line is index 0.
    let after = stat
        .rsplit_once(')')
        .map(|(_, rest)| rest)
        .unwrap_or_default();
    let fields: Vec<&str> = after.split_whitespace().collect();
    let tick = |i: usize| {
        fields
            .get(i)
            .and_then(|f| f.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (tick(first) + tick(first + 1)) / 100.0
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
    fn this_process_has_used_some_cpu() {
        let mut x = 0u64;
        for i in 0..50_000_000u64 {
            x = x.wrapping_mul(31).wrapping_add(i);
        }
        assert!(x != 1);
        assert!(cpu_seconds(Cpu::Process(std::process::id())) > 0.0);
    }
}
