-- trim_journal: drop journal entries older than the retention window, oldest
-- first, at most ARGV[2] per call, once the archive has them. What they
-- moved is added to the carried sums first, so every balance still equals
-- its journal in the audit.
--
-- The caller read the entries up to ARGV[1] (ARGV[5] of them) and appended
-- them to the shard's archive files, fsynced; this commits those files'
-- new lengths (src/archive.rs) in the same step as the trim.
--
-- KEYS[1] journal (stream)   KEYS[2] journal index (sorted set)
-- KEYS[3] carried sums (hash: account id -> cents, "kind:<kind>" -> cents)
-- KEYS[4] trim pauses (sorted set: audit token -> until, ms)
-- KEYS[5] the shard's archive lock (string: holder token)
-- KEYS[6] the shard's committed archive lengths (hash: day -> bytes)
-- then the list of entries (stream) of each customer the entries are listed
--   for: each loses its entries older than the window (ARGV[4])
-- ARGV[1] the highest index member to trim   ARGV[2] most entries per call
-- ARGV[3] now, ms since the Unix epoch   ARGV[4] the window's start, ms
-- ARGV[5] how many index members the caller read up to ARGV[1]
-- ARGV[6] the archive lock's token   ARGV[7] F, archive files written
-- then F pairs: the file's day, its new length
--
-- Returns the number of entries trimmed, or, writing nothing:
--   -1 while an audit is reading the journal (a pause until a time after
--      now), since an entry moved to the carried sums mid-audit would be
--      missing from both of its reads
--   -2 when the lock is not the caller's any more (it ran out)
--   -3 when the entries up to ARGV[1] are not the ones the caller read
--
-- Safe to run twice: once its file lengths are committed, the same call
-- answers as it did, writing nothing.

local files = tonumber(ARGV[7])
if #ARGV ~= 7 + 2 * files then
  return redis.error_reply('trim_journal: expected 7 arguments and 2 per archive file')
end
if archive_step_committed(KEYS[6], 7, files) then
  return tonumber(ARGV[5])
end
if redis.call('ZCOUNT', KEYS[4], '(' .. ARGV[3], '+inf') > 0 then
  return -1
end
if not holds_archive_lock(KEYS[5], ARGV[6]) then
  return -2
end

local old = redis.call('ZRANGE', KEYS[2], '-', '[' .. ARGV[1], 'BYLEX', 'LIMIT', 0, ARGV[2])
if #old ~= tonumber(ARGV[5]) or old[#old] ~= ARGV[1] then
  return -3
end
for _, member in ipairs(old) do
  local dash = string.find(member, '-', 1, true)
  local ms = (string.gsub(string.sub(member, 1, dash - 1), '^0+(%d)', '%1'))
  local seq = (string.gsub(string.sub(member, dash + 1), '^0+(%d)', '%1'))
  local id = ms .. '-' .. seq
  local entries = redis.call('XRANGE', KEYS[1], id, id)
  if #entries == 1 then
    local fields, entry = entries[1][2], {}
    for i = 1, #fields, 2 do
      entry[fields[i]] = fields[i + 1]
    end
    if entry.amount ~= '0' then
      redis.call('HINCRBY', KEYS[3], entry.debit, '-' .. entry.amount)
      redis.call('HINCRBY', KEYS[3], entry.credit, entry.amount)
      redis.call('HINCRBY', KEYS[3], 'kind:' .. entry.kind, entry.amount)
    end
    redis.call('XDEL', KEYS[1], id)
  end
  redis.call('ZREM', KEYS[2], member)
end
-- A list entry is stamped no earlier than its journal entry (written after
-- it, by the same script): what is older than the window on a list is so
-- on its journal too, and goes with this trim. (On a standalone Redis, a
-- payee's list may name another shard's entry, which that shard's trim of
-- the same pass takes.)
for i = 7, #KEYS do
  redis.call('XTRIM', KEYS[i], 'MINID', ARGV[4])
end
commit_archive_lengths(KEYS[6], 7, files)
return #old
