//! What `tally migrate` checks before it writes anything: every key known,
//! nothing of the sharded layout yet, no work in flight, and an old ledger
//! that adds up.

use std::collections::{BTreeMap, HashMap};

use anyhow::{Context, bail};
use redis::streams::{StreamInfoGroupsReply, StreamRangeReply};

use super::legacy::{self, Class, Fixed, Index, Legacy, Scope};
use super::{IndexPages, Listed, PAGE_SIZE, Placement, SCANNED, Scan, place_records};
use crate::domain::format_units;
use crate::store::advances::INSTALLMENTS_MAX;
use crate::store::connection::Conn;
use crate::store::keys::{self, Keys};
use crate::store::streams::StreamId;

/// The job streams whose consumer groups must be done.
const JOB_STREAMS: [Fixed; 4] = [
    Fixed::Settle,
    Fixed::Wallet,
    Fixed::Installments,
    Fixed::Events,
];

/// The way from work in flight to a dataset `tally migrate` takes (README,
/// "Upgrading from the single-node layout").
const THE_WAY: &str = "The way: stop the API (`tally serve`), let the workers and the scheduler \
drain the streams, settle (`tally batches retry`) or refund (`tally batches refund`) failed \
batches, and wait for the queues and retry sets to empty; then stop the workers and the \
scheduler and run `tally migrate` again. A bucket below the exchange minimum empties only when \
later orders fill it. A dataset with advances still being repaid cannot be migrated by this \
version.";

/// What a pass over every key found.
#[derive(Debug, Default)]
pub struct Survey {
    /// Keys of the old layout.
    pub legacy: u64,
    /// Keys of the sharded layout, its stamp aside.
    pub sharded: Listed,
    pub unknown: Listed,
    /// Work in flight (when checking).
    in_flight: Listed,
    /// Data tally could not have left (when checking).
    broken: Listed,
    /// The old layout's balances by account id (when checking).
    balances: BTreeMap<String, i64>,
}

/// Classifies every key; when `checking`, also reads what the checks need.
pub async fn survey(conn: &mut Conn, keys: &Keys, checking: bool) -> anyhow::Result<Survey> {
    let mut survey = Survey::default();
    for pattern in SCANNED {
        let mut scan = Scan::new(pattern);
        while let Some(page) = scan.next_page(conn).await? {
            let mut found = Vec::new();
            for key in page {
                match legacy::classify(&key) {
                    Class::Legacy(legacy) => {
                        survey.legacy += 1;
                        found.push((key, legacy));
                    }
                    Class::Sharded => survey.sharded.push(key),
                    Class::Unknown => survey.unknown.push(key),
                    Class::ShardCount | Class::Migration | Class::Kept => {}
                }
            }
            if checking {
                for chunk in found.chunks(PAGE_SIZE) {
                    check_keys(conn, chunk, &mut survey).await?;
                    check_idempotency(conn, keys, chunk, &mut survey).await?;
                }
            }
        }
    }
    Ok(survey)
}

/// The one read a key's check needs, if it needs one.
fn check_command(key: &str, legacy: &Legacy) -> Option<redis::Cmd> {
    let mut cmd = redis::Cmd::new();
    match legacy {
        Legacy::Fixed(
            Fixed::SettleRetries
            | Fixed::EventsRetries
            | Fixed::InstallmentsLeased
            | Fixed::InstallmentsDue
            | Fixed::FailedBatches,
        ) => cmd.arg("ZCARD").arg(key),
        Legacy::Bucket(_) => cmd.arg("HGET").arg(key).arg("count"),
        Legacy::BucketOrders(_) | Legacy::WalletQueue(_) => cmd.arg("LLEN").arg(key),
        Legacy::Batch(_) => cmd.arg("HGET").arg(key).arg("status"),
        Legacy::Advance(_) => cmd.arg("HGETALL").arg(key),
        Legacy::Account(_) | Legacy::System(_) => cmd.arg("HGET").arg(key).arg("balance"),
        Legacy::WalletScheduled(_) => cmd.arg("EXISTS").arg(key),
        _ => return None,
    };
    Some(cmd)
}

