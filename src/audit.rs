//! `tally audit`: the ledger's invariants, checked from what Redis holds.
//!
//! 1. All balances, customer and system, sum to exactly zero.
//! 2. Each balance equals the sum of its journal entries.
//! 3. Every cent paid for orders is in exactly one place: a batch or a bucket.
//! 4. `@exchange` holds exactly what is still owed to the exchange: the
//!    buckets, the batches not yet settled or refunded, and the orders
//!    debited whose saga has not yet put them in a bucket (in flight).
//! 5. Every advance reconciles: paid + scheduled + processing = its amount,
//!    and every scheduled installment is due or leased (something will
//!    collect it).
//! 6. Every balance, customer and system, is within ±(2^53 - 1) cents
//!    ([`BALANCE_LIMIT_CENTS`]), the range the scripts keep exact and refuse
//!    to move past. One outside it was set by hand, or by a script that did
//!    not check: the scripts' comparisons on it are no longer exact.
//!
//! The audit reads in bounded pages and is not one atomic snapshot: run it on
//! a quiet system (or twice) before calling a mismatch a breach. The journal
//! trim, which runs whether or not there is traffic, waits while it reads.

use std::collections::BTreeMap;
use std::fmt;

use redis::streams::StreamRangeReply;

use crate::domain::{AccountId, BALANCE_LIMIT_CENTS, SystemAccount, format_units};
use crate::store::connection::Conn;
use crate::store::keys::Keys;
use crate::store::orders::SettlementStatus;
use crate::store::{Store, StoreError, StoreResult, accounts, advances, journal, orders};

/// The value of every batch retention took out of Redis, in cents.
async fn retired_batches_value(conn: &mut Conn, keys: &Keys) -> StoreResult<i64> {
    let mut value = 0;
    for shard in keys.shards() {
        let carried = crate::store::archive::carried(conn, keys, shard).await?;
        value += carried.get("batches_value").copied().unwrap_or(0);
    }
    Ok(value)
}

/// Entries, accounts or batches read per Redis call.
pub const AUDIT_PAGE_SIZE: usize = 1_000;

#[derive(Debug, Default)]
pub struct AuditReport {
    pub accounts_checked: usize,
    pub journal_entries: u64,
    pub balances_sum_cents: i64,
    /// Customers' balances alone, summed (the console shows it).
    pub customer_balances_cents: i64,
    /// Accounts whose balance differs from their journal: (id, balance, journal sum).
    pub mismatched_accounts: Vec<(AccountId, i64, i64)>,
    /// Accounts whose balance is outside ±[`BALANCE_LIMIT_CENTS`]: (id, balance).
    pub out_of_range_accounts: Vec<(AccountId, i64)>,
    pub orders_value_cents: i64,
    pub batches_value_cents: i64,
    pub buckets_value_cents: i64,
    pub exchange_balance_cents: i64,
    /// Orders debited whose saga has not yet put them in a bucket: on
    /// `@exchange`, in no batch or bucket yet.
    pub orders_in_flight: usize,
    pub orders_in_flight_cents: i64,
    /// `@transit`'s balance: the sum of its sub-accounts.
    pub transit_balance_cents: i64,
    /// Transfers between shards debited and not yet credited to their payee
    /// (or refused by it and not yet voided): what `@transit` must hold.
    pub transfers_in_flight: usize,
    pub transfers_in_flight_cents: i64,
    /// Batches settling or failed: bought from the exchange by no one yet.
    pub open_batches_value_cents: i64,
    pub advances_checked: usize,
    /// Advances whose installments do not add up to their amount.
    pub unreconciled_advances: Vec<String>,
    /// Installments (`advance_id:n`) scheduled but neither due nor leased:
    /// nothing would ever collect them.
    pub stranded_installments: Vec<String>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.balances_sum_cents == 0
            && self.mismatched_accounts.is_empty()
            && self.out_of_range_accounts.is_empty()
            && self.orders_value_cents
                == self.batches_value_cents + self.buckets_value_cents + self.orders_in_flight_cents
            && self.exchange_balance_cents
                == self.open_batches_value_cents
                    + self.buckets_value_cents
                    + self.orders_in_flight_cents
            && self.transit_balance_cents == self.transfers_in_flight_cents
            && self.unreconciled_advances.is_empty()
            && self.stranded_installments.is_empty()
    }
}

