//! Redis Cluster's hash slots, and tally's logical shards laid over them
//! (see CLUSTER.md in the shared design).
//!
//! A cluster lets a script, a `MULTI` or a pipeline touch the keys of one hash
//! slot only. tally's keys are to carry one of N hash tags, one per logical
//! shard, so that every key of a shard lands on one slot and every script that
//! stays inside a shard is legal on a cluster, while a standalone Redis
//! ignores the tags: one code path for both.
//!
//! Each shard's tag is chosen so that its slot lies in the shard's own N-th
//! of the slot range. A cluster made with `redis-cli --cluster create` gives
//! each master an equal run of slots, so its masters then hold about N / M
//! shards each, with no slot moved by hand.

use uuid::Uuid;

/// How many hash slots Redis Cluster has.
pub const SLOTS: u16 = 16_384;

pub use crate::config::SHARDS_MAX;

/// CRC16-CCITT (XModem: polynomial 0x1021, initial value 0), the checksum
/// Redis Cluster takes of a key, bit by bit: this runs per script call in
/// checks, not per byte of traffic.
pub fn crc16(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0;
    for &byte in bytes {
        crc ^= u16::from(byte) << 8;
        for _ in 0..8 {
            crc = if crc & 0x8000 != 0 {
                (crc << 1) ^ 0x1021
            } else {
                crc << 1
            };
        }
    }
    crc
}

/// The slot Redis Cluster puts `key` in: of its hash tag, the text between
/// the first `{` and the next `}`, when that is not empty; else of the key.
pub fn hash_slot(key: &[u8]) -> u16 {
    let tagged = key.iter().position(|&b| b == b'{').and_then(|open| {
        let rest = &key[open + 1..];
        let close = rest.iter().position(|&b| b == b'}')?;
        (close > 0).then(|| &rest[..close])
    });
    crc16(tagged.unwrap_or(key)) % SLOTS
}

/// One logical shard, `0..count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Shard(u16);

impl Shard {
    pub fn index(self) -> u16 {
        self.0
    }
}

/// N logical shards and their hash tags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ShardLayout {
    tags: Vec<String>,
}

impl ShardLayout {
    /// The layout of `count` shards (1 to [`SHARDS_MAX`]). The same count
    /// always gives the same tags: data written under them is found again.
    pub fn new(count: u16) -> Self {
        assert!(
            (1..=SHARDS_MAX).contains(&count),
            "1 to {SHARDS_MAX} shards, not {count}"
        );
        let tags = (0..count).map(|shard| tag_in_range(shard, count)).collect();
        ShardLayout { tags }
    }

    pub fn count(&self) -> u16 {
        self.tags.len() as u16
    }

    pub fn shards(&self) -> impl Iterator<Item = Shard> + '_ {
        (0..self.count()).map(Shard)
    }

    /// The shard's hash tag, without its braces.
    pub fn tag(&self, shard: Shard) -> &str {
        &self.tags[usize::from(shard.0)]
    }

    /// The shard of this index, if the layout has it.
    pub fn shard(&self, index: u16) -> Option<Shard> {
        (index < self.count()).then_some(Shard(index))
    }

    pub fn first(&self) -> Shard {
        Shard(0)
    }

    /// The shard of an id tally drew (an account, an order, a batch, ...):
    /// from the random bits of its UUIDv7 (the 62 bits after the variant),
    /// so ids spread evenly and a `GET` needs no lookup.
    pub fn of_id(&self, id: &Uuid) -> Shard {
        Shard((random_bits(id) % u64::from(self.count())) as u16)
    }

    /// A fresh UUIDv7 whose random bits put it on `shard`: a record drawn
    /// beside the account (or symbol) it belongs to. Still time-ordered and
    /// still 62 bits short of random only by `log2(count)` bits.
    pub fn new_id_in(&self, shard: Shard) -> Uuid {
        let id = Uuid::now_v7();
        let count = u64::from(self.count());
        let random = random_bits(&id);
        let mut moved = random - random % count + u64::from(shard.0);
        if moved > RANDOM_MASK {
            moved -= count;
        }
        let mut bytes = *id.as_bytes();
        let variant = bytes[8] & 0xC0;
        bytes[8..16].copy_from_slice(&moved.to_be_bytes());
        bytes[8] = (bytes[8] & 0x3F) | variant;
        Uuid::from_bytes(bytes)
    }

    /// A symbol's home shard: its bucket, batches and settle stream.
    pub fn of_symbol(&self, symbol: &str) -> Shard {
        Shard(crc16(symbol.as_bytes()) % self.count())
    }
}

/// The 62 random bits after a UUID's variant.
const RANDOM_MASK: u64 = (1 << 62) - 1;

fn random_bits(id: &Uuid) -> u64 {
    u64::from_be_bytes(id.as_bytes()[8..16].try_into().expect("8 bytes")) & RANDOM_MASK
}

/// The first of `s<shard>`, `s<shard>.1`, `s<shard>.2`, ... whose slot lies in
/// the shard's `1/count` of the slot range. Each try lands there with
/// probability `1/count`, so this takes about `count` tries per shard.
fn tag_in_range(shard: u16, count: u16) -> String {
    let slots = u32::from(SLOTS);
    let low = u32::from(shard) * slots / u32::from(count);
    let high = (u32::from(shard) + 1) * slots / u32::from(count);
    (0u32..)
        .map(|attempt| match attempt {
            0 => format!("s{shard}"),
            _ => format!("s{shard}.{attempt}"),
        })
        .find(|tag| (low..high).contains(&u32::from(crc16(tag.as_bytes()) % SLOTS)))
        .expect("some suffix lands in every range")
}

