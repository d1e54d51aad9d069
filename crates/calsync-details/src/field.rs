//! The kinds a detail column can have, and a field's value as the store binds it.

use chrono::{DateTime, Utc};

/// A detail field's value, borrowed: what one row contributes to a column's `UNNEST` array.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Field<'a> {
    /// A `text` column.
    Text(Option<&'a str>),
    /// A `boolean` column.
    Bool(Option<bool>),
    /// A `timestamptz` column.
    Time(Option<DateTime<Utc>>),
}

impl Field<'_> {
    /// The array type its column is bound as.
    pub fn array_type(&self) -> &'static str {
        match self {
            Field::Text(_) => String::ARRAY_TYPE,
            Field::Bool(_) => bool::ARRAY_TYPE,
            Field::Time(_) => <DateTime<Utc>>::ARRAY_TYPE,
        }
    }

    /// Whether the value is absent.
    pub fn is_none(&self) -> bool {
        match self {
            Field::Text(v) => v.is_none(),
            Field::Bool(v) => v.is_none(),
            Field::Time(v) => v.is_none(),
        }
    }
}

/// A Rust type a detail column can have. A new kind is a variant of [`Field`], an impl
/// here and an array of it in calsync-store's `columns.rs`.
pub trait Kind: Sized {
    /// The column's type as `information_schema.columns.data_type` names it.
    const SQL_TYPE: &'static str;
    /// The array type an `UNNEST` parameter of it is cast to.
    const ARRAY_TYPE: &'static str;
    /// The value, borrowed.
    fn field(v: &Option<Self>) -> Field<'_>;
    /// The value as text to repair in place, for text columns.
    fn text_mut(_: &mut Option<Self>) -> Option<&mut String> {
        None
    }
}

impl Kind for String {
    const SQL_TYPE: &'static str = "text";
    const ARRAY_TYPE: &'static str = "text[]";
    fn field(v: &Option<Self>) -> Field<'_> {
        Field::Text(v.as_deref())
    }
    fn text_mut(v: &mut Option<Self>) -> Option<&mut String> {
        v.as_mut()
    }
}

impl Kind for bool {
    const SQL_TYPE: &'static str = "boolean";
    const ARRAY_TYPE: &'static str = "bool[]";
    fn field(v: &Option<Self>) -> Field<'_> {
        Field::Bool(*v)
    }
}

impl Kind for DateTime<Utc> {
    const SQL_TYPE: &'static str = "timestamp with time zone";
    const ARRAY_TYPE: &'static str = "timestamptz[]";
    fn field(v: &Option<Self>) -> Field<'_> {
        Field::Time(*v)
    }
}
