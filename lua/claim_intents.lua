-- claim_intents: a sweeper takes up to ARGV[2] sagas (orders or transfers)
-- left unfinished past their takeover time, and moves their takeover time on
-- by its lease, so that another sweeper leaves them alone meanwhile.
-- Finishing them is safe twice anyway (each later step is recorded once and
-- answers a second run as the first).
--
-- KEYS[1] intents (sorted set: order or transaction id by takeover time, ms)
-- ARGV[1] now, ms   ARGV[2] most sagas to take   ARGV[3] the lease, ms
--
-- Returns the ids taken.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[3])
local leased = {}
for _, id in ipairs(due) do
  leased[#leased + 1] = string.format('%d', until_ms)
  leased[#leased + 1] = id
end
call_chunked('ZADD', KEYS[1], leased, 2)
return due
