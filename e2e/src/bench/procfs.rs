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

/// Pids of every `postgres` process on this machine (the server the stack's databases are
/// on, its backends and workers): the bench counts their CPU as one process, "postgres".
pub fn postgres_pids() -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(|e| e.ok()?.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm"))
                .is_ok_and(|comm| comm.trim() == "postgres")
        })
        .collect()
}

/// Pids of the PostgreSQL server `url` points at — its postmaster and every process it
/// forked (backends, workers) — read from the `postmaster.pid` of its data directory, so other
/// servers on the machine are not counted; every `postgres` process when that cannot be read
/// (a server elsewhere, or its directory closed to this user).
pub fn postgres_server_pids(url: &str) -> Vec<u32> {
    server_pids(url).unwrap_or_else(postgres_pids)
}

fn server_pids(url: &str) -> Option<Vec<u32>> {
    use diesel::{Connection, RunQueryDsl};
    let mut conn = diesel::PgConnection::establish(url).ok()?;
    let dir: String = diesel::dsl::sql::<diesel::sql_types::Text>(
        "SELECT setting FROM pg_settings WHERE name = 'data_directory'",
    )
    .get_result(&mut conn)
    .ok()?;
    let pid_file = std::fs::read_to_string(Path::new(&dir).join("postmaster.pid")).ok()?;
    let postmaster: u32 = pid_file.lines().next()?.trim().parse().ok()?;
    let parent = |pid: u32| -> Option<u32> {
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
        stat.rsplit_once(')')?
            .1
            .split_whitespace()
            .nth(1)?
            .parse()
            .ok()
    };
    let mut pids = vec![postmaster];
    pids.extend(
        postgres_pids()
            .into_iter()
            .filter(|pid| parent(*pid) == Some(postmaster)),
    );
    Some(pids)
}

/// Bytes of a service's database: `pg_database_size` for a PostgreSQL URL (0 if unreachable),
/// else the SQLite file in `dir` and its write-ahead log.
pub fn database_size(dir: &Path, service: &str, url: Option<&str>) -> u64 {
    use diesel::{Connection, RunQueryDsl};
    match url {
        Some(url) if url.starts_with("postgres") => diesel::PgConnection::establish(url)
            .ok()
            .and_then(|mut conn| {
                diesel::dsl::sql::<diesel::sql_types::BigInt>(
                    "SELECT pg_database_size(current_database())",
                )
                .get_result::<i64>(&mut conn)
                .ok()
            })
            .map_or(0, |bytes| bytes as u64),
        _ => database_bytes(dir, service),
    }
}

/// Bytes of `<dir>/<service>.db` plus its write-ahead log.
pub fn database_bytes(dir: &Path, service: &str) -> u64 {
    let size = |name: String| std::fs::metadata(dir.join(name)).map_or(0, |m| m.len());
    size(format!("{service}.db")) + size(format!("{service}.db-wal"))
}
