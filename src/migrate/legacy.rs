//! The single-node key layout of tally before logical shards, as
//! `src/store/keys.rs` spelled it then (git `db0bc5f`): every key
//! `tally:<name>`, no hash tags. Frozen: only `tally migrate` reads it, to
//! say what each key it finds was and where the sharded layout keeps it.

use uuid::Uuid;

use crate::access::KeyId;
use crate::domain::{AccountId, BatchId, OrderId, Symbol, SystemAccount};
use crate::store::keys::{self, Keys};
use crate::store::slots::Shard;

/// Rejected wallet transactions: the one key of the old layout without the
/// `tally:` prefix.
pub const WALLET_ERRORS: &str = "transactions:errors";

/// The `tally:` prefix every other key of both layouts carries.
pub const PREFIX: &str = "tally:";

/// A key of the old layout with a fixed name.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fixed {
    Accounts,
    Journal,
    JournalIndex,
    JournalCarried,
    JournalTrimPauses,
    Settle,
    SettleDead,
    SettleRetries,
    FailedBatches,
    Events,
    EventsRetries,
    EventsDead,
    Stats,
    Batches,
    Symbols,
    Wallet,
    WalletDead,
    WalletErrors,
    InstallmentsDue,
    InstallmentsLeased,
    Installments,
    InstallmentsDead,
    Advances,
    ApiKeys,
    ApiKeysEpoch,
}

impl Fixed {
    pub const ALL: [Fixed; 25] = [
        Fixed::Accounts,
        Fixed::Journal,
        Fixed::JournalIndex,
        Fixed::JournalCarried,
        Fixed::JournalTrimPauses,
        Fixed::Settle,
        Fixed::SettleDead,
        Fixed::SettleRetries,
        Fixed::FailedBatches,
        Fixed::Events,
        Fixed::EventsRetries,
        Fixed::EventsDead,
        Fixed::Stats,
        Fixed::Batches,
        Fixed::Symbols,
        Fixed::Wallet,
        Fixed::WalletDead,
        Fixed::WalletErrors,
        Fixed::InstallmentsDue,
        Fixed::InstallmentsLeased,
        Fixed::Installments,
        Fixed::InstallmentsDead,
        Fixed::Advances,
        Fixed::ApiKeys,
        Fixed::ApiKeysEpoch,
    ];

    /// The key's name in the old layout.
    pub fn name(self) -> &'static str {
        match self {
            Fixed::Accounts => "tally:accounts",
            Fixed::Journal => "tally:journal",
            Fixed::JournalIndex => "tally:journal:index",
            Fixed::JournalCarried => "tally:journal:carried",
            Fixed::JournalTrimPauses => "tally:journal:trim_pauses",
            Fixed::Settle => "tally:settle",
            Fixed::SettleDead => "tally:settle:dead",
            Fixed::SettleRetries => "tally:settle:retries",
            Fixed::FailedBatches => "tally:batches:failed",
            Fixed::Events => "tally:events",
            Fixed::EventsRetries => "tally:events:retries",
            Fixed::EventsDead => "tally:events:dead",
            Fixed::Stats => "tally:stats",
            Fixed::Batches => "tally:batches",
            Fixed::Symbols => "tally:symbols",
            Fixed::Wallet => "tally:wallet",
            Fixed::WalletDead => "tally:wallet:dead",
            Fixed::WalletErrors => WALLET_ERRORS,
            Fixed::InstallmentsDue => "tally:installments:due",
            Fixed::InstallmentsLeased => "tally:installments:leased",
            Fixed::Installments => "tally:installments",
            Fixed::InstallmentsDead => "tally:installments:dead",
            Fixed::Advances => "tally:advances",
            Fixed::ApiKeys => "tally:api_keys",
            Fixed::ApiKeysEpoch => "tally:api_keys:epoch",
        }
    }

    /// An index the sharded layout keeps per shard: split by member.
    pub fn index(self) -> Option<Index> {
        match self {
            Fixed::Accounts => Some(Index::Accounts),
            Fixed::Batches => Some(Index::Batches),
            Fixed::FailedBatches => Some(Index::FailedBatches),
            Fixed::Symbols => Some(Index::Symbols),
            Fixed::Advances => Some(Index::Advances),
            Fixed::ApiKeys => Some(Index::ApiKeys),
            _ => None,
        }
    }

    /// Where a key that moves whole goes: shard 0's key of the same role
    /// (its entries keep their ids, its consumer groups their positions).
    /// `None` for the indexes, which are split.
    pub fn whole_target(self, keys: &Keys) -> Option<String> {
        let first = keys.layout().first();
        Some(match self {
            Fixed::Journal => keys.journal(first),
            Fixed::JournalIndex => keys.journal_index(first),
            Fixed::JournalCarried => keys.journal_carried(first),
            Fixed::JournalTrimPauses => keys.journal_trim_pauses(first),
            Fixed::Settle => keys.settle(first),
            Fixed::SettleDead => keys.settle_dead(first),
            Fixed::SettleRetries => keys.settle_retries(first),
            Fixed::Events => keys.events(first),
            Fixed::EventsRetries => keys.events_retries(first),
            Fixed::EventsDead => keys.events_dead(first),
            Fixed::Stats => keys.stats(first),
            Fixed::Wallet => keys.wallet(first),
            Fixed::WalletDead => keys.wallet_dead(first),
            Fixed::WalletErrors => keys.wallet_errors(first),
            Fixed::InstallmentsDue => keys.installments_due(first),
            Fixed::InstallmentsLeased => keys.installments_leased(first),
            Fixed::Installments => keys.installments(first),
            Fixed::InstallmentsDead => keys.installments_dead(first),
            Fixed::ApiKeysEpoch => keys.api_keys_epoch(first),
            Fixed::Accounts
            | Fixed::FailedBatches
            | Fixed::Batches
            | Fixed::Symbols
            | Fixed::Advances
            | Fixed::ApiKeys => return None,
        })
    }
}