/// Reads, in one pipeline, what the keys of a page need checked, and notes
/// what is in flight and the balances.
async fn check_keys(
    conn: &mut Conn,
    found: &[(String, Legacy)],
    survey: &mut Survey,
) -> anyhow::Result<()> {
    let mut pipe = redis::pipe();
    let mut asked = Vec::new();
    for (key, legacy) in found {
        if let Some(cmd) = check_command(key, legacy) {
            pipe.add_command(cmd);
            asked.push((key, legacy));
        }
    }
    if asked.is_empty() {
        return Ok(());
    }
    let replies: Vec<redis::Value> = pipe.query_async(conn).await?;
    for ((key, legacy), reply) in asked.into_iter().zip(replies) {
        judge(key, legacy, reply, survey)?;
    }
    Ok(())
}

/// Notes what one key's reply says about it.
fn judge(
    key: &str,
    legacy: &Legacy,
    reply: redis::Value,
    survey: &mut Survey,
) -> anyhow::Result<()> {
    match legacy {
        Legacy::Batch(id) => {
            let status: Option<String> = redis::from_redis_value(reply)?;
            if let Some(status) =
                status.filter(|status| !matches!(status.as_str(), "settled" | "refunded"))
            {
                survey.in_flight.push(format!("batch {id} is {status}"));
            }
        }
        Legacy::Advance(id) => {
            let fields: HashMap<String, String> = redis::from_redis_value(reply)?;
            if let Some(problem) = unrepaid(&fields) {
                survey.in_flight.push(format!("advance {id} {problem}"));
            }
        }
        _ => {
            // A count, a length, a balance or a flag; absent reads as 0.
            let number: Option<i64> = redis::from_redis_value(reply)
                .with_context(|| format!("`{key}` holds something else than a number"))?;
            let number = number.unwrap_or(0);
            let in_flight = match legacy {
                Legacy::Account(id) => {
                    survey.balances.insert(id.as_str().to_owned(), number);
                    None
                }
                Legacy::System(system) => {
                    survey
                        .balances
                        .insert(system.id().as_str().to_owned(), number);
                    None
                }
                _ if number == 0 => None,
                Legacy::Bucket(symbol) => Some(format!(
                    "the {symbol} bucket holds {number} order(s) not yet in a batch"
                )),
                Legacy::WalletScheduled(account) => {
                    Some(format!("account {account} has a job on the wallet stream"))
                }
                _ => Some(format!("`{key}` is not empty: it holds {number}")),
            };
            if let Some(item) = in_flight {
                survey.in_flight.push(item);
            }
        }
    }
    Ok(())
}

/// Why an advance is not fully repaid, if it is not: every installment must
/// be `paid`, or `failed` with its amount carried onward, and `paid` must
/// be the whole amount.
fn unrepaid(fields: &HashMap<String, String>) -> Option<String> {
    let field = |name: &str| fields.get(name).map(String::as_str).unwrap_or("");
    let count = field("count").parse().unwrap_or(0).min(INSTALLMENTS_MAX);
    let open = (1..=count).find(|n| !matches!(field(&format!("i{n}:status")), "paid" | "failed"));
    if let Some(n) = open {
        return Some(format!(
            "is still being repaid (installment {n} is `{}`)",
            field(&format!("i{n}:status"))
        ));
    }
    (field("paid") != field("amount")).then(|| {
        format!(
            "is still being repaid (paid {} of {} cents)",
            field("paid"),
            field("amount")
        )
    })
}

/// Every idempotency record must name what the move needs to place it.
async fn check_idempotency(
    conn: &mut Conn,
    keys: &Keys,
    found: &[(String, Legacy)],
    survey: &mut Survey,
) -> anyhow::Result<()> {
    let records: Vec<(&str, Scope, &str)> = found
        .iter()
        .filter_map(|(key, legacy)| match legacy {
            Legacy::Idempotency { scope, key: name } => Some((key.as_str(), *scope, name.as_str())),
            _ => None,
        })
        .collect();
    let placements = place_records(conn, keys, &records).await?;
    for ((key, _, _), placement) in records.iter().zip(placements) {
        if let Placement::Broken(problem) = placement {
            survey.broken.push(format!("`{key}` {problem}"));
        }
    }
    Ok(())
}

