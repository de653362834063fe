-- promote_due_jobs: move jobs whose time has come from a schedule (sorted set
-- of job JSON by due time) onto their stream. Atomic, so any number of
-- workers and schedulers may run it at once without doubling a job.
--
-- KEYS[1] the schedule (sorted set)   KEYS[2] the stream jobs go to
-- ARGV[1] now, ms since the Unix epoch
-- ARGV[2] most jobs to move in one call
--
-- Returns the number of jobs moved.

local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, job in ipairs(due) do
  local fields = {}
  for name, value in pairs(cjson.decode(job)) do
    table.insert(fields, name)
    table.insert(fields, tostring(value))
  end
  redis.call('XADD', KEYS[2], '*', unpack(fields))
  redis.call('ZREM', KEYS[1], job)
end
return #due
