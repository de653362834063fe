-- retire_orders: orders of a finished batch leave Redis, once the archive has
-- them (src/retention.rs): each order's hash goes, with its entry on its
-- customer's list of orders, and the shard's archive files' new lengths are
-- committed in the same atomic step. Their money stays counted: the journal
-- (and its carried sums) holds what they paid.
--
-- KEYS[1] the shard's archive lock (string: holder token)
-- KEYS[2] the shard's committed archive lengths (hash: day -> bytes)
-- then 2 keys per order: the order (hash), its customer's list of orders (stream)
-- ARGV[1] the lock's token   ARGV[2] F, archive files written
-- then F pairs: the file's day, its new length
-- then 2 arguments per order: its id, its customer's id
--
-- Returns the number of orders removed, or, writing nothing:
--   -2 when the lock is not the caller's any more (it ran out)
--   -3 when an order is missing or not the one named (the caller archived
--      something else)
--
-- Safe to run twice: once its file lengths are committed, the same call
-- answers as it did, writing nothing.

local files = tonumber(ARGV[2])
local count = (#KEYS - 2) / 2
if count ~= math.floor(count) or #ARGV ~= 2 + 2 * files + 2 * count then
  return redis.error_reply('retire_orders: expected 2 keys and 2 arguments per order, 2 arguments per file')
end
if archive_step_committed(KEYS[2], 2, files) then
  return count
end
if not holds_archive_lock(KEYS[1], ARGV[1]) then
  return -2
end
local first = 2 + 2 * files
local listed = {}
for i = 1, count do
  local order = redis.call('HMGET', KEYS[1 + 2 * i], 'id', 'account_id', 'listed')
  if order[1] ~= ARGV[first + 2 * i - 1] or order[2] ~= ARGV[first + 2 * i] then
    return -3
  end
  listed[i] = order[3]
end

for i = 1, count do
  redis.call('DEL', KEYS[1 + 2 * i])
  if listed[i] then
    redis.call('XDEL', KEYS[2 + 2 * i], listed[i])
  end
end
commit_archive_lengths(KEYS[2], 2, files)
return count