/// An index of the old layout that the sharded layout keeps per shard.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Index {
    /// Customer account ids (sorted set, scores 0).
    Accounts,
    /// Batch ids by creation time (sorted set).
    Batches,
    /// Failed batch ids by failure time (sorted set).
    FailedBatches,
    /// Symbols ever ordered (set).
    Symbols,
    /// Advance ids by creation time (sorted set).
    Advances,
    /// API key ids by creation time (sorted set).
    ApiKeys,
}

impl Index {
    pub const ALL: [Index; 6] = [
        Index::Accounts,
        Index::Batches,
        Index::FailedBatches,
        Index::Symbols,
        Index::Advances,
        Index::ApiKeys,
    ];

    pub fn old_name(self) -> &'static str {
        match self {
            Index::Accounts => Fixed::Accounts.name(),
            Index::Batches => Fixed::Batches.name(),
            Index::FailedBatches => Fixed::FailedBatches.name(),
            Index::Symbols => Fixed::Symbols.name(),
            Index::Advances => Fixed::Advances.name(),
            Index::ApiKeys => Fixed::ApiKeys.name(),
        }
    }

    /// Whether it is a set (the others are sorted sets).
    pub fn is_set(self) -> bool {
        self == Index::Symbols
    }

    /// The shard a member belongs on: where the new code looks for the
    /// record it names. `None` for a member tally could not have written.
    pub fn shard_of(self, keys: &Keys, member: &str) -> Option<Shard> {
        match self {
            Index::Accounts => canonical_account(member).and_then(|id| keys.shard_of_account(&id)),
            Index::Batches | Index::FailedBatches => {
                canonical_uuid(member).map(|id| keys.shard_of_id(&id))
            }
            Index::Symbols => Symbol::parse(member)
                .ok()
                .map(|symbol| keys.shard_of_symbol(&symbol)),
            Index::Advances => canonical_uuid(member).map(|_| keys.shard_of_text_id(member)),
            Index::ApiKeys => KeyId::parse(member).ok().map(|id| keys.api_key_shard(&id)),
        }
    }

    /// The shard's index in the sharded layout.
    pub fn target(self, keys: &Keys, shard: Shard) -> String {
        match self {
            Index::Accounts => keys.accounts(shard),
            Index::Batches => keys.batches(shard),
            Index::FailedBatches => keys.failed_batches(shard),
            Index::Symbols => keys.symbols(shard),
            Index::Advances => keys.advances(shard),
            Index::ApiKeys => keys.api_keys(shard),
        }
    }
}

/// The kinds of request an Idempotency-Key was recorded for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    Accounts,
    Orders,
    Wallet,
    Advances,
    Transfer,
    BankTransaction,
}

impl Scope {
    pub const ALL: [Scope; 6] = [
        Scope::Accounts,
        Scope::Orders,
        Scope::Wallet,
        Scope::Advances,
        Scope::Transfer,
        Scope::BankTransaction,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Accounts => "accounts",
            Scope::Orders => "orders",
            Scope::Wallet => "wallet",
            Scope::Advances => "advances",
            Scope::Transfer => "transfer",
            Scope::BankTransaction => "bank_transaction",
        }
    }
}

