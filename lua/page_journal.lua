-- page_journal: one page of the journal report, newest first, inside a
-- snapshot window, in one atomic read. Ranks in the index make any page cost
-- O(log N + page size): page 200 costs what page 1 does.
--
-- KEYS[1] journal index (sorted set of zero-padded entry ids, scores all 0)
-- ARGV[1] lowest member in the window (inclusive)
-- ARGV[2] highest member in the window (inclusive): the snapshot's newest
-- ARGV[3] offset from the newest, in entries   ARGV[4] page size
--
-- Returns {total_in_window, member, member, ...}

local low, high = '[' .. ARGV[1], '[' .. ARGV[2]
local total = redis.call('ZLEXCOUNT', KEYS[1], low, high)
-- Entries above the window (newer than the snapshot) come first in reverse rank order.
local above = redis.call('ZLEXCOUNT', KEYS[1], '(' .. ARGV[2], '+')
local offset, size = tonumber(ARGV[3]), tonumber(ARGV[4])
local result = {total}
if offset >= total then
  return result
end
local last = math.min(offset + size, total) - 1
local members = redis.call('ZRANGE', KEYS[1], above + offset, above + last, 'REV')
for _, member in ipairs(members) do
  result[#result + 1] = member
end
return result
