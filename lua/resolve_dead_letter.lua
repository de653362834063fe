-- resolve_dead_letter: an operator replays a dead-lettered job (it goes back
-- on its job stream, as a new entry, and leaves the dead-letter stream) or
-- discards it (it leaves the dead-letter stream; the operator log keeps the
-- reason). One atomic step: a job is never both replayed and still dead.
--
-- A dead accounting event keeps its event (the JSON body it was sent with,
-- field `event`): replayed, it goes back with its fields, `event_id`
-- included, so the receiver can tell a redelivery. Another dead job keeps
-- its own fields, plus `stream_id`, `error` and `worker`, which are left out.
--
-- The letter leaves the dead-letter stream for the shard's resolved letters
-- (a stream), with how it was resolved; retention archives those after
-- TALLY_RECORD_RETENTION, so no dead letter leaves Redis unarchived.
--
-- KEYS[1] the dead-letter stream   KEYS[2] its job stream
-- KEYS[3] this entry's resolution (string, expiring)
-- KEYS[4] the shard's resolved dead letters (stream)
-- ARGV[1] the dead-letter entry's id   ARGV[2] "replay" | "discard"
-- ARGV[3] how long the resolution is remembered, seconds
-- ARGV[4] the dead-letter stream's kind (settle, wallet, installments, events)
--
-- Returns {"replayed", new entry id} | {"discarded", ""}
--       | {"refused", "missing", ""} (no such dead letter)
--       | {"refused", "bad_entry", why} (a replay of an event that is not JSON)
--
-- Safe to run twice: the resolution is remembered, and the same call run
-- again answers as the first did, writing nothing.

local remembered = redis.call('GET', KEYS[3])
if remembered then
  local verdict, detail = string.match(remembered, '^(%S+) ?(.*)$')
  return {verdict, detail}
end
local action = ARGV[2]
if action ~= 'replay' and action ~= 'discard' then
  return redis.error_reply('resolve_dead_letter: the action is replay or discard')
end
local found = redis.call('XRANGE', KEYS[1], ARGV[1], ARGV[1])
if #found == 0 then
  return {'refused', 'missing', ''}
end
local fields = found[1][2]
local answer
if action == 'replay' then
  local job = {}
  local event
  for i = 1, #fields, 2 do
    if fields[i] == 'event' then
      event = fields[i + 1]
    end
  end
  if event then
    local ok, decoded = pcall(cjson.decode, event)
    if not ok or type(decoded) ~= 'table' then
      return {'refused', 'bad_entry', 'the event is not a JSON object'}
    end
    for name, value in pairs(decoded) do
      if type(value) ~= 'string' then
        return {'refused', 'bad_entry', 'the event field ' .. name .. ' is not a string'}
      end
      job[#job + 1] = name
      job[#job + 1] = value
    end
  else
    for i = 1, #fields, 2 do
      local name = fields[i]
      if name ~= 'stream_id' and name ~= 'error' and name ~= 'worker' then
        job[#job + 1] = name
        job[#job + 1] = fields[i + 1]
      end
    end
  end
  if #job == 0 then
    return {'refused', 'bad_entry', 'the dead letter holds no job'}
  end
  local id = redis.call('XADD', KEYS[2], '*', unpack(job))
  answer = {'replayed', id}
else
  answer = {'discarded', ''}
end
local resolved = {'resolved_stream', ARGV[4], 'resolved_letter', ARGV[1],
  'resolution', answer[1], 'replayed_as', answer[2]}
for i = 1, #fields, 2 do
  resolved[#resolved + 1] = fields[i]
  resolved[#resolved + 1] = fields[i + 1]
end
redis.call('XADD', KEYS[4], '*', unpack(resolved))
redis.call('XDEL', KEYS[1], ARGV[1])
redis.call('SET', KEYS[3], answer[1] .. ' ' .. answer[2], 'EX', tonumber(ARGV[3]))
return answer