/// Refuses, naming everything in the way, unless the old data may move:
/// nothing of the sharded layout, no other stamp, nothing in flight, and a
/// ledger that adds up (printed).
pub async fn refuse_unless_ready(
    conn: &mut Conn,
    keys: &Keys,
    mut survey: Survey,
    stamped: Option<u16>,
) -> anyhow::Result<()> {
    let count = keys.layout().count();
    let mut refusals = Vec::new();
    if let Some(stamped) = stamped.filter(|stamped| *stamped != count) {
        refusals.push(format!(
            "`{}` says the data here is for TALLY_SHARDS={stamped}, and this run moves to \
             {count} shards: run it with TALLY_SHARDS={stamped}",
            keys::SHARD_COUNT
        ));
    }
    if !survey.sharded.is_empty() {
        refusals.push(format!(
            "this Redis already holds data of the sharded layout; tally migrate moves the \
             single-node layout into an empty sharded one and never merges the two:\n{}",
            survey.sharded.lines()
        ));
    }
    check_streams(conn, &mut survey.in_flight).await?;
    if !survey.in_flight.is_empty() {
        refusals.push(format!(
            "work is in flight, which after the move would have to span shards:\n{}\n{THE_WAY}",
            survey.in_flight.lines()
        ));
    }
    check_indexes(conn, keys, &mut survey.broken).await?;
    let ledger = check_ledger(conn, &survey.balances).await?;
    for (id, balance, journal) in &ledger.mismatched {
        survey.broken.push(format!(
            "account {id}: balance {} but journal {}",
            format_units(*balance, 2),
            format_units(*journal, 2)
        ));
    }
    if ledger.sum != 0 {
        survey.broken.push(format!(
            "the balances sum to {}, not 0.00",
            format_units(ledger.sum, 2)
        ));
    }
    if !survey.broken.is_empty() {
        refusals.push(format!(
            "the data does not add up (look before moving it):\n{}",
            survey.broken.lines()
        ));
    }
    if !refusals.is_empty() {
        bail!("refused, nothing written:\n{}", refusals.join("\n"));
    }
    println!(
        "checked: no work in flight (job streams done, retry sets, leases, buckets and wallet \
         queues empty, no batch settling or failed, every advance repaid)"
    );
    println!(
        "ledger before the move: {} accounts, {} journal entries; balances sum to 0.00, and \
         each equals its journal entries plus the carried sums",
        survey.balances.len(),
        ledger.entries
    );
    Ok(())
}

/// Each job stream's consumer groups must have acknowledged every entry they
/// were given and been given every entry; a stream with entries and no group
/// has delivered none.
async fn check_streams(conn: &mut Conn, in_flight: &mut Listed) -> anyhow::Result<()> {
    for stream in JOB_STREAMS {
        let name = stream.name();
        let exists: bool = redis::cmd("EXISTS").arg(name).query_async(conn).await?;
        if !exists {
            continue;
        }
        let newest: StreamRangeReply = redis::cmd("XREVRANGE")
            .arg(name)
            .arg("+")
            .arg("-")
            .arg("COUNT")
            .arg(1)
            .query_async(conn)
            .await?;
        let newest = newest
            .ids
            .first()
            .and_then(|entry| StreamId::parse(&entry.id));
        let groups: StreamInfoGroupsReply = redis::cmd("XINFO")
            .arg("GROUPS")
            .arg(name)
            .query_async(conn)
            .await?;
        if groups.groups.is_empty() && newest.is_some() {
            in_flight.push(format!("`{name}` holds entries no consumer group has read"));
        }
        for group in groups.groups {
            if group.pending > 0 {
                in_flight.push(format!(
                    "`{name}`: {} entries delivered to group `{}` and not acknowledged",
                    group.pending, group.name
                ));
            }
            let delivered = StreamId::parse(&group.last_delivered_id);
            if newest.is_some() && delivered < newest {
                in_flight.push(format!(
                    "`{name}`: entries after {} not yet delivered to group `{}`",
                    group.last_delivered_id, group.name
                ));
            }
        }
    }
    Ok(())
}