impl fmt::Display for AuditReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let usd = |cents: i64| format_units(cents, 2);
        let mark = |ok: bool| if ok { "ok    " } else { "BREACH" };
        writeln!(
            f,
            "{} balances sum to {} over {} accounts (must be 0.00)",
            mark(self.balances_sum_cents == 0),
            usd(self.balances_sum_cents),
            self.accounts_checked
        )?;
        writeln!(
            f,
            "{} every balance equals its journal ({} entries, {} mismatched)",
            mark(self.mismatched_accounts.is_empty()),
            self.journal_entries,
            self.mismatched_accounts.len()
        )?;
        for (id, balance, journal) in &self.mismatched_accounts {
            writeln!(
                f,
                "       {id}: balance {} but journal {}",
                usd(*balance),
                usd(*journal)
            )?;
        }
        writeln!(
            f,
            "{} every balance is within ±{} ({} outside)",
            mark(self.out_of_range_accounts.is_empty()),
            usd(BALANCE_LIMIT_CENTS),
            self.out_of_range_accounts.len()
        )?;
        for (id, balance) in &self.out_of_range_accounts {
            writeln!(f, "       {id}: balance {} is out of range", usd(*balance))?;
        }
        let in_flight = self.orders_in_flight_cents;
        let settled = self.batches_value_cents + self.buckets_value_cents + in_flight;
        writeln!(
            f,
            "{} orders paid {} = batches {} + buckets {} + in flight {} ({} orders debited, not yet in a bucket)",
            mark(self.orders_value_cents == settled),
            usd(self.orders_value_cents),
            usd(self.batches_value_cents),
            usd(self.buckets_value_cents),
            usd(in_flight),
            self.orders_in_flight
        )?;
        let owed = self.open_batches_value_cents + self.buckets_value_cents + in_flight;
        writeln!(
            f,
            "{} @exchange holds {} = open batches {} + buckets {} + in flight {}",
            mark(self.exchange_balance_cents == owed),
            usd(self.exchange_balance_cents),
            usd(self.open_batches_value_cents),
            usd(self.buckets_value_cents),
            usd(in_flight)
        )?;
        writeln!(
            f,
            "{} @transit holds {} = transfers between shards in flight {} ({} debited, not yet credited)",
            mark(self.transit_balance_cents == self.transfers_in_flight_cents),
            usd(self.transit_balance_cents),
            usd(self.transfers_in_flight_cents),
            self.transfers_in_flight
        )?;
        writeln!(
            f,
            "{} advances reconcile: paid + scheduled + processing = amount ({} checked, {} not)",
            mark(self.unreconciled_advances.is_empty()),
            self.advances_checked,
            self.unreconciled_advances.len()
        )?;
        for id in &self.unreconciled_advances {
            writeln!(f, "       advance {id} does not reconcile")?;
        }
        writeln!(
            f,
            "{} every scheduled installment is due or leased ({} stranded)",
            mark(self.stranded_installments.is_empty()),
            self.stranded_installments.len()
        )?;
        for member in &self.stranded_installments {
            writeln!(f, "       installment {member} would never be collected")?;
        }
        write!(
            f,
            "{}",
            if self.is_clean() {
                "audit clean"
            } else {
                "audit FAILED"
            }
        )
    }
}

/// How long an audit holds the journal trim off, from its last page read.
pub const AUDIT_TRIM_PAUSE_MS: i64 = 60_000;
/// Audits in a row that may find the journal trimmed under them (the pause
/// ran out: a stalled audit, clocks far apart) before the run gives up.
pub const AUDIT_ATTEMPTS_MAX: u32 = 3;

