//! Validation of `POST /spaces` bodies: one sentence per mistake.

use serde::{Deserialize, Serialize};

/// Largest body `POST /spaces` accepts.
pub const MAX_BODY: usize = 16 * 1024;

/// A valid request to create a space.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CreateSpace {
    pub name: String,
    pub owner: String,
}

/// Why a body was refused: the HTTP status and the sentence.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    pub status: u16,
    pub message: String,
}

fn invalid(status: u16, message: impl Into<String>) -> Invalid {
    Invalid { status, message: message.into() }
}

/// Parse and check a body: JSON (400 otherwise), an object with a `name` of 1-63 characters of
/// `[a-z0-9-]` and an `owner` of 1-254 characters (422 otherwise).
pub fn validate(body: &[u8]) -> Result<CreateSpace, Invalid> {
    const EXPECTED: &str = r#"send {"name": "my-space", "owner": "alice"}"#;
    let value: serde_json::Value = serde_json::from_slice(body)
        .map_err(|e| invalid(400, format!("the body is not valid JSON ({e}); {EXPECTED}")))?;
    let obj = value
        .as_object()
        .ok_or_else(|| invalid(422, format!("the body must be a JSON object; {EXPECTED}")))?;
    let field = |name: &str| -> Result<String, Invalid> {
        match obj.get(name) {
            None | Some(serde_json::Value::Null) => {
                Err(invalid(422, format!("the field `{name}` is missing; {EXPECTED}")))
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
    let length = name.chars().count();
    if length == 0 || length > 63 {
        return Err(invalid(
            422,
            format!("the name must be 1 to 63 characters long, and `{name}` has {length}"),
        ));
    }
    if let Some(bad) = name.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || *c == '-')) {
        return Err(invalid(
            422,
            format!("the name may only hold lowercase letters, digits and `-`, and `{name}` holds `{bad}`"),
        ));
    }
    let owner_len = owner.chars().count();
    if owner.trim().is_empty() || owner_len > 254 {
        return Err(invalid(422, format!("the owner must be 1 to 254 characters long, not {owner_len}")));
    }
    if owner.chars().any(char::is_control) {
        return Err(invalid(422, "the owner must not contain control characters"));
    }
    Ok(CreateSpace { name, owner })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn err(body: &str) -> Invalid {
        validate(body.as_bytes()).unwrap_err()
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
}
