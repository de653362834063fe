-- delete_idle_consumers: forget the consumers of a group that hold no job and
-- have not read for a long time (a worker process that is gone: consumer
-- names carry the host and process id, so every restart adds new ones).
-- Atomic, so a consumer cannot take a job between the check and the delete:
-- XGROUP DELCONSUMER would make that job unclaimable. A live consumer that
-- is deleted anyway is made again by its next read.
--
-- KEYS[1] the stream
-- ARGV[1] consumer group   ARGV[2] least idle time, ms
-- ARGV[3] most consumers deleted in one call
--
-- Returns the number of consumers deleted.

local idle_min, deleted_max = tonumber(ARGV[2]), tonumber(ARGV[3])
local deleted = 0
for _, consumer in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
  if deleted >= deleted_max then
    break
  end
  local fields = {}
  for i = 1, #consumer, 2 do
    fields[consumer[i]] = consumer[i + 1]
  end
  if fields['pending'] == 0 and fields['idle'] >= idle_min then
    redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], fields['name'])
    deleted = deleted + 1
  end
end
return deleted
