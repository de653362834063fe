-- lease_due_installments: the scheduler's step. Due installments move from
-- the due set to the lease set (expiring at now + lease) and onto the
-- installments stream; installments whose lease expired (their worker died)
-- are leased again and queued again. Atomic, so any number of schedulers
-- may run it at once without doubling anything. A lease is the token a
-- worker needs to collect: `collect_installment.lua` removes it, so a second
-- delivery of the same installment finds no lease and does nothing.
--
-- While the collectors have jobs they have not read yet (they are down or
-- behind), an expired lease is only extended: its job is still on its way,
-- and queueing it again would add a duplicate every lease period for as long
-- as the backlog lasts. Once they have read everything, an expired lease
-- means its job was taken by a worker that died, and it is queued again.
--
-- KEYS[1] due installments (sorted set: "advance_id:n" by due ms)
-- KEYS[2] leased installments (sorted set: "advance_id:n" by lease expiry ms)
-- KEYS[3] installment jobs (stream)
-- ARGV[1] now, ms   ARGV[2] lease, ms   ARGV[3] most installments per call
-- ARGV[4] the collectors' consumer group
--
-- Returns {leased, re-leased, re-leased without a new job}

local now, lease, limit = tonumber(ARGV[1]), tonumber(ARGV[2]), ARGV[3]
local expiry = string.format('%d', now + lease)

-- Stream ids compared as Redis orders them: milliseconds, then sequence.
local function id_before(a, b)
  local a_ms, a_seq = string.match(a, '^(%d+)-(%d+)$')
  local b_ms, b_seq = string.match(b, '^(%d+)-(%d+)$')
  if a_ms ~= b_ms then
    return tonumber(a_ms) < tonumber(b_ms)
  end
  return tonumber(a_seq) < tonumber(b_seq)
end

-- True when the group has not read the stream's newest job.
local function jobs_unread()
  local newest = redis.call('XREVRANGE', KEYS[3], '+', '-', 'COUNT', 1)[1]
  if not newest then
    return false
  end
  for _, group in ipairs(redis.call('XINFO', 'GROUPS', KEYS[3])) do
    local info = {}
    for i = 1, #group, 2 do
      info[group[i]] = group[i + 1]
    end
    if info['name'] == ARGV[4] then
      return id_before(info['last-delivered-id'], newest[1])
    end
  end
  return true -- no collector has ever read the stream
end

local moved = {0, 0, 0}
-- Read before this call queues anything: its own new jobs are unread.
local expired = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', ARGV[1], 'LIMIT', 0, limit)
local requeue = #expired > 0 and not jobs_unread()
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, limit)
for _, member in ipairs(due) do
  redis.call('ZREM', KEYS[1], member)
  redis.call('ZADD', KEYS[2], expiry, member)
  redis.call('XADD', KEYS[3], '*', 'installment', member)
  moved[1] = moved[1] + 1
end
for _, member in ipairs(expired) do
  redis.call('ZADD', KEYS[2], expiry, member)
  if requeue then
    redis.call('XADD', KEYS[3], '*', 'installment', member)
    moved[2] = moved[2] + 1
  else
    moved[3] = moved[3] + 1
  end
end
return moved
