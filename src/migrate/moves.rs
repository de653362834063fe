//! How `tally migrate` moves the keys, each in one atomic step, so that a
//! run cut short leaves every key at its old name or its new one.

use anyhow::{Context, bail};

use super::legacy::{self, Class, Index, Legacy, Scope};
use super::{IndexPages, PAGE_SIZE, Placement, SCANNED, Scan, place_records};
use crate::domain::SystemAccount;
use crate::store::connection::Conn;
use crate::store::keys::{self, Keys};

/// What the move did.
#[derive(Debug, Default)]
pub struct Moved {
    renamed: u64,
    indexes: u64,
    members: u64,
    idempotency: u64,
    expired: u64,
    dropped: u64,
}

impl std::fmt::Display for Moved {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "moved: {} keys renamed (of them {} idempotency records); {} indexes split ({} \
             members); dropped {} rate-limit buckets and {} idempotency records whose \
             transaction had expired",
            self.renamed, self.idempotency, self.indexes, self.members, self.dropped, self.expired
        )
    }
}

/// Where one key goes: renamed (never over an existing key), or dropped.
enum Step {
    Rename { from: String, to: String },
    Drop(String),
}

/// Moves every key of the old layout but `@bank` (see [`finish`]).
pub async fn move_all(conn: &mut Conn, keys: &Keys) -> anyhow::Result<Moved> {
    let mut moved = Moved::default();
    for pattern in SCANNED {
        let mut scan = Scan::new(pattern);
        while let Some(page) = scan.next_page(conn).await? {
            for chunk in page.chunks(PAGE_SIZE) {
                move_page(conn, keys, chunk, &mut moved).await?;
            }
        }
    }
    Ok(moved)
}

/// What the move does with one key.
enum Plan {
    Step(Step),
    Split(Index),
    /// An idempotency record: where it goes depends on what it names.
    Idempotency {
        scope: Scope,
        name: String,
    },
    /// Not moved here: `@bank` (last, see [`finish`]) and keys that are not
    /// the old layout's.
    Skip,
}

fn plan(keys: &Keys, key: &str) -> anyhow::Result<Plan> {
    let legacy = match legacy::classify(key) {
        Class::Legacy(legacy) => legacy,
        Class::Unknown => bail!(
            "`{key}` appeared during the move: a tally process is still running; stop it and \
             run `tally migrate` again"
        ),
        Class::Sharded | Class::ShardCount | Class::Migration | Class::Kept => {
            return Ok(Plan::Skip);
        }
    };
    Ok(match legacy {
        Legacy::System(SystemAccount::Bank) => Plan::Skip,
        Legacy::Fixed(fixed) if fixed.index().is_some() => {
            Plan::Split(fixed.index().expect("an index"))
        }
        Legacy::Idempotency { scope, key: name } => Plan::Idempotency { scope, name },
        Legacy::RateLimit => Plan::Step(Step::Drop(key.to_owned())),
        legacy => Plan::Step(Step::Rename {
            from: key.to_owned(),
            to: legacy
                .whole_target(keys)
                .expect("every other old key moves whole"),
        }),
    })
}

async fn move_page(
    conn: &mut Conn,
    keys: &Keys,
    page: &[String],
    moved: &mut Moved,
) -> anyhow::Result<()> {
    let mut steps = Vec::new();
    let mut records = Vec::new();
    for key in page {
        match plan(keys, key)? {
            Plan::Step(step) => {
                if matches!(step, Step::Drop(_)) {
                    moved.dropped += 1;
                }
                steps.push(step);
            }
            Plan::Split(index) => {
                moved.members += split_index(conn, keys, index).await?;
                moved.indexes += 1;
            }
            Plan::Idempotency { scope, name } => records.push((key.clone(), scope, name)),
            Plan::Skip => {}
        }
    }
    let placed: Vec<(&str, Scope, &str)> = records
        .iter()
        .map(|(key, scope, name)| (key.as_str(), *scope, name.as_str()))
        .collect();
    let placements = place_records(conn, keys, &placed).await?;
    for ((key, scope, name), placement) in placed.into_iter().zip(placements) {
        match placement {
            Placement::On(shard) => {
                moved.idempotency += 1;
                steps.push(Step::Rename {
                    from: key.to_owned(),
                    to: keys.idempotency(shard, scope.as_str(), name),
                });
            }
            Placement::Expired => {
                moved.expired += 1;
                steps.push(Step::Drop(key.to_owned()));
            }
            Placement::Gone => {}
            Placement::Broken(problem) => {
                bail!("`{key}` {problem}: move or delete it, then run `tally migrate` again")
            }
        }
    }
    moved.renamed += run_steps(conn, &steps).await?;
    Ok(())
}

