-- trim_archived_stream: a stream's entries older than the retention window
-- (dead letters an operator resolved, the operator log) leave Redis once the
-- archive has them (src/retention.rs): the oldest entries, up to ARGV[2],
-- go, and the shard's archive files' new lengths are committed in the same
-- atomic step.
--
-- KEYS[1] the shard's archive lock (string: holder token)
-- KEYS[2] the shard's committed archive lengths (hash: day -> bytes)
-- KEYS[3] the stream
-- ARGV[1] the lock's token   ARGV[2] the last entry to trim
-- ARGV[3] how many entries the caller read, up to and with ARGV[2]
-- ARGV[4] F, archive files written   then F pairs: the file's day, its new length
--
-- Returns the number of entries trimmed, or, writing nothing:
--   -2 when the lock is not the caller's any more (it ran out)
--   -3 when the oldest entries up to ARGV[2] are not the ones the caller read
--
-- Safe to run twice: once its file lengths are committed, the same call
-- answers as it did, writing nothing.

local files = tonumber(ARGV[4])
if #KEYS ~= 3 or #ARGV ~= 4 + 2 * files then
  return redis.error_reply('trim_archived_stream: expected 3 keys, 4 arguments and 2 per archive file')
end
local count = tonumber(ARGV[3])
if archive_step_committed(KEYS[2], 4, files) then
  return count
end
if not holds_archive_lock(KEYS[1], ARGV[1]) then
  return -2
end
local old = redis.call('XRANGE', KEYS[3], '-', ARGV[2], 'COUNT', count + 1)
if #old ~= count or count == 0 or old[#old][1] ~= ARGV[2] then
  return -3
end
for _, entry in ipairs(old) do
  redis.call('XDEL', KEYS[3], entry[1])
end
commit_archive_lengths(KEYS[2], 4, files)
return count
