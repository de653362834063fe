-- debit_orders: the order saga's first step, on the customers' shard. For
-- each order given: check funds, debit the customer, credit this shard's
-- @exchange sub-account, write the order, its journal entry and event, and an
-- intent (the order is debited but not yet known to be in its symbol's
-- bucket). Each order is its own atomic step (checked, then written, or
-- refused with nothing written); the API groups the orders of one shard into
-- one call. The only step that can refuse: admission (admit_orders.lua, on the
-- symbol's home shard) and finishing never do. A call also carries the
-- finishing step of this shard's orders admitted since its last call (as
-- finish_orders.lua does it), which saves a call per group under load.
--
-- KEYS[1] @exchange's sub-account on this shard (hash: balance, orders_paid)
-- KEYS[2] journal (stream)     KEYS[3] journal index (sorted set, for the report)
-- KEYS[4] accounting events (stream)
-- KEYS[5] order intents (sorted set: order id by when a sweeper may take over, ms)
-- then 5 keys per order, at offset k = 5 + 5 * (i - 1):
--   k+1 customer account (hash: balance)   k+2 the new order (hash)
--   k+3 idempotency key (string "order_id fingerprint")
--   k+4 the customer's journal entries   k+5 the customer's orders (streams)
-- then one key per order to finish: that admitted order (hash)
-- ARGV[1] number of orders   ARGV[2] @exchange's account id
-- ARGV[3] when a sweeper may take the intents over, ms since the Unix epoch
-- ARGV[4] number of admitted orders to finish
-- then 9 arguments per order, at offset a = 4 + 9 * (i - 1):
--   a+1 account id   a+2 order id   a+3 symbol   a+4 quantity, units of 1e-8
--   a+5 price, cents   a+6 cost, cents
--   a+7 idempotency "fingerprint ttl_seconds", or "" for none
--   a+8 now, ms since the Unix epoch
--   a+9 the exchange minimum, cents (kept on the order for a sweeper's admission)
-- then 2 arguments per order to finish: its id, the epoch it joined
--
-- Returns three strings per order, in order:
--   "debited", "", ""                   go on: admit it
--   "replayed", order_id, ""            same key, same request: nothing written
--   "refused", "idempotency_conflict", order_id
--   "refused", "account_not_found", ""
--   "refused", "insufficient_funds", balance_cents
--   "refused", "balance_limit", account_id   the order would take the customer
--     or @exchange past BALANCE_LIMIT (counting the orders before it in this call)
--
-- Safe to run twice: the API draws a fresh order id per request, so an order
-- with this id means this very call ran already (its reply lost, the call
-- sent again): it answers "debited" as it did, writing nothing.

local count, finishing = tonumber(ARGV[1]), tonumber(ARGV[4])
if #KEYS ~= 5 + 5 * count + finishing or #ARGV ~= 4 + 9 * count + 2 * finishing then
  return redis.error_reply('debit_orders: expected 5 keys and 9 arguments per order, 1 and 2 per order to finish')
end
local exchange_id, takeover_at = ARGV[2], ARGV[3]

local function int(number)
  return string.format('%d', number)
end

-- @exchange is credited once at the end with the call's total, as are the
-- journal index and the intents, which take any number of members in one
-- call (the script is atomic: nothing reads them in between).
local exchange_credit, exchange_orders = 0, 0
local exchange_balance
local journal_pending = {}
local intents = {}

local function debit(k, a)
  if redis.call('EXISTS', KEYS[k + 2]) == 1 then
    return 'debited', '', ''
  end
  local idempotency = ARGV[a + 7]
  local fingerprint, ttl
  if idempotency ~= '' then
    local space = string.find(idempotency, ' ', 1, true)
    fingerprint, ttl = string.sub(idempotency, 1, space - 1), string.sub(idempotency, space + 1)
    local prior = idempotency_reply(KEYS[k + 3], fingerprint)
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
  -- Both sides within the limit, before this order's first write.
  if customer_after > BALANCE_LIMIT then
    return 'refused', 'balance_limit', ARGV[a + 1]
  end
  if not exchange_balance then
    exchange_balance = tonumber(redis.call('HGET', KEYS[1], 'balance') or '0')
  end
  local exchange_after = exchange_balance + cost
  if not within_limit(exchange_after) then
    return 'refused', 'balance_limit', exchange_id
  end
  exchange_balance = exchange_after

  local account_id, order_id, symbol, now = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3], ARGV[a + 8]
  redis.call('HINCRBY', KEYS[k + 1], 'balance', '-' .. ARGV[a + 6])
  exchange_credit = exchange_credit + cost
  exchange_orders = exchange_orders + 1
  local entry = journal_deferred(KEYS[2], journal_pending, 'at', now, 'kind', 'order',
    'debit', account_id, 'credit', exchange_id, 'amount', ARGV[a + 6], 'ref', order_id,
    'status', 'completed', 'reason', '')
  index_on_accounts(KEYS[2], entry, KEYS[k + 4])
  redis.call('XADD', KEYS[4], '*', 'type', 'order.placed', 'ref', order_id,
    'account_id', account_id, 'symbol', symbol, 'amount', ARGV[a + 6], 'at', now)
  redis.call('HSET', KEYS[k + 2], 'id', order_id, 'account_id', account_id, 'symbol', symbol,
    'quantity', ARGV[a + 4], 'price', ARGV[a + 5], 'cost', ARGV[a + 6], 'created_at', now,
    'minimum', ARGV[a + 9], 'listed', redis.call('XADD', KEYS[k + 5], '*', 'order', order_id))
  if fingerprint then
    redis.call('SET', KEYS[k + 3], order_id .. ' ' .. fingerprint, 'EX', ttl)
  end
  intents[#intents + 1] = takeover_at
  intents[#intents + 1] = order_id
  return 'debited', '', ''
end

local replies = {}
for i = 1, count do
  local verdict, detail, extra = debit(5 + 5 * (i - 1), 4 + 9 * (i - 1))
  replies[#replies + 1] = verdict
  replies[#replies + 1] = detail
  replies[#replies + 1] = extra
end
if exchange_credit > 0 then
  redis.call('HINCRBY', KEYS[1], 'balance', int(exchange_credit))
  redis.call('HINCRBY', KEYS[1], 'orders_paid', exchange_orders)
end
index_journal(KEYS[3], journal_pending)
call_chunked('ZADD', KEYS[5], intents, 2)
if finishing > 0 then
  finish_admitted_orders(KEYS[5], finishing, 6 + 5 * count, 5 + 9 * count)
end
return replies
