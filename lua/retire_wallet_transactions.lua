-- retire_wallet_transactions: wallet transactions applied (completed or
-- rejected) before the retention window leave Redis, once the archive has
-- them (src/retention.rs): each transaction's hash goes, with its place on
-- its account's history and on the shard's applied index, and the shard's
-- archive files' new lengths are committed in the same atomic step. The
-- money they moved stays counted: the journal holds it.
--
-- KEYS[1] the shard's archive lock (string: holder token)
-- KEYS[2] the shard's committed archive lengths (hash: day -> bytes)
-- KEYS[3] the shard's applied transactions (sorted set: id by when applied)
-- then 2 keys per transaction: the transaction (hash), its account's
--   history (sorted set)
-- ARGV[1] the lock's token   ARGV[2] the window's start, ms
-- ARGV[3] F, archive files written   then F pairs: the file's day, its new length
-- then 2 arguments per transaction: its id, its account's id
--
-- Returns the number of transactions removed, or, writing nothing:
--   -2 when the lock is not the caller's any more (it ran out)
--   -3 when a transaction is missing, not the one named, not applied, or
--      applied within the window

local files = tonumber(ARGV[3])
local count = (#KEYS - 3) / 2
if count ~= math.floor(count) or #ARGV ~= 3 + 2 * files + 2 * count then
  return redis.error_reply('retire_wallet_transactions: expected 2 keys and 2 arguments per transaction, 2 arguments per file')
end
if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return -2
end
local first = 3 + 2 * files
for i = 1, count do
  local id, account = ARGV[first + 2 * i - 1], ARGV[first + 2 * i]
  local txn = redis.call('HMGET', KEYS[2 + 2 * i], 'id', 'account_id', 'status')
  local applied = redis.call('ZSCORE', KEYS[3], id)
  if txn[1] ~= id or txn[2] ~= account or (txn[3] ~= 'completed' and txn[3] ~= 'rejected')
      or not applied or tonumber(applied) >= tonumber(ARGV[2]) then
    return -3
  end
end

for i = 1, count do
  local id = ARGV[first + 2 * i - 1]
  redis.call('DEL', KEYS[2 + 2 * i])
  redis.call('ZREM', KEYS[3 + 2 * i], id)
  redis.call('ZREM', KEYS[3], id)
end
for i = 1, files do
  redis.call('HSET', KEYS[2], ARGV[2 + 2 * i], ARGV[3 + 2 * i])
end
return count
