//! Fresh PostgreSQL databases for the suites: one server (started by `scripts/lib.sh`'s
//! `start_postgres`, or any given in `TEST_POSTGRES_URL`), a new database per service per run.

use diesel::Connection;
use diesel::connection::SimpleConnection;
use diesel::pg::PgConnection;

/// `server` is a URL of the server's maintenance database (`postgres://u@host:port/postgres`);
/// creates a database called `name` there (dropping any of that name) and returns its URL.
pub fn fresh_database(server: &str, name: &str) -> Result<String, String> {
    let mut admin = PgConnection::establish(server)
        .map_err(|e| format!("cannot connect to PostgreSQL at {server}: {e}"))?;
    // Two statements, sent one by one: sent together they form one implicit transaction,
    // which `DROP DATABASE` refuses.
    for statement in [
        format!("DROP DATABASE IF EXISTS \"{name}\" WITH (FORCE)"),
        format!("CREATE DATABASE \"{name}\""),
    ] {
        admin
            .batch_execute(&statement)
            .map_err(|e| format!("cannot create database {name}: {e}"))?;
    }
    Ok(with_database(server, name))
}

/// `server` with its database path replaced by `name`.
pub fn with_database(server: &str, name: &str) -> String {
    let (base, query) = match server.split_once('?') {
        Some((b, q)) => (b, Some(q)),
        None => (server, None),
    };
    let authority_end = base
        .find("://")
        .map(|s| s + 3)
        .and_then(|start| base[start..].find('/').map(|i| start + i))
        .unwrap_or(base.len());
    let mut url = format!("{}/{name}", &base[..authority_end]);
    if let Some(q) = query {
        url.push('?');
        url.push_str(q);
    }
    url
}

/// A database name unique to this process and call: `prefix_<pid>_<n>`.
pub fn unique_name(prefix: &str) -> String {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    format!(
        "{prefix}_{}_{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_is_replaced_and_the_rest_kept() {
        assert_eq!(
            with_database("postgres://u@127.0.0.1:5432/postgres", "orders_1"),
            "postgres://u@127.0.0.1:5432/orders_1"
        );
        assert_eq!(
            with_database("postgres://u@h:1/postgres?sslmode=disable", "x"),
            "postgres://u@h:1/x?sslmode=disable"
        );
        assert_eq!(with_database("postgres://u@h:1", "x"), "postgres://u@h:1/x");
    }
}
