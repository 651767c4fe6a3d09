//! The query of `GET /workflows` (and of the console's list): which sagas, how many, and from where. Pure: it turns the query
//! string into the orchestrator's [`Filter`], or one sentence that says what was wrong.

use std::time::UNIX_EPOCH;

use baton_orchestrator::query::{Cursor, Filter, Search};
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
    /// Read the parameters ([`PARAMETERS`]) from a query string (percent-encoded, as it came).
    /// An unknown or repeated parameter is an error, so that a typo is not silently a filter
    /// left out; an empty one is no filter (what a form sends for a field left blank).
    pub fn parse(query: &str) -> Result<Listing, String> {
        let mut asked = Listing { filter: Filter::default(), limit: DEFAULT_LIMIT, after: None };
        let mut seen = Vec::new();
        for (key, value) in url::form_urlencoded::parse(query.as_bytes()) {
            if seen.contains(&key) {
                return Err(format!("`{key}` is given twice; give each parameter once"));
            }
            let value = value.trim();
            if value.is_empty() && PARAMETERS.contains(&&*key) {
                seen.push(key);
                continue;
            }
            match &*key {
                "state" => asked.filter.status = Some(SagaStatus::parse(value).map_err(|e| e.to_string())?),
                "workflow" => asked.filter.workflow = Some(value.to_owned()),
                "version" => asked.filter.version = Some(value.to_owned()),
                "space" => {
                    let id = Uuid::parse_str(value)
                        .map_err(|_| format!("space `{value}` is not a UUID (a space's `id`)"))?;
                    asked.filter.space_id = Some(id);
                }
                "id" => {
                    let id = Uuid::parse_str(value)
                        .map_err(|_| format!("id `{value}` is not a UUID (a saga's `workflow_id`)"))?;
                    asked.filter.id = Some(id);
                }
                "name" => asked.filter.name = Some(value.to_owned()),
                "owner" => asked.filter.owner = Some(owner(value)),
                "q" => {
                    // An id is matched as stored (hyphenated), however it was typed.
                    let text = Uuid::parse_str(value).map_or_else(|_| value.to_owned(), |id| id.to_string());
                    asked.filter.search = Some(Search { text, owner: owner(value) });
                }
                "since" => asked.filter.since_ms = Some(time("since", value)?),
                "until" => asked.filter.until_ms = Some(time("until", value)?),
                "limit" => {
                    asked.limit =
                        value.parse().ok().filter(|n| (1..=MAX_LIMIT).contains(n)).ok_or_else(|| {
                            format!("limit `{value}` is not a number from 1 to {MAX_LIMIT}")
                        })?;
                }
                "cursor" => asked.after = Some(value.parse()?),
                other => {
                    return Err(format!(
                        "`{other}` is not a parameter of GET /workflows; it takes {}",
                        PARAMETERS.join(", ")
                    ));
                }
            }
            seen.push(key);
        }
        Ok(asked)
    }
}

/// The parameters `GET /workflows` takes.
pub const PARAMETERS: [&str; 12] = [
    "state", "workflow", "version", "space", "id", "name", "owner", "q", "since", "until", "limit", "cursor",
];

/// An owner as the store keeps it (normalised as the gateway does on `POST /spaces`); one that
/// no request could have named stays as given, and matches nothing.
fn owner(value: &str) -> String {
    crate::normalise_owner(value).unwrap_or_else(|_| value.to_owned())
}

/// The time `key` as an RFC 3339 timestamp (`2026-11-30T10:00:00Z`) or milliseconds since the
/// epoch.
fn time(key: &str, value: &str) -> Result<i64, String> {
    if let Ok(ms) = value.parse::<i64>() {
        return Ok(ms);
    }
    let at = humantime::parse_rfc3339_weak(value).map_err(|e| {
        format!("{key} `{value}` is not a time ({e}); give an RFC 3339 time such as 2026-11-30T10:00:00Z, or ms since the epoch")
    })?;
    let ms =
        at.duration_since(UNIX_EPOCH).map_err(|_| format!("{key} `{value}` is before 1970"))?.as_millis();
    i64::try_from(ms).map_err(|_| format!("{key} `{value}` is too far ahead"))
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
    fn search_by_name_owner_id_and_time_range() {
        let id = Uuid::from_u128(7);
        let q = format!("id={}&name=acme&owner=%20Alice%20&until=2026-11-30T11:00:00Z", id.simple());
        let asked = Listing::parse(&q).unwrap().filter;
        assert_eq!(asked.id, Some(id));
        assert_eq!(asked.name.as_deref(), Some("acme"));
        assert_eq!(asked.owner.as_deref(), Some(crate::normalise_owner("Alice").unwrap().as_str()));
        assert_eq!(asked.until_ms, Some(1_796_036_400_000));
        let any = Listing::parse(&format!("q={}", id.simple())).unwrap().filter.search.unwrap();
        assert_eq!(any.text, id.to_string(), "an id is looked for hyphenated, as stored");
        let any = Listing::parse("q=acme").unwrap().filter.search.unwrap();
        assert_eq!(any.text, "acme");
    }

    #[test]
    fn a_blank_field_is_no_filter() {
        assert_eq!(Listing::parse("state=&q=%20&since=").unwrap(), Listing::parse("").unwrap());
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
        assert!(err("until=later").contains("until `later` is not a time"));
        assert!(err("id=abc").contains("workflow_id"));
        assert!(err("limit=1&limit=2").contains("twice"));
    }
}
