//! Validation of `POST /spaces` requests: one sentence per mistake, and one spelling per owner.
//!
//! The owner is the key of the free plan's quota, so every way of writing one person's name must
//! come out the same: trimmed, Unicode NFKC, then full case folding (`Carol`, `CAROL`, `carol `
//! and `carol` are one owner; so are the NFC and NFD spellings of `andré`). Characters a reader
//! cannot see (control and format characters, such as U+200B) are refused rather than dropped:
//! silently removing them would make two different strings one owner without the client knowing.

use std::collections::HashSet;
use std::fmt;

use axum::http::HeaderMap;
use axum::http::header::{CONTENT_ENCODING, CONTENT_TYPE};
use icu_casemap::CaseMapper;
use icu_normalizer::ComposingNormalizerBorrowed;
use icu_properties::CodePointMapData;
use icu_properties::props::GeneralCategory;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Serialize};

/// Largest body `POST /spaces` accepts.
pub const MAX_BODY: usize = 16 * 1024;

/// Longest name: one DNS label, since the name becomes a route.
const MAX_NAME: usize = 63;
/// Longest owner, in characters after normalisation (an e-mail address fits).
const MAX_OWNER: usize = 254;

/// A valid request to create a space, its owner normalised.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSpace {
    pub name: String,
    pub owner: String,
}

/// Why a request was refused: the HTTP status and the sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub status: u16,
    pub message: String,
}

fn invalid(status: u16, message: impl Into<String>) -> Invalid {
    Invalid { status, message: message.into() }
}

const EXPECTED: &str = r#"send {"name": "my-space", "owner": "alice"}"#;

/// Check the headers of a `POST /spaces` before reading its body: the body must be JSON
/// (`application/json`, with `charset=utf-8` if any charset) and not encoded, or 415.
pub fn check_headers(headers: &HeaderMap) -> Result<(), Invalid> {
    const JSON: &str = "send it as `content-type: application/json`";
    let mut types = headers.get_all(CONTENT_TYPE).iter();
    let ct = match (types.next(), types.next()) {
        (None, _) => return Err(invalid(415, format!("the request has no content-type; {JSON}"))),
        (Some(_), Some(_)) => return Err(invalid(415, format!("the request has two content-types; {JSON}"))),
        (Some(ct), None) => ct,
    };
    let shown = String::from_utf8_lossy(ct.as_bytes());
    let mime: mime::Mime = ct
        .to_str()
        .ok()
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| invalid(415, format!("the content-type `{shown}` cannot be read; {JSON}")))?;
    if mime.essence_str() != mime::APPLICATION_JSON.essence_str() {
        return Err(invalid(415, format!("the content-type is `{shown}`, not JSON; {JSON}")));
    }
    if let Some(charset) = mime.get_param(mime::CHARSET)
        && charset != mime::UTF_8
    {
        return Err(invalid(415, format!("the body must be UTF-8, not `{charset}`; {JSON}")));
    }
    for value in headers.get_all(CONTENT_ENCODING) {
        let value = String::from_utf8_lossy(value.as_bytes());
        if let Some(coding) = value.split(',').map(str::trim).find(|c| !c.eq_ignore_ascii_case("identity")) {
            return Err(invalid(
                415,
                format!(
                    "the body is encoded with `{coding}`, which this API does not take; send it unencoded"
                ),
            ));
        }
    }
    Ok(())
}

