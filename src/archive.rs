//! The archive: what leaves Redis, kept in append-only gzip JSON Lines files,
//! `<TALLY_ARCHIVE_DIR>/<YYYY-MM-DD>/shard-<NN>.jsonl.gz`: one file per shard
//! per UTC day, the day of each record's id (its creation), so a record's
//! file follows from its id alone.
//!
//! Each line is one record: `{"id", "kind", "shard", "archived_at", "fields"}`,
//! `fields` being the record as Redis held it (text, amounts in cents).
//!
//! A step writes each record once even if it dies anywhere (see
//! `retention`): Redis keeps each file's committed length, and the script
//! that removes the records from Redis sets the new length in the same
//! atomic step. A step first cuts its files back to their committed length
//! (what an interrupted step appended, whose records are still in Redis),
//! appends one gzip member per file, and fsyncs file and directory before
//! that script runs.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{self, BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use flate2::Compression;
use flate2::read::MultiGzDecoder;
use flate2::write::GzEncoder;
use serde::{Deserialize, Serialize};

use crate::store::slots::Shard;

/// The file in an archive directory naming the dataset it belongs to.
const IDENTITY_FILE: &str = "ARCHIVE";

/// One archived record, as a line of a file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Line {
    pub id: String,
    /// `journal_entry`, `order`, `batch`, ...
    pub kind: String,
    pub shard: u16,
    /// RFC 3339, when it was archived.
    pub archived_at: String,
    pub fields: BTreeMap<String, String>,
}

/// The UTC day (`YYYY-MM-DD`) of a time in ms since the Unix epoch.
pub fn day_of_ms(ms: i64) -> String {
    let at =
        std::time::UNIX_EPOCH + std::time::Duration::from_millis(u64::try_from(ms).unwrap_or(0));
    humantime::format_rfc3339_seconds(at).to_string()[..10].to_owned()
}

/// When a record id was drawn, in ms since the Unix epoch: a UUIDv7 (an
/// order, batch, account, ...) or a journal entry's `ms-seq.shard` (or
/// `ms-seq`). `None` for anything else.
pub fn ms_of_id(id: &str) -> Option<i64> {
    if let Ok(uuid) = uuid::Uuid::parse_str(id) {
        let (seconds, nanos) = uuid.get_timestamp()?.to_unix();
        return Some(i64::try_from(seconds).ok()? * 1000 + i64::from(nanos / 1_000_000));
    }
    let stream_id = id.split_once('.').map_or(id, |(stream_id, _)| stream_id);
    let (ms, seq) = stream_id.split_once('-')?;
    seq.parse::<u64>().ok()?;
    ms.parse().ok()
}

/// The UTC day of a record id ([`ms_of_id`]): the day of its archive file.
pub fn day_of_id(id: &str) -> Option<String> {
    ms_of_id(id).map(day_of_ms)
}

/// An archive directory, and how long a step may hold a shard.
#[derive(Debug, Clone)]
pub struct Archive {
    dir: PathBuf,
    lease_ms: u64,
}

impl Archive {
    pub fn new(dir: impl Into<PathBuf>) -> Self {
        Archive {
            dir: dir.into(),
            lease_ms: crate::config::ARCHIVE_LEASE_MS_DEFAULT,
        }
    }

    /// With steps holding their shard's lock for `lease_ms`: far longer
    /// than a step (a batch read, an append with fsync, a script), so it
    /// never runs out under a live holder; after a holder dies, the shard
    /// waits this long for the next.
    pub fn with_lease_ms(mut self, lease_ms: u64) -> Self {
        self.lease_ms = lease_ms;
        self
    }

    pub fn lease_ms(&self) -> u64 {
        self.lease_ms
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The file of a shard's records of one day.
    pub fn path(&self, day: &str, shard: Shard) -> PathBuf {
        self.dir
            .join(day)
            .join(format!("shard-{:02}.jsonl.gz", shard.index()))
    }

    /// The dataset id in the directory, if it has one.
    pub fn identity(&self) -> io::Result<Option<String>> {
        match std::fs::read_to_string(self.dir.join(IDENTITY_FILE)) {
            Ok(text) => Ok(Some(text.trim().to_owned())),
            Err(err) if err.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(err) => Err(err),
        }
    }

    /// Writes the dataset id into a directory that has none (durably).
    pub fn set_identity(&self, id: &str) -> io::Result<()> {
        std::fs::create_dir_all(&self.dir)?;
        let path = self.dir.join(IDENTITY_FILE);
        let mut file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)?;
        writeln!(file, "{id}")?;
        file.sync_all()?;
        sync_dir(&self.dir)
    }

