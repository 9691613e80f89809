//! Database work waits for a pooled connection as a future, not on a blocking thread: many
//! requests waiting at once cost no threads. (Its own test binary, so no other test's threads
//! are counted.)

use diesel::connection::SimpleConnection;
use kafka::db::PLUMBING_MIGRATIONS;
use kafka::{Database, DbError};
use std::time::Duration;

/// This process's thread count (Linux).
fn threads() -> usize {
    let status = std::fs::read_to_string("/proc/self/status").expect("/proc/self/status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("Threads:"))
        .and_then(|n| n.trim().parse().ok())
        .expect("a Threads line")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn waiting_database_work_holds_no_threads() {
    let dir = tempfile::tempdir().unwrap();
    let db = Database::open(
        dir.path().join("t.db").to_str().unwrap(),
        PLUMBING_MIGRATIONS,
    )
    .unwrap();
    db.ping().await.unwrap();
    let before = threads();
    // 64 reads of 300 ms each at once: 8 run (the pool's connections), 56 wait.
    let reads: Vec<_> = (0..64)
        .map(|_| {
            let db = db.clone();
            tokio::spawn(async move {
                db.read(|conn| {
                    std::thread::sleep(Duration::from_millis(300));
                    conn.batch_execute("SELECT 1").map_err(DbError::from)
                })
                .await
            })
        })
        .collect();
    tokio::time::sleep(Duration::from_millis(150)).await;
    let during = threads();
    for read in reads {
        read.await.unwrap().unwrap();
    }
    // A thread per waiting read would add ~64; the pool's 8 plus a little slack is allowed.
    assert!(
        during <= before + 16,
        "{} threads while 64 reads were outstanding, {before} before",
        during
    );
}
