-- place_order: debit a customer for a crypto purchase and queue it for the
-- exchange, in one atomic step.
--
-- The order joins its symbol's pending bucket. When the bucket's value reaches
-- the exchange minimum (or this order alone reaches it, taking the bucket
-- along), the bucket is emptied into a batch and one settle job is added to
-- the settle stream. Orders find their batch through the bucket's epoch: each
-- emptying closes an epoch and maps it to the batch, so closing a batch writes
-- a fixed set of keys however many orders it holds.
--
-- KEYS[1]  customer account (hash: balance)
-- KEYS[2]  @exchange account (hash: balance)
-- KEYS[3]  journal (stream)
-- KEYS[4]  the new order (hash)
-- KEYS[5]  the symbol's pending bucket (hash: value, quantity, count, epoch)
-- KEYS[6]  the bucket's order ids (list)
-- KEYS[7]  the bucket's closed epochs (hash: epoch -> batch id)
-- KEYS[8]  the batch this order would close (hash)
-- KEYS[9]  that batch's order ids (list)
-- KEYS[10] settle jobs (stream)
-- KEYS[11] batch index (sorted set: batch id by creation time)
-- KEYS[12] symbols ever ordered (set)
-- KEYS[13] idempotency key (string "order_id fingerprint"); unused when ARGV[9] is ""
-- ARGV[1]  account id             ARGV[2] order id           ARGV[3] symbol
-- ARGV[4]  quantity, units of 1e-8                           ARGV[5] price, cents
-- ARGV[6]  cost, cents            ARGV[7] exchange minimum, cents
-- ARGV[8]  batch id, used only if this order closes a batch
-- ARGV[9]  idempotency fingerprint or ""                     ARGV[10] its ttl, seconds
-- ARGV[11] now, ms since the Unix epoch                      ARGV[12] @exchange's account id
--
-- Returns one of
--   {"placed", "pending"}                  the order waits in the bucket
--   {"placed", "settling", batch_id}       the order closed a batch
--   {"replayed", order_id}                 same key, same request: nothing written
--   {"refused", "idempotency_conflict", order_id}
--   {"refused", "account_not_found"}
--   {"refused", "insufficient_funds", balance_cents}

local fingerprint = ARGV[9]
if fingerprint ~= '' then
  local prior = redis.call('GET', KEYS[13])
  if prior then
    local space = string.find(prior, ' ', 1, true)
    local prior_id = string.sub(prior, 1, space - 1)
    if string.sub(prior, space + 1) == fingerprint then
      return {'replayed', prior_id}
    end
    return {'refused', 'idempotency_conflict', prior_id}
  end
end

local balance = redis.call('HGET', KEYS[1], 'balance')
if not balance then
  return {'refused', 'account_not_found'}
end
local cost = tonumber(ARGV[6])
if tonumber(balance) < cost then
  return {'refused', 'insufficient_funds', balance}
end

local account_id, order_id, symbol, now = ARGV[1], ARGV[2], ARGV[3], ARGV[11]
redis.call('HINCRBY', KEYS[1], 'balance', -cost)
redis.call('HINCRBY', KEYS[2], 'balance', cost)
redis.call('XADD', KEYS[3], '*', 'at', now, 'kind', 'order', 'debit', account_id,
  'credit', ARGV[12], 'amount', ARGV[6], 'ref', order_id, 'status', 'completed', 'reason', '')

local epoch = redis.call('HGET', KEYS[5], 'epoch') or '0'
redis.call('HSET', KEYS[4], 'id', order_id, 'account_id', account_id, 'symbol', symbol,
  'quantity', ARGV[4], 'price', ARGV[5], 'cost', ARGV[6], 'epoch', epoch, 'created_at', now)
redis.call('SADD', KEYS[12], symbol)
if fingerprint ~= '' then
  redis.call('SET', KEYS[13], order_id .. ' ' .. fingerprint, 'EX', ARGV[10])
end

redis.call('RPUSH', KEYS[6], order_id)
local value = redis.call('HINCRBY', KEYS[5], 'value', cost)
local quantity = redis.call('HINCRBY', KEYS[5], 'quantity', ARGV[4])
local count = redis.call('HINCRBY', KEYS[5], 'count', 1)
local minimum = tonumber(ARGV[7])
if value < minimum then
  return {'placed', 'pending'}
end

-- Close the batch: move the bucket's orders into it and queue its settle job.
local batch_id = ARGV[8]
local order_ids = redis.call('LRANGE', KEYS[6], 0, -1)
local push_chunk = 1000 -- unpack() is bounded by Lua's C stack
for first = 1, #order_ids, push_chunk do
  redis.call('RPUSH', KEYS[9], unpack(order_ids, first, math.min(first + push_chunk - 1, #order_ids)))
end
local quantity_text = string.format('%d.%08d', math.floor(quantity / 1e8), quantity % 1e8)
redis.call('HSET', KEYS[8], 'id', batch_id, 'symbol', symbol, 'quantity', quantity,
  'value', value, 'order_count', count, 'epoch', epoch, 'status', 'settling',
  'attempts', 0, 'created_at', now)
redis.call('HSET', KEYS[7], epoch, batch_id)
redis.call('DEL', KEYS[6])
redis.call('HSET', KEYS[5], 'value', 0, 'quantity', 0, 'count', 0, 'epoch', tonumber(epoch) + 1)
redis.call('ZADD', KEYS[11], now, batch_id)
redis.call('XADD', KEYS[10], '*', 'batch_id', batch_id, 'symbol', symbol,
  'quantity', quantity_text, 'quantity_units', quantity, 'value_cents', value,
  'order_count', count, 'orders', table.concat(order_ids, ','), 'created_at', now)
return {'placed', 'settling', batch_id}
