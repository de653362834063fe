//! `tally migrate`: moves a dataset of the single-node key layout (every key
//! `tally:<name>`, before logical shards; `legacy`) to the sharded layout
//! ([`crate::store::keys`]), on a standalone Redis.
//!
//! # What it refuses, writing nothing
//!
//! - A Redis Cluster (`cluster_enabled:1`): the move renames keys across
//!   slots, which only a standalone node allows (it ignores hash tags).
//! - Any `tally:*` key it does not recognise: it never leaves data behind.
//! - A stamp (`tally:shards`) of another shard count, and any data of the
//!   sharded layout already there: it moves into an empty layout, never
//!   merges two.
//! - Work in flight, which after the move would have to span shards: a job
//!   stream (`settle`, `wallet`, `installments`, `events`) with entries
//!   pending in, or not yet delivered to, a consumer group (entries and no
//!   group count as undelivered); a retry set that is not empty; a leased
//!   installment; a bucket holding orders; a batch `settling` or `failed`; a
//!   wallet queue that is not empty; an advance not fully repaid (this
//!   version cannot move one that is still being repaid).
//! - A ledger that does not add up: the balances must sum to zero, and each
//!   must equal its journal entries plus the carried sums.
//!
//! # What it does
//!
//! Every key moves with `RENAMENX` (one atomic step that keeps the value,
//! its ttl and a stream's entry ids and consumer groups), to where the new
//! code looks for it: an account and its wallet queue, history and advance
//! index to the account's shard; a record whose id tally draws (order,
//! batch, transaction, wallet transaction, advance, API key) to its id's
//! shard (old ids were not drawn on a chosen shard, so an old order may sit
//! off its customer's shard: a `GET` finds it by its id all the same); a
//! symbol's bucket to its home shard; the journal, its index and
//! carried sums, the job and event streams, their dead letters and retry
//! sets, `transactions:errors`, the installment sets, the stats and the
//! revocation epoch whole to shard 0's keys; the old `@bank`, `@exchange`
//! and `@card` to shard 0's sub-accounts (their whole balances), the other
//! shards' sub-accounts then made at 0. Idempotency records go where the new
//! code looks for them (`Keys::idempotency`). The account, batch, failed
//! batch, symbol, advance and API key indexes are split over the shards,
//! scores kept. Rate-limit buckets are dropped (transient); the audit lock
//! and `tally dev`'s notes stay as they are. Then it runs the audit.
//!
//! # A crash part way: run it again
//!
//! The move is re-runnable: after a crash (of this process or of Redis, with
//! AOF on), run `tally migrate` again with the same `TALLY_SHARDS`, and it
//! finishes.
//! - Before its first write it sets [`keys::MIGRATION`] to the shard count.
//!   A run that finds it resumes: the sharded keys there are its own. It
//!   does not check again what it checked before that first write: nothing
//!   can have changed since, as every other tally process refuses to start
//!   while the old `@bank` exists (`Store::check_layout`).
//! - A key is at its old name or its new one, never both nor neither, so a
//!   second run moves what the first did not. An index is split by adding
//!   its members to the shards' indexes and only then deleting it: adding
//!   them again is harmless.
//! - The old `tally:account:@bank` moves last, in one `MULTI` with the
//!   shard-count stamp (`tally:shards`) and the removal of the mark: until
//!   then the data is refused everywhere, and after it the data is whole. A
//!   crash after that step leaves the other shards' system sub-accounts to
//!   make, which the next run (it finds nothing to move, then audits) or the
//!   first `tally serve` or `tally worker` does.
//!
//! No tally process of either version may run meanwhile: this version's
//! refuse the data until the move is done, but the old version's do not
//! look (the command notes other clients connected to Redis).
//!
//! # Layout
//!
//! - `legacy`: the old layout's key names, and what each key found is.
//! - `checks`: what is checked before anything is written.
//! - `moves`: the moves, each key in one atomic step, and the last step.

mod checks;
mod legacy;
mod moves;

use std::process::ExitCode;

use anyhow::{Context, bail};

use crate::config::RedisSettings;
use crate::domain::AccountId;
use crate::store::connection::Conn;
use crate::store::keys::{self, Keys};
use crate::store::slots::Shard;
use crate::store::{Store, transfers};
use legacy::{Index, NamedRecord, Scope};

/// Keys one `SCAN` call asks for.
pub const SCAN_COUNT: usize = 1_000;
/// Members, entries or keys one call reads or moves.
pub const PAGE_SIZE: usize = 1_000;
/// Problems a refusal names; the rest it counts.
pub const LISTED_MAX: usize = 20;

