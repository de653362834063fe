//! What a JSON request body may not hold, whatever the operation:
//!
//! - A key named twice in one object. serde_json keeps the last value of a
//!   repeated key, so `{"balance":"1","balance":"1000"}` would open an account
//!   with 1000.00 while a log, a proxy or a signature check that keeps the
//!   first saw 1.00: a request means one thing or is refused.
//! - `null`. No field of any request is nullable (the spec says so); poem
//!   would read `null` as absent, so a client's `"merchant": null` would pass
//!   where the spec refuses it. An optional field is left out.
//!
//! One pass of a serde visitor over the bytes the guard already holds, with
//! no value built: only the keys of the object being walked are kept, and
//! keys without escapes are borrowed from the body. serde_json's recursion
//! limit bounds the depth.

use std::borrow::Cow;
use std::collections::HashSet;
use std::fmt;

use serde::de::{self, DeserializeSeed, Deserializer, MapAccess, SeqAccess, Visitor};

/// What is wrong with a body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finding {
    /// A key found twice in one object.
    DuplicateKey(String),
    /// A `null`, as the value of this key (`None`: an array item, or the body).
    Null(Option<String>),
}

/// The first finding in `body`, in nested objects and arrays too (keys
/// compared after unescaping: `"a"` and `"\u0061"` are one key). `None` when
/// there is none, and when `body` is not JSON at all: the handler's own parse
/// then says what is wrong with it.
pub fn check(body: &[u8]) -> Option<Finding> {
    let mut found = None;
    let mut deserializer = serde_json::Deserializer::from_slice(body);
    // An error is either the finding (in `found`) or malformed JSON.
    let _ = Walk { found: &mut found }.deserialize(&mut deserializer);
    found
}

/// Walks one JSON value, recording the first finding in `found`.
struct Walk<'a> {
    found: &'a mut Option<Finding>,
}

impl<'de> DeserializeSeed<'de> for Walk<'_> {
    type Value = ();

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<(), D::Error> {
        deserializer.deserialize_any(self)
    }
}

impl<'de> Visitor<'de> for Walk<'_> {
    type Value = ();

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("any JSON value")
    }

    fn visit_bool<E: de::Error>(self, _: bool) -> Result<(), E> {
        Ok(())
    }

    // Numbers are only skipped, never converted: with `arbitrary_precision`
    // serde_json hands them over as a one-key map holding their text anyway.
    fn visit_i64<E: de::Error>(self, _: i64) -> Result<(), E> {
        Ok(())
    }

    fn visit_u64<E: de::Error>(self, _: u64) -> Result<(), E> {
        Ok(())
    }

    fn visit_f64<E: de::Error>(self, _: f64) -> Result<(), E> {
        Ok(())
    }

    fn visit_str<E: de::Error>(self, _: &str) -> Result<(), E> {
        Ok(())
    }

    fn visit_unit<E: de::Error>(self) -> Result<(), E> {
        *self.found = Some(Finding::Null(None));
        Err(de::Error::custom("null"))
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut items: A) -> Result<(), A::Error> {
        let found = self.found;
        while items
            .next_element_seed(Walk { found: &mut *found })?
            .is_some()
        {}
        Ok(())
    }

    fn visit_map<A: MapAccess<'de>>(self, mut entries: A) -> Result<(), A::Error> {
        let found = self.found;
        let mut seen: HashSet<Cow<'de, str>> = HashSet::new();
        while let Some(key) = entries.next_key_seed(Key)? {
            if seen.contains(&key) {
                let error = de::Error::custom(format_args!("duplicate key `{key}`"));
                *found = Some(Finding::DuplicateKey(key.into_owned()));
                return Err(error);
            }
            let walked = entries.next_value_seed(Walk { found: &mut *found });
            if walked.is_err() && *found == Some(Finding::Null(None)) {
                *found = Some(Finding::Null(Some(key.clone().into_owned())));
            }
            walked?;
            seen.insert(key);
        }
        Ok(())
    }
}

/// An object key, borrowed from the body unless it had escapes.
struct Key;

impl<'de> DeserializeSeed<'de> for Key {
    type Value = Cow<'de, str>;

    fn deserialize<D: Deserializer<'de>>(self, deserializer: D) -> Result<Self::Value, D::Error> {
        deserializer.deserialize_str(self)
    }
}

impl<'de> Visitor<'de> for Key {
    type Value = Cow<'de, str>;

    fn expecting(&self, formatter: &mut fmt::Formatter) -> fmt::Result {
        formatter.write_str("an object key")
    }

    fn visit_borrowed_str<E: de::Error>(self, key: &'de str) -> Result<Self::Value, E> {
        Ok(Cow::Borrowed(key))
    }

    fn visit_str<E: de::Error>(self, key: &str) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key.to_owned()))
    }

    fn visit_string<E: de::Error>(self, key: String) -> Result<Self::Value, E> {
        Ok(Cow::Owned(key))
    }
}

#[cfg(test)]
mod tests {
    use super::{Finding, check};

    fn duplicate_key(body: &[u8]) -> Option<String> {
        match check(body) {
            Some(Finding::DuplicateKey(key)) => Some(key),
            _ => None,
        }
    }

    #[test]
    fn nulls_are_found_with_their_key() {
        let cases: [(&str, Option<Finding>); 6] = [
            (
                r#"{"merchant":null}"#,
                Some(Finding::Null(Some("merchant".into()))),
            ),
            (r#"{"a":{"b":null}}"#, Some(Finding::Null(Some("b".into())))),
            (r#"{"a":[1,null]}"#, Some(Finding::Null(Some("a".into())))),
            ("null", Some(Finding::Null(None))),
            (r#"{"a":"null"}"#, None),
            (
                r#"{"a":1,"a":null}"#,
                Some(Finding::DuplicateKey("a".into())),
            ),
        ];
        for (body, expected) in cases {
            assert_eq!(check(body.as_bytes()), expected, "{body}");
        }
    }

    #[test]
    fn repeated_keys_are_found_at_any_depth() {
        let cases: [(&str, Option<&str>); 10] = [
            (r#"{"balance":"1","balance":"1000"}"#, Some("balance")),
            (r#"{"a":{"b":1,"b":2}}"#, Some("b")),
            (r#"[1,{"x":[{"k":1,"k":2}]}]"#, Some("k")),
            (r#"{"bal\u0061nce":"1","balance":"2"}"#, Some("balance")),
            (r#"{"a":1,"b":{"a":1},"c":[{"a":1}]}"#, None),
            (r#"{"amount":1.50,"n":-3,"t":true,"z":"null"}"#, None),
            ("[]", None),
            ("", None),
            ("{not json", None),
            // Malformed after the duplicate: still the duplicate.
            (r#"{"a":1,"a":"#, Some("a")),
        ];
        for (body, expected) in cases {
            assert_eq!(
                duplicate_key(body.as_bytes()).as_deref(),
                expected,
                "{body}"
            );
        }
    }

    #[test]
    fn nesting_past_the_recursion_limit_is_left_to_the_parser() {
        let deep = format!("{}{}", "[".repeat(10_000), "]".repeat(10_000));
        assert_eq!(duplicate_key(deep.as_bytes()), None);
    }
}
