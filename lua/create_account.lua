-- create_account: open a customer account, funding its opening balance from
-- @bank, in one atomic step.
--
-- KEYS[1] the new account (hash: id, name, balance, created_at)
-- KEYS[2] @bank account (hash: balance)
-- KEYS[3] journal (stream)
-- KEYS[4] customer account index (sorted set, members ordered by id)
-- KEYS[5] idempotency key (string "account_id fingerprint"); unused when ARGV[5] is ""
-- KEYS[6] journal index (sorted set of padded entry ids, for the report)
-- KEYS[7] accounting events (stream)
-- KEYS[8] the new account's journal entries (stream)
-- ARGV[1] account id         ARGV[2] name
-- ARGV[3] opening balance, cents (0 for none)
-- ARGV[4] now, ms since the Unix epoch
-- ARGV[5] idempotency fingerprint or ""
-- ARGV[6] idempotency ttl, seconds
-- ARGV[7] @bank's account id
--
-- Returns one of
--   {"created", account_id}
--   {"replayed", account_id}                   same key, same request: nothing written
--   {"refused", "idempotency_conflict", account_id}
--   {"refused", "balance_limit", account_id}  the opening balance would take
--     this account (the new one, or @bank, which funds it) past BALANCE_LIMIT

-- Safe to run twice: the API draws a fresh id for each request, so an
-- account with this id means this very call ran already (its reply lost, the
-- call sent again): answer as it did, writing nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'created', ARGV[1]}
end
local fingerprint = ARGV[5]
local prior = idempotency_reply(KEYS[5], fingerprint)
if prior then
  return prior
end

local account_id, opening = ARGV[1], ARGV[3]
-- Both sides of the opening move, before the first write. @bank funds every
-- opening balance, so enough openings would take it past the limit however
-- small each one is.
if not within_balance_limit('0', tonumber(opening)) then
  return {'refused', 'balance_limit', account_id}
end
if not within_balance_limit(redis.call('HGET', KEYS[2], 'balance'), -tonumber(opening)) then
  return {'refused', 'balance_limit', ARGV[7]}
end
redis.call('HSET', KEYS[1], 'id', account_id, 'name', ARGV[2], 'balance', opening,
  'created_at', ARGV[4])
redis.call('ZADD', KEYS[4], 0, account_id)
if opening ~= '0' then
  redis.call('HINCRBY', KEYS[2], 'balance', '-' .. opening)
  index_on_accounts(KEYS[3], journal(KEYS[3], KEYS[6], 'at', ARGV[4], 'kind', 'opening_balance',
    'debit', ARGV[7], 'credit', account_id, 'amount', opening, 'ref', account_id,
    'status', 'completed', 'reason', ''), KEYS[8])
end
redis.call('XADD', KEYS[7], '*', 'type', 'account.opened', 'ref', account_id,
  'account_id', account_id, 'amount', opening, 'at', ARGV[4])
if fingerprint ~= '' then
  redis.call('SET', KEYS[5], account_id .. ' ' .. fingerprint, 'EX', ARGV[6])
end
return {'created', account_id}