/// What `SCAN` looks for: every key of both layouts.
const SCANNED: [&str; 2] = ["tally:*", "transactions:errors*"];

/// `tally migrate` against the Redis of `settings`, to its shard count (see
/// the module doc). A refusal is an error (exit code 1); an audit that is
/// not clean after the move, a failure exit code.
pub async fn run(settings: &RedisSettings) -> anyhow::Result<ExitCode> {
    // Not `Store::open`: that refuses the old layout, and stamps a count.
    let store = Store::connect_node(settings)?;
    let keys = store.keys().clone();
    let count = keys.layout().count();
    let mut conn = store
        .conn()
        .await
        .with_context(|| format!("connecting to Redis at {}", settings.url()))?;
    refuse_cluster(&mut conn).await?;
    println!(
        "tally migrate: Redis at {}, to {count} shards",
        settings.url()
    );
    note_other_clients(&mut conn).await?;

    let marked = read_count(&mut conn, keys::MIGRATION).await?;
    let stamped = read_count(&mut conn, keys::SHARD_COUNT).await?;
    if let Some(marked) = marked.filter(|marked| *marked != count) {
        bail!(
            "refused, this run wrote nothing: an earlier `tally migrate` began moving this \
             data to {marked} shards (`{}`): run it again with TALLY_SHARDS={marked} to finish",
            keys::MIGRATION
        );
    }
    let resuming = marked.is_some();
    let survey = checks::survey(&mut conn, &keys, !resuming).await?;
    if !survey.unknown.is_empty() {
        bail!(
            "refused, this run wrote nothing: this Redis holds keys tally does not write; \
             tally migrate never leaves data behind, so move or delete them first:\n{}",
            survey.unknown.lines()
        );
    }
    if survey.legacy == 0 && !resuming {
        return already_sharded(&store, &survey, stamped).await;
    }
    if resuming {
        println!(
            "resuming the move an earlier run began (its checks passed before it wrote anything)"
        );
    } else {
        checks::refuse_unless_ready(&mut conn, &keys, survey, stamped).await?;
        let marked: Option<String> = redis::cmd("SET")
            .arg(keys::MIGRATION)
            .arg(count)
            .arg("NX")
            .query_async(&mut conn)
            .await?;
        if marked.is_none() {
            bail!("another `tally migrate` began meanwhile: let it finish");
        }
    }

    let moved = moves::move_all(&mut conn, &keys).await?;
    moves::finish(&mut conn, &keys).await?;
    println!("{moved}");
    store
        .ensure_system_accounts()
        .await
        .context("making the system sub-accounts of the other shards")?;
    audit(&store).await
}

