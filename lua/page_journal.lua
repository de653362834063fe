-- page_journal: one shard's part of a page of the journal report, newest
-- first, inside a snapshot window, in one atomic read: O(log N + count)
-- however deep the page (the report merges the shards' parts).
--
-- KEYS[1] the shard's journal index (sorted set of zero-padded entry ids, scores all 0)
-- ARGV[1] lowest member in the window (inclusive)
-- ARGV[2] highest member in the window (inclusive): the shard's newest at the snapshot
-- ARGV[3] where this page starts, as a ZRANGE BYLEX bound ('[member' or
--         '(member'), at or below the window's highest
-- ARGV[4] most members to return
--
-- Returns {total_in_window, member, member, ...}, newest first.

local low = '[' .. ARGV[1]
local total = redis.call('ZLEXCOUNT', KEYS[1], low, '[' .. ARGV[2])
local result = {total}
if total == 0 then
  return result
end
local members = redis.call('ZRANGE', KEYS[1], ARGV[3], low, 'BYLEX', 'REV', 'LIMIT', 0, tonumber(ARGV[4]))
for _, member in ipairs(members) do
  result[#result + 1] = member
end
return result