/// The record an idempotency value names ("id fingerprint"), as the old
/// layout and the sharded one spell its key, and the field of it that says
/// where the record's Idempotency-Key belongs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamedRecord {
    pub old: String,
    pub new: String,
    pub field: &'static str,
}

impl Scope {
    /// The record `id` names; `None` for `accounts` (the key alone says
    /// where it belongs) and for an id tally could not have drawn.
    pub fn named_record(self, keys: &Keys, id: &str) -> Option<NamedRecord> {
        let uuid = canonical_uuid(id)?;
        let (old, new, field) = match self {
            Scope::Accounts => return None,
            Scope::Orders => (
                format!("tally:order:{id}"),
                keys.order(&OrderId::from_uuid(uuid)),
                "account_id",
            ),
            Scope::Wallet => (
                format!("tally:wallet:transaction:{id}"),
                keys.wallet_transaction(id),
                "account_id",
            ),
            Scope::Advances => (
                format!("tally:advance:{id}"),
                keys.advance(id),
                "account_id",
            ),
            Scope::Transfer | Scope::BankTransaction => (
                format!("tally:transaction:{id}"),
                keys.transaction(id),
                "request",
            ),
        };
        Some(NamedRecord { old, new, field })
    }
}

/// The payer and payee of a transfer or bank transaction, from the request
/// its record kept in canonical form (`api/transfers.rs`): `src dst cents
/// Debit|Credit` for a transfer, `account cents Debit|Credit reason` for a
/// bank transaction. `None` for anything else.
pub fn movement_parties(scope: Scope, request: &str) -> Option<(AccountId, AccountId)> {
    let words: Vec<&str> = request.splitn(4, ' ').collect();
    // The first pays on a debit; the second on a credit.
    let (first, second, direction) = match (scope, words.as_slice()) {
        (Scope::Transfer, [src, dst, _, direction]) => (customer(src)?, customer(dst)?, *direction),
        (Scope::BankTransaction, [account, _, direction, ..]) => {
            (customer(account)?, SystemAccount::Bank.id(), *direction)
        }
        _ => return None,
    };
    match direction {
        "Debit" => Some((first, second)),
        "Credit" => Some((second, first)),
        _ => None,
    }
}

/// What a key of the old layout holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Legacy {
    Fixed(Fixed),
    /// A system account: its whole balance becomes shard 0's sub-account.
    System(SystemAccount),
    Account(AccountId),
    AccountAdvances(AccountId),
    Order(OrderId),
    Bucket(Symbol),
    BucketOrders(Symbol),
    BucketBatches(Symbol),
    Batch(BatchId),
    BatchOrders(BatchId),
    /// A transfer or bank transaction (hash, with a ttl).
    Transaction(String),
    /// `tally:idempotency:<scope>:<key>` (string "id fingerprint", with a ttl).
    Idempotency {
        scope: Scope,
        key: String,
    },
    WalletTransaction(String),
    WalletQueue(AccountId),
    WalletScheduled(AccountId),
    WalletHistory(AccountId),
    Advance(String),
    ApiKey(KeyId),
    /// A rate-limit bucket: transient, dropped.
    RateLimit,
}

impl Legacy {
    /// Where the sharded layout keeps this key, for a key that moves whole
    /// to a name known from the key alone (not an index, an idempotency
    /// record or a rate-limit bucket).
    pub fn whole_target(&self, keys: &Keys) -> Option<String> {
        let first = keys.layout().first();
        Some(match self {
            Legacy::Fixed(fixed) => return fixed.whole_target(keys),
            Legacy::System(system) => keys.system_account(*system, first),
            Legacy::Account(id) => keys.account(id),
            Legacy::AccountAdvances(id) => keys.account_advances(id),
            Legacy::Order(id) => keys.order(id),
            Legacy::Bucket(symbol) => keys.bucket(symbol),
            Legacy::BucketOrders(symbol) => keys.bucket_orders(symbol),
            Legacy::BucketBatches(symbol) => keys.bucket_batches(symbol),
            Legacy::Batch(id) => keys.batch(id),
            Legacy::BatchOrders(id) => keys.batch_orders(id),
            Legacy::Transaction(id) => keys.transaction(id),
            Legacy::WalletTransaction(id) => keys.wallet_transaction(id),
            Legacy::WalletQueue(id) => keys.wallet_queue(id),
            Legacy::WalletScheduled(id) => keys.wallet_scheduled(id),
            Legacy::WalletHistory(id) => keys.wallet_history(id),
            Legacy::Advance(id) => keys.advance(id),
            Legacy::ApiKey(id) => keys.api_key(id),
            Legacy::Idempotency { .. } | Legacy::RateLimit => return None,
        })
    }
}

