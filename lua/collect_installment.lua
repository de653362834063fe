-- collect_installment: collect one leased installment of an advance, in one
-- atomic step. If the balance covers it, debit it to @bank (journaled) and
-- mark it paid; otherwise mark it failed and add its amount to the next
-- installment still scheduled, or to a new one a period after the last; an
-- advance that has as many installments as it may have (ARGV[8]) keeps the
-- failed one instead, due again a period after the last. Either way emit
-- the accounting event, drop the lease and acknowledge.
--
-- Without a lease (another delivery collected it already) nothing is
-- written but the acknowledgement.
--
-- KEYS[1] the advance (hash)        KEYS[2] the customer's account (hash)
-- KEYS[3] @bank account (hash)      KEYS[4] journal (stream)
-- KEYS[5] journal index (sorted set)   KEYS[6] accounting events (stream)
-- KEYS[7] leased installments (sorted set)   KEYS[8] due installments (sorted set)
-- KEYS[9] installment jobs (stream)   KEYS[10] the customer's journal entries (stream)
-- KEYS[11] the shard's repaid advances (sorted set: id by when repaid), which
--   retention reads
-- ARGV[1] "advance_id:n"   ARGV[2] n   ARGV[3] now, ms   ARGV[4] consumer group
-- ARGV[5] the job's stream id   ARGV[6] @bank's id   ARGV[7] worker name
-- ARGV[8] most installments an advance may have
--
-- Returns {"paid", amount} | {"failed", amount, carried_to_n} | {"skipped"}
-- (carried_to_n is n itself when the failed installment is due again)
--   | {"malformed", what}: the advance or the account lacks a field this
--     needs; nothing is written, and the worker dead-letters the job.
--   | {"balance_limit", account_id}: paying would take the customer or @bank
--     past BALANCE_LIMIT. Nothing is written: the installment stays
--     leased, as for "malformed", and the worker dead-letters the job with
--     the reason. When the lease expires the scheduler queues the
--     installment again, so it is collected once the balance is back in
--     range. It is not failed: the customer could pay, and carrying the
--     amount forward would blame them for the ledger's limit.

-- Journals an entry, and lists it on the customer's own entries.
local function journal_installment(...)
  index_on_accounts(KEYS[4], journal(KEYS[4], KEYS[5], ...), KEYS[10])
end

if not redis.call('ZSCORE', KEYS[7], ARGV[1]) then
  redis.call('XACK', KEYS[9], ARGV[4], ARGV[5])
  return {'skipped'}
end
local n = tonumber(ARGV[2])
local prefix = 'i' .. n .. ':'
local advance = redis.call('HMGET', KEYS[1], 'id', 'account_id', 'count', 'period_ms', prefix .. 'amount', prefix .. 'status')
local id, account_id, count, period, amount, status = advance[1], advance[2], tonumber(advance[3]), tonumber(advance[4]), advance[5], advance[6]
if status ~= 'scheduled' then
  redis.call('ZREM', KEYS[7], ARGV[1])
  redis.call('XACK', KEYS[9], ARGV[4], ARGV[5])
  return {'skipped'}
end
-- Read and check everything before the first write: Redis does not roll a
-- script back, and a lease dropped by a script that then failed would leave
-- the installment scheduled with nothing to collect it.
local balance = tonumber(redis.call('HGET', KEYS[2], 'balance'))
local dues = count and redis.call('HMGET', KEYS[1], 'i' .. count .. ':due', prefix .. 'due') or {}
local last_due, own_due = tonumber(dues[1]), tonumber(dues[2])
if not balance then
  return {'malformed', 'account ' .. tostring(account_id) .. ' has no balance'}
end
if not (id and account_id and tonumber(amount) and count and period and last_due and own_due) then
  return {'malformed', 'advance ' .. ARGV[1] .. ' lacks its id, account, amount, count, period or due times'}
end
local covered = balance >= tonumber(amount)
if covered then
  -- Both sides of the payment, before the first write: @bank takes every
  -- installment. The customer stays at or above zero; only a balance
  -- already past the limit (set by hand) stays past it.
  if not within_limit(balance - tonumber(amount)) then
    return {'balance_limit', account_id}
  end
  if not within_balance_limit(redis.call('HGET', KEYS[3], 'balance'), tonumber(amount)) then
    return {'balance_limit', ARGV[6]}
  end