/// Every member of an index that is split must say which shard it goes to.
async fn check_indexes(conn: &mut Conn, keys: &Keys, broken: &mut Listed) -> anyhow::Result<()> {
    for index in Index::ALL {
        let mut pages = IndexPages::new(index);
        while let Some(page) = pages.next_page(conn).await? {
            for (member, _) in page {
                if index.shard_of(keys, &member).is_none() {
                    broken.push(format!(
                        "`{}` holds `{member}`, which tally could not have written",
                        index.old_name()
                    ));
                }
            }
        }
    }
    Ok(())
}

/// The old ledger, summed: balances and the journal against each other.
struct Ledger {
    entries: u64,
    sum: i64,
    /// (account id, balance, journal entries plus carried sums).
    mismatched: Vec<(String, i64, i64)>,
}

async fn check_ledger(conn: &mut Conn, balances: &BTreeMap<String, i64>) -> anyhow::Result<Ledger> {
    let carried: HashMap<String, i64> = redis::cmd("HGETALL")
        .arg(Fixed::JournalCarried.name())
        .query_async(conn)
        .await?;
    let mut journal: BTreeMap<String, i64> = carried
        .into_iter()
        .filter(|(name, _)| !name.starts_with("kind:"))
        .collect();
    let name = Fixed::Journal.name();
    let mut entries = 0;
    let mut start = "-".to_owned();
    loop {
        let page: StreamRangeReply = redis::cmd("XRANGE")
            .arg(name)
            .arg(&start)
            .arg("+")
            .arg("COUNT")
            .arg(PAGE_SIZE)
            .query_async(conn)
            .await?;
        let Some(last) = page.ids.last() else { break };
        start = format!("({}", last.id);
        for entry in &page.ids {
            let field = |field: &str| {
                entry
                    .get::<String>(field)
                    .with_context(|| format!("journal entry {} has no `{field}`", entry.id))
            };
            let amount: i64 = field("amount")?
                .parse()
                .with_context(|| format!("journal entry {}: amount", entry.id))?;
            *journal.entry(field("debit")?).or_default() -= amount;
            *journal.entry(field("credit")?).or_default() += amount;
            entries += 1;
        }
    }
    let mut mismatched = Vec::new();
    for (id, &balance) in balances {
        let sum = journal.remove(id).unwrap_or(0);
        if sum != balance {
            mismatched.push((id.clone(), balance, sum));
        }
    }
    // Money journaled to an account that does not exist.
    mismatched.extend(
        journal
            .into_iter()
            .filter(|(_, sum)| *sum != 0)
            .map(|(id, sum)| (id, 0, sum)),
    );
    // In i128, as the audit sums: balances set by hand could overflow i64.
    let sum: i128 = balances.values().map(|&balance| i128::from(balance)).sum();
    Ok(Ledger {
        entries,
        sum: i64::try_from(sum).unwrap_or(if sum > 0 { i64::MAX } else { i64::MIN }),
        mismatched,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn advance(fields: &[(&str, &str)]) -> HashMap<String, String> {
        fields
            .iter()
            .map(|(name, value)| ((*name).to_owned(), (*value).to_owned()))
            .collect()
    }

    #[test]
    fn an_advance_is_repaid_once_no_installment_is_open_and_all_is_paid() {
        let repaid = advance(&[
            ("amount", "200"),
            ("paid", "200"),
            ("count", "3"),
            ("i1:status", "paid"),
            ("i2:status", "failed"),
            ("i3:status", "paid"),
        ]);
        assert_eq!(
            unrepaid(&repaid),
            None,
            "a failure carried onward is repaid"
        );
        let mut open = repaid.clone();
        open.insert("i3:status".to_owned(), "scheduled".to_owned());
        let problem = unrepaid(&open).unwrap();
        assert!(
            problem.contains("installment 3 is `scheduled`"),
            "{problem}"
        );
        let mut short = repaid;
        short.insert("paid".to_owned(), "150".to_owned());
        assert!(unrepaid(&short).unwrap().contains("paid 150 of 200"));
    }
}
