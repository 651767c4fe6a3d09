//! The values that cross the store port: parameters in, rows out, the same on both backends.
//!
//! Components write their SQL once, in the subset both engines share (`?1` parameters,
//! `INTEGER` for 64-bit numbers, `ON CONFLICT`, `RETURNING`, `CAST`), and read rows through
//! [`Row::get`]. The backend turns a [`Value`] into its own wire type; a component never sees
//! which one it runs on.

use crate::StoreError;

/// One SQL value: what a parameter is, and what a column reads as. Booleans are integers (0 or
/// 1), as SQLite stores them; PostgreSQL's `boolean` reads as one too.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    Null,
    Integer(i64),
    Real(f64),
    Text(String),
}

/// A Rust value that can be a parameter.
pub trait Param {
    fn value(&self) -> Value;
}

macro_rules! integer_param {
    ($($t:ty),*) => {$(
        impl Param for $t {
            fn value(&self) -> Value {
                Value::Integer(*self as i64)
            }
        }
    )*};
}
integer_param!(i64, i32, i16, u32, u16, u8);

impl Param for u64 {
    /// Counts and times fit; a value past `i64::MAX` would be a bug, stored as the maximum.
    fn value(&self) -> Value {
        Value::Integer(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl Param for usize {
    fn value(&self) -> Value {
        Value::Integer(i64::try_from(*self).unwrap_or(i64::MAX))
    }
}

impl Param for bool {
    fn value(&self) -> Value {
        Value::Integer(i64::from(*self))
    }
}

impl Param for f64 {
    fn value(&self) -> Value {
        Value::Real(*self)
    }
}

impl Param for str {
    fn value(&self) -> Value {
        Value::Text(self.to_owned())
    }
}

impl Param for String {
    fn value(&self) -> Value {
        Value::Text(self.clone())
    }
}

impl Param for uuid::Uuid {
    /// Ids are stored as their hyphenated text.
    fn value(&self) -> Value {
        Value::Text(self.to_string())
    }
}

impl Param for Value {
    fn value(&self) -> Value {
        self.clone()
    }
}

impl<T: Param + ?Sized> Param for &T {
    fn value(&self) -> Value {
        (**self).value()
    }
}

impl<T: Param> Param for Option<T> {
    fn value(&self) -> Value {
        self.as_ref().map_or(Value::Null, Param::value)
    }
}

/// The parameters of one statement: `()` for none, an array of one type (`[id]`), or
/// [`params!`](crate::params) for several types.
pub trait Params {
    fn values(self) -> Vec<Value>;
}

impl Params for () {
    fn values(self) -> Vec<Value> {
        Vec::new()
    }
}

impl Params for &[&dyn Param] {
    fn values(self) -> Vec<Value> {
        self.iter().map(|p| p.value()).collect()
    }
}

impl<T: Param, const N: usize> Params for [T; N] {
    fn values(self) -> Vec<Value> {
        self.iter().map(Param::value).collect()
    }
}

impl Params for Vec<Value> {
    fn values(self) -> Vec<Value> {
        self
    }
}

/// Parameters of several types: `params![id, name, now_ms()]`.
#[macro_export]
macro_rules! params {
    ($($p:expr),* $(,)?) => {
        &[$(&$p as &dyn $crate::Param),*] as &[&dyn $crate::Param]
    };
}

/// A row read from either backend, its columns in the order of the query.
#[derive(Debug, Clone)]
pub struct Row(pub(crate) Vec<Value>);

impl Row {
    /// Column `i`, as `T`: an error that names the column when it is missing or of another type.
    pub fn get<T: FromValue>(&self, i: usize) -> Result<T, StoreError> {
        let v = self.0.get(i).ok_or_else(|| StoreError::Type(format!("the row has no column {i}")))?;
        T::from_value(v).map_err(|want| StoreError::Type(format!("column {i} is {v:?}, not {want}")))
    }
}

/// A Rust type a column can be read as; the error is what was expected.
pub trait FromValue: Sized {
    fn from_value(v: &Value) -> Result<Self, &'static str>;
}

impl FromValue for i64 {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Integer(n) => Ok(*n),
            _ => Err("an integer"),
        }
    }
}

macro_rules! narrow_integer {
    ($($t:ty),*) => {$(
        impl FromValue for $t {
            fn from_value(v: &Value) -> Result<Self, &'static str> {
                match v {
                    Value::Integer(n) => <$t>::try_from(*n).map_err(|_| concat!("an integer in range of ", stringify!($t))),
                    _ => Err("an integer"),
                }
            }
        }
    )*};
}
narrow_integer!(i32, u32, u16, u64, usize);

impl FromValue for bool {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Integer(n) => Ok(*n != 0),
            _ => Err("a boolean"),
        }
    }
}

impl FromValue for f64 {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Real(x) => Ok(*x),
            Value::Integer(n) => Ok(*n as f64),
            _ => Err("a number"),
        }
    }
}

impl FromValue for String {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Text(s) => Ok(s.clone()),
            _ => Err("text"),
        }
    }
}

impl FromValue for uuid::Uuid {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Text(s) => s.parse().map_err(|_| "a UUID"),
            _ => Err("a UUID as text"),
        }
    }
}

impl FromValue for Value {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        Ok(v.clone())
    }
}

