-- finish_orders: the order saga's last step, on the customers' shard: each
-- order admitted to its bucket (admit_orders.lua) records the epoch it
-- joined, and its intent is dropped, so no sweeper takes it up again. Writes
-- only what is missing: safe to run twice, and for orders already finished.
--
-- KEYS[1] order intents (sorted set)
-- then KEYS[1 + i] the i-th order (hash)
-- ARGV: two per order, at offset a = 2 * (i - 1): a+1 order id, a+2 epoch
--
-- Returns the number of intents dropped.

local count = #KEYS - 1
if #ARGV ~= 2 * count then
  return redis.error_reply('finish_orders: expected one order key and two arguments per order')
end
local ids = {}
for i = 1, count do
  local order = KEYS[1 + i]
  if redis.call('EXISTS', order) == 1 then
    redis.call('HSETNX', order, 'epoch', ARGV[2 * i])
  end
  ids[#ids + 1] = ARGV[2 * i - 1]
end
local dropped = 0
for first = 1, #ids, UNPACK_CHUNK_MAX do
  dropped = dropped + redis.call('ZREM', KEYS[1], unpack(ids, first, math.min(first + UNPACK_CHUNK_MAX - 1, #ids)))
end
return dropped
