-- admit_orders: the order saga's second step, on the symbol's home shard.
-- Each order given (debited on its customer's shard by debit_orders.lua)
-- joins its symbol's pending bucket, once: an admission marker records the
-- bucket epoch it joined, and an order already marked is not added again.
-- When the bucket's value reaches the exchange minimum (or the order alone
-- reaches it, taking the bucket along), the bucket is emptied into a batch
-- and one settle job is added to the settle stream: "exactly one exchange
-- call, right after the third $4 order" happens here. Orders find their
-- batch through the bucket's epoch: each emptying closes an epoch and maps it
-- to the batch, so closing a batch writes a fixed set of keys however many
-- orders it holds. Nothing is refused here: the money was taken in the
-- first step.
--
-- KEYS[1] settle jobs (stream)   KEYS[2] batch index (sorted set)
-- KEYS[3] symbols ever ordered (set)
-- then 6 keys per order, at offset k = 3 + 6 * (i - 1):
--   k+1 the symbol's bucket (hash: value, quantity, count, epoch)
--   k+2 the bucket's order ids (list)     k+3 its closed epochs (hash: epoch -> batch id)
--   k+4 the order's admission marker (string: epoch)
--   k+5 the batch this order would close (hash)   k+6 that batch's order ids (list)
-- ARGV[1] number of orders   ARGV[2] how long a marker is kept, seconds
-- then 7 arguments per order, at offset a = 2 + 7 * (i - 1):
--   a+1 order id   a+2 symbol   a+3 quantity, units of 1e-8   a+4 cost, cents
--   a+5 exchange minimum, cents   a+6 batch id, used only if this order closes a batch
--   a+7 now, ms since the Unix epoch
--
-- Returns three strings per order, in order:
--   "pending", epoch, ""          the order waits in the bucket
--   "settling", epoch, batch_id   the order is in a closed batch (this call
--                                 closed it, or an earlier admission did)
--
-- Safe to run twice, and to run for an order admitted before (a sweeper
-- finishing a saga): a marked order answers from its marker and the epochs.

local count = tonumber(ARGV[1])
if #KEYS ~= 3 + 6 * count or #ARGV ~= 2 + 7 * count then
  return redis.error_reply('admit_orders: expected 6 keys and 7 arguments per order')
end
local marker_ttl = ARGV[2]

local function int(number)
  return string.format('%d', number)
end

-- A group's orders often share a bucket: the script keeps it in Lua while it
-- runs and writes it once at the end (`flush`), as it does the batch index.
local buckets = {} -- bucket key -> {value, quantity, count, epoch, stored, ids, list, epochs, closed, dirty}
local batches_closed = {} -- score, batch id: for the batch index

local function bucket_at(k)
  local key = KEYS[k + 1]
  local bucket = buckets[key]
  if not bucket then
    local stored = redis.call('HMGET', key, 'value', 'quantity', 'count', 'epoch')
    local stored_count = tonumber(stored[3] or '0')
    bucket = {
      value = tonumber(stored[1] or '0'), quantity = tonumber(stored[2] or '0'),
      count = stored_count, epoch = stored[4] or '0', fresh = not stored[4],
      -- Order ids in the stored list (its length is the stored count: only
      -- this script writes either, and always both), not yet moved into a
      -- batch by this run.
      stored = stored_count,
      ids = {}, list = KEYS[k + 2], epochs = KEYS[k + 3], closed = {}, dirty = false,
    }
    buckets[key] = bucket
  end
  return bucket
end

-- The batch an epoch became, if it is closed: in this run, or before.
local function batch_of(bucket, epoch)
  for i = 1, #bucket.closed, 2 do
    if bucket.closed[i] == epoch then
      return bucket.closed[i + 1]
    end
  end
  return redis.call('HGET', bucket.epochs, epoch)
end

local function admit(k, a)
  local bucket = bucket_at(k)
  local marked = redis.call('GET', KEYS[k + 4])
  if marked then
    local batch_id = batch_of(bucket, marked)
    if batch_id then
      return 'settling', marked, batch_id
    end
    return 'pending', marked, ''
  end

  local order_id, symbol, now = ARGV[a + 1], ARGV[a + 2], ARGV[a + 7]
  local cost = tonumber(ARGV[a + 4])
  if bucket.fresh then
    redis.call('SADD', KEYS[3], symbol) -- the symbol's first order: the audit must find its bucket
    bucket.fresh = false
  end
  local epoch = bucket.epoch
  redis.call('SET', KEYS[k + 4], epoch, 'EX', marker_ttl)
  bucket.ids[#bucket.ids + 1] = order_id
  bucket.value = bucket.value + cost
  bucket.quantity = bucket.quantity + tonumber(ARGV[a + 3])
  bucket.count = bucket.count + 1
  bucket.dirty = true
  if bucket.value < tonumber(ARGV[a + 5]) then
    return 'pending', epoch, ''
  end

  -- Close the batch: move the bucket's orders (stored, then this group's)
  -- into it and queue its settle job.
  local batch_id = ARGV[a + 6]
  local order_ids = {}
  if bucket.stored > 0 then
    order_ids = redis.call('LRANGE', bucket.list, 0, -1)
    redis.call('DEL', bucket.list)
    bucket.stored = 0
  end
  for _, id in ipairs(bucket.ids) do
    order_ids[#order_ids + 1] = id
  end
  call_chunked('RPUSH', KEYS[k + 6], order_ids, 1)
  local value, quantity, orders = bucket.value, bucket.quantity, bucket.count
  local quantity_text = string.format('%d.%08d', math.floor(quantity / 1e8), quantity % 1e8)
  redis.call('HSET', KEYS[k + 5], 'id', batch_id, 'symbol', symbol, 'quantity', int(quantity),
    'value', int(value), 'order_count', int(orders), 'epoch', epoch, 'status', 'settling',
    'attempts', 0, 'created_at', now)
  bucket.closed[#bucket.closed + 1] = epoch
  bucket.closed[#bucket.closed + 1] = batch_id
  bucket.value, bucket.quantity, bucket.count, bucket.ids = 0, 0, 0, {}
  bucket.epoch = int(tonumber(epoch) + 1)
  batches_closed[#batches_closed + 1] = now
  batches_closed[#batches_closed + 1] = batch_id
  redis.call('XADD', KEYS[1], '*', 'batch_id', batch_id, 'symbol', symbol,
    'quantity', quantity_text, 'quantity_units', int(quantity), 'value_cents', int(value),
    'order_count', int(orders), 'orders', table.concat(order_ids, ','), 'created_at', now)
  return 'settling', epoch, batch_id
end

-- Writes what the group kept in Lua: each bucket it changed, its closed
-- epochs, and the batch index members.
local function flush()
  for key, bucket in pairs(buckets) do
    if bucket.dirty then
      call_chunked('RPUSH', bucket.list, bucket.ids, 1)
      call_chunked('HSET', bucket.epochs, bucket.closed, 2)
      redis.call('HSET', key, 'value', int(bucket.value), 'quantity', int(bucket.quantity),
        'count', int(bucket.count), 'epoch', bucket.epoch)
    end
  end
  call_chunked('ZADD', KEYS[2], batches_closed, 2)
end

local replies = {}
for i = 1, count do
  local verdict, epoch, batch_id = admit(3 + 6 * (i - 1), 2 + 7 * (i - 1))
  replies[#replies + 1] = verdict
  replies[#replies + 1] = epoch
  replies[#replies + 1] = batch_id
end
flush()
return replies