/// Runs the audit on the data as it now is and prints it.
async fn audit(store: &Store) -> anyhow::Result<ExitCode> {
    let report = crate::audit::run(store)
        .await
        .context("auditing the moved data")?;
    println!("audit:\n{report}");
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// No key of the old layout and no move under way: nothing to move. Data of
/// the sharded layout (a run that crashed after its last step, or a
/// deployment that never had the old layout) gets the system sub-accounts
/// made and the audit run; an empty Redis is left as it is.
async fn already_sharded(
    store: &Store,
    survey: &checks::Survey,
    stamped: Option<u16>,
) -> anyhow::Result<ExitCode> {
    if survey.sharded.is_empty() && stamped.is_none() {
        println!("nothing to migrate: this Redis holds no tally data");
        return Ok(ExitCode::SUCCESS);
    }
    println!("nothing to migrate: the data here is in the sharded layout already");
    store.ensure_system_accounts().await?;
    audit(store).await
}

async fn refuse_cluster(conn: &mut Conn) -> anyhow::Result<()> {
    let info: String = redis::cmd("INFO").arg("cluster").query_async(conn).await?;
    if info.lines().any(|line| line.trim() == "cluster_enabled:1") {
        bail!(
            "this Redis is a cluster node (cluster_enabled:1): tally migrate runs on a \
             standalone Redis only; migrate there, then move the data to the cluster"
        );
    }
    Ok(())
}

/// A still-running tally process (of either version) would write during the
/// move: say how many others are connected, without refusing (monitoring
/// connects too).
async fn note_other_clients(conn: &mut Conn) -> anyhow::Result<()> {
    let clients: String = redis::cmd("CLIENT").arg("LIST").query_async(conn).await?;
    let others = clients.lines().count().saturating_sub(1);
    if others > 0 {
        println!(
            "note: {others} other client(s) connected to this Redis; make sure no tally \
             process (serve, worker, scheduler, of any version) runs during the move"
        );
    }
    Ok(())
}

/// A shard count kept as a string (the stamp, the mark).
async fn read_count(conn: &mut Conn, key: &str) -> anyhow::Result<Option<u16>> {
    let text: Option<String> = redis::cmd("GET").arg(key).query_async(conn).await?;
    text.map(|text| {
        text.parse()
            .with_context(|| format!("`{key}` holds `{text}`, not a shard count"))
    })
    .transpose()
}

/// A bounded list of problems for a refusal, with a count of the rest.
#[derive(Debug, Default)]
struct Listed {
    count: u64,
    shown: Vec<String>,
}

impl Listed {
    fn push(&mut self, item: String) {
        self.count += 1;
        if self.shown.len() < LISTED_MAX {
            self.shown.push(item);
        }
    }

    fn is_empty(&self) -> bool {
        self.count == 0
    }

    fn lines(&self) -> String {
        let mut text: String = self
            .shown
            .iter()
            .map(|item| format!("  - {item}\n"))
            .collect();
        let hidden = self.count - self.shown.len() as u64;
        if hidden > 0 {
            text.push_str(&format!("  - and {hidden} more\n"));
        }
        text.trim_end().to_owned()
    }
}

/// Iterates a `SCAN MATCH pattern`, a page at a time.
struct Scan {
    pattern: &'static str,
    cursor: Option<u64>,
}

impl Scan {
    fn new(pattern: &'static str) -> Self {
        Scan {
            pattern,
            cursor: Some(0),
        }
    }

    async fn next_page(&mut self, conn: &mut Conn) -> anyhow::Result<Option<Vec<String>>> {
        let Some(cursor) = self.cursor else {
            return Ok(None);
        };
        let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
            .arg(cursor)
            .arg("MATCH")
            .arg(self.pattern)
            .arg("COUNT")
            .arg(SCAN_COUNT)
            .query_async(conn)
            .await?;
        self.cursor = (next != 0).then_some(next);
        Ok(Some(keys))
    }
}

/// Pages through an old index: (member, score) pairs; a set's scores are empty.
struct IndexPages {
    index: Index,
    /// The next `SSCAN` cursor or `ZRANGE` rank; `None` once done.
    position: Option<u64>,
}

impl IndexPages {
    fn new(index: Index) -> Self {
        IndexPages {
            index,
            position: Some(0),
        }
    }

    async fn next_page(
        &mut self,
        conn: &mut Conn,
    ) -> anyhow::Result<Option<Vec<(String, String)>>> {
        let Some(position) = self.position else {
            return Ok(None);
        };
        let name = self.index.old_name();
        if self.index.is_set() {
            let (next, members): (u64, Vec<String>) = redis::cmd("SSCAN")
                .arg(name)
                .arg(position)
                .arg("COUNT")
                .arg(PAGE_SIZE)
                .query_async(conn)
                .await?;
            self.position = (next != 0).then_some(next);
            return Ok(Some(
                members
                    .into_iter()
                    .map(|member| (member, String::new()))
                    .collect(),
            ));
        }
        // Scores as Redis prints them, written back as they are: no float
        // in between.
        let page: Vec<(String, String)> = redis::cmd("ZRANGE")
            .arg(name)
            .arg(position)
            .arg(position + PAGE_SIZE as u64 - 1)
            .arg("WITHSCORES")
            .query_async(conn)
            .await?;
        self.position = (page.len() == PAGE_SIZE).then_some(position + PAGE_SIZE as u64);
        Ok(Some(page))
    }
}

/// Where an idempotency record belongs, as read now.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Placement {
    /// Gone since the scan: moved already, or expired.
    Gone,
    /// On this shard, where the new code looks for it.
    On(Shard),
    /// A transfer's whose transaction expired first: both have one ttl, so
    /// it would be gone within the second.
    Expired,
    /// It names nothing tally could have written; why.
    Broken(String),
}