end
redis.call('ZREM', KEYS[7], ARGV[1])
redis.call('XACK', KEYS[9], ARGV[4], ARGV[5])
local now = ARGV[3]

if covered then
  if amount ~= '0' then -- Redis refuses HINCRBY by "-0"
    redis.call('HINCRBY', KEYS[2], 'balance', '-' .. amount)
    redis.call('HINCRBY', KEYS[3], 'balance', amount)
  end
  journal_installment('at', now, 'kind', 'installment', 'debit', account_id,
    'credit', ARGV[6], 'amount', amount, 'ref', ARGV[1], 'status', 'completed', 'reason', '')
  redis.call('HSET', KEYS[1], prefix .. 'status', 'paid', prefix .. 'paid_at', now)
  -- Repaid once every cent is paid and nothing is left scheduled (so a
  -- scheduler never leases an installment of an advance retention took):
  -- from then on retention may take it.
  local paid = redis.call('HINCRBY', KEYS[1], 'paid', amount)
  local repaid = paid == tonumber(redis.call('HGET', KEYS[1], 'amount'))
  for other = 1, repaid and count or 0 do
    if redis.call('HGET', KEYS[1], 'i' .. other .. ':status') == 'scheduled' then
      repaid = false
      break
    end
  end
  if repaid then
    redis.call('HSET', KEYS[1], 'repaid_at', now)
    redis.call('ZADD', KEYS[11], now, id)
  end
  redis.call('XADD', KEYS[6], '*', 'type', 'installment.paid', 'ref', ARGV[1],
    'account_id', account_id, 'amount', amount, 'at', now, 'worker', ARGV[7])
  return {'paid', amount}
end

-- Not covered: carry the amount forward, to the first later installment
-- still scheduled (a later one may have been collected first when several
-- fell due together), or to a new one a period after the last.
local target
for later = n + 1, count do
  if redis.call('HGET', KEYS[1], 'i' .. later .. ':status') == 'scheduled' then
    target = later
    break
  end
end
if not target and count >= tonumber(ARGV[8]) then
  -- At the bound: this installment stays scheduled, with its amount, due a
  -- period after the last (itself, once it has been moved).
  local due = math.max(last_due, own_due) + period
  redis.call('HSET', KEYS[1], prefix .. 'due', string.format('%d', due))
  redis.call('ZADD', KEYS[8], due, ARGV[1])
  journal_installment('at', now, 'kind', 'installment', 'debit', account_id,
    'credit', ARGV[6], 'amount', '0', 'requested', amount, 'ref', ARGV[1], 'status', 'failed',
    'reason', 'insufficient funds; due again a period after the last installment')
  redis.call('XADD', KEYS[6], '*', 'type', 'installment.failed', 'ref', ARGV[1],
    'account_id', account_id, 'amount', amount, 'at', now, 'reason', 'insufficient funds', 'worker', ARGV[7])
  return {'failed', amount, tostring(n)}
end
if not target then
  count = count + 1
  target = count
  redis.call('HSET', KEYS[1], 'count', count, 'i' .. target .. ':amount', '0',
    'i' .. target .. ':due', string.format('%d', last_due + period), 'i' .. target .. ':status', 'scheduled')
  redis.call('ZADD', KEYS[8], last_due + period, id .. ':' .. target)
end
redis.call('HINCRBY', KEYS[1], 'i' .. target .. ':amount', amount)
redis.call('HSET', KEYS[1], prefix .. 'status', 'failed', prefix .. 'carried_to', target)
journal_installment('at', now, 'kind', 'installment', 'debit', account_id,
  'credit', ARGV[6], 'amount', '0', 'requested', amount, 'ref', ARGV[1], 'status', 'failed',
  'reason', 'insufficient funds; carried to installment ' .. target)
redis.call('XADD', KEYS[6], '*', 'type', 'installment.failed', 'ref', ARGV[1],
  'account_id', account_id, 'amount', amount, 'at', now, 'reason', 'insufficient funds', 'worker', ARGV[7])
return {'failed', amount, tostring(target)}