/// What one script's calls looked like: how many there were, and how many
/// named keys of more than one slot (a cluster refuses those: `CROSSSLOT`).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ScriptSlots {
    pub calls: u64,
    pub crossing: u64,
    /// The keys of the first crossing call, to show which keys disagree.
    pub first_crossing: Option<Vec<String>>,
}

/// Records every script call's keys by script (its SHA1), so that a test can
/// say which scripts a cluster would refuse. Off unless a test attaches it to
/// a `Store` (`Store::record_script_slots`).
#[derive(Debug, Default)]
pub struct SlotRecorder {
    scripts: std::sync::Mutex<std::collections::BTreeMap<String, ScriptSlots>>,
}

impl SlotRecorder {
    /// Notes `cmd` if it runs a script (`EVALSHA` or `EVAL`).
    pub fn record(&self, cmd: &redis::Cmd) {
        let args: Vec<&[u8]> = cmd
            .args_iter()
            .filter_map(|arg| match arg {
                redis::Arg::Simple(bytes) => Some(bytes),
                _ => None,
            })
            .collect();
        let Some(name) = args.first() else { return };
        let script = if name.eq_ignore_ascii_case(b"EVALSHA") {
            String::from_utf8_lossy(args.get(1).copied().unwrap_or_default()).into_owned()
        } else if name.eq_ignore_ascii_case(b"EVAL") {
            let body = String::from_utf8_lossy(args.get(1).copied().unwrap_or_default());
            redis::Script::new(&body).get_hash().to_owned()
        } else {
            return;
        };
        let count = args
            .get(2)
            .and_then(|count| std::str::from_utf8(count).ok()?.parse::<usize>().ok())
            .unwrap_or(0);
        let keys = args.iter().skip(3).take(count);
        let slots: std::collections::BTreeSet<u16> =
            keys.clone().map(|key| hash_slot(key)).collect();
        let mut scripts = self
            .scripts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let entry = scripts.entry(script).or_default();
        entry.calls += 1;
        if slots.len() > 1 {
            entry.crossing += 1;
            entry.first_crossing.get_or_insert_with(|| {
                keys.map(|key| String::from_utf8_lossy(key).into_owned())
                    .collect()
            });
        }
    }

    /// Every script called so far, by SHA1.
    pub fn scripts(&self) -> std::collections::BTreeMap<String, ScriptSlots> {
        self.scripts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_redis_clusters() {
        // The check value of CRC16/XMODEM, and examples from the cluster spec.
        assert_eq!(crc16(b"123456789"), 0x31C3);
        assert_eq!(hash_slot(b"foo"), 12_182);
        assert_eq!(
            hash_slot(b"{user1000}.following"),
            hash_slot(b"{user1000}.followers")
        );
        assert_eq!(
            hash_slot(b"foo{}{bar}"),
            hash_slot(b"foo{}{bar}".as_slice())
        );
        assert_ne!(
            hash_slot(b"foo{}{bar}"),
            hash_slot(b"bar"),
            "an empty tag hashes the key"
        );
        assert_eq!(hash_slot(b"foo{{bar}}zap"), hash_slot(b"{bar"));
        assert_eq!(hash_slot(b"foo{bar}{zap}"), hash_slot(b"bar"));
    }

    #[test]
    fn every_shard_has_its_own_part_of_the_slot_range() {
        for count in [1, 2, 3, 16, 100, SHARDS_MAX] {
            let layout = ShardLayout::new(count);
            let mut previous = None;
            for shard in layout.shards() {
                let slot = hash_slot(format!("tally:{{{}}}:x", layout.tag(shard)).as_bytes());
                let part = u32::from(slot) * u32::from(count) / u32::from(SLOTS);
                assert_eq!(part, u32::from(shard.index()), "{count} shards: {shard:?}");
                assert!(previous < Some(slot), "slots rise with the shard");
                previous = Some(slot);
            }
        }
    }

    #[test]
    fn the_tags_of_a_count_never_change() {
        // Data written under these tags must be found by every later version.
        let layout = ShardLayout::new(16);
        let tags: Vec<&str> = layout.shards().map(|shard| layout.tag(shard)).collect();
        assert_eq!(tags, PINNED_16);
    }

    /// The 16-shard tags, as first computed. Changing them strands data.
    const PINNED_16: [&str; 16] = [
        "s0.10", "s1.13", "s2", "s3.20", "s4.4", "s5.3", "s6.40", "s7.43", "s8.23", "s9.20",
        "s10.22", "s11.21", "s12.2", "s13.1", "s14.41", "s15.42",
    ];

    #[test]
    fn accounts_and_symbols_spread_over_the_shards() {
        let layout = ShardLayout::new(16);
        let mut counts = [0u32; 16];
        for _ in 0..16_000 {
            counts[usize::from(layout.of_id(&Uuid::now_v7()).index())] += 1;
        }
        // 1,000 expected per shard; 6 standard deviations either side.
        assert!(
            counts.iter().all(|&n| (810..=1_190).contains(&n)),
            "{counts:?}"
        );
        let id = Uuid::now_v7();
        assert_eq!(layout.of_id(&id), layout.of_id(&id));
        assert_eq!(layout.of_symbol("ABAN"), layout.of_symbol("ABAN"));
    }

    #[test]
    fn ids_drawn_in_a_shard_live_there_and_stay_version_7() {
        for count in [1, 3, 16, SHARDS_MAX] {
            let layout = ShardLayout::new(count);
            for shard in layout.shards() {
                let id = layout.new_id_in(shard);
                assert_eq!(layout.of_id(&id), shard, "{count} shards");
                assert_eq!(id.get_version_num(), 7);
                assert_eq!(id.get_variant(), uuid::Variant::RFC4122);
            }
        }
    }
}
