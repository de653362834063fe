-- apply_wallet_transaction: apply the transaction at the head of an
-- account's queue: authorize it (withdrawals and card payments need the
-- funds), move the money, journal it, mark it and emit the accounting event,
-- or reject it with a reason, copied to the error stream. One atomic step.
--
-- The caller names the head it read; if the head has changed (another
-- delivery applied it first), nothing is written.
--
-- KEYS[1] the account's queue (list)   KEYS[2] the transaction (hash)
-- KEYS[3] the account (hash)           KEYS[4] the counterpart: @bank or @card (hash)
-- KEYS[5] journal (stream)             KEYS[6] journal index (sorted set)
-- KEYS[7] accounting events (stream)   KEYS[8] rejected transactions (stream)
-- KEYS[9] the account's journal entries (stream)
-- KEYS[10] the shard's applied transactions (sorted set: id by when applied,
--   ms), which retention takes them out of Redis by
-- ARGV[1] transaction id   ARGV[2] account id   ARGV[3] counterpart's account id
-- ARGV[4] now, ms          ARGV[5] worker name  ARGV[6] errors stream length bound (approximate)
--
-- Returns {"completed"} | {"rejected", reason} | {"skipped"} (not the head any more)
-- A rejection is for insufficient funds, or for a move that would take the
-- account or its counterpart past BALANCE_LIMIT (the reason names which);
-- both are decided before the first write, and no balance moves.

local id, account_id, counterpart, now = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
if redis.call('LINDEX', KEYS[1], 0) ~= id then
  -- Safe to run twice: the same call run again (this worker, this moment)
  -- finds the transaction it applied and answers as it did; any other
  -- delivery only skips it.
  local done = redis.call('HMGET', KEYS[2], 'status', 'reason', 'applied_at', 'worker')
  if done[3] == now and done[4] == ARGV[5] then
    if done[1] == 'rejected' then
      return {'rejected', done[2]}
    end
    return {'completed'}
  end
  return {'skipped'}
end
local txn = redis.call('HMGET', KEYS[2], 'kind', 'amount')
local kind, amount = txn[1], txn[2]
local debit, credit = account_id, counterpart
if kind == 'deposit' then
  debit, credit = counterpart, account_id
end
local reason = ''
local balance = redis.call('HGET', KEYS[3], 'balance')
local delta = kind == 'deposit' and tonumber(amount) or -tonumber(amount)
if kind ~= 'deposit' and tonumber(balance) < tonumber(amount) then
  reason = 'insufficient funds'
elseif not within_balance_limit(balance, delta) then
  reason = 'the balance of account ' .. account_id .. ' would pass the largest amount held'
elseif not within_balance_limit(redis.call('HGET', KEYS[4], 'balance'), -delta) then
  -- The system side too: @bank and @card take every customer's moves.
  reason = 'the balance of account ' .. counterpart .. ' would pass the largest amount held'
end

local status, moved = 'completed', amount
if reason == '' then
  redis.call('HINCRBY', KEYS[3], 'balance', kind == 'deposit' and amount or '-' .. amount)
  redis.call('HINCRBY', KEYS[4], 'balance', kind == 'deposit' and '-' .. amount or amount)
else
  status, moved = 'rejected', '0'
end
redis.call('LPOP', KEYS[1])
local applied = redis.call('HINCRBY', KEYS[3], 'wallet_applied', 1)
redis.call('HSET', KEYS[2], 'status', status, 'reason', reason, 'applied_at', now,
  'applied_seq', applied, 'worker', ARGV[5])
redis.call('ZADD', KEYS[10], now, id)
index_on_accounts(KEYS[5], journal(KEYS[5], KEYS[6], 'at', now, 'kind', kind, 'debit', debit,
  'credit', credit, 'amount', moved, 'requested', amount, 'ref', id,
  'status', reason == '' and 'completed' or 'failed', 'reason', reason), KEYS[9])
redis.call('XADD', KEYS[7], '*', 'type', kind .. '.' .. status,
  'ref', id, 'account_id', account_id, 'amount', moved, 'at', now, 'reason', reason)
if reason ~= '' then
  redis.call('XADD', KEYS[8], 'MAXLEN', '~', ARGV[6], '*', 'transaction_id', id,
    'account_id', account_id, 'kind', kind, 'amount', amount, 'reason', reason, 'at', now)
  return {'rejected', reason}
end
return {'completed'}
