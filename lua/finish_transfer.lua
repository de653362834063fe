-- finish_transfer: the last step of a transfer between shards, on the
-- payer's shard, once the payee's shard has decided: `credited` completes the
-- transfer; `refused` voids it (the payer credited back from @transit, the
-- reversal journaled) and fails it. Either way the intent is dropped and the
-- accounting event written, as transfer.lua writes it for a one-step
-- transfer. A transfer no longer pending is left as it is (a second run).
--
-- KEYS[1] payer account (hash: balance)   KEYS[2] @transit's sub-account here
-- KEYS[3] journal (stream)                KEYS[4] journal index (sorted set)
-- KEYS[5] the transaction (hash)          KEYS[6] accounting events (stream)
-- KEYS[7] transfer intents (sorted set)   KEYS[8] the payer's journal entries (stream)
-- ARGV[1] transaction id   ARGV[2] decision: credited | refused
-- ARGV[3] the refusal's code, or ""   ARGV[4] now, ms   ARGV[5] @transit's id
--
-- Returns {"success"} | {"fail", reason, code} | {"missing"} (no such transfer).

local id = ARGV[1]
local record = redis.call('HMGET', KEYS[5], 'status', 'reason', 'code', 'payer', 'payee',
  'amount', 'kind', 'memo', 'ttl')
local status = record[1]
if not status then
  redis.call('ZREM', KEYS[7], id)
  return {'missing'}
end
if status ~= 'pending' then
  redis.call('ZREM', KEYS[7], id)
  if status == 'failed' then
    return {'fail', record[2], record[3]}
  end
  return {'success'}
end
local payer, payee, amount, kind, memo, ttl =
  record[4], record[5], record[6], record[7], record[8], record[9]
local now = ARGV[4]

if ARGV[2] == 'credited' then
  redis.call('HSET', KEYS[5], 'status', 'completed')
  redis.call('EXPIRE', KEYS[5], ttl)
  redis.call('XADD', KEYS[6], '*', 'type', kind .. '.completed',
    'ref', id, 'debit', payer, 'credit', payee, 'amount', amount, 'requested', amount,
    'at', now, 'reason', '')
  redis.call('ZREM', KEYS[7], id)
  return {'success'}
end
if ARGV[2] ~= 'refused' then
  return redis.error_reply('finish_transfer: unknown decision ' .. ARGV[2])
end

local code = ARGV[3]
local reason
if code == 'account_not_found' then
  reason = 'account ' .. payee .. ' not found'
else
  code = 'balance_limit'
  reason = 'the balance of account ' .. payee .. ' would pass the largest amount held'
end
-- The void: the money goes back the way it came. (The payer's balance was at
-- least this much more before the debit; it stays within the exact range
-- unless it was credited to near the limit meanwhile, which BALANCE_LIMIT's
-- size makes theoretical.)
redis.call('HINCRBY', KEYS[1], 'balance', amount)
redis.call('HINCRBY', KEYS[2], 'balance', '-' .. amount)
index_on_accounts(KEYS[3], journal(KEYS[3], KEYS[4], 'at', now, 'kind', kind, 'debit', ARGV[5],
  'credit', payer, 'amount', amount, 'requested', amount, 'ref', id, 'status', 'failed',
  'reason', reason, 'memo', memo), KEYS[8])
redis.call('HSET', KEYS[5], 'status', 'failed', 'reason', reason, 'code', code)
redis.call('EXPIRE', KEYS[5], ttl)
redis.call('XADD', KEYS[6], '*', 'type', kind .. '.failed',
  'ref', id, 'debit', payer, 'credit', payee, 'amount', '0', 'requested', amount,
  'at', now, 'reason', reason)
redis.call('ZREM', KEYS[7], id)
return {'fail', reason, code}