/// What `tally migrate` makes of a key it finds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Class {
    /// A key of the old layout.
    Legacy(Legacy),
    /// A key of the sharded layout (`tally:{<tag>}:...`).
    Sharded,
    /// The shard count the sharded layout's data was written with.
    ShardCount,
    /// `tally migrate`'s own mark of a move under way.
    Migration,
    /// Left as it is: the same in both layouts (the audit lock, `tally dev`'s notes).
    Kept,
    /// Nothing tally writes.
    Unknown,
}

/// What `key` is. Ids must be spelled as tally spells them (canonical
/// UUIDs): any other spelling is a key tally did not write.
pub fn classify(key: &str) -> Class {
    if key == WALLET_ERRORS {
        return Class::Legacy(Legacy::Fixed(Fixed::WalletErrors));
    }
    if let Some(rest) = key.strip_prefix("transactions:errors:") {
        return if is_tag(rest) {
            Class::Sharded
        } else {
            Class::Unknown
        };
    }
    let Some(name) = key.strip_prefix(PREFIX) else {
        return Class::Unknown;
    };
    if let Some(fixed) = Fixed::ALL.into_iter().find(|fixed| fixed.name() == key) {
        return Class::Legacy(Legacy::Fixed(fixed));
    }
    match key {
        keys::SHARD_COUNT => return Class::ShardCount,
        keys::MIGRATION => return Class::Migration,
        keys::AUDIT_RUNNING => return Class::Kept,
        _ => {}
    }
    // `tally dev`'s notes (`keys::DEV_DEMO_ACCOUNT`, `keys::DEV_KEYS`) are
    // spelled alike in both layouts.
    if name.starts_with("dev:") {
        return Class::Kept;
    }
    if name.starts_with('{') {
        return Class::Sharded;
    }
    legacy_record(name).map_or(Class::Unknown, Class::Legacy)
}

/// A record of the old layout, from its name after `tally:`.
fn legacy_record(name: &str) -> Option<Legacy> {
    let (kind, rest) = name.split_once(':')?;
    Some(match kind {
        "account" => match rest.strip_suffix(":advances") {
            Some(id) => Legacy::AccountAdvances(customer(id)?),
            None => match canonical_account(rest)? {
                id if id.is_system() => Legacy::System(system(&id)?),
                id => Legacy::Account(id),
            },
        },
        "order" => Legacy::Order(OrderId::from_uuid(canonical_uuid(rest)?)),
        "bucket" => match rest.split_once(':') {
            None => Legacy::Bucket(Symbol::parse(rest).ok()?),
            Some((symbol, "orders")) => Legacy::BucketOrders(Symbol::parse(symbol).ok()?),
            Some((symbol, "batches")) => Legacy::BucketBatches(Symbol::parse(symbol).ok()?),
            Some(_) => return None,
        },
        "batch" => match rest.strip_suffix(":orders") {
            Some(id) => Legacy::BatchOrders(BatchId::from_uuid(canonical_uuid(id)?)),
            None => Legacy::Batch(BatchId::from_uuid(canonical_uuid(rest)?)),
        },
        "transaction" => Legacy::Transaction(canonical_text(rest)?),
        "idempotency" => {
            let (scope, key) = rest.split_once(':')?;
            let scope = Scope::ALL.into_iter().find(|s| s.as_str() == scope)?;
            (!key.is_empty()).then(|| Legacy::Idempotency {
                scope,
                key: key.to_owned(),
            })?
        }
        "wallet" => {
            let (part, id) = rest.split_once(':')?;
            match part {
                "transaction" => Legacy::WalletTransaction(canonical_text(id)?),
                "queue" => Legacy::WalletQueue(customer(id)?),
                "scheduled" => Legacy::WalletScheduled(customer(id)?),
                "history" => Legacy::WalletHistory(customer(id)?),
                _ => return None,
            }
        }
        "advance" => Legacy::Advance(canonical_text(rest)?),
        "api_key" => Legacy::ApiKey(KeyId::parse(rest).ok()?),
        "rate_limit" => Legacy::RateLimit,
        _ => return None,
    })
}

