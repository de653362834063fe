-- finish_batch: the exchange filled a batch. Mark it settled, pay @exchange's
-- balance for it out through @bank, journal that, emit the accounting event
-- and acknowledge the settle job, in one atomic step.
--
-- Safe to run twice: a batch already settled is only acknowledged again.
-- A failed batch the exchange filled after all (a late answer) settles too.
--
-- KEYS[1] the batch (hash)           KEYS[2] settle jobs (stream)
-- KEYS[3] @exchange account (hash)   KEYS[4] @bank account (hash)
-- KEYS[5] journal (stream)           KEYS[6] failed batches (sorted set)
-- KEYS[7] accounting events (stream)
-- KEYS[8] journal index (sorted set of padded entry ids, for the report)
-- KEYS[9] counters (hash: batches_settled)
-- ARGV[1] consumer group     ARGV[2] settle job's stream id
-- ARGV[3] batch id           ARGV[4] now, ms since the Unix epoch
-- ARGV[5] the exchange's fill id       ARGV[6] worker name
-- ARGV[7] @exchange's account id       ARGV[8] @bank's account id
-- ARGV[9] events stream length bound (approximate)
--
-- Returns {"settled"} | {"already", status} for a batch settled or refunded
-- before | {"missing"} for an unknown batch. The job is acknowledged in every case.

local status = redis.call('HGET', KEYS[1], 'status')
redis.call('XACK', KEYS[2], ARGV[1], ARGV[2])
if not status then
  return {'missing'}
end
if status ~= 'settling' and status ~= 'failed' then
  return {'already', status}
end

local batch_id, now = ARGV[3], ARGV[4]
local value = redis.call('HGET', KEYS[1], 'value')
redis.call('HINCRBY', KEYS[3], 'balance', '-' .. value)
redis.call('HINCRBY', KEYS[4], 'balance', value)
journal(KEYS[5], KEYS[8], 'at', now, 'kind', 'settlement', 'debit', ARGV[7],
  'credit', ARGV[8], 'amount', value, 'ref', batch_id, 'status', 'completed', 'reason', '')
redis.call('HSET', KEYS[1], 'status', 'settled', 'fill_id', ARGV[5], 'settled_at', now,
  'last_error', '')
redis.call('ZREM', KEYS[6], batch_id)
redis.call('HINCRBY', KEYS[9], 'batches_settled', 1)
redis.call('XADD', KEYS[7], 'MAXLEN', '~', ARGV[9], '*', 'type', 'batch.settled',
  'ref', batch_id, 'amount', value, 'at', now, 'worker', ARGV[6])
return {'settled'}
