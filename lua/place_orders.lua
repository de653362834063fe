-- place_orders: for each order given, debit the customer for a crypto
-- purchase and queue it for the exchange. Each order is its own atomic step
-- (checked, then written, or refused with nothing written); the API groups
-- concurrent orders into one call to save round trips and script overhead.
--
-- Each order joins its symbol's pending bucket. When the bucket's value
-- reaches the exchange minimum (or the order alone reaches it, taking the
-- bucket along), the bucket is emptied into a batch and one settle job is
-- added to the settle stream. Orders find their batch through the bucket's
-- epoch: each emptying closes an epoch and maps it to the batch, so closing a
-- batch writes a fixed set of keys however many orders it holds.
--
-- The orders may be of several customer shards and several symbols' home
-- shards (a standalone Redis holds them all; on a cluster the order saga runs
-- instead): each order names its customer shard's block of keys and its home
-- shard's block.
-- ARGV[1] C, customer shard blocks   ARGV[2] H, home shard blocks
-- ARGV[3] number of orders            ARGV[4] @exchange's account id
-- KEYS, first 4 per customer shard block, at offset c = 4 * (j - 1):
--   c+1 that shard's @exchange account (hash: balance, orders_paid)   c+2 its journal (stream)
--   c+3 its journal index (sorted set of padded entry ids, for the report)
--   c+4 its accounting events (stream)
-- then 3 per home shard block, at offset h = 4 * C + 3 * (j - 1):
--   h+1 settle jobs (stream)   h+2 batch index (sorted set)
--   h+3 symbols ever ordered (set)
-- then 10 keys per order, at offset k = 4 * C + 3 * H + 10 * (i - 1):
--   k+1 customer account (hash: balance)      k+2 the new order (hash)
--   k+3 the symbol's bucket (hash: value, quantity, count, epoch)
--   k+4 the bucket's order ids (list)         k+5 its closed epochs (hash: epoch -> batch id)
--   k+6 the batch this order would close (hash)   k+7 that batch's order ids (list)
--   k+8 idempotency key (string "order_id fingerprint")
--   k+9 the customer's journal entries   k+10 the customer's orders (streams)
-- and 12 arguments per order, at offset a = 4 + 12 * (i - 1):
--   a+1 account id   a+2 order id   a+3 symbol   a+4 quantity, units of 1e-8
--   a+5 price, cents   a+6 cost, cents   a+7 exchange minimum, cents
--   a+8 batch id, used only if this order closes a batch
--   a+9 idempotency "fingerprint ttl_seconds", or "" for none
--   a+10 now, ms since the Unix epoch
--   a+11 its customer shard block (1..C)   a+12 its home shard block (1..H)
--
-- Returns three strings per order, in order:
--   "placed", "pending", ""                 the order waits in the bucket
--   "placed", "settling", batch_id          the order closed a batch
--   "replayed", order_id, ""                same key, same request: nothing written
--   "refused", "idempotency_conflict", order_id
--   "refused", "account_not_found", ""
--   "refused", "insufficient_funds", balance_cents
--   "refused", "balance_limit", account_id   the order would take the customer
--     or @exchange past BALANCE_LIMIT (counting the orders placed before it
--     in this call)

local customer_blocks, home_blocks, count = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local order_keys = 4 * customer_blocks + 3 * home_blocks
if #KEYS ~= order_keys + 10 * count or #ARGV ~= 4 + 12 * count then
  return redis.error_reply('place_orders: expected 4 keys per customer shard, 3 per home shard, '
    .. '10 keys and 12 arguments per order')
end
local exchange_id = ARGV[4]
for i = 1, count do
  local a = 4 + 12 * (i - 1)
  local customer, home = tonumber(ARGV[a + 11]), tonumber(ARGV[a + 12])
  if not customer or customer < 1 or customer > customer_blocks
      or not home or home < 1 or home > home_blocks then
    return redis.error_reply('place_orders: order ' .. i .. ' names no shard block')
  end
end

-- Integers go back to Redis as plain digits: a Lua number passed as it is may
-- be written with an exponent (1e+15). Exact below 2^53, which the API's
-- bounds keep every sum under.
local function int(number)
  return string.format('%d', number)
