//! The reference data the rules use: shards, plans, reserved route keys.

use std::collections::BTreeMap;

/// Configuration of the services' rules; the defaults are the design's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServiceConfig {
    /// Shard name and capacity (spaces it can hold).
    pub shards: Vec<(String, i64)>,
    /// Plan name and quota (spaces an owner on it may have).
    pub plans: Vec<(String, i64)>,
    pub default_plan: String,
    /// Owners on another plan than the default.
    pub owner_plans: BTreeMap<String, String>,
    /// Route keys nobody may take.
    pub reserved: Vec<String>,
}

impl Default for ServiceConfig {
    fn default() -> Self {
        ServiceConfig {
            shards: (1..=4).map(|i| (format!("shard-{i}"), 250_000)).collect(),
            plans: vec![("free".into(), 3), ("team".into(), 50), ("enterprise".into(), 1_000_000)],
            default_plan: "free".into(),
            owner_plans: BTreeMap::new(),
            reserved: ["admin", "api", "www", "status"].map(String::from).to_vec(),
        }
    }
}

/// Parse `name:number,name:number`, as the `--shards` and `--plans` flags take it.
pub fn parse_pairs(text: &str, what: &str) -> Result<Vec<(String, i64)>, BadPair> {
    text.split(',')
        .filter(|s| !s.trim().is_empty())
        .map(|item| {
            let (name, n) = item
                .split_once(':')
                .ok_or_else(|| BadPair::NotAPair { what: what.to_owned(), item: item.to_owned() })?;
            let n: i64 = n.trim().parse().ok().filter(|n| *n >= 0).ok_or_else(|| BadPair::NotANumber {
                what: what.to_owned(),
                item: item.to_owned(),
                n: n.to_owned(),
            })?;
            Ok((name.trim().to_owned(), n))
        })
        .collect()
}

/// An item of a `name:number` list that is not one: the user fixes the flag.
#[derive(Debug, thiserror::Error)]
pub enum BadPair {
    #[error("{what} `{item}` is not of the form name:number (e.g. shard-1:250000)")]
    NotAPair { what: String, item: String },
    #[error("{what} `{item}`: `{n}` is not a whole number of 0 or more")]
    NotANumber { what: String, item: String, n: String },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pairs_parse_and_errors_say_what_is_expected() {
        assert_eq!(parse_pairs("a:1, b:2", "shard").unwrap(), vec![("a".into(), 1), ("b".into(), 2)]);
        assert!(parse_pairs("a", "shard").unwrap_err().to_string().contains("name:number"));
        assert!(parse_pairs("a:-1", "shard").unwrap_err().to_string().contains("whole number"));
    }
}
