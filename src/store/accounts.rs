//! Accounts: creation (with its opening-balance journal entry), reads, paging.

use std::sync::LazyLock;

use redis::{AsyncCommands, Script};

use super::keys::Keys;
use super::slots::Shard;
use super::{Conn, Record, StoreError, StoreResult, now_ms, verdict};
use crate::domain::{AccountId, AccountName, Amount, Idempotency, SystemAccount};

pub static CREATE_ACCOUNT: LazyLock<Script> = lua_script!("create_account.lua");

/// An account as stored. System accounts may hold a negative balance.
#[derive(Debug, Clone)]
pub struct Account {
    pub id: AccountId,
    pub name: String,
    pub balance_cents: i64,
    pub created_at_ms: i64,
}

impl Account {
    fn from_record(record: &Record) -> StoreResult<Self> {
        Ok(Account {
            id: record.parsed("id", AccountId::parse)?,
            name: record.text("name")?.to_owned(),
            balance_cents: record.integer("balance")?,
            created_at_ms: record.integer("created_at")?,
        })
    }
}

pub struct NewAccount {
    pub id: AccountId,
    pub name: AccountName,
    pub opening_balance: Amount,
    pub idempotency: Option<Idempotency>,
    pub idempotency_ttl_secs: u64,
}

#[derive(Debug, PartialEq, Eq)]
pub enum CreateAccountOutcome {
    Created(AccountId),
    /// The Idempotency-Key was seen before with the same request.
    Replayed(AccountId),
}

#[derive(Debug, thiserror::Error)]
pub enum CreateAccountError {
    #[error("the Idempotency-Key was used for another request (account {0})")]
    IdempotencyConflict(String),
    /// The opening balance would take this account (the new one, or @bank,
    /// which funds it) past the balance limit; nothing was written.
    #[error(
        "the opening balance would take the balance of account {0} past the largest amount held"
    )]
    BalanceLimit(AccountId),
    #[error(transparent)]
    Store(#[from] StoreError),
}

#[tracing::instrument(skip_all, fields(account_id = %new.id))]
pub async fn create_account(
    conn: &mut impl Conn,
    keys: &Keys,
    new: &NewAccount,
) -> Result<CreateAccountOutcome, CreateAccountError> {
    let shard = keys
        .shard_of_account(&new.id)
        .ok_or_else(|| StoreError::Corrupt {
            key: new.id.to_string(),
            problem: "a new account must be a customer's".to_owned(),
        })?;
    let (idempotency_key, fingerprint) = match &new.idempotency {
        Some(idem) => (
            keys.idempotency(shard, "accounts", idem.key.as_str()),
            idem.fingerprint.as_str(),
        ),
        None => (keys.idempotency(shard, "accounts", "-"), ""),
    };
    let bank = SystemAccount::Bank.id();
    let reply: Vec<String> = CREATE_ACCOUNT
        .key(keys.account(&new.id))
        .key(keys.system_account(SystemAccount::Bank, shard))
        .key(keys.journal(shard))
        .key(keys.accounts(shard))
        .key(idempotency_key)
        .key(keys.journal_index(shard))
        .key(keys.events(shard))
        .key(keys.account_entries(&new.id))
        .arg(new.id.as_str())
        .arg(new.name.as_str())
        .arg(new.opening_balance.cents())
        .arg(now_ms())
        .arg(fingerprint)
        .arg(new.idempotency_ttl_secs)
        .arg(bank.as_str())
        .invoke_async(conn)
        .await
        .map_err(StoreError::from)?;
    let id_at = |i: usize| -> Result<AccountId, CreateAccountError> {
        reply
            .get(i)
            .and_then(|id| AccountId::parse(id).ok())
            .ok_or_else(|| StoreError::UnexpectedReply(reply.clone()).into())
    };
    match (verdict(&reply), reply.get(1).map(String::as_str)) {
        ("created", _) => Ok(CreateAccountOutcome::Created(id_at(1)?)),
        ("replayed", _) => Ok(CreateAccountOutcome::Replayed(id_at(1)?)),
        ("refused", Some("idempotency_conflict")) => Err(CreateAccountError::IdempotencyConflict(
            reply.get(2).cloned().unwrap_or_default(),
        )),
        ("refused", Some("balance_limit")) if reply.len() == 3 => {
            match super::balance_limit_account(reply.get(2)) {
                Some(account) => Err(CreateAccountError::BalanceLimit(account)),
                None => Err(StoreError::UnexpectedReply(reply).into()),
            }
        }
        _ => Err(StoreError::UnexpectedReply(reply).into()),
    }
}

