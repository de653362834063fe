//! API keys as clients hold them: `tally_<role>_<id>_<secret>`.
//!
//! - The prefix `tally_<role>_` says what the text is, so a secret scanner
//!   can find a leaked key (`tally_(customer|bank|read|metrics|ops|admin)_[0-9a-f]{32}_[0-9a-f]{64}`)
//!   and a log line can be redacted by pattern.
//! - The id (32 hex digits, a UUIDv7) names the key in logs, in `tally keys
//!   list` and in Redis; it is not secret.
//! - The secret is 32 random bytes from the operating system, as 64 hex digits.
//!   Redis keeps only HMAC-SHA256(pepper, id ":" secret): a copy of Redis is
//!   no use without the pepper, and the comparison runs in constant time.

use std::fmt;

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub const KEY_PREFIX: &str = "tally_";
/// Bytes of randomness in a key's secret.
pub const KEY_SECRET_BYTES: usize = 32;
const KEY_ID_HEX_LENGTH: usize = 32;
/// Shortest pepper accepted, in bytes: as long as the HMAC's output.
pub const PEPPER_LENGTH_MIN: usize = 32;

/// What a key may do. A key has exactly one role.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Bound to one customer account: reads it, and spends from it.
    Customer,
    /// The banking system's integration: opens accounts, deposits, bank
    /// transactions, advances; reads everything.
    Bank,
    /// Operators who look: every GET.
    Read,
    /// A metrics scraper: `/metrics` only, so a scraper's key reads no
    /// customer's data.
    Metrics,
    /// Operators who act: what `read` may, plus batch retry and refund.
    Ops,
    /// Everything, key management included.
    Admin,
}

impl Role {
    pub const ALL: [Role; 6] = [
        Role::Customer,
        Role::Bank,
        Role::Read,
        Role::Metrics,
        Role::Ops,
        Role::Admin,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Customer => "customer",
            Role::Bank => "bank",
            Role::Read => "read",
            Role::Metrics => "metrics",
            Role::Ops => "ops",
            Role::Admin => "admin",
        }
    }

    pub fn parse(text: &str) -> Result<Self, KeyError> {
        Role::ALL
            .into_iter()
            .find(|role| role.as_str() == text)
            .ok_or_else(|| KeyError::UnknownRole(super::truncate(text)))
    }

    /// Whether every GET of the API is open to this role (customer data of
    /// every account included).
    pub fn reads_everything(self) -> bool {
        matches!(self, Role::Bank | Role::Read | Role::Ops | Role::Admin)
    }

    /// Whether this role may do everything `other` may: no key can make a
    /// key broader than itself.
    pub fn covers(self, other: Role) -> bool {
        match self {
            Role::Admin => true,
            Role::Ops | Role::Bank => other == self || matches!(other, Role::Read | Role::Metrics),
            Role::Read => matches!(other, Role::Read | Role::Metrics),
            Role::Metrics | Role::Customer => other == self,
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("`{0}` is not a role (customer, bank, read, metrics, ops or admin)")]
    UnknownRole(String),
    #[error("`{0}` is not a key id (32 lower-case hex digits)")]
    MalformedId(String),
    #[error("the pepper must be at least {PEPPER_LENGTH_MIN} bytes")]
    PepperTooShort,
}

/// A key's id: 32 lower-case hex digits (a UUIDv7, so ids sort by creation).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct KeyId(String);

impl KeyId {
    pub fn new() -> Self {
        KeyId(uuid::Uuid::now_v7().simple().to_string())
    }

    pub fn parse(text: &str) -> Result<Self, KeyError> {
        let valid = text.len() == KEY_ID_HEX_LENGTH
            && text
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b));
        if !valid {
            return Err(KeyError::MalformedId(super::truncate(text)));
        }
        Ok(KeyId(text.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl Default for KeyId {
    fn default() -> Self {
        Self::new()
    }
}

impl fmt::Display for KeyId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The server-side secret that keys the hash of every key's secret.
#[derive(Clone)]
pub struct Pepper(Vec<u8>);

impl Pepper {
    pub fn new(text: &str) -> Result<Self, KeyError> {
        if text.len() < PEPPER_LENGTH_MIN {
            return Err(KeyError::PepperTooShort);
        }
        Ok(Pepper(text.as_bytes().to_vec()))
    }

    /// A fresh random pepper (hex), for `tally dev` and the bench.
    pub fn generate_text() -> String {
        hex::encode(random_bytes::<32>())
    }

    fn mac(&self, id: &KeyId, secret: &[u8]) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.0).expect("HMAC takes any key");
        mac.update(id.as_str().as_bytes());
        mac.update(b":");
        mac.update(secret);
        mac
    }

    /// What Redis stores for a key: hex HMAC-SHA256 of its id and secret.
    pub fn secret_hash(&self, id: &KeyId, secret: &[u8]) -> String {
        hex::encode(self.mac(id, secret).finalize().into_bytes())
    }

    /// Whether `secret` is the one `stored_hash` was made from, compared in
    /// constant time.
    pub fn verify(&self, id: &KeyId, secret: &[u8], stored_hash: &str) -> bool {
        let Ok(stored) = hex::decode(stored_hash) else {
            return false;
        };
        self.mac(id, secret).verify_slice(&stored).is_ok()
    }
}

