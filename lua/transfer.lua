-- transfer: move money from a payer to a payee at once, or record why not.
-- Used for transfers between accounts and for bank transactions against
-- @bank. A refusal (unknown account, insufficient funds) is journaled too,
-- with amount 0 and its reason, because the report must show it.
--
-- KEYS[1] payer account (hash: balance)   KEYS[2] payee account (hash)
-- KEYS[3] journal (stream)                KEYS[4] journal index (sorted set)
-- KEYS[5] the transaction (hash): answers a replay of its Idempotency-Key, and
--         a second run of this very call (kept for the idempotency ttl)
-- KEYS[6] idempotency key (string "transaction_id fingerprint"); unused when ARGV[9] is ""
-- KEYS[7] accounting events (stream)
-- then the journal entries (stream) of the payer, if ARGV[12] is "1", and
--   of the payee, if ARGV[13] is "1": of each party that is a customer
-- ARGV[1] payer id   ARGV[2] payee id   ARGV[3] amount, cents
-- ARGV[4] kind (transfer | bank_transaction)   ARGV[5] transaction id
-- ARGV[6] now, ms    ARGV[7] "1" if the payer may go negative (a system account)
-- ARGV[8] the request in canonical form, stored with the transaction
-- ARGV[9] idempotency fingerprint or ""   ARGV[10] its ttl, seconds
-- ARGV[11] memo   ARGV[12] "1" if the payer is a customer   ARGV[13] the same for the payee
--
-- Returns {"success", transaction_id}
--   | {"fail", transaction_id, reason, code}: code is account_not_found,
--     insufficient_funds or balance_limit (the move would take the payer or
--     the payee past BALANCE_LIMIT; for a bank transaction one of them is
--     @bank, which every bank transaction moves). The reason says which.
--   | {"replayed", transaction_id} | {"refused", "idempotency_conflict", transaction_id}

-- Safe to run twice: the API draws a fresh transaction id for each request,
-- so a record of this id means this very call ran already (its reply lost,
-- the call sent again): answer as it did, writing nothing.
local payer_entries = ARGV[12] == '1' and KEYS[8] or nil
local payee_entries = ARGV[13] == '1' and KEYS[payer_entries and 9 or 8] or nil
if #KEYS ~= 7 + (payer_entries and 1 or 0) + (payee_entries and 1 or 0) then
  return redis.error_reply('transfer: expected 7 keys and one per customer party')
end

local done = redis.call('HMGET', KEYS[5], 'status', 'reason', 'code')
if done[1] == 'failed' then
  return {'fail', ARGV[5], done[2], done[3]}
elseif done[1] then
  return {'success', ARGV[5]}
end
local fingerprint = ARGV[9]
local prior = idempotency_reply(KEYS[6], fingerprint)
if prior then
  return prior
end

local payer, payee, amount, id, now = ARGV[1], ARGV[2], ARGV[3], ARGV[5], ARGV[6]
local reason, code = '', ''
local payer_balance = redis.call('HGET', KEYS[1], 'balance')
local payee_balance = redis.call('HGET', KEYS[2], 'balance')
if not payer_balance then
  reason, code = 'account ' .. payer .. ' not found', 'account_not_found'
elseif not payee_balance then
  reason, code = 'account ' .. payee .. ' not found', 'account_not_found'
elseif ARGV[7] ~= '1' and tonumber(payer_balance) < tonumber(amount) then
  reason = 'insufficient funds: account ' .. payer .. ' holds less than the amount'
  code = 'insufficient_funds'
else
  -- Both sides, before the first write: a system payer (@bank) may go
  -- negative, but not past the limit either.
  local past
  if not within_balance_limit(payer_balance, -tonumber(amount)) then
    past = payer
  elseif not within_balance_limit(payee_balance, tonumber(amount)) then
    past = payee
  end
  if past then
    reason = 'the balance of account ' .. past .. ' would pass the largest amount held'
    code = 'balance_limit'
  end
end

local status, moved = 'completed', amount
if reason ~= '' then
  status, moved = 'failed', '0'
else
  redis.call('HINCRBY', KEYS[1], 'balance', '-' .. amount)
  redis.call('HINCRBY', KEYS[2], 'balance', amount)
end
local entry = journal(KEYS[3], KEYS[4], 'at', now, 'kind', ARGV[4], 'debit', payer,
  'credit', payee, 'amount', moved, 'requested', amount, 'ref', id, 'status', status,
  'reason', reason, 'memo', ARGV[11])
-- On the list of each customer party that exists; a refused transfer on
-- the payer's alone: its payee never saw it (as with a transfer between
-- shards, refused on the payer's shard).
if payer_entries and payer_balance then
  index_on_accounts(KEYS[3], entry, payer_entries)
end
if payee_entries and payee_balance and (status == 'completed' or ARGV[4] ~= 'transfer') then
  index_on_accounts(KEYS[3], entry, payee_entries)
end
-- Kept to answer a second run of this call and a replay of its
-- Idempotency-Key, for as long as the key.
redis.call('HSET', KEYS[5], 'id', id, 'at', now, 'status', status, 'reason', reason,
  'code', code, 'request', ARGV[8])
redis.call('EXPIRE', KEYS[5], ARGV[10])
if fingerprint ~= '' then
  redis.call('SET', KEYS[6], id .. ' ' .. fingerprint, 'EX', ARGV[10])
end
redis.call('XADD', KEYS[7], '*', 'type', ARGV[4] .. '.' .. status,
  'ref', id, 'debit', payer, 'credit', payee, 'amount', moved, 'requested', amount,
  'at', now, 'reason', reason)
if reason ~= '' then
  return {'fail', id, reason, code}
end
return {'success', id}