    /// Appends `lines` to a shard's file of `day` as one gzip member, after
    /// cutting the file back to `committed` bytes, and fsyncs it. Returns
    /// the file's new length, to be committed. Refuses a file shorter than
    /// its committed length: committed records are missing from it.
    pub fn append(
        &self,
        day: &str,
        shard: Shard,
        committed: u64,
        lines: &[Line],
    ) -> io::Result<u64> {
        let path = self.path(day, shard);
        let day_dir = path.parent().expect("a file is in its day's directory");
        let fresh_dir = !day_dir.exists();
        std::fs::create_dir_all(day_dir)?;
        if fresh_dir {
            sync_dir(&self.dir)?;
        }
        let fresh_file = !path.exists();
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&path)?;
        let length = file.metadata()?.len();
        if length < committed {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!(
                    "{} holds {length} bytes, fewer than the {committed} committed: archived records are missing from it",
                    path.display()
                ),
            ));
        }
        if length > committed {
            // What a step that died before its commit appended: its
            // records are still in Redis, and this step writes them again.
            file.set_len(committed)?;
        }
        file.seek(SeekFrom::Start(committed))?;
        let mut gzip = GzEncoder::new(&mut file, Compression::default());
        for line in lines {
            serde_json::to_writer(&mut gzip, line).map_err(io::Error::other)?;
            gzip.write_all(b"\n")?;
        }
        gzip.finish()?;
        file.sync_all()?;
        if fresh_file {
            sync_dir(day_dir)?;
        }
        file.metadata().map(|meta| meta.len())
    }

    /// Every line of a file, in order; a file that ends in a torn member (a
    /// step that died mid-write, before its commit) is read up to it.
    pub fn read(&self, day: &str, shard: Shard) -> io::Result<Vec<Line>> {
        let file = match File::open(self.path(day, shard)) {
            Ok(file) => file,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(err) => return Err(err),
        };
        let mut lines = Vec::new();
        for text in BufReader::new(MultiGzDecoder::new(file)).lines() {
            let Ok(text) = text else { break };
            match serde_json::from_str(&text) {
                Ok(line) => lines.push(line),
                Err(_) => break,
            }
        }
        Ok(lines)
    }

    /// The lines archived under `id`: in the file of its day and its shard
    /// (`shard_of`: from the id's bits) if it has a day, else in every file.
    pub fn find(
        &self,
        id: &str,
        shards: &[Shard],
        shard_of: impl Fn(&str) -> Option<Shard>,
    ) -> io::Result<Vec<Line>> {
        let days = match day_of_id(id) {
            Some(day) => vec![day],
            None => self.days()?,
        };
        let mut found = Vec::new();
        for day in days {
            let candidates: Vec<Shard> = match shard_of(id) {
                Some(shard) => vec![shard],
                None => shards.to_vec(),
            };
            for shard in candidates {
                found.extend(
                    self.read(&day, shard)?
                        .into_iter()
                        .filter(|line| line.id == id),
                );
            }
        }
        Ok(found)
    }

    /// The days the archive has files for, oldest first.
    pub fn days(&self) -> io::Result<Vec<String>> {
        let mut days = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(entries) => entries,
            Err(err) if err.kind() == io::ErrorKind::NotFound => return Ok(days),
            Err(err) => return Err(err),
        };
        for entry in entries {
            let name = entry?.file_name().to_string_lossy().into_owned();
            if name.len() == 10 && name.as_bytes()[4] == b'-' {
                days.push(name);
            }
        }
        days.sort();
        Ok(days)
    }
}

/// Makes a directory's new entries durable.
fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::slots::ShardLayout;

    fn line(id: &str) -> Line {
        Line {
            id: id.to_owned(),
            kind: "journal_entry".to_owned(),
            shard: 0,
            archived_at: "2026-12-01T00:00:00Z".to_owned(),
            fields: BTreeMap::from([("amount".to_owned(), "100".to_owned())]),
        }
    }

    #[test]
    fn an_uncommitted_tail_is_cut_before_the_next_append_and_a_short_file_refused() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::new(dir.path());
        let shard = ShardLayout::new(1).first();
        let committed = archive
            .append("2026-12-01", shard, 0, &[line("1-0")])
            .unwrap();
        // A step appends and dies before its commit...
        let uncommitted = archive
            .append("2026-12-01", shard, committed, &[line("2-0")])
            .unwrap();
        assert!(uncommitted > committed);
        // ...so the next one starts from the committed length again.
        let now = archive
            .append("2026-12-01", shard, committed, &[line("2-0"), line("3-0")])
            .unwrap();
        let ids: Vec<String> = archive
            .read("2026-12-01", shard)
            .unwrap()
            .into_iter()
            .map(|line| line.id)
            .collect();
        assert_eq!(ids, ["1-0", "2-0", "3-0"], "each once");
        let err = archive
            .append("2026-12-01", shard, now + 1, &[line("4-0")])
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_torn_member_at_the_end_is_read_up_to() {
        let dir = tempfile::tempdir().unwrap();
        let archive = Archive::new(dir.path());
        let shard = ShardLayout::new(1).first();
        let committed = archive
            .append("2026-12-01", shard, 0, &[line("1-0")])
            .unwrap();
        let path = archive.path("2026-12-01", shard);
        let mut file = OpenOptions::new().append(true).open(&path).unwrap();
        file.write_all(&[0x1f, 0x8b, 8, 0, 0]).unwrap(); // a member cut short
        assert_eq!(archive.read("2026-12-01", shard).unwrap(), [line("1-0")]);
        assert!(std::fs::metadata(&path).unwrap().len() > committed);
    }

    #[test]
    fn days_come_from_uuidv7_and_stream_ids() {
        assert_eq!(day_of_id("1764547200000-3").as_deref(), Some("2025-12-01"));
        assert_eq!(
            day_of_id("1764547200000-3.7").as_deref(),
            Some("2025-12-01")
        );
        let id = uuid::Uuid::now_v7().to_string();
        assert_eq!(
            day_of_id(&id),
            Some(day_of_ms(crate::store::now_ms())),
            "today (unless midnight passed in between)"
        );
        assert_eq!(day_of_id("nothing"), None);
    }
}