/// Places idempotency records (`key`, scope, the Idempotency-Key): for
/// `accounts`, the key's shard (`Keys::new_account_id`); for the others,
/// the shard of the account of the record the value ("id fingerprint")
/// names, wherever that record is now (moved or not yet): an order's,
/// wallet transaction's or advance's account, or a transfer's payer
/// (`transfers::movement_shard`). Two pipelined reads for them all.
async fn place_records(
    conn: &mut Conn,
    keys: &Keys,
    records: &[(&str, Scope, &str)],
) -> anyhow::Result<Vec<Placement>> {
    if records.is_empty() {
        return Ok(Vec::new());
    }
    let mut pipe = redis::pipe();
    for (key, _, _) in records {
        pipe.get(*key);
    }
    let values: Vec<Option<String>> = pipe.query_async(conn).await?;
    let named: Vec<Option<NamedRecord>> = records
        .iter()
        .zip(&values)
        .map(|((_, scope, _), value)| {
            value
                .as_deref()
                .and_then(|value| scope.named_record(keys, named_id(value)))
        })
        .collect();
    let mut pipe = redis::pipe();
    for record in named.iter().flatten() {
        pipe.hget(&record.old, record.field)
            .hget(&record.new, record.field);
    }
    let fields: Vec<Option<String>> = if named.iter().any(Option::is_some) {
        pipe.query_async(conn).await?
    } else {
        Vec::new()
    };
    let mut fields = fields
        .chunks(2)
        .map(|pair| pair[0].clone().or(pair[1].clone()));
    let mut placements = Vec::with_capacity(records.len());
    for (((_, scope, name), value), record) in records.iter().zip(&values).zip(&named) {
        let field = record.as_ref().and_then(|_| fields.next().flatten());
        placements.push(placement(
            keys,
            *scope,
            name,
            value.as_deref(),
            record.is_some(),
            field,
        ));
    }
    Ok(placements)
}

/// The id an idempotency value ("id fingerprint") names.
fn named_id(value: &str) -> &str {
    value.split(' ').next().unwrap_or("")
}

/// Where one idempotency record belongs: see [`place_records`]. `named`
/// says whether its value names an id tally draws; `field` is what the
/// named record says of its account (`None`: no such record).
fn placement(
    keys: &Keys,
    scope: Scope,
    name: &str,
    value: Option<&str>,
    named: bool,
    field: Option<String>,
) -> Placement {
    let Some(value) = value else {
        return Placement::Gone;
    };
    if scope == Scope::Accounts {
        return Placement::On(keys.layout().of_symbol(name));
    }
    let id = named_id(value);
    if !named {
        return Placement::Broken(format!("names `{id}`, not an id tally draws"));
    }
    let Some(field) = field else {
        return match scope {
            Scope::Transfer | Scope::BankTransaction => Placement::Expired,
            _ => Placement::Broken(format!(
                "names {} {id}, which does not exist",
                scope.as_str()
            )),
        };
    };
    if matches!(scope, Scope::Transfer | Scope::BankTransaction) {
        return match legacy::movement_parties(scope, &field) {
            Some((payer, payee)) => Placement::On(transfers::movement_shard(keys, &payer, &payee)),
            None => Placement::Broken(format!("names transaction {id}, which kept `{field}`")),
        };
    }
    match AccountId::parse(&field) {
        Ok(account) if !account.is_system() => Placement::On(keys.account_shard(&account)),
        _ => Placement::Broken(format!(
            "names {} {id}, of account `{field}`",
            scope.as_str()
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::domain::SystemAccount;

    #[test]
    fn idempotency_records_go_where_the_new_code_looks() {
        let keys = Keys::new(16);
        let payer = AccountId::new_customer();
        let payee = AccountId::new_customer();
        let id = uuid::Uuid::now_v7().to_string();
        let value = format!("{id} fingerprint");
        let place = |scope, field: Option<String>| {
            placement(&keys, scope, "apikey/k", Some(&value), true, field)
        };
        assert_eq!(
            placement(
                &keys,
                Scope::Accounts,
                "apikey/k",
                Some(&value),
                false,
                None
            ),
            Placement::On(keys.layout().of_symbol("apikey/k"))
        );
        assert_eq!(
            place(Scope::Orders, Some(payer.to_string())),
            Placement::On(keys.account_shard(&payer))
        );
        let credit = format!("{payer} {payee} 1500 Credit");
        assert_eq!(
            place(Scope::Transfer, Some(credit)),
            Placement::On(keys.account_shard(&payee)),
            "a credit: dst pays"
        );
        let bank = format!("{payer} 1500 Credit a reason with spaces");
        assert_eq!(
            place(Scope::BankTransaction, Some(bank)),
            Placement::On(transfers::movement_shard(
                &keys,
                &SystemAccount::Bank.id(),
                &payer
            ))
        );
        assert_eq!(place(Scope::Transfer, None), Placement::Expired);
        assert!(matches!(place(Scope::Wallet, None), Placement::Broken(_)));
        assert!(matches!(
            place(Scope::Advances, Some("@bank".to_owned())),
            Placement::Broken(_)
        ));
        assert_eq!(
            placement(&keys, Scope::Orders, "k", None, false, None),
            Placement::Gone
        );
    }
}
