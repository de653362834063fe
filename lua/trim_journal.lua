-- trim_journal: drop journal entries older than the retention window, oldest
-- first, at most ARGV[2] per call. What they moved is added to the carried
-- sums first, so every balance still equals its journal in the audit.
--
-- KEYS[1] journal (stream)   KEYS[2] journal index (sorted set)
-- KEYS[3] carried sums (hash: account id -> cents, "kind:<kind>" -> cents)
-- KEYS[4] trim pauses (sorted set: audit token -> until, ms)
-- then the list of entries (sorted set) of each customer the entries are
--   listed for: what this call trims leaves their lists too
-- ARGV[1] the highest index member to trim (older than the retention
--   window; the caller read the entries up to it for the customers they
--   name)   ARGV[2] most entries per call
-- ARGV[3] now, ms since the Unix epoch   ARGV[4] this journal's shard
-- then the id of each customer whose list is given, in the same order
--
-- Returns the number of entries trimmed: 0 while an audit is reading the
-- journal (a pause until a time after now), since an entry moved to the
-- carried sums mid-audit would be missing from both of its reads.

if redis.call('ZCOUNT', KEYS[4], '(' .. ARGV[3], '+inf') > 0 then
  return 0
end

local lists = {}
for i = 5, #KEYS do
  lists[ARGV[i]] = KEYS[i]
end

local old = redis.call('ZRANGE', KEYS[2], '-', '[' .. ARGV[1], 'BYLEX', 'LIMIT', 0, ARGV[2])
for _, member in ipairs(old) do
  local dash = string.find(member, '-', 1, true)
  local ms = (string.gsub(string.sub(member, 1, dash - 1), '^0+(%d)', '%1'))
  local seq = (string.gsub(string.sub(member, dash + 1), '^0+(%d)', '%1'))
  local id = ms .. '-' .. seq
  local entries = redis.call('XRANGE', KEYS[1], id, id)
  if #entries == 1 then
    local fields, entry = entries[1][2], {}
    for i = 1, #fields, 2 do
      entry[fields[i]] = fields[i + 1]
    end
    if entry.amount ~= '0' then
      redis.call('HINCRBY', KEYS[3], entry.debit, '-' .. entry.amount)
      redis.call('HINCRBY', KEYS[3], entry.credit, entry.amount)
      redis.call('HINCRBY', KEYS[3], 'kind:' .. entry.kind, entry.amount)
    end
    local listed = member .. ':' .. ARGV[4]
    for _, account in ipairs({entry.debit, entry.credit}) do
      if lists[account] then
        redis.call('ZREM', lists[account], listed)
      end
    end
    redis.call('XDEL', KEYS[1], id)
  end
  redis.call('ZREM', KEYS[2], member)
end
return #old
