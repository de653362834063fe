-- retire_batch: a batch settled or refunded before the retention window
-- leaves Redis, once the archive has it and its orders have left (the
-- caller retires them first, on their customers' shards: retire_orders.lua).
-- Its value is carried, so the audit still finds every cent paid for orders
-- in one place; the archive files' new lengths are committed in the same
-- atomic step.
--
-- KEYS[1] the shard's archive lock (string: holder token)
-- KEYS[2] the shard's committed archive lengths (hash: day -> bytes)
-- KEYS[3] the batch (hash)   KEYS[4] its order ids (list)
-- KEYS[5] the shard's batch index (sorted set)
-- KEYS[6] its symbol's closed epochs (hash: epoch -> batch id)
-- KEYS[7] the shard's archive sums (hash: batches_value -> cents)
-- ARGV[1] the lock's token   ARGV[2] the batch id
-- ARGV[3] the window's start, ms   ARGV[4] F, archive files written
-- then F pairs: the file's day, its new length
--
-- Returns 1 when the batch left Redis, or, writing nothing:
--   -2 when the lock is not the caller's any more (it ran out)
--   -3 when the batch is missing, not settled or refunded, or finished
--      within the window

local files = tonumber(ARGV[4])
if #KEYS ~= 7 or #ARGV ~= 4 + 2 * files then
  return redis.error_reply('retire_batch: expected 7 keys, 4 arguments and 2 per file')
end
if not holds_archive_lock(KEYS[1], ARGV[1]) then
  return -2
end
local batch = redis.call('HMGET', KEYS[3], 'id', 'status', 'settled_at', 'refunded_at', 'value', 'epoch')
local finished = batch[2] == 'settled' and batch[3] or (batch[2] == 'refunded' and batch[4])
if batch[1] ~= ARGV[2] or not finished or tonumber(finished) >= tonumber(ARGV[3]) then
  return -3
end

redis.call('DEL', KEYS[3], KEYS[4])
redis.call('ZREM', KEYS[5], ARGV[2])
if redis.call('HGET', KEYS[6], batch[6]) == ARGV[2] then
  redis.call('HDEL', KEYS[6], batch[6])
end
redis.call('HINCRBY', KEYS[7], 'batches_value', batch[5])
commit_archive_lengths(KEYS[2], 4, files)
return 1
