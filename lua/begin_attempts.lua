-- begin_attempts: a worker is about to call the exchange for the batches of
-- one read. For each, count the attempt if the batch is still settling;
-- otherwise acknowledge its job, which another delivery already ended.
-- One call for the whole read saves a round trip and a script run per batch.
--
-- Safe to run twice: each call carries a token for its attempts, kept on the
-- batch, so the same call run again (its reply lost, the call sent again)
-- counts nothing more and answers as it did.
--
-- KEYS[1] settle jobs (stream)
-- then KEYS[1 + i] the i-th job's batch (hash)
-- ARGV[1] consumer group    ARGV[2] this call's attempt token
-- then ARGV[2 + i] the i-th settle job's stream id
--
-- Returns two strings per job, in order:
--   "go", attempts          the attempt is counted: call the exchange
--   "skipped", status       the job is acknowledged ("missing" for no batch)

if #KEYS < 2 or #ARGV ~= #KEYS + 1 then
  return redis.error_reply('begin_attempts: expected one batch key and one stream id per job')
end

local token = ARGV[2]
local replies = {}
local acknowledged = {}
for i = 2, #KEYS do
  local batch = redis.call('HMGET', KEYS[i], 'status', 'attempt_token', 'attempts')
  local status = batch[1]
  if status == 'settling' then
    replies[#replies + 1] = 'go'
    if batch[2] == token then
      replies[#replies + 1] = batch[3]
    else
      redis.call('HSET', KEYS[i], 'attempt_token', token)
      replies[#replies + 1] = tostring(redis.call('HINCRBY', KEYS[i], 'attempts', 1))
    end
  else
    acknowledged[#acknowledged + 1] = ARGV[i + 1]
    replies[#replies + 1] = 'skipped'
    replies[#replies + 1] = status or 'missing'
  end
end
if #acknowledged > 0 then
  redis.call('XACK', KEYS[1], ARGV[1], unpack(acknowledged))
end
return replies