/// The audit's hold on the journal trim. Ended when the audit ends, or, if
/// the audit is dropped part way (a timed-out HTTP request), by a task the
/// drop starts; failing both, it runs out on its own.
struct TrimPause {
    store: Store,
    token: String,
    ended: bool,
}

impl TrimPause {
    async fn start(store: &Store, conn: &mut Conn) -> StoreResult<Self> {
        let pause = TrimPause {
            store: store.clone(),
            token: uuid::Uuid::now_v7().to_string(),
            ended: false,
        };
        pause.renew(conn).await?;
        Ok(pause)
    }

    async fn renew(&self, conn: &mut Conn) -> StoreResult<()> {
        let until = crate::store::now_ms() + AUDIT_TRIM_PAUSE_MS;
        journal::pause_trim(conn, self.store.keys(), &self.token, until).await
    }

    async fn end(mut self, conn: &mut Conn) -> StoreResult<()> {
        self.ended = true;
        journal::resume_trim(conn, self.store.keys(), &self.token).await
    }
}

impl Drop for TrimPause {
    fn drop(&mut self) {
        if self.ended {
            return;
        }
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let (store, token) = (self.store.clone(), std::mem::take(&mut self.token));
            runtime.spawn(async move {
                if let Ok(mut conn) = store.conn().await {
                    let _ = journal::resume_trim(&mut conn, store.keys(), &token).await;
                }
            });
        }
    }
}

pub async fn run(store: &Store) -> StoreResult<AuditReport> {
    let mut conn = store.conn().await?;
    // The trim moves entries from the journal to the carried sums, which the
    // audit reads at different times: it waits while an audit runs. If it ran
    // anyway, the carried sums differ at the end, and the audit starts over.
    let pause = TrimPause::start(store, &mut conn).await?;
    let mut attempt = 1;
    let report = loop {
        match check(conn.clone(), store.keys(), &pause).await {
            Ok(None) if attempt < AUDIT_ATTEMPTS_MAX => attempt += 1,
            Ok(None) => {
                break Err(StoreError::Contended(format!(
                    "the journal was trimmed while each of {AUDIT_ATTEMPTS_MAX} audits read it"
                )));
            }
            Ok(Some(report)) => break Ok(report),
            Err(err) => break Err(err),
        }
    };
    let resumed = pause.end(&mut conn).await;
    let report = report?;
    resumed?;
    Ok(report)
}

/// The sum of `balances`, exact in i128: balances out of range (set by hand)
/// could overflow an i64 sum. A sum beyond i64 reads as its nearest bound,
/// which is not zero, so it is a breach either way.
fn sum_cents(balances: impl Iterator<Item = i64>) -> i64 {
    let sum: i128 = balances.map(i128::from).sum();
    i64::try_from(sum).unwrap_or(if sum > 0 { i64::MAX } else { i64::MIN })
}

