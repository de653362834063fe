-- create_advance: lend a customer money from @bank and schedule its
-- repayment in installments one period apart, in one atomic step. The
-- installments sum exactly to the amount; the remainder goes on the last.
--
-- KEYS[1] the advance (hash)          KEYS[2] the customer's account (hash)
-- KEYS[3] @bank account (hash)        KEYS[4] journal (stream)
-- KEYS[5] journal index (sorted set)  KEYS[6] due installments (sorted set: "advance_id:n" by due ms)
-- KEYS[7] all advances (sorted set)   KEYS[8] the account's advances (sorted set)
-- KEYS[9] accounting events (stream)  KEYS[10] idempotency key; unused when ARGV[7] is ""
-- KEYS[11] the customer's journal entries (stream)
-- ARGV[1] advance id   ARGV[2] account id   ARGV[3] amount, cents
-- ARGV[4] installments   ARGV[5] period, ms   ARGV[6] now, ms
-- ARGV[7] idempotency fingerprint or ""   ARGV[8] its ttl, seconds   ARGV[9] @bank's id
--
-- Returns {"created", id} | {"replayed", id} | {"refused", "idempotency_conflict", id}
--   | {"refused", "account_not_found"}
--   | {"refused", "balance_limit", account_id}: the advance would take the
--     customer or @bank (which lends it) past BALANCE_LIMIT

-- Safe to run twice: an advance with this (fresh) id means this very call
-- ran already; answer as it did, writing nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'created', ARGV[1]}
end
local fingerprint = ARGV[7]
local prior = idempotency_reply(KEYS[10], fingerprint)
if prior then
  return prior
end
if redis.call('EXISTS', KEYS[2]) == 0 then
  return {'refused', 'account_not_found'}
end

local id, account_id, amount, now = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[6])
-- Both sides of the loan, before the first write: @bank lends every advance,
-- so enough of them would take it past the limit.
if not within_balance_limit(redis.call('HGET', KEYS[2], 'balance'), amount) then
  return {'refused', 'balance_limit', account_id}
end
if not within_balance_limit(redis.call('HGET', KEYS[3], 'balance'), -amount) then
  return {'refused', 'balance_limit', ARGV[9]}
end
local count, period = tonumber(ARGV[4]), tonumber(ARGV[5])
local base = math.floor(amount / count)
redis.call('HSET', KEYS[1], 'id', id, 'account_id', account_id, 'amount', ARGV[3],
  'count', count, 'period_ms', ARGV[5], 'created_at', ARGV[6], 'paid', 0)
for n = 1, count do
  local share = base
  if n == count then
    share = amount - base * (count - 1)
  end
  local due = now + n * period
  redis.call('HSET', KEYS[1], 'i' .. n .. ':amount', string.format('%d', share),
    'i' .. n .. ':due', string.format('%d', due), 'i' .. n .. ':status', 'scheduled')
  redis.call('ZADD', KEYS[6], due, id .. ':' .. n)
end
redis.call('HINCRBY', KEYS[2], 'balance', ARGV[3])
redis.call('HINCRBY', KEYS[3], 'balance', '-' .. ARGV[3])
index_on_accounts(KEYS[4], journal(KEYS[4], KEYS[5], 'at', ARGV[6], 'kind', 'advance', 'debit', ARGV[9],
  'credit', account_id, 'amount', ARGV[3], 'ref', id, 'status', 'completed', 'reason', ''), KEYS[11])
redis.call('ZADD', KEYS[7], now, id)
redis.call('ZADD', KEYS[8], now, id)
redis.call('XADD', KEYS[9], '*', 'type', 'advance.created', 'ref', id,
  'account_id', account_id, 'amount', ARGV[3], 'at', ARGV[6])
if fingerprint ~= '' then
  redis.call('SET', KEYS[10], id .. ' ' .. fingerprint, 'EX', ARGV[8])
end
return {'created', id}
