-- create_account: open a customer account, funding its opening balance from
-- @bank, in one atomic step.
--
-- KEYS[1] the new account (hash: id, name, balance, created_at)
-- KEYS[2] @bank account (hash: balance)
-- KEYS[3] journal (stream)
-- KEYS[4] customer account index (sorted set, members ordered by id)
-- KEYS[5] idempotency key (string "account_id fingerprint"); unused when ARGV[5] is ""
-- KEYS[6] journal index (sorted set of padded entry ids, for the report)
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
--   {"refused", "account_exists"}

-- The journal index member of a stream id: zero-padded, so that text order
-- is id order (the report pages through the index by rank).
local function journal_index_member(id)
  local dash = string.find(id, '-', 1, true)
  return string.format('%013d-%010d', tonumber(string.sub(id, 1, dash - 1)), tonumber(string.sub(id, dash + 1)))
end

local fingerprint = ARGV[5]
if fingerprint ~= '' then
  local prior = redis.call('GET', KEYS[5])
  if prior then
    local space = string.find(prior, ' ', 1, true)
    local prior_id = string.sub(prior, 1, space - 1)
    if string.sub(prior, space + 1) == fingerprint then
      return {'replayed', prior_id}
    end
    return {'refused', 'idempotency_conflict', prior_id}
  end
end
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'refused', 'account_exists'}
end

local account_id, opening = ARGV[1], ARGV[3]
redis.call('HSET', KEYS[1], 'id', account_id, 'name', ARGV[2], 'balance', opening,
  'created_at', ARGV[4])
redis.call('ZADD', KEYS[4], 0, account_id)
if opening ~= '0' then
  redis.call('HINCRBY', KEYS[2], 'balance', '-' .. opening)
  local entry = redis.call('XADD', KEYS[3], '*', 'at', ARGV[4], 'kind', 'opening_balance',
    'debit', ARGV[7], 'credit', account_id, 'amount', opening, 'ref', account_id,
    'status', 'completed', 'reason', '')
  redis.call('ZADD', KEYS[6], 0, journal_index_member(entry))
end
if fingerprint ~= '' then
  redis.call('SET', KEYS[5], account_id .. ' ' .. fingerprint, 'EX', ARGV[6])
end
return {'created', account_id}