/// Renames (never over an existing key) and drops, in pipelines; returns
/// how many keys it renamed. A key gone since the scan (moved already: a
/// scan may return a key twice; or expired) is skipped.
async fn run_steps(conn: &mut Conn, steps: &[Step]) -> anyhow::Result<u64> {
    let mut renamed = 0;
    for chunk in steps.chunks(PAGE_SIZE) {
        let mut pipe = redis::pipe();
        pipe.ignore_errors();
        for step in chunk {
            match step {
                Step::Rename { from, to } => pipe.cmd("RENAMENX").arg(from).arg(to),
                Step::Drop(key) => pipe.cmd("UNLINK").arg(key),
            };
        }
        let replies: Vec<redis::RedisResult<i64>> = pipe.query_async(conn).await?;
        for (step, reply) in chunk.iter().zip(replies) {
            let Step::Rename { from, to } = step else {
                reply?;
                continue;
            };
            match reply {
                Ok(1) => renamed += 1,
                Ok(_) => bail!(
                    "both `{from}` and `{to}` exist: refusing to overwrite `{to}`; \
                     look at both before running `tally migrate` again"
                ),
                Err(err) => {
                    let exists: bool = redis::cmd("EXISTS").arg(from).query_async(conn).await?;
                    if exists {
                        return Err(err).with_context(|| format!("renaming `{from}` to `{to}`"));
                    }
                }
            }
        }
    }
    Ok(renamed)
}

/// Adds an old index's members to the shards' indexes (scores kept), then
/// deletes it. Returns how many members it moved.
async fn split_index(conn: &mut Conn, keys: &Keys, index: Index) -> anyhow::Result<u64> {
    let mut members = 0;
    let mut pages = IndexPages::new(index);
    while let Some(page) = pages.next_page(conn).await? {
        if page.is_empty() {
            continue;
        }
        let mut pipe = redis::pipe();
        for (member, score) in &page {
            let shard = index.shard_of(keys, member).with_context(|| {
                format!(
                    "`{}` holds `{member}`, which tally could not have written",
                    index.old_name()
                )
            })?;
            let target = index.target(keys, shard);
            if index.is_set() {
                pipe.sadd(target, member).ignore();
            } else {
                pipe.cmd("ZADD").arg(target).arg(score).arg(member).ignore();
            }
        }
        pipe.query_async::<()>(conn).await?;
        members += page.len() as u64;
    }
    redis::cmd("UNLINK")
        .arg(index.old_name())
        .query_async::<()>(conn)
        .await?;
    Ok(members)
}

/// The last step, in one `MULTI`: the old `@bank` becomes shard 0's
/// sub-account, the shard count is stamped and the mark goes. Until it runs
/// every other tally process refuses the data (the old `@bank` exists).
pub async fn finish(conn: &mut Conn, keys: &Keys) -> anyhow::Result<()> {
    let bank = keys.system_account(SystemAccount::Bank, keys.layout().first());
    let (old, new): (bool, bool) = redis::pipe()
        .exists(keys::UNSHARDED_BANK)
        .exists(&bank)
        .query_async(conn)
        .await?;
    if old && new {
        bail!(
            "both `{}` and `{bank}` exist: refusing to overwrite `{bank}`",
            keys::UNSHARDED_BANK
        );
    }
    let mut pipe = redis::pipe();
    pipe.atomic();
    if old {
        pipe.cmd("RENAME")
            .arg(keys::UNSHARDED_BANK)
            .arg(&bank)
            .ignore();
    }
    pipe.cmd("SET")
        .arg(keys::SHARD_COUNT)
        .arg(keys.layout().count())
        .ignore()
        .cmd("DEL")
        .arg(keys::MIGRATION)
        .ignore();
    pipe.query_async::<()>(conn).await?;
    Ok(())
}