/// Parse and check a body: JSON (400 otherwise, and for a field given twice), an object with a
/// valid `name` and `owner` and nothing else (422 otherwise). The owner comes back normalised.
pub fn validate(body: &[u8]) -> Result<CreateSpace, Invalid> {
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| invalid(400, format!("the body is not valid JSON ({e}); {EXPECTED}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| invalid(422, format!("the body must be a JSON object; {EXPECTED}")))?;
    // serde_json keeps the last of two equal keys: `{"name":"a","name":"b"}` would create `b`.
    serde_json::from_slice::<UniqueKeys>(body)
        .map_err(|e| invalid(400, format!("{e}; give each field once")))?;
    let field = |name: &str| -> Result<String, Invalid> {
        match obj.get(name) {
            None => Err(invalid(422, format!("the field `{name}` is missing; {EXPECTED}"))),
            // Given, so not missing: the client wrote `null` where a string belongs.
            Some(serde_json::Value::Null) => {
                Err(invalid(422, format!("the field `{name}` is null; it must be a string; {EXPECTED}")))
            }
            Some(serde_json::Value::String(s)) => Ok(s.clone()),
            Some(_) => Err(invalid(422, format!("the field `{name}` must be a string; {EXPECTED}"))),
        }
    };
    let name = field("name")?;
    let owner = field("owner")?;
    if let Some(extra) = obj.keys().find(|k| *k != "name" && *k != "owner") {
        return Err(invalid(422, format!("the field `{extra}` is not known; only `name` and `owner` are")));
    }
    check_name(&name)?;
    let owner = normalise_owner(&owner)?;
    Ok(CreateSpace { name, owner })
}

/// A valid name is one DNS label in lowercase: 1 to 63 of `a-z`, `0-9` and `-`, starting and
/// ending with a letter or a digit (it becomes the space's route).
fn check_name(name: &str) -> Result<(), Invalid> {
    let length = name.chars().count();
    if length == 0 || length > MAX_NAME {
        return Err(invalid(
            422,
            format!("the name must be 1 to {MAX_NAME} characters long, and `{name}` has {length}"),
        ));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(invalid(
            422,
            format!("the name may only hold lowercase letters, digits and `-`, and `{name}` holds `{bad}`"),
        ));
    }
    if name.starts_with('-') || name.ends_with('-') {
        return Err(invalid(
            422,
            format!("the name must start and end with a letter or a digit, and `{name}` does not"),
        ));
    }
    Ok(())
}

/// One spelling per owner: trim, refuse invisible characters, then NFKC, full case folding,
/// and NFKC again (folding can undo it), as Unicode's NFKC_Casefold.
pub fn normalise_owner(raw: &str) -> Result<String, Invalid> {
    let trimmed = raw.trim();
    // Positions are counted in the owner as sent, leading spaces included.
    let lead = raw.chars().count() - raw.trim_start().chars().count();
    let categories = CodePointMapData::<GeneralCategory>::new();
    for (i, c) in trimmed.chars().enumerate() {
        let kind = match categories.get(c) {
            GeneralCategory::Control => "a control character",
            GeneralCategory::Format => "an invisible format character",
            _ => continue,
        };
        return Err(invalid(
            422,
            format!(
                "the owner holds {} at character {}, {kind}; remove it (an owner is a name or an address)",
                CodePoint(c),
                lead + i + 1
            ),
        ));
    }
    let nfkc = ComposingNormalizerBorrowed::new_nfkc();
    let composed = nfkc.normalize(trimmed);
    let folded = CaseMapper::new().fold_string(&composed);
    let owner = nfkc.normalize(&folded).trim().to_owned();
    let length = owner.chars().count();
    if length == 0 || length > MAX_OWNER {
        return Err(invalid(
            422,
            format!("the owner must be 1 to {MAX_OWNER} characters long once trimmed, not {length}"),
        ));
    }
    Ok(owner)
}

/// `U+200B`.
struct CodePoint(char);

impl fmt::Display for CodePoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "U+{:04X}", u32::from(self.0))
    }
}

/// A JSON object whose keys are all different (its values are skipped).
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Keys;
        impl<'de> Visitor<'de> for Keys {
            type Value = UniqueKeys;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }
            fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
                let mut seen = HashSet::new();
                while let Some(key) = map.next_key::<String>()? {
                    if !seen.insert(key.clone()) {
                        return Err(de::Error::custom(format_args!("the field `{key}` is given twice")));
                    }
                    map.next_value::<IgnoredAny>()?;
                }
                Ok(UniqueKeys)
            }
        }
        d.deserialize_map(Keys)
    }
}

#[cfg(test)]
mod tests {
    use axum::http::HeaderValue;

    use super::*;

    fn err(body: &str) -> Invalid {
        validate(body.as_bytes()).unwrap_err()
    }

