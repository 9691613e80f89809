//! Statements a connection prepares once and then only executes.
//!
//! diesel keeps a prepared statement per connection only for statements whose SQL follows
//! from their Rust type. Its UPDATEs, upserts, `sql_query`s and inserts of optional columns
//! are sent to be parsed, analysed and planned again on every execution: on PostgreSQL that
//! was about 40 % of the server's CPU per saga (`perf` during `saga-bench --postgres`).
//! [`Prepared`] caches such a statement under its SQL text and bind types, which is sound
//! whatever the text: the same text with the same types is the same statement.
//!
//! Only for statements whose text takes few shapes: a multi-row insert's text changes with
//! its row count, and each count would be one more statement kept on the connection.

use diesel::backend::Backend;
use diesel::query_builder::{AstPass, Query, QueryFragment, QueryId};
use diesel::query_dsl::LoadQuery;
use diesel::sql_types::Untyped;
use diesel::{QueryResult, QueryableByName, RunQueryDsl};

/// A multi-row insert of at most this many rows is prepared (one statement kept per row
/// count); a larger one, a consumer batch's, is prepared for its one use.
pub const FEW_ROWS: usize = 4;

/// A statement cached by its SQL text on each connection that runs it ([`PrepareOnce`]).
///
/// It runs by value only: diesel's own `execute` hands the statement on by reference, and
/// a reference asks the statement's parts whether it may be kept (they say no), so
/// [`Prepared::execute`] runs it as a query that returns no rows instead.
#[derive(Debug, Clone, Copy)]
pub struct Prepared<Q>(Q);

/// `.prepared()` on any diesel statement.
pub trait PrepareOnce: Sized {
    /// This statement, prepared once per connection (see the module's header).
    fn prepared(self) -> Prepared<Self> {
        Prepared(self)
    }

    /// This query, parsed and planned for its values on every run (loaded with
    /// [`RunQueryDsl`]), where diesel would keep it. For a query whose best plan depends on
    /// sizes — `id = ANY($1)`: PostgreSQL keeps a generic plan after five runs, and one made
    /// while the table was new (no statistics until autovacuum's first ANALYZE, a minute
    /// later) reads the whole table on every run after.
    fn planned_each_time(self) -> PlannedEachTime<Self> {
        PlannedEachTime(self)
    }
}

impl<Q: QueryId> PrepareOnce for Q {}

impl<Q> Prepared<Q> {
    /// Runs a statement that returns no rows (in place of [`RunQueryDsl::execute`], which
    /// would prepare it anew). The count of rows it changed is not known: diesel counts only by
    /// that path. Queries run with [`RunQueryDsl`]'s `load` and `get_result`.
    pub fn execute<'query, Conn>(self, conn: &mut Conn) -> QueryResult<()>
    where
        RowsIgnored<Q>: LoadQuery<'query, Conn, NoRow>,
    {
        RowsIgnored(self.0).load::<NoRow>(conn).map(|_| ())
    }
}

/// A query planned for its own values on every run ([`PrepareOnce::planned_each_time`]).
#[derive(Debug, Clone, Copy)]
pub struct PlannedEachTime<Q>(Q);

/// A [`Prepared`] statement run for its effect: a query of no columns.
#[derive(Debug)]
pub struct RowsIgnored<Q>(Q);

/// What a [`RowsIgnored`] statement returns (nothing).
#[derive(Debug, QueryableByName)]
pub struct NoRow {}

/// A wrapper that is the statement it wraps, with no id from its type (diesel then keys its
/// cache by the SQL text), saying whether a connection may keep it.
macro_rules! statement_wrapper {
    ($wrapper:ident, keep: $keep:expr) => {
        impl<Q> QueryId for $wrapper<Q> {
            type QueryId = ();
            const HAS_STATIC_QUERY_ID: bool = false;
        }

        impl<Q, DB> QueryFragment<DB> for $wrapper<Q>
        where
            DB: Backend,
            Q: QueryFragment<DB>,
        {
            fn walk_ast<'b>(&'b self, pass: AstPass<'_, 'b, DB>) -> QueryResult<()> {
                self.0.walk_ast(pass)
            }

            // diesel hides this method from its documentation (it is for backends); the
            // tests below fail if a diesel release stops asking it.
            fn is_safe_to_cache_prepared(&self, _: &DB) -> QueryResult<bool> {
                Ok($keep)
            }
        }

        impl<Q, Conn> RunQueryDsl<Conn> for $wrapper<Q> {}
    };
}

statement_wrapper!(Prepared, keep: true);
statement_wrapper!(RowsIgnored, keep: true);
statement_wrapper!(PlannedEachTime, keep: false);

impl<Q: Query> Query for Prepared<Q> {
    type SqlType = Q::SqlType;
}

impl<Q: Query> Query for PlannedEachTime<Q> {
    type SqlType = Q::SqlType;
}

impl<Q> Query for RowsIgnored<Q> {
    type SqlType = Untyped;
}