/// Whether `text` is `{<tag>}`, a hash tag as the sharded layout writes one.
fn is_tag(text: &str) -> bool {
    text.len() > 2 && text.starts_with('{') && text.ends_with('}') && !text[1..].contains('{')
}

fn canonical_uuid(text: &str) -> Option<Uuid> {
    crate::domain::parse_uuid(text)
        .ok()
        .filter(|uuid| uuid.to_string() == text)
}

fn canonical_text(text: &str) -> Option<String> {
    canonical_uuid(text).map(|_| text.to_owned())
}

fn canonical_account(text: &str) -> Option<AccountId> {
    AccountId::parse(text).ok().filter(|id| id.as_str() == text)
}

fn customer(text: &str) -> Option<AccountId> {
    canonical_account(text).filter(|id| !id.is_system())
}

fn system(id: &AccountId) -> Option<SystemAccount> {
    SystemAccount::ALL
        .into_iter()
        .find(|system| system.id() == *id)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_of_old_key_is_known_and_lands_where_the_new_code_looks() {
        let keys = Keys::new(16);
        let account = AccountId::new_customer();
        let order = OrderId::new();
        let batch = BatchId::new();
        let id = Uuid::now_v7().to_string();
        let key_id = KeyId::new();
        let cases = [
            (format!("tally:account:{account}"), keys.account(&account)),
            (
                format!("tally:account:{account}:advances"),
                keys.account_advances(&account),
            ),
            (format!("tally:order:{order}"), keys.order(&order)),
            (format!("tally:batch:{batch}"), keys.batch(&batch)),
            (
                format!("tally:batch:{batch}:orders"),
                keys.batch_orders(&batch),
            ),
            (format!("tally:transaction:{id}"), keys.transaction(&id)),
            (
                format!("tally:wallet:transaction:{id}"),
                keys.wallet_transaction(&id),
            ),
            (
                format!("tally:wallet:history:{account}"),
                keys.wallet_history(&account),
            ),
            (format!("tally:advance:{id}"), keys.advance(&id)),
            (format!("tally:api_key:{key_id}"), keys.api_key(&key_id)),
            (
                "tally:account:@exchange".to_owned(),
                keys.system_account(SystemAccount::Exchange, keys.layout().first()),
            ),
            (
                "tally:bucket:ABAN:batches".to_owned(),
                keys.bucket_batches(&Symbol::parse("ABAN").unwrap()),
            ),
            (
                "tally:journal".to_owned(),
                keys.journal(keys.layout().first()),
            ),
            (
                "transactions:errors".to_owned(),
                keys.wallet_errors(keys.layout().first()),
            ),
        ];
        for (old, new) in cases {
            let Class::Legacy(legacy) = classify(&old) else {
                panic!("{old} is not known");
            };
            assert_eq!(legacy.whole_target(&keys), Some(new), "{old}");
        }
        assert!(matches!(
            classify("tally:idempotency:transfer:abc/key:with:colons"),
            Class::Legacy(Legacy::Idempotency { scope: Scope::Transfer, key }) if key == "abc/key:with:colons"
        ));
        assert_eq!(
            classify("tally:rate_limit:127.0.0.1"),
            Class::Legacy(Legacy::RateLimit)
        );
    }

    #[test]
    fn keys_of_the_sharded_layout_and_strangers_are_told_apart() {
        let keys = Keys::new(16);
        let shard = keys.layout().first();
        for key in [keys.journal(shard), keys.wallet_errors(shard)] {
            assert_eq!(classify(&key), Class::Sharded, "{key}");
        }
        assert_eq!(classify(keys::SHARD_COUNT), Class::ShardCount);
        assert_eq!(classify(keys::MIGRATION), Class::Migration);
        for key in [keys::AUDIT_RUNNING, keys::DEV_DEMO_ACCOUNT, keys::DEV_KEYS] {
            assert_eq!(classify(key), Class::Kept, "{key}");
        }
        for key in [
            "tally:nonsense",
            "tally:order:not-a-uuid",
            "tally:account:@nobody",
            "tally:idempotency:unknown_scope:k",
            "tally:bucket:aban",
            "other:key",
            "transactions:errors:x",
        ] {
            assert_eq!(classify(key), Class::Unknown, "{key}");
        }
        let upper = Uuid::now_v7().to_string().to_uppercase();
        assert_eq!(classify(&format!("tally:order:{upper}")), Class::Unknown);
    }
}
