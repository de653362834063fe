-- begin_attempts: a worker is about to call the exchange for the batches of
-- one read. For each, count the attempt if the batch is still settling;
-- otherwise acknowledge its job, which another delivery already ended.
-- One call for the whole read saves a round trip and a script run per batch.
--
-- KEYS[1] settle jobs (stream)
-- then KEYS[1 + i] the i-th job's batch (hash)
-- ARGV[1] consumer group
-- then ARGV[1 + i] the i-th settle job's stream id
--
-- Returns two strings per job, in order:
--   "go", attempts          the attempt is counted: call the exchange
--   "skipped", status       the job is acknowledged ("missing" for no batch)

if #KEYS < 2 or #ARGV ~= #KEYS then
  return redis.error_reply('begin_attempts: expected one batch key and one stream id per job')
end

local replies = {}
local acknowledged = {}
for i = 2, #KEYS do
  local status = redis.call('HGET', KEYS[i], 'status')
  if status == 'settling' then
    replies[#replies + 1] = 'go'
    replies[#replies + 1] = tostring(redis.call('HINCRBY', KEYS[i], 'attempts', 1))
  else
    acknowledged[#acknowledged + 1] = ARGV[i]
    replies[#replies + 1] = 'skipped'
    replies[#replies + 1] = status or 'missing'
  end
end
if #acknowledged > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(acknowledged))
end
return replies
