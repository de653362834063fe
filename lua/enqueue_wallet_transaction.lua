-- enqueue_wallet_transaction: accept a deposit, withdrawal or card payment
-- for later, in the account's own queue, so that an account's transactions
-- are applied in the order they were accepted whatever the number of workers.
-- The account is put on the wallet stream only if it is not there already:
-- one job per account at a time means one worker per account at a time.
--
-- KEYS[1] the account (hash)              KEYS[2] the transaction (hash)
-- KEYS[3] the account's queue (list)      KEYS[4] the account's transactions (sorted set, by id)
-- KEYS[5] the account's "on the stream" flag (string)
-- KEYS[6] wallet jobs (stream)            KEYS[7] idempotency key; unused when ARGV[7] is ""
-- ARGV[1] transaction id   ARGV[2] account id   ARGV[3] kind   ARGV[4] amount, cents
-- ARGV[5] description      ARGV[6] merchant     ARGV[7] idempotency fingerprint or ""
-- ARGV[8] idempotency ttl, seconds              ARGV[9] now, ms
-- ARGV[10] most transactions the account may have waiting
--
-- Returns {"queued", id} | {"replayed", id} | {"refused", "idempotency_conflict", id}
--   | {"refused", "account_not_found"} | {"refused", "queue_full", waiting}

-- Safe to run twice: a transaction with this (fresh) id means this very call
-- ran already; answer as it did, writing nothing.
if redis.call('EXISTS', KEYS[2]) == 1 then
  return {'queued', ARGV[1]}
end
local fingerprint = ARGV[7]
local prior = idempotency_reply(KEYS[7], fingerprint)
if prior then
  return prior
end
if redis.call('EXISTS', KEYS[1]) == 0 then
  return {'refused', 'account_not_found'}
end
local waiting = redis.call('LLEN', KEYS[3])
if waiting >= tonumber(ARGV[10]) then
  return {'refused', 'queue_full', tostring(waiting)}
end

local id = ARGV[1]
local accepted = redis.call('HINCRBY', KEYS[1], 'wallet_accepted', 1)
redis.call('HSET', KEYS[2], 'id', id, 'account_id', ARGV[2], 'kind', ARGV[3], 'amount', ARGV[4],
  'description', ARGV[5], 'merchant', ARGV[6], 'status', 'queued', 'created_at', ARGV[9],
  'accepted_seq', accepted)
redis.call('RPUSH', KEYS[3], id)
redis.call('ZADD', KEYS[4], 0, id)
if redis.call('SET', KEYS[5], '1', 'NX') then
  redis.call('XADD', KEYS[6], '*', 'account_id', ARGV[2])
end
if fingerprint ~= '' then
  redis.call('SET', KEYS[7], id .. ' ' .. fingerprint, 'EX', ARGV[8])
end
return {'queued', id}
