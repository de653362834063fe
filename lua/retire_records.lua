-- retire_records: finished records (wallet transactions applied, advances
-- repaid) older than the retention window leave Redis, once the archive has
-- them (src/retention.rs): each record's hash goes, with its place on its
-- account's list and on the shard's indexes, and the shard's archive files'
-- new lengths are committed in the same atomic step. The money they moved
-- stays counted: the journal holds it.
--
-- KEYS[1] the shard's archive lock (string: holder token)
-- KEYS[2] the shard's committed archive lengths (hash: day -> bytes)
-- KEYS[3] the shard's finished records of this kind (sorted set: id by
--   when it finished; written by the script that finishes the record)
-- then I more indexes of the shard that name the records (sorted sets)
-- then 2 keys per record: the record (hash), its account's list (sorted set)
-- ARGV[1] the lock's token   ARGV[2] the window's start, ms   ARGV[3] I
-- ARGV[4] F, archive files written   then F pairs: the file's day, its new length
-- then 2 arguments per record: its id, its account's id
--
-- Returns the number of records removed, or, writing nothing:
--   -2 when the lock is not the caller's any more (it ran out)
--   -3 when a record is missing, not the one named, or not finished before
--      the window

local indexes, files = tonumber(ARGV[3]), tonumber(ARGV[4])
local first_key, first_arg = 3 + indexes, 4 + 2 * files
local count = (#KEYS - first_key) / 2
if count ~= math.floor(count) or #ARGV ~= first_arg + 2 * count then
  return redis.error_reply('retire_records: expected 2 keys and 2 arguments per record, 2 arguments per file')
end
if archive_step_committed(KEYS[2], 4, files) then
  return count
end
if not holds_archive_lock(KEYS[1], ARGV[1]) then
  return -2
end
for i = 1, count do
  local id, account = ARGV[first_arg + 2 * i - 1], ARGV[first_arg + 2 * i]
  local record = redis.call('HMGET', KEYS[first_key + 2 * i - 1], 'id', 'account_id')
  local finished = redis.call('ZSCORE', KEYS[3], id)
  if record[1] ~= id or record[2] ~= account
      or not finished or tonumber(finished) >= tonumber(ARGV[2]) then
    return -3
  end
end

for i = 1, count do
  local id = ARGV[first_arg + 2 * i - 1]
  redis.call('DEL', KEYS[first_key + 2 * i - 1])
  redis.call('ZREM', KEYS[first_key + 2 * i], id)
  for index = 3, first_key do
    redis.call('ZREM', KEYS[index], id)
  end
end
commit_archive_lengths(KEYS[2], 4, files)
return count
