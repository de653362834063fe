-- retire_batches: batches settled or refunded before the retention window
-- leave Redis, once the archive has them and their orders have left (the
-- caller retires those first, on their customers' shards: retire_orders.lua).
-- Their value is carried, so the audit still finds every cent paid for
-- orders in one place; the archive files' new lengths are committed in the
-- same atomic step.
--
-- KEYS[1] the shard's archive lock (string: holder token)
-- KEYS[2] the shard's committed archive lengths (hash: day -> bytes)
-- KEYS[3] the shard's batch index (sorted set)
-- KEYS[4] the shard's archive sums (hash: batches_value -> cents)
-- then 3 keys per batch: the batch (hash), its order ids (list), its
--   symbol's closed epochs (hash: epoch -> batch id)
-- ARGV[1] the lock's token   ARGV[2] the window's start, ms
-- ARGV[3] F, archive files written   then F pairs: the file's day, its new length
-- then 1 argument per batch: its id
--
-- Returns the number of batches removed, or, writing nothing:
--   -2 when the lock is not the caller's any more (it ran out)
--   -3 when a batch is missing, not settled or refunded, or finished within
--      the window
--
-- Safe to run twice: once its file lengths are committed, the same call
-- answers as it did, writing nothing.

local files = tonumber(ARGV[3])
local first_arg = 3 + 2 * files
local count = (#KEYS - 4) / 3
if count ~= math.floor(count) or #ARGV ~= first_arg + count then
  return redis.error_reply('retire_batches: expected 3 keys and 1 argument per batch, 2 arguments per file')
end
if archive_step_committed(KEYS[2], 3, files) then
  return count
end
if not holds_archive_lock(KEYS[1], ARGV[1]) then
  return -2
end
local batches = {}
for i = 1, count do
  local batch = redis.call('HMGET', KEYS[2 + 3 * i], 'id', 'status', 'settled_at', 'refunded_at', 'value', 'epoch')
  local finished = batch[2] == 'settled' and batch[3] or (batch[2] == 'refunded' and batch[4])
  if batch[1] ~= ARGV[first_arg + i] or not finished or tonumber(finished) >= tonumber(ARGV[2]) then
    return -3
  end
  batches[i] = batch
end

for i = 1, count do
  local id, batch = ARGV[first_arg + i], batches[i]
  redis.call('DEL', KEYS[2 + 3 * i], KEYS[3 + 3 * i])
  redis.call('ZREM', KEYS[3], id)
  if redis.call('HGET', KEYS[4 + 3 * i], batch[6]) == id then
    redis.call('HDEL', KEYS[4 + 3 * i], batch[6])
  end
  redis.call('HINCRBY', KEYS[4], 'batches_value', batch[5])
end
commit_archive_lengths(KEYS[2], 3, files)
return count