end

-- A group's orders often share a bucket, and all credit @exchange: the
-- script keeps those in Lua while it runs and writes each once at the end
-- (`flush`), as it does the journal index and the batch index, which take
-- any number of members in one call. Nothing else reads them in between;
-- the script is atomic. (A Lua error part way would leave the orders placed
-- so far written but these not; Redis does not roll a script back. The
-- arguments are checked above and built by one Rust function.)
local buckets = {} -- bucket key -> {value, quantity, count, epoch, stored, ids, list, closed, dirty}
-- Per customer shard block: its @exchange credit so far, and its balance with
-- that credit (read once, at the first order that passes its funds check, so
-- that each order checks the limit against a Lua number and not another call
-- into Redis); the index members of the journal entries written.
local customers = {}
for j = 1, customer_blocks do
  customers[j] = { key = 4 * (j - 1), credit = 0, orders = 0, balance = nil, journal_pending = {} }
end
-- Per home shard block: score, batch id of each batch closed, for the batch index.
local homes = {}
for j = 1, home_blocks do
  homes[j] = { key = 4 * customer_blocks + 3 * (j - 1), batches_closed = {} }
end

local function bucket_at(k)
  local key = KEYS[k + 3]
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
      ids = {}, list = KEYS[k + 4], epochs = KEYS[k + 5], closed = {}, dirty = false,
    }
    buckets[key] = bucket
  end
  return bucket
end

