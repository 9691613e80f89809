//! What PostgreSQL did for the services in the steady window, from `pg_stat_statements`: how
//! many statements the services' databases ran (per saga) and which ones, so a change to the
//! plumbing shows its cost in statements, not only in CPU.
//!
//! Needs the server started with `shared_preload_libraries = 'pg_stat_statements'`
//! (`scripts/lib.sh`'s `start_postgres` sets it); on a server without it the bench says so
//! and prints the rest.

use diesel::connection::SimpleConnection;
use diesel::sql_types::{BigInt, Double, Text};
use diesel::{Connection, PgConnection, QueryableByName, RunQueryDsl};

/// One normalised statement and what it cost in the window, summed over the service databases.
#[derive(Debug, Clone, QueryableByName)]
pub struct Statement {
    /// The service database it ran on.
    #[diesel(sql_type = Text)]
    pub database: String,
    /// The statement, parameters replaced by `$n`.
    #[diesel(sql_type = Text)]
    pub query: String,
    /// Times it ran.
    #[diesel(sql_type = BigInt)]
    pub calls: i64,
    /// Server time spent executing it, ms.
    #[diesel(sql_type = Double)]
    pub exec_ms: f64,
}

/// The maintenance database of the server `url` points at: where the extension is created.
fn maintenance(url: &str) -> String {
    crate::pg::with_database(url, "postgres")
}

/// Creates the extension if needed and forgets every count so far; an error when the server
/// was not started with the library preloaded.
pub fn reset(any_database_url: &str) -> Result<(), String> {
    let mut conn = PgConnection::establish(&maintenance(any_database_url))
        .map_err(|e| format!("cannot connect: {e}"))?;
    conn.batch_execute(
        "CREATE EXTENSION IF NOT EXISTS pg_stat_statements; SELECT pg_stat_statements_reset();",
    )
    .map_err(|e| format!("pg_stat_statements unavailable ({e}); start the server with shared_preload_libraries = 'pg_stat_statements'"))
}

/// Every statement counted since [`reset`] on the `databases` (names), most called first.
pub fn read(any_database_url: &str, databases: &[String]) -> Result<Vec<Statement>, String> {
    let mut conn = PgConnection::establish(&maintenance(any_database_url))
        .map_err(|e| format!("cannot connect: {e}"))?;
    // Same query text on several instances or users: one row.
    diesel::sql_query(
        "SELECT d.datname::text AS database, s.query, sum(s.calls)::bigint AS calls, \
                sum(s.total_exec_time)::float8 AS exec_ms \
           FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
          WHERE d.datname = ANY($1) \
          GROUP BY d.datname, s.query ORDER BY calls DESC",
    )
    .bind::<diesel::sql_types::Array<Text>, _>(databases)
    .load(&mut conn)
    .map_err(|e| format!("cannot read pg_stat_statements: {e}"))
}

/// The database name at the end of a PostgreSQL URL.
pub fn database_name(url: &str) -> String {
    let path = url.split('?').next().unwrap_or(url);
    path.rsplit('/').next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_database_name_is_the_last_path_segment() {
        assert_eq!(database_name("postgres://u@h:1/orders_3_1"), "orders_3_1");
        assert_eq!(database_name("postgres://u@h:1/x?sslmode=disable"), "x");
    }
}
