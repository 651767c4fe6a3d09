//! The query of `GET /workflows` (and of the console's list): which sagas, how many, and from where. Pure: it turns the query
//! string into the orchestrator's [`Filter`], or one sentence that says what was wrong.

use std::time::UNIX_EPOCH;

use baton_orchestrator::query::{Cursor, Filter};
use baton_workflow::SagaStatus;
use uuid::Uuid;

/// Sagas a page holds unless `limit` says otherwise.
pub const DEFAULT_LIMIT: usize = 50;
/// The most a page holds: a client walks further with the cursor.
pub const MAX_LIMIT: usize = 500;

/// What a `GET /workflows` asked for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    pub filter: Filter,
    pub limit: usize,
    pub after: Option<Cursor>,
}

impl Listing {
    /// Read `state`, `workflow`, `version`, `space`, `since`, `limit` and `cursor` from a query string
    /// (percent-encoded, as it came). An unknown or repeated parameter is an error, so that a typo
    /// is not silently a filter left out.
    pub fn parse(query: &str) -> Result<Listing, String> {
        let mut asked = Listing { filter: Filter::default(), limit: DEFAULT_LIMIT, after: None };
        let mut seen = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if seen.contains(&key) {
                return Err(format!("`{key}` is given twice; give each parameter once"));
            }
            match &*key {
                "state" => asked.filter.status = Some(SagaStatus::parse(&value).map_err(|e| e.to_string())?),
                "workflow" => asked.filter.workflow = Some(value.to_string()),
                "version" => asked.filter.version = Some(value.to_string()),
                "space" => {
                    let id = Uuid::parse_str(&value)
                        .map_err(|_| format!("space `{value}` is not a UUID (a space's `id`)"))?;
                    asked.filter.space_id = Some(id);
                }
                "since" => asked.filter.since_ms = Some(since(&value)?),
                "limit" => {
                    asked.limit =
                        value.parse().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
                            format!("limit `{value}` is not a number from 1 to {MAX_LIMIT}")
                        })?;
                }
                "cursor" => asked.after = Some(value.parse()?),
                other => {
                    return Err(format!(
                        "`{other}` is not a parameter of GET /workflows; it takes state, workflow, version, space, \
                         since, limit and cursor"
                    ));
                }
            }
            seen.push(key);
        }
        Ok(asked)
    }
}

/// A time as an RFC 3339 timestamp (`2026-11-30T10:00:00Z`) or milliseconds since the epoch.
fn since(value: &str) -> Result<i64, String> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    let at = humantime::parse_rfc3339_weak(value).map_err(|e| {
        format!("since `{value}` is not a time ({e}); give an RFC 3339 time such as 2026-11-30T10:00:00Z, or ms since the epoch")
    })?;
    let ms =
        at.duration_since(UNIX_EPOCH).map_err(|_| format!("since `{value}` is before 1970"))?.as_millis();
    i64::try_from(ms).map_err(|_| format!("since `{value}` is too far ahead"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nothing_asked_is_the_first_page_of_everything() {
        assert_eq!(
            Listing::parse("").unwrap(),
            Listing { filter: Filter::default(), limit: DEFAULT_LIMIT, after: None }
        );
    }

    #[test]
    fn every_parameter_is_read() {
        let space = Uuid::from_u128(9);
        let cursor = Cursor { created_at_ms: 1_700_000_000_000, id: Uuid::from_u128(3) };
        let q = format!(
            "state=rolled_back&workflow=create-space&space={space}&since=2026-11-30T10:00:00Z&limit=2&cursor={cursor}"
        );
        let asked = Listing::parse(&q).unwrap();
        assert_eq!(asked.filter.status, Some(SagaStatus::RolledBack));
        assert_eq!(asked.filter.workflow.as_deref(), Some("create-space"));
        assert_eq!(asked.filter.space_id, Some(space));
        assert_eq!(asked.filter.since_ms, Some(1_796_032_800_000));
        assert_eq!(asked.limit, 2);
        assert_eq!(asked.after, Some(cursor));
        assert_eq!(Listing::parse("since=1234").unwrap().filter.since_ms, Some(1234));
    }

    #[test]
    fn a_mistake_is_one_sentence_that_names_it() {
        let err = |q: &str| Listing::parse(q).unwrap_err();
        assert!(err("state=rolledback").contains("rolled_back"), "{}", err("state=rolledback"));
        assert!(err("limit=0").contains("from 1 to 500"));
        assert!(err("limit=501").contains("from 1 to 500"));
        assert!(err("space=acme").contains("not a UUID"));
        assert!(err("since=yesterday").contains("RFC 3339"));
        assert!(err("cursor=abc").contains("next_cursor"));
        assert!(err("status=running").contains("takes state, workflow"));
        assert!(err("limit=1&limit=2").contains("twice"));
    }
}