impl fmt::Debug for Pepper {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("Pepper(..)")
    }
}

fn random_bytes<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the operating system's random source works");
    bytes
}

/// A key as a client presented it, parsed but not yet checked.
pub struct PresentedKey {
    pub role: Role,
    pub id: KeyId,
    secret: [u8; KEY_SECRET_BYTES],
}

impl PresentedKey {
    /// `None` for anything that is not shaped like a tally key.
    pub fn parse(token: &str) -> Option<Self> {
        let rest = token.strip_prefix(KEY_PREFIX)?;
        let (role, rest) = rest.split_once('_')?;
        let (id, secret) = rest.split_once('_')?;
        let mut bytes = [0u8; KEY_SECRET_BYTES];
        // Upper-case hex would decode too; only the form tally prints is a key.
        if secret.bytes().any(|b| b.is_ascii_uppercase()) {
            return None;
        }
        hex::decode_to_slice(secret, &mut bytes).ok()?;
        Some(PresentedKey {
            role: Role::parse(role).ok()?,
            id: KeyId::parse(id).ok()?,
            secret: bytes,
        })
    }

    pub fn matches(&self, pepper: &Pepper, stored_hash: &str) -> bool {
        pepper.verify(&self.id, &self.secret, stored_hash)
    }

    /// The hash Redis would hold for this key, for `authenticate_key.lua`
    /// to decide whether to take tokens.
    pub fn secret_hash(&self, pepper: &Pepper) -> String {
        pepper.secret_hash(&self.id, &self.secret)
    }
}

/// A key just made: the plaintext exists only here, to be shown once.
pub struct GeneratedKey {
    pub id: KeyId,
    pub role: Role,
    /// `tally_<role>_<id>_<secret>`: what the client sends as its bearer token.
    pub plaintext: String,
    /// What Redis keeps.
    pub secret_hash: String,
}

impl GeneratedKey {
    pub fn new(role: Role, pepper: &Pepper) -> Self {
        let id = KeyId::new();
        let secret = random_bytes::<KEY_SECRET_BYTES>();
        let plaintext = format!("{KEY_PREFIX}{role}_{id}_{}", hex::encode(secret));
        let secret_hash = pepper.secret_hash(&id, &secret);
        GeneratedKey {
            id,
            role,
            plaintext,
            secret_hash,
        }
    }
}

impl fmt::Debug for GeneratedKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "GeneratedKey({} {})", self.role, self.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pepper() -> Pepper {
        Pepper::new(&"p".repeat(PEPPER_LENGTH_MIN)).unwrap()
    }

    #[test]
    fn a_generated_key_parses_and_verifies_against_its_hash_only() {
        let pepper = pepper();
        let key = GeneratedKey::new(Role::Customer, &pepper);
        let presented = PresentedKey::parse(&key.plaintext).unwrap();
        assert_eq!(presented.role, Role::Customer);
        assert_eq!(presented.id, key.id);
        assert!(presented.matches(&pepper, &key.secret_hash));
        let other = GeneratedKey::new(Role::Customer, &pepper);
        assert!(!presented.matches(&pepper, &other.secret_hash));
        let other_pepper = Pepper::new(&"q".repeat(PEPPER_LENGTH_MIN)).unwrap();
        assert!(!presented.matches(&other_pepper, &key.secret_hash));
        assert!(
            !key.secret_hash
                .contains(&key.plaintext[key.plaintext.len() - 64..])
        );
    }

    #[test]
    fn only_the_printed_shape_is_a_key() {
        let key = GeneratedKey::new(Role::Admin, &pepper()).plaintext;
        assert!(PresentedKey::parse(&key).is_some());
        let secret_start = key.len() - 64;
        for bad in [
            String::new(),
            key.replacen("tally_", "tally-", 1),
            key.replacen("admin", "root", 1),
            key[..key.len() - 1].to_owned(),
            format!("{key}0"),
            format!(
                "{}{}",
                &key[..secret_start],
                key[secret_start..].to_uppercase()
            ),
            key.replacen('_', "", 3),
        ] {
            assert!(PresentedKey::parse(&bad).is_none(), "{bad}");
        }
    }

    #[test]
    fn no_role_covers_a_broader_one() {
        for role in Role::ALL {
            assert!(role.covers(role));
            assert!(Role::Admin.covers(role));
        }
        assert!(!Role::Ops.covers(Role::Bank));
        assert!(!Role::Bank.covers(Role::Ops));
        assert!(!Role::Read.covers(Role::Customer));
        assert!(!Role::Customer.covers(Role::Read));
        assert!(!Role::Metrics.covers(Role::Read));
        assert!(Pepper::new("short").is_err());
    }
}