/// Runs `f` on `conn` and returns the SQL of each statement it prepared and kept: on both
/// backends a statement run twice is kept once, so a test sees whether it is prepared anew.
pub fn statements_kept<C, T>(conn: &mut C, f: impl FnOnce(&mut C) -> T) -> (T, Vec<String>)
where
    C: diesel::Connection,
{
    use diesel::connection::InstrumentationEvent;
    crate::db::watching(conn, f, |e| match e {
        InstrumentationEvent::CacheQuery { sql, .. } => Some((*sql).to_owned()),
        _ => None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use diesel::connection::SimpleConnection;
    use diesel::prelude::*;
    use diesel::sqlite::SqliteConnection;

    diesel::table! {
        items (id) {
            id -> BigInt,
            name -> Nullable<Text>,
            n -> BigInt,
        }
    }

    #[test]
    fn an_update_prepared_once_is_kept_and_one_not_prepared_is_not() {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.batch_execute("CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT, n BIGINT NOT NULL); INSERT INTO items VALUES (1, 'a', 0)")
            .unwrap();
        let update = |n: i64| diesel::update(items::table.find(1)).set(items::n.eq(n));
        let (_, plain) = statements_kept(&mut conn, |c| {
            for n in 0..3 {
                update(n).execute(c).unwrap();
            }
        });
        assert!(plain.is_empty(), "diesel keeps its UPDATEs now: {plain:?}");
        let (_, kept) = statements_kept(&mut conn, |c| {
            for n in 0..3 {
                update(n).prepared().execute(c).unwrap();
            }
        });
        assert_eq!(
            kept.len(),
            1,
            "prepared once for three executions: {kept:?}"
        );
        assert!(kept[0].starts_with("UPDATE"), "{kept:?}");
        let n: i64 = items::table
            .select(items::n)
            .find(1)
            .first(&mut conn)
            .unwrap();
        assert_eq!(n, 2, "each execution ran with its own values");
    }

    #[test]
    fn a_query_planned_each_time_is_not_kept() {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.batch_execute("CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT, n BIGINT NOT NULL); INSERT INTO items VALUES (1, 'a', 7), (2, 'b', 9)")
            .unwrap();
        // (SQLite lists an array's ids in the text, PostgreSQL binds one array: kept there.)
        let query = |id: i64| items::table.filter(items::id.eq(id)).select(items::n);
        let (_, kept) = statements_kept(&mut conn, |c| query(1).load::<i64>(c).unwrap());
        assert_eq!(kept.len(), 1, "diesel keeps its own selects: {kept:?}");
        let (found, kept) = statements_kept(&mut conn, |c| {
            [1, 2].map(|id| query(id).planned_each_time().get_result::<i64>(c).unwrap())
        });
        assert_eq!(found, [7, 9]);
        assert!(kept.is_empty(), "{kept:?}");
    }

    #[test]
    fn statements_of_another_text_are_kept_apart() {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.batch_execute(
            "CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT, n BIGINT NOT NULL)",
        )
        .unwrap();
        // An optional column left out changes the text: each shape is its own statement.
        #[derive(Insertable)]
        #[diesel(table_name = items)]
        struct NewItem<'a> {
            id: i64,
            name: Option<&'a str>,
            n: i64,
        }
        let (_, kept) = statements_kept(&mut conn, |c| {
            for (id, name) in [(1, Some("a")), (2, None), (3, Some("c")), (4, None)] {
                diesel::insert_into(items::table)
                    .values(NewItem { id, name, n: id })
                    .prepared()
                    .execute(c)
                    .unwrap();
            }
        });
        assert_eq!(kept.len(), 2, "{kept:?}");
        let rows: Vec<(i64, Option<String>)> = items::table
            .select((items::id, items::name))
            .order(items::id)
            .load(&mut conn)
            .unwrap();
        assert_eq!(
            rows,
            vec![
                (1, Some("a".into())),
                (2, None),
                (3, Some("c".into())),
                (4, None)
            ]
        );
    }

    #[test]
    fn a_prepared_sql_query_loads_rows() {
        let mut conn = SqliteConnection::establish(":memory:").unwrap();
        conn.batch_execute("CREATE TABLE items (id BIGINT PRIMARY KEY, name TEXT, n BIGINT NOT NULL); INSERT INTO items VALUES (1, 'a', 7), (2, 'b', 9)")
            .unwrap();
        #[derive(QueryableByName, Debug, PartialEq)]
        struct N {
            #[diesel(sql_type = diesel::sql_types::BigInt)]
            n: i64,
        }
        let (found, kept) = statements_kept(&mut conn, |c| {
            [1_i64, 2].map(|id| {
                diesel::sql_query("SELECT n FROM items WHERE id = ?")
                    .bind::<diesel::sql_types::BigInt, _>(id)
                    .prepared()
                    .get_result::<N>(c)
                    .unwrap()
            })
        });
        assert_eq!(found, [N { n: 7 }, N { n: 9 }]);
        assert_eq!(kept.len(), 1, "{kept:?}");
    }
}
