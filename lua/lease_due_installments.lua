-- lease_due_installments: the scheduler's step. Due installments move from
-- the due set to the lease set (expiring at now + lease) and onto the
-- installments stream; installments whose lease expired (their worker died)
-- are leased again and queued again. Atomic, so any number of schedulers
-- may run it at once without doubling anything. A lease is the token a
-- worker needs to collect: `collect_installment.lua` removes it, so a second
-- delivery of the same installment finds no lease and does nothing.
--
-- KEYS[1] due installments (sorted set: "advance_id:n" by due ms)
-- KEYS[2] leased installments (sorted set: "advance_id:n" by lease expiry ms)
-- KEYS[3] installment jobs (stream)
-- ARGV[1] now, ms   ARGV[2] lease, ms   ARGV[3] most installments per call
--
-- Returns {leased, re-leased}

local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local expiry = string.format('%d', now + lease)
local moved = {0, 0}
local sets = {
  {KEYS[1], 1},  -- due for the first time
  {KEYS[2], 2},  -- lease expired
}
for _, set in ipairs(sets) do
  local members = redis.call('ZRANGEBYSCORE', set[1], '-inf', ARGV[1], 'LIMIT', 0, limit)
  for _, member in ipairs(members) do
    redis.call('ZREM', KEYS[1], member)
    redis.call('ZADD', KEYS[2], expiry, member)
    redis.call('XADD', KEYS[3], '*', 'installment', member)
    moved[set[2]] = moved[set[2]] + 1
  end
end
return moved
