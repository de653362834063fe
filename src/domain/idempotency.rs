//! The `Idempotency-Key` a client sends with a POST that moves money.

use super::ids::truncate_for_message;

/// Longest key accepted; a UUID is 36.
pub const IDEMPOTENCY_KEY_LENGTH_MAX: usize = 128;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("Idempotency-Key `{0}` must be 1 to 128 visible ASCII characters")]
pub struct IdempotencyKeyError(String);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IdempotencyKey(String);

impl IdempotencyKey {
    pub fn parse(text: &str) -> Result<Self, IdempotencyKeyError> {
        let valid = (1..=IDEMPOTENCY_KEY_LENGTH_MAX).contains(&text.len())
            && text.bytes().all(|b| b.is_ascii_graphic());
        if !valid {
            return Err(IdempotencyKeyError(truncate_for_message(text)));
        }
        Ok(IdempotencyKey(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The key as one API key's own: two clients that pick the same text
    /// neither collide nor learn of each other's requests.
    pub fn scoped(&self, api_key_id: &str) -> Self {
        IdempotencyKey(format!("{api_key_id}/{}", self.0))
    }
}

/// An Idempotency-Key together with what the request asked for, so a replay
/// with another body can be told apart from a true retry.
#[derive(Debug, Clone)]
pub struct Idempotency {
    pub key: IdempotencyKey,
    /// The request's meaning in canonical form (no spaces: the scripts store
    /// `id fingerprint` as one string).
    pub fingerprint: String,
}

impl Idempotency {
    pub fn new(key: IdempotencyKey, parts: &[&str]) -> Self {
        let fingerprint = parts
            .iter()
            .map(|part| {
                part.replace('%', "%25")
                    .replace(' ', "%20")
                    .replace('|', "%7C")
            })
            .collect::<Vec<_>>()
            .join("|");
        Idempotency { key, fingerprint }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprints_keep_parts_apart() {
        let key = IdempotencyKey::parse("k").unwrap();
        let a = Idempotency::new(key.clone(), &["a b", "c"]).fingerprint;
        let b = Idempotency::new(key.clone(), &["a|b", "c"]).fingerprint;
        let c = Idempotency::new(key, &["a", "b c"]).fingerprint;
        assert!(a != b && a != c && b != c && !a.contains(' '));
    }

    #[test]
    fn keys_are_short_visible_ascii() {
        assert!(IdempotencyKey::parse("order-1").is_ok());
        assert!(IdempotencyKey::parse("").is_err());
        assert!(IdempotencyKey::parse("a b").is_err());
        assert!(IdempotencyKey::parse(&"k".repeat(129)).is_err());
    }
}