/// An account; a system account's balance is the sum of its sub-accounts,
/// one per shard.
pub async fn get_account(
    conn: &mut impl Conn,
    keys: &Keys,
    id: &AccountId,
) -> StoreResult<Option<Account>> {
    let key = keys.account(id);
    let fields = redis::cmd("HGETALL").arg(&key).query_async(conn).await?;
    let Some(mut account) = Record::new(key, fields)
        .map(|record| Account::from_record(&record))
        .transpose()?
    else {
        return Ok(None);
    };
    if account.id.is_system() {
        account.balance_cents = system_balance(conn, keys, &account.id).await?;
    }
    Ok(Some(account))
}

/// A system account's balance: the sum of its sub-accounts (each alone may
/// be negative; only the sum means anything).
pub async fn system_balance(conn: &mut impl Conn, keys: &Keys, id: &AccountId) -> StoreResult<i64> {
    let mut total: i64 = 0;
    for shard in keys.shards() {
        let balance: Option<i64> = conn.hget(keys.account_on(shard, id), "balance").await?;
        total = total
            .checked_add(balance.unwrap_or(0))
            .ok_or_else(|| StoreError::Corrupt {
                key: keys.account_on(shard, id),
                problem: "the sub-accounts' sum leaves i64".to_owned(),
            })?;
    }
    Ok(total)
}

/// One page of customer accounts in id (creation) order, after `after`:
/// each shard's index read from `after` on, merged.
pub async fn list_accounts(
    conn: &mut impl Conn,
    keys: &Keys,
    after: Option<&AccountId>,
    limit: usize,
) -> StoreResult<Vec<Account>> {
    let start = match after {
        Some(id) => format!("({id}"),
        None => "-".to_owned(),
    };
    let mut ids: Vec<(Shard, String)> = Vec::new();
    for shard in keys.shards() {
        let page: Vec<String> = conn
            .zrangebylex_limit(keys.accounts(shard), &start, "+", 0, limit as isize)
            .await?;
        ids.extend(page.into_iter().map(|id| (shard, id)));
    }
    // Ids are lowercase hyphenated UUIDv7s: text order is creation order.
    ids.sort_unstable_by(|a, b| a.1.cmp(&b.1));
    ids.truncate(limit);
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let mut records = Vec::with_capacity(ids.len());
    for (shard, id) in &ids {
        let id = AccountId::parse(id).map_err(|err| StoreError::Corrupt {
            key: keys.accounts(*shard),
            problem: err.to_string(),
        })?;
        let key = keys.account(&id);
        let fields: std::collections::HashMap<String, String> = conn.hgetall(&key).await?;
        records.push((key, fields));
    }
    records
        .into_iter()
        .filter_map(|(key, fields)| Record::new(key, fields))
        .map(|record| Account::from_record(&record))
        .collect()
}

/// Every account, customers and system, for the audit: a bounded page at a time.
pub async fn all_balances(
    conn: &mut impl Conn,
    keys: &Keys,
    page_size: usize,
) -> StoreResult<Vec<(AccountId, i64)>> {
    let mut balances = Vec::new();
    for system in SystemAccount::ALL {
        let id = system.id();
        balances.push((id.clone(), system_balance(conn, keys, &id).await?));
    }
    let mut after = None;
    loop {
        let page = list_accounts(conn, keys, after.as_ref(), page_size).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.id.clone());
        balances.extend(
            page.into_iter()
                .map(|account| (account.id, account.balance_cents)),
        );
    }
    Ok(balances)
}
