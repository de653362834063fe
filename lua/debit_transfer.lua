-- debit_transfer: the first step of a transfer between customers on two
-- shards (CLUSTER.md, "Transfers between shards"), on the payer's shard: check
-- and debit the payer, credit @transit there, and record the transfer
-- `pending` with an intent, so that a sweeper can finish it after a crash.
-- The only step that can refuse for lack of funds. A refusal is journaled
-- with amount 0 and its reason, as transfer.lua does.
--
-- KEYS[1] payer account (hash: balance)   KEYS[2] @transit's sub-account here
-- KEYS[3] journal (stream)                KEYS[4] journal index (sorted set)
-- KEYS[5] the transaction (hash): answers a second run of this call
-- KEYS[6] idempotency key (string "transaction_id fingerprint"); unused when ARGV[9] is ""
-- KEYS[7] accounting events (stream)      KEYS[8] transfer intents (sorted set)
-- KEYS[9] the payer's journal entries (stream)
-- ARGV[1] payer id   ARGV[2] payee id   ARGV[3] amount, cents
-- ARGV[4] kind (transfer)   ARGV[5] transaction id   ARGV[6] now, ms
-- ARGV[7] "1" if the payee exists (the API looked on its shard; accounts are
--         never deleted)
-- ARGV[8] the request in canonical form, stored with the transaction
-- ARGV[9] idempotency fingerprint or ""   ARGV[10] its ttl, seconds
-- ARGV[11] memo   ARGV[12] when a sweeper may take the saga over, ms
-- ARGV[13] @transit's id
--
-- Returns {"pending", transaction_id}: debited, the credit step is next
--   | {"success", id} | {"fail", id, reason, code}: a second run, the saga ended
--   | {"fail", id, reason, code}: refused (account_not_found,
--     insufficient_funds, balance_limit), journaled, nothing moved
--   | {"replayed", transaction_id} | {"refused", "idempotency_conflict", transaction_id}

local done = redis.call('HMGET', KEYS[5], 'status', 'reason', 'code')
if done[1] == 'failed' then
  return {'fail', ARGV[5], done[2], done[3]}
elseif done[1] == 'pending' then
  return {'pending', ARGV[5]}
elseif done[1] then
  return {'success', ARGV[5]}
end
local fingerprint = ARGV[9]
local prior = idempotency_reply(KEYS[6], fingerprint)
if prior then
  return prior
end

local payer, payee, amount, id, now = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[6]
local transit = ARGV[13]
local reason, code = '', ''
local payer_balance = redis.call('HGET', KEYS[1], 'balance')
local transit_balance = redis.call('HGET', KEYS[2], 'balance')
if not payer_balance then
  reason, code = 'account ' .. payer .. ' not found', 'account_not_found'
elseif ARGV[7] ~= '1' then
  reason, code = 'account ' .. payee .. ' not found', 'account_not_found'
elseif not transit_balance then
  return redis.error_reply('debit_transfer: ' .. transit .. ' has no sub-account on this shard')
elseif tonumber(payer_balance) < tonumber(amount) then
  reason = 'insufficient funds: account ' .. payer .. ' holds less than the amount'
  code = 'insufficient_funds'
elseif not within_balance_limit(transit_balance, tonumber(amount)) then
  reason = 'the balance of account ' .. transit .. ' would pass the largest amount held'
  code = 'balance_limit'
end

if reason ~= '' then
  local entry = journal(KEYS[3], KEYS[4], 'at', now, 'kind', ARGV[4], 'debit', payer,
    'credit', payee, 'amount', '0', 'requested', amount, 'ref', id, 'status', 'failed',
    'reason', reason, 'memo', ARGV[11])
  if payer_balance then
    index_on_accounts(KEYS[3], entry, KEYS[9])
  end
  redis.call('HSET', KEYS[5], 'id', id, 'at', now, 'status', 'failed', 'reason', reason,
    'code', code, 'request', ARGV[8])
  redis.call('EXPIRE', KEYS[5], ARGV[10])
  if fingerprint ~= '' then
    redis.call('SET', KEYS[6], id .. ' ' .. fingerprint, 'EX', ARGV[10])
  end
  redis.call('XADD', KEYS[7], '*', 'type', ARGV[4] .. '.failed',
    'ref', id, 'debit', payer, 'credit', payee, 'amount', '0', 'requested', amount,
    'at', now, 'reason', reason)
  return {'fail', id, reason, code}
end

redis.call('HINCRBY', KEYS[1], 'balance', '-' .. amount)
redis.call('HINCRBY', KEYS[2], 'balance', amount)
index_on_accounts(KEYS[3], journal(KEYS[3], KEYS[4], 'at', now, 'kind', ARGV[4], 'debit', payer,
  'credit', transit, 'amount', amount, 'requested', amount, 'ref', id, 'status', 'pending',
  'reason', '', 'memo', ARGV[11]), KEYS[9])
-- Kept, with no expiry, until the saga ends: the later steps read it.
redis.call('HSET', KEYS[5], 'id', id, 'at', now, 'status', 'pending', 'reason', '',
  'code', '', 'request', ARGV[8], 'kind', ARGV[4], 'payer', payer, 'payee', payee,
  'amount', amount, 'memo', ARGV[11], 'ttl', ARGV[10])
if fingerprint ~= '' then
  redis.call('SET', KEYS[6], id .. ' ' .. fingerprint, 'EX', ARGV[10])
end
redis.call('ZADD', KEYS[8], ARGV[12], id)
return {'pending', id}