local function place(k, a)
  local customer, home = customers[tonumber(ARGV[a + 11])], homes[tonumber(ARGV[a + 12])]
  local c, h = customer.key, home.key
  local idempotency = ARGV[a + 9]
  local fingerprint, ttl
  if idempotency ~= '' then
    local space = string.find(idempotency, ' ', 1, true)
    fingerprint, ttl = string.sub(idempotency, 1, space - 1), string.sub(idempotency, space + 1)
    local prior = idempotency_reply(KEYS[k + 8], fingerprint)
    if prior then
      return prior[1], prior[2], prior[3] or ''
    end
  end

  local balance = redis.call('HGET', KEYS[k + 1], 'balance')
  if not balance then
    return 'refused', 'account_not_found', ''
  end
  local cost = tonumber(ARGV[a + 6])
  local customer_after = tonumber(balance) - cost
  if customer_after < 0 then
    return 'refused', 'insufficient_funds', balance
  end
  -- Both sides within the limit, before this order's first write. The funds
  -- check keeps the customer at or above zero; only a balance already past
  -- the limit (set by hand) stays past it. @exchange takes every order.
  if customer_after > BALANCE_LIMIT then
    return 'refused', 'balance_limit', ARGV[a + 1]
  end
  if not customer.balance then
    customer.balance = tonumber(redis.call('HGET', KEYS[c + 1], 'balance') or '0')
  end
  local exchange_after = customer.balance + cost
  if not within_limit(exchange_after) then
    return 'refused', 'balance_limit', exchange_id
  end
  customer.balance = exchange_after

  local account_id, order_id, symbol, now = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 10]
  redis.call('HINCRBY', KEYS[k + 1], 'balance', '-' .. ARGV[a + 6])
  customer.credit = customer.credit + cost
  customer.orders = customer.orders + 1
  local entry = journal_deferred(KEYS[c + 2], customer.journal_pending, 'at', now, 'kind', 'order',
    'debit', account_id, 'credit', exchange_id, 'amount', ARGV[a + 6], 'ref', order_id,
    'status', 'completed', 'reason', '')
  index_on_accounts(KEYS[c + 2], entry, KEYS[k + 9])
  redis.call('XADD', KEYS[c + 4], '*', 'type', 'order.placed', 'ref', order_id,
    'account_id', account_id, 'symbol', symbol, 'amount', ARGV[a + 6], 'at', now)

  local bucket = bucket_at(k)
  if bucket.fresh then
    redis.call('SADD', KEYS[h + 3], symbol) -- the symbol's first order: the audit must find its bucket
    bucket.fresh = false
  end
  local epoch = bucket.epoch
  redis.call('HSET', KEYS[k + 2], 'id', order_id, 'account_id', account_id, 'symbol', symbol,
    'quantity', ARGV[a + 4], 'price', ARGV[a + 5], 'cost', ARGV[a + 6], 'epoch', epoch, 'created_at', now,
    'listed', redis.call('XADD', KEYS[k + 10], '*', 'order', order_id))
  if fingerprint then
    redis.call('SET', KEYS[k + 8], order_id .. ' ' .. fingerprint, 'EX', ttl)
  end

  bucket.ids[#bucket.ids + 1] = order_id
  bucket.value = bucket.value + cost
  bucket.quantity = bucket.quantity + tonumber(ARGV[a + 4])
  bucket.count = bucket.count + 1
  bucket.dirty = true
  if bucket.value < tonumber(ARGV[a + 7]) then
    return 'placed', 'pending', ''
  end

  -- Close the batch: move the bucket's orders (stored, then this group's)
  -- into it and queue its settle job.
  local batch_id = ARGV[a + 8]
  local order_ids = {}
  if bucket.stored > 0 then
    order_ids = redis.call('LRANGE', bucket.list, 0, -1)
    redis.call('DEL', bucket.list)
    bucket.stored = 0
  end
  for _, id in ipairs(bucket.ids) do
    order_ids[#order_ids + 1] = id
  end
  call_chunked('RPUSH', KEYS[k + 7], order_ids, 1)
  local value, quantity, orders = bucket.value, bucket.quantity, bucket.count
  local quantity_text = string.format('%d.%08d', math.floor(quantity / 1e8), quantity % 1e8)
  redis.call('HSET', KEYS[k + 6], 'id', batch_id, 'symbol', symbol, 'quantity', int(quantity),
    'value', int(value), 'order_count', int(orders), 'epoch', epoch, 'status', 'settling',
    'attempts', 0, 'created_at', now)
  bucket.closed[#bucket.closed + 1] = epoch
  bucket.closed[#bucket.closed + 1] = batch_id
  bucket.value, bucket.quantity, bucket.count, bucket.ids = 0, 0, 0, {}
  bucket.epoch = int(tonumber(epoch) + 1)
  home.batches_closed[#home.batches_closed + 1] = now
  home.batches_closed[#home.batches_closed + 1] = batch_id
  redis.call('XADD', KEYS[h + 1], '*', 'batch_id', batch_id, 'symbol', symbol,
    'quantity', quantity_text, 'quantity_units', int(quantity), 'value_cents', int(value),
    'order_count', int(orders), 'orders', table.concat(order_ids, ','), 'created_at', now)
  return 'placed', 'settling', batch_id
end

-- Writes what the group kept in Lua: each bucket it changed, its closed
-- epochs, each @exchange's credit, and the journal and batch index members.
local function flush()
  for key, bucket in pairs(buckets) do
    if bucket.dirty then
      call_chunked('RPUSH', bucket.list, bucket.ids, 1)
      call_chunked('HSET', bucket.epochs, bucket.closed, 2)
      redis.call('HSET', key, 'value', int(bucket.value), 'quantity', int(bucket.quantity),
        'count', int(bucket.count), 'epoch', bucket.epoch)
    end
  end
  for _, customer in ipairs(customers) do
    if customer.credit > 0 then
      redis.call('HINCRBY', KEYS[customer.key + 1], 'balance', int(customer.credit))
      redis.call('HINCRBY', KEYS[customer.key + 1], 'orders_paid', customer.orders)
    end
    index_journal(KEYS[customer.key + 3], customer.journal_pending)
  end
  for _, home in ipairs(homes) do
    call_chunked('ZADD', KEYS[home.key + 2], home.batches_closed, 2)
  end
end

local replies = {}
for i = 1, count do
  local verdict, detail, extra = place(order_keys + 10 * (i - 1), 4 + 12 * (i - 1))
  replies[#replies + 1] = verdict
  replies[#replies + 1] = detail
  replies[#replies + 1] = extra
end
flush()
return replies
