//! What a process cost the machine, read from `/proc`: CPU time, RSS now and at its peak.

use std::sync::OnceLock;

use serde::Serialize;

/// What one component process cost, read just before it was stopped.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct ComponentUsage {
    pub component: String,
    /// The `--instance` it ran as, when the fleet gave it one (several processes of a service).
    pub instance: Option<String>,
    pub pid: u32,
    /// User plus system CPU time since the process started.
    pub cpu_ms: f64,
    /// Peak resident set size (VmHWM).
    pub peak_rss_kb: u64,
}

impl ComponentUsage {
    /// `records`, or `records-i2` for an instance: the process's name in the fleet.
    pub fn name(&self) -> String {
        crate::process_name(&self.component, self.instance.as_deref())
    }
}

/// Clock ticks per second of `/proc/<pid>/stat` (`getconf CLK_TCK`; 100 on Linux).
fn clock_ticks() -> f64 {
    static TICKS: OnceLock<f64> = OnceLock::new();
    *TICKS.get_or_init(|| {
        std::process::Command::new("getconf")
            .arg("CLK_TCK")
            .output()
            .ok()
            .and_then(|o| String::from_utf8(o.stdout).ok())
            .and_then(|s| s.trim().parse::<f64>().ok())
            .filter(|t| *t > 0.0)
            .unwrap_or(100.0)
    })
}

/// CPU time (user + system, ms) of a process: `self` or a pid.
pub fn cpu_ms(pid: &str) -> Option<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: count fields after the last `)`.
    // There the state is field 3 of stat(5), so utime (14) and stime (15) are the 12th and 13th.
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    let ticks = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
    Some(ticks as f64 * 1000.0 / clock_ticks())
}

/// One `kB` field of `/proc/<pid>/status`.
fn status_kb(pid: &str, field: &str) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let line = status.lines().find(|l| l.strip_prefix(field).is_some_and(|r| r.starts_with(':')))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// Peak RSS (VmHWM, kB) of a process: `self` or a pid.
pub fn peak_rss_kb(pid: &str) -> Option<u64> {
    status_kb(pid, "VmHWM")
}

/// RSS now (VmRSS, kB) of a process: `self` or a pid.
pub fn rss_kb(pid: &str) -> Option<u64> {
    status_kb(pid, "VmRSS")
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;

    #[test]
    fn reads_its_own_cpu_time() {
        // Burn a little CPU so that at least one tick shows.
        let t = Instant::now();
        let mut x = 0u64;
        while t.elapsed() < Duration::from_millis(30) {
            x = x.wrapping_mul(31).wrapping_add(7);
        }
        std::hint::black_box(x);
        assert!(cpu_ms("self").is_some_and(|ms| ms > 0.0));
        let (now, peak) = (rss_kb("self").unwrap(), peak_rss_kb("self").unwrap());
        assert!(now > 0 && peak >= now, "VmRSS {now} kB, VmHWM {peak} kB");
    }
}