/// One pass over the ledger; None when the journal was trimmed during it.
/// Every shard's journal is read; system accounts are checked as the sums of
/// their sub-accounts (each alone may be negative: see CLUSTER.md).
async fn check(mut conn: Conn, keys: &Keys, pause: &TrimPause) -> StoreResult<Option<AuditReport>> {
    let balances = accounts::all_balances(&mut conn, keys, AUDIT_PAGE_SIZE).await?;
    let mut report = AuditReport {
        accounts_checked: balances.len(),
        balances_sum_cents: sum_cents(balances.iter().map(|(_, balance)| *balance)),
        customer_balances_cents: sum_cents(
            balances
                .iter()
                .filter(|(id, _)| !id.is_system())
                .map(|(_, balance)| *balance),
        ),
        out_of_range_accounts: balances
            .iter()
            .filter(|(_, balance)| !(-BALANCE_LIMIT_CENTS..=BALANCE_LIMIT_CENTS).contains(balance))
            .cloned()
            .collect(),
        ..AuditReport::default()
    };
    for (id, balance) in &report.out_of_range_accounts {
        tracing::error!(account_id = %id, balance_cents = balance, "balance outside the range the scripts keep exact");
    }

    // Entries trimmed past retention count through what they carried.
    let mut journal_sums: BTreeMap<String, i64> = BTreeMap::new();
    for shard in keys.shards() {
        let carried = journal::carried(&mut conn, keys, shard).await?;
        for (name, &cents) in &carried {
            match name.strip_prefix("kind:") {
                Some("order") => report.orders_value_cents += cents,
                Some(_) => {}
                None => *journal_sums.entry(name.clone()).or_default() += cents,
            }
        }
        let journal_key = keys.journal(shard);
        let mut start = "-".to_owned();
        loop {
            let page: StreamRangeReply = redis::cmd("XRANGE")
                .arg(&journal_key)
                .arg(&start)
                .arg("+")
                .arg("COUNT")
                .arg(AUDIT_PAGE_SIZE)
                .query_async(&mut conn)
                .await?;
            let Some(last) = page.ids.last() else { break };
            pause.renew(&mut conn).await?;
            start = format!("({}", last.id);
            for entry in &page.ids {
                let field = |name: &str| -> StoreResult<String> {
                    entry.get(name).ok_or_else(|| StoreError::Corrupt {
                        key: format!("{journal_key} {}", entry.id),
                        problem: format!("field `{name}` is missing or malformed"),
                    })
                };
                let amount: i64 = entry.get("amount").ok_or_else(|| StoreError::Corrupt {
                    key: format!("{journal_key} {}", entry.id),
                    problem: "amount is missing or not an integer".to_owned(),
                })?;
                *journal_sums.entry(field("debit")?).or_default() -= amount;
                *journal_sums.entry(field("credit")?).or_default() += amount;
                if field("kind")? == "order" {
                    report.orders_value_cents += amount;
                }
                report.journal_entries += 1;
            }
        }
        if journal::carried(&mut conn, keys, shard).await? != carried {
            return Ok(None); // a trim moved entries between the two reads
        }
    }
    for (id, balance) in &balances {
        let journal = journal_sums.remove(id.as_str()).unwrap_or(0);
        if journal != *balance {
            report
                .mismatched_accounts
                .push((id.clone(), *balance, journal));
        }
    }
    // Money journaled to an account that does not exist is a breach too
    // (refusals naming an unknown account moved nothing and sum to zero).
    for (id, journal) in journal_sums
        .into_iter()
        .filter(|(_, journal)| *journal != 0)
    {
        let id = AccountId::parse(&id).map_err(|err| StoreError::Corrupt {
            key: "the journals".to_owned(),
            problem: err.to_string(),
        })?;
        report.mismatched_accounts.push((id, 0, journal));
    }

    // Batches that left Redis count through the value they carried.
    let retired_value = retired_batches_value(&mut conn, keys).await?;
    report.batches_value_cents += retired_value;
    let batches = orders::batch_values(&mut conn, keys, AUDIT_PAGE_SIZE).await?;
    if retired_value != retired_batches_value(&mut conn, keys).await? {
        return Ok(None); // a batch left Redis between the two reads
    }
    for (batch_id, value, status) in batches {
        report.batches_value_cents += value;
        match status {
            SettlementStatus::Settling | SettlementStatus::Failed => {
                report.open_batches_value_cents += value;
            }
            // Part paid back already, shard by shard.
            SettlementStatus::Refunding => {
                report.open_batches_value_cents +=
                    crate::store::refund_saga::still_owed(&mut conn, keys, &batch_id).await?;
            }
            _ => {}
        }
    }
    report.exchange_balance_cents = balances
        .iter()
        .find(|(id, _)| *id == SystemAccount::Exchange.id())
        .map_or(0, |(_, balance)| *balance);
    let symbols = orders::ordered_symbols(&mut conn, keys).await?;
    let buckets = orders::buckets(&mut conn, keys, &symbols).await?;
    report.buckets_value_cents = buckets.iter().map(|bucket| bucket.value_cents).sum();
    for shard in keys.shards() {
        let (count, cents) =
            crate::store::order_saga::unadmitted(&mut conn, keys, shard, AUDIT_PAGE_SIZE).await?;
        report.orders_in_flight += count;
        report.orders_in_flight_cents += cents;
        let (count, cents) =
            crate::store::transfer_saga::in_flight(&mut conn, keys, shard, AUDIT_PAGE_SIZE).await?;
        report.transfers_in_flight += count;
        report.transfers_in_flight_cents += cents;
    }
    report.transit_balance_cents = balances
        .iter()
        .find(|(id, _)| *id == SystemAccount::Transit.id())
        .map_or(0, |(_, balance)| *balance);

    for shard in keys.shards() {
        let mut offset = 0;
        loop {
            let ids = advances::ids_on(&mut conn, keys, shard, offset, AUDIT_PAGE_SIZE).await?;
            if ids.is_empty() {
                break;
            }
            offset += ids.len();
            for id in ids {
                check_advance(&mut conn, keys, &id, &mut report).await?;
            }
        }
    }
    Ok(Some(report))
}

