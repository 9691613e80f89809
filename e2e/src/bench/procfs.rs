//! What the bench reads from Linux's `/proc` and the run directory: CPU time and memory of a
//! process, and the size of a service's database.

use std::path::Path;
use std::process::Command;

/// Clock ticks per second (`getconf CLK_TCK`), the unit of `/proc/<pid>/stat`'s CPU times;
/// 100 when `getconf` cannot say.
pub fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8_lossy(&o.stdout).trim().parse().ok())
        .unwrap_or(100.0)
}

/// utime + stime of a process (fields 14 and 15 of `/proc/<pid>/stat`) in clock ticks;
/// `None` when the process is gone.
pub fn cpu_ticks(pid: u32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Field 2, the command name, may hold spaces: count from the last ')', field 3 on.
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let utime: u64 = fields.get(11)?.parse().ok()?;
    let stime: u64 = fields.get(12)?.parse().ok()?;
    Some(utime + stime)
}

/// CPU ticks of every named process at one moment.
pub fn cpu_sample(processes: &[(String, u32)]) -> Vec<Option<u64>> {
    processes.iter().map(|(_, pid)| cpu_ticks(*pid)).collect()
}

/// Peak (VmHWM) and current (VmRSS) resident memory of a process, in kB.
#[derive(Debug, Clone, Copy, Default)]
pub struct Memory {
    /// VmHWM: the peak resident set.
    pub hwm_kb: u64,
    /// VmRSS: the resident set now.
    pub rss_kb: u64,
}

/// The memory of a process from `/proc/<pid>/status`; zeros when it is gone.
pub fn memory(pid: u32) -> Memory {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let kb = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next())
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    Memory {
        hwm_kb: kb("VmHWM:"),
        rss_kb: kb("VmRSS:"),
    }
}

/// Bytes of `<dir>/<service>.db` plus its write-ahead log.
pub fn database_bytes(dir: &Path, service: &str) -> u64 {
    let size = |name: String| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    size(format!("{service}.db")) + size(format!("{service}.db-wal"))
}
