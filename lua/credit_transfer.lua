-- credit_transfer: the second step of a transfer between shards, on the
-- payee's shard: decide once whether the payee takes the money (`credited`),
-- or not (`refused`: the payee's balance would pass the exact range), and if
-- so credit the payee from @transit's sub-account here. The decision is kept,
-- so a second run (a resent call, a sweeper) answers it and writes nothing.
--
-- KEYS[1] payee account (hash: balance)   KEYS[2] @transit's sub-account here
-- KEYS[3] journal (stream)                KEYS[4] journal index (sorted set)
-- KEYS[5] the decision (string "credited" or "refused CODE", expiring)
-- KEYS[6] the payee's journal entries (stream)
-- ARGV[1] payer id   ARGV[2] payee id   ARGV[3] amount, cents
-- ARGV[4] kind   ARGV[5] transaction id   ARGV[6] now, ms   ARGV[7] memo
-- ARGV[8] how long the decision is kept, seconds   ARGV[9] @transit's id
--
-- Returns {"credited"} | {"refused", code}: code is balance_limit or
-- account_not_found.

local decided = redis.call('GET', KEYS[5])
if decided then
  local space = string.find(decided, ' ', 1, true)
  if space then
    return {string.sub(decided, 1, space - 1), string.sub(decided, space + 1)}
  end
  return {decided}
end

local payee, amount, transit = ARGV[2], ARGV[3], ARGV[9]
local payee_balance = redis.call('HGET', KEYS[1], 'balance')
local transit_balance = redis.call('HGET', KEYS[2], 'balance')
if not transit_balance then
  return redis.error_reply('credit_transfer: ' .. transit .. ' has no sub-account on this shard')
end
local code
if not payee_balance then
  code = 'account_not_found'
elseif not within_balance_limit(payee_balance, tonumber(amount))
    or not within_balance_limit(transit_balance, -tonumber(amount)) then
  code = 'balance_limit'
end
if code then
  redis.call('SET', KEYS[5], 'refused ' .. code, 'EX', ARGV[8])
  return {'refused', code}
end

redis.call('HINCRBY', KEYS[1], 'balance', amount)
redis.call('HINCRBY', KEYS[2], 'balance', '-' .. amount)
index_on_accounts(KEYS[3], journal(KEYS[3], KEYS[4], 'at', ARGV[6], 'kind', ARGV[4], 'debit', transit,
  'credit', payee, 'amount', amount, 'requested', amount, 'ref', ARGV[5],
  'status', 'completed', 'reason', '', 'memo', ARGV[7]), KEYS[6])
redis.call('SET', KEYS[5], 'credited', 'EX', ARGV[8])
return {'credited'}
