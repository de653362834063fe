-- refund_orders: the middle step of a refund saga, on one customer shard:
-- each order given, of a batch being refunded, goes back to its customer from
-- @exchange's sub-account on this shard (only the sub-accounts' sum means
-- anything), journaled one entry per order, and is marked refunded, so that a
-- second run (a resent call, a sweeper) refunds it no more.
--
-- KEYS[1] @exchange's sub-account here   KEYS[2] journal (stream)
-- KEYS[3] journal index (sorted set)
-- then 3 keys per order: the order (hash), its customer's account (hash),
--   the customer's journal entries (stream)
-- ARGV[1] batch id   ARGV[2] now, ms   ARGV[3] @exchange's id
-- then per order: its id, its customer's id
--
-- Returns {"refunded", orders_refunded_now, cents_now}
--   | {"refused", "stale_orders"}: an order is not the one named, or not of
--     this batch
--   | {"refused", "balance_limit", account_id}: a refund would take that
--     account past BALANCE_LIMIT; nothing of this call is written.

local count = (#KEYS - 3) / 3
if count ~= math.floor(count) or #ARGV ~= 3 + 2 * count then
  return redis.error_reply('refund_orders: expected 3 keys and 2 arguments per order')
end
local batch_id, now, exchange = ARGV[1], ARGV[2], ARGV[3]
local todo, costs = {}, {}
local exchange_after = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
local customers_after = {}
for i = 1, count do
  local order_key, account_key = KEYS[1 + 3 * i], KEYS[2 + 3 * i]
  local order = redis.call('HMGET', order_key, 'id', 'account_id', 'cost', 'refunded_in')
  if order[1] ~= ARGV[2 + 2 * i] or order[2] ~= ARGV[3 + 2 * i] then
    return {'refused', 'stale_orders'}
  end
  if order[4] ~= batch_id then
    if order[4] then
      return {'refused', 'stale_orders'}
    end
    local amount = tonumber(order[3])
    exchange_after = exchange_after - amount
    if not within_limit(exchange_after) then
      return {'refused', 'balance_limit', exchange}
    end
    local after = (customers_after[account_key]
      or tonumber(redis.call('HGET', account_key, 'balance') or '0')) + amount
    if not within_limit(after) then
      return {'refused', 'balance_limit', order[2]}
    end
    customers_after[account_key] = after
    todo[#todo + 1] = i
    costs[i] = order[3]
  end
end

local cents = 0
for _, i in ipairs(todo) do
  redis.call('HINCRBY', KEYS[2 + 3 * i], 'balance', costs[i])
  redis.call('HINCRBY', KEYS[1], 'balance', '-' .. costs[i])
  local entry = journal(KEYS[2], KEYS[3], 'at', now, 'kind', 'refund', 'debit', exchange,
    'credit', ARGV[3 + 2 * i], 'amount', costs[i], 'ref', ARGV[2 + 2 * i],
    'status', 'completed', 'reason', 'batch ' .. batch_id .. ' refunded')
  index_on_accounts(KEYS[2], entry, KEYS[3 + 3 * i])
  redis.call('HSET', KEYS[1 + 3 * i], 'refunded_in', batch_id)
  cents = cents + tonumber(costs[i])
end
return {'refunded', tostring(#todo), string.format('%d', cents)}
