-- finish_batches: the exchange filled these batches. For each, mark it
-- settled, pay @exchange's balance for it out through @bank, journal that and
-- emit the accounting event; acknowledge every job. One atomic step for the
-- fills a worker has in hand, so a busy worker pays one script run for many.
--
-- Safe to run twice: a batch already settled (or refunded) is only
-- acknowledged again, and the same call run again (the batch settled by this
-- job with this fill) answers "settled" as it did. A failed batch the
-- exchange filled after all (a late answer) settles too.
--
-- KEYS[1] settle jobs (stream)       KEYS[2] @exchange account (hash)
-- KEYS[3] @bank account (hash)       KEYS[4] journal (stream)
-- KEYS[5] failed batches (sorted set)    KEYS[6] accounting events (stream)
-- KEYS[7] journal index (sorted set of padded entry ids, for the report)
-- KEYS[8] counters (hash: batches_settled)
-- then KEYS[8 + i] the i-th batch (hash)
-- ARGV[1] consumer group    ARGV[2] now, ms since the Unix epoch
-- ARGV[3] worker name       ARGV[4] @exchange's account id
-- ARGV[5] @bank's account id
-- then three per batch, at offset a = 5 + 3 * (i - 1):
--   a+1 settle job's stream id   a+2 batch id   a+3 the exchange's fill id
--
-- A batch whose settlement would take @exchange or @bank past
-- BALANCE_LIMIT (counting the batches settled before it in this call) is
-- refused: nothing is written for it, not even the acknowledgement, so its
-- job stays pending. The worker then dead-letters the batch with the reason
-- (dead_letter_batch.lua, flagged as possibly filled, so a refund needs the
-- operator to confirm), and an operator retries it once the balance is back
-- in range: the exchange fills a batch id once, so the retry finds the same
-- fill. Nothing is lost, and no balance moves half way.
--
-- Returns two strings per batch, in order:
--   "settled", ""      | "already", status (settled or refunded before)
--   "missing", "missing"   for an unknown batch
--   "balance_limit", account_id   refused, the job left pending (see above)

local count = #KEYS - 8
if count < 1 or #ARGV ~= 5 + 3 * count then
  return redis.error_reply('finish_batches: expected one batch key and three arguments per batch')
end
local now, worker = ARGV[2], ARGV[3]

local replies = {}
local stream_ids = {}
local journal_pending = {} -- index members, written in one ZADD at the end
local paid = 0
local settled = 0
-- The two balances the settlements move, read at the first batch to settle.
local exchange_balance, bank_balance
for i = 1, count do
  local key, a = KEYS[8 + i], 5 + 3 * (i - 1)
  local stream_id, batch_id, fill_id = ARGV[a + 1], ARGV[a + 2], ARGV[a + 3]
  local batch = redis.call('HMGET', key, 'status', 'value', 'settled_job', 'fill_id')
  local status, value = batch[1], batch[2]
  local this_call = status == 'settled' and batch[3] == stream_id and batch[4] == fill_id
  local settles = status == 'settling' or status == 'failed'
  local past -- the account this batch's settlement would take past the limit
  if settles then
    if not exchange_balance then
      exchange_balance = tonumber(redis.call('HGET', KEYS[2], 'balance') or '0')
      bank_balance = tonumber(redis.call('HGET', KEYS[3], 'balance') or '0')
    end
    local moved = paid + tonumber(value)
    if not within_limit(exchange_balance - moved) then
      past = ARGV[4]
    elseif not within_limit(bank_balance + moved) then
      past = ARGV[5]
    end
  end
  if past then
    -- Refused: not acknowledged, nothing written (see the header).
    replies[#replies + 1] = 'balance_limit'
    replies[#replies + 1] = past
  elseif not status then
    stream_ids[#stream_ids + 1] = stream_id
    replies[#replies + 1] = 'missing'
    replies[#replies + 1] = 'missing'
  elseif this_call then
    stream_ids[#stream_ids + 1] = stream_id
    replies[#replies + 1] = 'settled'
    replies[#replies + 1] = ''
  elseif not settles then
    stream_ids[#stream_ids + 1] = stream_id
    replies[#replies + 1] = 'already'
    replies[#replies + 1] = status
  else
    stream_ids[#stream_ids + 1] = stream_id
    journal_deferred(KEYS[4], journal_pending, 'at', now, 'kind', 'settlement', 'debit', ARGV[4],
      'credit', ARGV[5], 'amount', value, 'ref', batch_id, 'status', 'completed', 'reason', '')
    redis.call('HSET', key, 'status', 'settled', 'fill_id', fill_id, 'settled_at', now,
      'last_error', '', 'settled_job', stream_id)
    if status == 'failed' then
      redis.call('ZREM', KEYS[5], batch_id)
    end
    redis.call('XADD', KEYS[6], '*', 'type', 'batch.settled',
      'ref', batch_id, 'amount', value, 'at', now, 'worker', worker)
    paid = paid + tonumber(value)
    settled = settled + 1
    replies[#replies + 1] = 'settled'
    replies[#replies + 1] = ''
  end
end

-- The balances move once for the whole group: the journal has each batch.
if settled > 0 then
  local total = string.format('%d', paid)
  redis.call('HINCRBY', KEYS[2], 'balance', '-' .. total)
  redis.call('HINCRBY', KEYS[3], 'balance', total)
  redis.call('HINCRBY', KEYS[8], 'batches_settled', settled)
end
index_journal(KEYS[7], journal_pending)
if #stream_ids > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(stream_ids))
end
return replies
