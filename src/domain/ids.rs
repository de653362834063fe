//! Identifiers. Every id is time-ordered (UUIDv7), so ids sort by creation
//! and page naturally; system accounts have fixed names starting with `@`.

use std::fmt;

use uuid::Uuid;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum IdError {
    #[error("`{0}` is not a valid id (expected a UUID)")]
    Malformed(String),
    #[error(
        "`{0}` is not a known system account (expected one of @bank, @exchange, @card, @transit)"
    )]
    UnknownSystemAccount(String),
}

/// The accounts the ledger itself owns. They may go negative; customers may not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SystemAccount {
    /// Deposits, withdrawals, advances and opening balances.
    Bank,
    /// Crypto purchases: what customers paid for orders not yet bought.
    Exchange,
    /// Card payments.
    Card,
    /// Transfers between customers on two shards, between their steps: the
    /// payer's shard's sub-account holds the money until the payee's is
    /// credited (see CLUSTER.md). Zero once no such transfer is in flight.
    Transit,
}

impl SystemAccount {
    pub const ALL: [SystemAccount; 4] = [Self::Bank, Self::Exchange, Self::Card, Self::Transit];

    pub fn id(self) -> AccountId {
        let name = match self {
            Self::Bank => "@bank",
            Self::Exchange => "@exchange",
            Self::Card => "@card",
            Self::Transit => "@transit",
        };
        AccountId(name.to_owned())
    }
}

/// A customer account (a UUIDv7) or a system account (`@bank`, ...).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AccountId(String);

impl AccountId {
    pub fn new_customer() -> Self {
        AccountId(Uuid::now_v7().to_string())
    }

    pub fn parse(text: &str) -> Result<Self, IdError> {
        if text.starts_with('@') {
            return SystemAccount::ALL
                .into_iter()
                .map(SystemAccount::id)
                .find(|id| id.0 == text)
                .ok_or_else(|| IdError::UnknownSystemAccount(text.to_owned()));
        }
        parse_uuid(text).map(|uuid| AccountId(uuid.to_string()))
    }

    /// A customer account's UUID; `None` for a system account.
    pub fn uuid(&self) -> Option<Uuid> {
        if self.is_system() {
            return None;
        }
        Uuid::try_parse(&self.0).ok()
    }

    /// A customer account id for a UUID tally drew.
    pub fn from_uuid(uuid: Uuid) -> Self {
        AccountId(uuid.to_string())
    }

    pub fn is_system(&self) -> bool {
        self.0.starts_with('@')
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for AccountId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Parses a UUID in its canonical hyphenated form (any case); `to_string`
/// then gives the one lowercase spelling ids are stored under.
pub fn parse_uuid(text: &str) -> Result<Uuid, IdError> {
    // Only the canonical hyphenated form: one spelling per id keeps keys unique.
    if text.len() != 36 {
        return Err(IdError::Malformed(truncate_for_message(text)));
    }
    Uuid::try_parse(text).map_err(|_| IdError::Malformed(truncate_for_message(text)))
}

/// Error messages quote the input back, but never more than a line of it.
pub fn truncate_for_message(text: &str) -> String {
    const QUOTE_LENGTH_MAX: usize = 64;
    match text.char_indices().nth(QUOTE_LENGTH_MAX) {
        Some((at, _)) => format!("{}...", &text[..at]),
        None => text.to_owned(),
    }
}

macro_rules! uuid_id {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(Uuid);

        impl $name {
            pub fn new() -> Self {
                $name(Uuid::now_v7())
            }

            pub fn parse(text: &str) -> Result<Self, IdError> {
                parse_uuid(text).map($name)
            }

            pub fn from_uuid(uuid: Uuid) -> Self {
                $name(uuid)
            }

            pub fn uuid(&self) -> Uuid {
                self.0
            }
        }

        impl Default for $name {
            fn default() -> Self {
                Self::new()
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }
    };
}

uuid_id!(
    /// A purchase order.
    OrderId
);
uuid_id!(
    /// A batch of orders bought from the exchange in one call.
    BatchId
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn account_ids_accept_uuids_and_known_system_names_only() {
        let id = AccountId::new_customer();
        assert_eq!(AccountId::parse(id.as_str()).unwrap(), id);
        assert!(AccountId::parse("@bank").unwrap().is_system());
        assert!(matches!(
            AccountId::parse("@nope"),
            Err(IdError::UnknownSystemAccount(_))
        ));
        assert!(matches!(AccountId::parse("42"), Err(IdError::Malformed(_))));
        let simple = id.as_str().replace('-', "");
        assert!(matches!(
            AccountId::parse(&simple),
            Err(IdError::Malformed(_))
        ));
    }

    #[test]
    fn quoted_input_is_truncated() {
        assert_eq!(truncate_for_message(&"x".repeat(100)).len(), 67);
    }
}
