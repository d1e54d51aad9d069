//! The read model's detail columns (subject, organizer, location, ...), as bound to a write:
//! the per-row arrays of an `UNNEST` and their `ON CONFLICT` updates, shared by the event and
//! the series upserts. Which columns there are is calsync-details' table: nothing here names
//! one.

use calsync_details::{COLUMNS, Details, Field};
use chrono::{DateTime, Utc};
use sqlx::Postgres;
use sqlx::postgres::PgArguments;
use std::sync::LazyLock;

/// A statement that takes bound parameters: a plain query or one that returns a column.
pub(crate) trait Binds<'q>: Sized {
    /// Binds the next parameter.
    fn bind_one<T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(self, v: T) -> Self;
}

impl<'q> Binds<'q> for sqlx::query::Query<'q, Postgres, PgArguments> {
    fn bind_one<T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(self, v: T) -> Self {
        self.bind(v)
    }
}

impl<'q, O> Binds<'q> for sqlx::query::QueryAs<'q, Postgres, O, PgArguments> {
    fn bind_one<T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(self, v: T) -> Self {
        self.bind(v)
    }
}

impl<'q, O> Binds<'q> for sqlx::query::QueryScalar<'q, Postgres, O, PgArguments> {
    fn bind_one<T: 'q + sqlx::Encode<'q, Postgres> + sqlx::Type<Postgres>>(self, v: T) -> Self {
        self.bind(v)
    }
}

/// One detail column's per-row values, bound as an `UNNEST` parameter.
enum Array<'a> {
    Text(Vec<Option<&'a str>>),
    Bool(Vec<Option<bool>>),
    Time(Vec<Option<DateTime<Utc>>>),
}

impl<'a> Array<'a> {
    /// An empty array of the field's kind.
    fn of_kind(f: Field<'_>, rows: usize) -> Array<'a> {
        match f {
            Field::Text(_) => Array::Text(Vec::with_capacity(rows)),
            Field::Bool(_) => Array::Bool(Vec::with_capacity(rows)),
            Field::Time(_) => Array::Time(Vec::with_capacity(rows)),
        }
    }

    fn push(&mut self, f: Field<'a>) {
        // Column i of every `Details` has one kind (calsync-details' table): the arms that
        // pair different kinds cannot be reached.
        match (self, f) {
            (Array::Text(v), Field::Text(x)) => v.push(x),
            (Array::Bool(v), Field::Bool(x)) => v.push(x),
            (Array::Time(v), Field::Time(x)) => v.push(x),
            (Array::Text(_) | Array::Bool(_) | Array::Time(_), _) => {
                debug_assert!(false, "a detail column changed kind between rows")
            }
        }
    }
}

/// The per-row arrays of the read model's detail columns (calsync-details' `COLUMNS`, in
/// order), bound as `UNNEST` parameters.
pub(crate) struct DetailColumns<'a>(Vec<Array<'a>>);

/// The detail columns, in the order [`DetailColumns::bind`] binds them.
pub(crate) static DETAIL_COLUMNS: LazyLock<String> = LazyLock::new(|| {
    COLUMNS
        .iter()
        .map(|c| c.name)
        .collect::<Vec<_>>()
        .join(", ")
});

impl<'a> DetailColumns<'a> {
    pub(crate) fn of(details: impl ExactSizeIterator<Item = &'a Details>) -> Self {
        let rows = details.len();
        let mut arrays: Vec<Array<'a>> = Details::default()
            .fields()
            .into_iter()
            .map(|f| Array::of_kind(f, rows))
            .collect();
        for d in details {
            for (a, f) in arrays.iter_mut().zip(d.fields()) {
                a.push(f);
            }
        }
        DetailColumns(arrays)
    }

    pub(crate) fn bind<'q, Q: Binds<'q>>(&'q self, q: Q) -> Q {
        self.0.iter().fold(q, |q, a| match a {
            Array::Text(v) => q.bind_one(v),
            Array::Bool(v) => q.bind_one(v),
            Array::Time(v) => q.bind_one(v),
        })
    }
}

/// `$first::text[], …` for the detail columns' parameters.
pub(crate) fn detail_params(first: usize) -> String {
    COLUMNS
        .iter()
        .enumerate()
        .map(|(i, c)| format!("${}::{}", first + i, c.array_type))
        .collect::<Vec<_>>()
        .join(", ")
}

/// `col = EXCLUDED.col` (or, for a partial row, `COALESCE(EXCLUDED.col, table.col)`).
pub(crate) fn detail_updates(table: &str, partial: bool) -> String {
    COLUMNS
        .iter()
        .map(|c| {
            let c = c.name;
            if partial {
                format!("{c} = COALESCE(EXCLUDED.{c}, {table}.{c})")
            } else {
                format!("{c} = EXCLUDED.{c}")
            }
        })
        .collect::<Vec<_>>()
        .join(", ")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Store;
    use sqlx::PgPool;

    /// calsync-details' table against the migrated schema: a column added there without its
    /// migration (or a migration that forgot the view) fails here, not in production.
    #[sqlx::test(migrations = false)]
    async fn every_detail_column_is_in_the_tables_and_the_view_with_its_type(pool: PgPool) {
        Store::from_pool(pool.clone()).migrate().await.unwrap();
        let types = |table: &'static str| {
            let pool = pool.clone();
            async move {
                let rows: Vec<(String, String)> = sqlx::query_as(
                    "SELECT column_name::text, data_type::text FROM information_schema.columns \
                     WHERE table_schema = current_schema() AND table_name = $1",
                )
                .bind(table)
                .fetch_all(&pool)
                .await
                .unwrap();
                rows.into_iter()
                    .collect::<std::collections::HashMap<String, String>>()
            }
        };
        let (events, series, view) = (
            types("events").await,
            types("series").await,
            types("calendar_events").await,
        );
        for c in COLUMNS {
            for (table, cols) in [("events", &events), ("series", &series)] {
                assert_eq!(
                    cols.get(c.name).map(String::as_str),
                    Some(c.sql_type),
                    "{table}.{}",
                    c.name
                );
            }
            let shown = view.get(c.name).map(String::as_str);
            if c.in_view {
                assert_eq!(shown, Some(c.sql_type), "calendar_events.{}", c.name);
            } else {
                assert_eq!(shown, None, "calendar_events shows {}", c.name);
            }
        }
    }

    #[test]
    fn the_statement_pieces_follow_the_table() {
        assert_eq!(DETAIL_COLUMNS.split(", ").count(), COLUMNS.len());
        assert!(detail_params(5).starts_with("$5::text[], "));
        assert_eq!(detail_params(5).matches("::").count(), COLUMNS.len());
        assert!(
            detail_updates("events", true)
                .contains("subject = COALESCE(EXCLUDED.subject, events.subject)")
        );
        let d = [Details::default(), Details::default()];
        let c = DetailColumns::of(d.iter());
        assert_eq!(c.0.len(), COLUMNS.len());
        assert!(c.0.iter().all(|a| match a {
            Array::Text(v) => v.len() == 2,
            Array::Bool(v) => v.len() == 2,
            Array::Time(v) => v.len() == 2,
        }));
    }
}
