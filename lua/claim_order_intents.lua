-- claim_order_intents: a sweeper takes up to ARGV[2] orders whose saga was
-- left unfinished (debited, and not known to be admitted) past their
-- takeover time, and moves their takeover time on by its lease, so that
-- another sweeper leaves them alone meanwhile. Finishing them is safe twice
-- anyway (admission is marked, finishing writes only what is missing).
--
-- KEYS[1] order intents (sorted set: order id by takeover time, ms)
-- ARGV[1] now, ms   ARGV[2] most orders to take   ARGV[3] the lease, ms
--
-- Returns the order ids taken.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, tonumber(ARGV[2]))
local until_ms = tonumber(ARGV[1]) + tonumber(ARGV[3])
local leased = {}
for _, id in ipairs(due) do
  leased[#leased + 1] = string.format('%d', until_ms)
  leased[#leased + 1] = id
end
call_chunked('ZADD', KEYS[1], leased, 2)
return due