    fn owner(raw: &str) -> String {
        normalise_owner(raw).unwrap_or_else(|e| panic!("{raw:?}: {}", e.message))
    }

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn accepts_a_good_body() {
        assert_eq!(
            validate(br#"{"name":"acme-1","owner":"alice@example.com"}"#).unwrap(),
            CreateSpace { name: "acme-1".into(), owner: "alice@example.com".into() }
        );
    }

    #[test]
    fn each_mistake_gets_its_sentence() {
        assert_eq!(err("{").status, 400);
        assert!(err("{").message.contains("not valid JSON"));
        assert_eq!(err("[1]").status, 422);
        assert!(err(r#"{"name":"a"}"#).message.contains("`owner` is missing"));
        assert!(err(r#"{"name":1,"owner":"o"}"#).message.contains("must be a string"));
        assert!(
            err(r#"{"name":null,"owner":"o"}"#).message.contains("`name` is null"),
            "{}",
            err(r#"{"name":null,"owner":"o"}"#).message
        );
        assert!(err(r#"{"name":"a","owner":null}"#).message.contains("`owner` is null"));
        assert!(err(r#"{"name":"","owner":"o"}"#).message.contains("1 to 63"));
        // 40 characters, 80 bytes: the length is right, the letters are not.
        let wide = format!(r#"{{"name":"{}","owner":"o"}}"#, "é".repeat(40));
        assert!(err(&wide).message.contains("may only hold lowercase letters"), "{}", err(&wide).message);
        assert!(err(&format!(r#"{{"name":"{}","owner":"o"}}"#, "a".repeat(64))).message.contains("has 64"));
        assert!(err(r#"{"name":"Acme","owner":"o"}"#).message.contains("holds `A`"));
        assert!(err(r#"{"name":"a b","owner":"o"}"#).message.contains("holds ` `"));
        assert!(err(r#"{"name":"a","owner":""}"#).message.contains("owner must be 1 to 254"));
        assert!(err(&format!(r#"{{"name":"a","owner":"{}"}}"#, "o".repeat(255))).message.contains("not 255"));
        assert!(err(r#"{"name":"a","owner":"o","x":1}"#).message.contains("`x` is not known"));
    }

    #[test]
    fn a_field_given_twice_is_refused_with_400_not_the_last_one_kept() {
        let e = err(r#"{"name":"a","name":"b","owner":"o"}"#);
        assert_eq!(e.status, 400);
        assert!(e.message.contains("the field `name` is given twice"), "{}", e.message);
        assert!(e.message.contains("give each field once"), "{}", e.message);
        assert_eq!(err(r#"{"name":"a","owner":"o","owner":"p"}"#).status, 400);
        // The same key in a nested value is that value's business: it is refused as a value.
        assert_eq!(err(r#"{"name":{"a":1,"a":2},"owner":"o"}"#).status, 422);
    }

    #[test]
    fn a_name_is_a_dns_label() {
        for ok in ["a", "a-b", "a--b", "0", "9-lives", &"a".repeat(63)] {
            assert!(check_name(ok).is_ok(), "{ok}");
        }
        for bad in ["-", "--", "-a", "a-"] {
            let e = check_name(bad).unwrap_err();
            assert_eq!(e.status, 422, "{bad}");
            assert!(e.message.contains("must start and end with a letter or a digit"), "{}", e.message);
        }
    }

    #[test]
    fn every_spelling_of_one_owner_is_one_owner() {
        for spelling in ["carol", "Carol", "CAROL", "carol ", " carol", "\tcarol\n", "ｃａｒｏｌ"] {
            assert_eq!(owner(spelling), "carol", "{spelling:?}");
        }
        // NFC (one code point) and NFD (e + combining acute) spellings of andré.
        assert_eq!(owner("andr\u{e9}"), owner("andre\u{301}"));
        assert_eq!(owner("ANDRE\u{301}"), "andr\u{e9}");
        // Full case folding, not lowercasing: ß and SS are one owner.
        assert_eq!(owner("Straße"), owner("STRASSE"));
        assert_eq!(owner("alice@example.com"), "alice@example.com");
    }

    #[test]
    fn an_invisible_character_in_the_owner_is_refused_with_its_position_and_code_point() {
        let e = normalise_owner("\u{200b}carol").unwrap_err();
        assert_eq!(e.status, 422);
        assert!(e.message.contains("U+200B at character 1"), "{}", e.message);
        assert!(e.message.contains("format character"), "{}", e.message);
        let e = normalise_owner("car\u{7}ol").unwrap_err();
        assert!(e.message.contains("U+0007 at character 4, a control character"), "{}", e.message);
        // Counted in the owner as sent.
        assert!(normalise_owner("  a\u{200b}").unwrap_err().message.contains("at character 4"));
        // A soft hyphen and a right-to-left mark are format characters too.
        assert_eq!(normalise_owner("caro\u{ad}l").unwrap_err().status, 422);
        assert_eq!(normalise_owner("carol\u{200f}").unwrap_err().status, 422);
        // The body's own check uses it: the owner that travels is the normalised one.
        assert_eq!(err("{\"name\":\"a\",\"owner\":\"\\u200bcarol\"}").status, 422);
        assert_eq!(validate(br#"{"name":"a","owner":" CAROL "}"#).unwrap().owner, "carol");
    }

    #[test]
    fn an_owner_of_only_spaces_is_empty() {
        assert!(normalise_owner("   ").unwrap_err().message.contains("not 0"));
    }

    #[test]
    fn only_unencoded_json_is_taken() {
        assert!(check_headers(&headers(&[("content-type", "application/json")])).is_ok());
        assert!(check_headers(&headers(&[("content-type", "application/json; charset=utf-8")])).is_ok());
        assert!(check_headers(&headers(&[("content-type", "Application/JSON; charset=\"UTF-8\"")])).is_ok());
        assert!(
            check_headers(&headers(&[
                ("content-type", "application/json"),
                ("content-encoding", "identity")
            ]))
            .is_ok()
        );
        let refused = |pairs: &[(&'static str, &str)], needle: &str| {
            let e = check_headers(&headers(pairs)).unwrap_err();
            assert_eq!(e.status, 415, "{pairs:?}");
            assert!(e.message.contains(needle), "{pairs:?}: {}", e.message);
        };
        refused(&[], "no content-type");
        refused(&[("content-type", "text/plain")], "`text/plain`, not JSON");
        refused(&[("content-type", "application/jsonx")], "not JSON");
        refused(&[("content-type", "application/json; charset=latin1")], "not `latin1`");
        refused(&[("content-type", "nonsense")], "cannot be read");
        refused(&[("content-type", "application/json"), ("content-type", "application/json")], "two");
        refused(&[("content-type", "application/json"), ("content-encoding", "gzip")], "`gzip`");
        refused(&[("content-type", "application/json"), ("content-encoding", "identity, br")], "`br`");
    }
}