impl<T: FromValue> FromValue for Option<T> {
    fn from_value(v: &Value) -> Result<Self, &'static str> {
        match v {
            Value::Null => Ok(None),
            v => T::from_value(v).map(Some),
        }
    }
}

/// `query_row(..).optional()`: no row is `None`, not an error.
pub trait OptionalExtension<T> {
    fn optional(self) -> Result<Option<T>, StoreError>;
}

impl<T> OptionalExtension<T> for Result<T, StoreError> {
    fn optional(self) -> Result<Option<T>, StoreError> {
        match self {
            Ok(v) => Ok(Some(v)),
            Err(StoreError::NoRows) => Ok(None),
            Err(e) => Err(e),
        }
    }
}

/// SQL of the portable subset in PostgreSQL's dialect: `?N` parameters become `$N`, `INTEGER`
/// becomes `BIGINT` (SQLite's integers are 64-bit), an `AUTOINCREMENT` key an identity column,
/// `BLOB` is `BYTEA`. Quoted text and identifiers are left alone.
pub(crate) fn to_postgres(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len() + 16);
    let mut chars = sql.char_indices().peekable();
    while let Some((i, c)) = chars.next() {
        match c {
            '\'' | '"' => {
                out.push(c);
                for (_, d) in chars.by_ref() {
                    out.push(d);
                    if d == c {
                        break;
                    }
                }
            }
            '?' if chars.peek().is_some_and(|(_, d)| d.is_ascii_digit()) => out.push('$'),
            c if c.is_ascii_alphabetic() || c == '_' => {
                let mut end = i + c.len_utf8();
                while let Some(&(j, d)) = chars.peek() {
                    if d.is_ascii_alphanumeric() || d == '_' {
                        end = j + d.len_utf8();
                        chars.next();
                    } else {
                        break;
                    }
                }
                let word = &sql[i..end];
                if word.eq_ignore_ascii_case("INTEGER") {
                    // A column `INTEGER PRIMARY KEY` is SQLite's row id, numbered when left out.
                    let rest = &sql[end..];
                    let keys = ["PRIMARY KEY AUTOINCREMENT", "PRIMARY KEY"];
                    match keys.iter().find_map(|k| starts_with_words(rest, k)) {
                        Some(len) => {
                            out.push_str("BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY");
                            let stop = end + len;
                            while chars.peek().is_some_and(|&(j, _)| j < stop) {
                                chars.next();
                            }
                        }
                        None => out.push_str("BIGINT"),
                    }
                } else if word.eq_ignore_ascii_case("BLOB") {
                    out.push_str("BYTEA");
                } else {
                    out.push_str(word);
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The length of `s` up to the end of `words` (any case, any blanks between them, then a word
/// boundary), if it starts with them.
fn starts_with_words(s: &str, words: &str) -> Option<usize> {
    let mut at = 0;
    for word in words.split(' ') {
        let rest = &s[at..];
        let blank = rest.len() - rest.trim_start().len();
        let rest = &rest[blank..];
        if rest.len() < word.len() || !rest[..word.len()].eq_ignore_ascii_case(word) {
            return None;
        }
        at += blank + word.len();
    }
    let boundary = s[at..].chars().next().is_none_or(|c| !(c.is_ascii_alphanumeric() || c == '_'));
    boundary.then_some(at)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_portable_subset_reads_as_postgres() {
        assert_eq!(
            to_postgres("SELECT a FROM t WHERE b = ?1 AND c = ?12 AND d = '?1 INTEGER'"),
            "SELECT a FROM t WHERE b = $1 AND c = $12 AND d = '?1 INTEGER'"
        );
        assert_eq!(
            to_postgres("CREATE TABLE t (seq INTEGER PRIMARY KEY AUTOINCREMENT, n integer NOT NULL, b BLOB)"),
            "CREATE TABLE t (seq BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY, n BIGINT NOT NULL, b BYTEA)"
        );
        assert_eq!(
            to_postgres(
                "CREATE TABLE d (id INTEGER PRIMARY KEY,\n k INTEGER PRIMARY KEYS, j INTEGER  primary  key)"
            ),
            "CREATE TABLE d (id BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY,\n k BIGINT PRIMARY KEYS, \
             j BIGINT GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY)"
        );
        assert_eq!(
            to_postgres("SELECT CAST(SUM(x) AS INTEGER), integers"),
            "SELECT CAST(SUM(x) AS BIGINT), integers"
        );
        assert_eq!(to_postgres("\"INTEGER\" é ?"), "\"INTEGER\" é ?");
    }

    #[test]
    fn rows_read_as_the_types_asked_or_say_why_not() {
        let row = Row(vec![Value::Integer(1), Value::Null, Value::Text("x".into())]);
        assert!(row.get::<bool>(0).unwrap());
        assert_eq!(row.get::<Option<i64>>(1).unwrap(), None);
        assert_eq!(row.get::<String>(2).unwrap(), "x");
        let e = row.get::<i64>(2).unwrap_err().to_string();
        assert!(e.contains("column 2") && e.contains("integer"), "{e}");
        assert!(row.get::<i64>(3).is_err());
        let p: Vec<Value> = crate::params![1_i64, "a", None::<String>, true].values();
        assert_eq!(p, vec![Value::Integer(1), Value::Text("a".into()), Value::Null, Value::Integer(1)]);
    }
}