async fn check_advance(
    conn: &mut Conn,
    keys: &Keys,
    id: &str,
    report: &mut AuditReport,
) -> StoreResult<()> {
    let advance = advances::get(conn, keys, id).await?;
    let reconciles = advance.as_ref().is_some_and(|advance| advance.reconciles());
    if let Some(advance) = &advance {
        for n in advances::stranded(conn, keys, advance).await? {
            tracing::error!(advance_id = %id, installment = n, "installment scheduled but neither due nor leased");
            report.stranded_installments.push(format!("{id}:{n}"));
        }
    }
    report.advances_checked += 1;
    if !reconciles {
        tracing::error!(advance_id = %id, "advance does not reconcile: paid + scheduled + processing differs from its amount");
        report.unreconciled_advances.push(id.to_owned());
    }
    Ok(())
}

/// Runs an audit every `interval` and keeps its result in Redis for the
/// console, until shutdown. Any number of worker processes may run this: a
/// lock lets one periodic audit run at a time, and a process skips its turn
/// while the last result is younger than `interval`.
pub async fn audit_periodically(
    store: Store,
    interval: std::time::Duration,
    mut shutdown: tokio::sync::watch::Receiver<bool>,
) {
    loop {
        if let Err(err) = audit_if_due(&store, interval).await {
            tracing::warn!(error = %err, "the periodic audit did not run");
        }
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = shutdown.wait_for(|stop| *stop) => return,
        }
    }
}

/// How long the periodic audit holds the audit lock at most.
pub const PERIODIC_AUDIT_LOCK_MS: u64 = 600_000;

/// Audits and records the result, unless another process did within
/// `interval` or is auditing now.
pub async fn audit_if_due(store: &Store, interval: std::time::Duration) -> StoreResult<bool> {
    use crate::store::console;
    let mut conn = store.conn().await?;
    let now = crate::store::now_ms();
    let interval_ms = i64::try_from(interval.as_millis()).unwrap_or(i64::MAX);
    if let Some(last) = console::last_audit(&mut conn, store.keys()).await?
        && now.saturating_sub(last.at_ms) < interval_ms
    {
        return Ok(false);
    }
    let Some(_lock) = crate::store::locks::Lock::acquire(
        store,
        crate::store::keys::PERIODIC_AUDIT_RUNNING,
        PERIODIC_AUDIT_LOCK_MS,
    )
    .await?
    else {
        return Ok(false);
    };
    record(store).await?;
    Ok(true)
}

/// Runs an audit now and records its result for the console.
pub async fn record(store: &Store) -> StoreResult<AuditReport> {
    let report = run(store).await?;
    if !report.is_clean() {
        tracing::error!(report = %report, "the periodic audit found a breach");
    }
    let summary = crate::store::console::AuditSummary {
        at_ms: crate::store::now_ms(),
        clean: report.is_clean(),
        customer_balances_cents: report.customer_balances_cents,
        accounts_checked: report.accounts_checked as u64,
        journal_entries: report.journal_entries,
        report: report.to_string(),
    };
    let mut conn = store.conn().await?;
    crate::store::console::record_audit(&mut conn, store.keys(), &summary).await?;
    Ok(report)
}
