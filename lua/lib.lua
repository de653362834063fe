-- lib.lua: helpers shared by every script. It is prepended to each script
-- when the script is built (src/store/mod.rs, `lua_script!`), since Redis
-- scripts cannot load one another.

-- The journal index member of a stream id: zero-padded, so that text order
-- is id order (the report pages through the index by rank).
local function journal_index_member(id)
  local dash = string.find(id, '-', 1, true)
  local ms, seq = string.sub(id, 1, dash - 1), string.sub(id, dash + 1)
  -- Padded as text: no round trip through Lua's floating-point numbers.
  return string.rep('0', 13 - #ms) .. ms .. '-' .. string.rep('0', 10 - #seq) .. seq
end

-- What an Idempotency-Key stored at `key` says about a request with this
-- fingerprint: nil when the key is new (or none was given), else the reply:
-- {"replayed", id} for the same request, {"refused", "idempotency_conflict", id}
-- for another. Keys store "id fingerprint".
local function idempotency_reply(key, fingerprint)
  if fingerprint == '' then
    return nil
  end
  local prior = redis.call('GET', key)
  if not prior then
    return nil
  end
  local space = string.find(prior, ' ', 1, true)
  local prior_id = string.sub(prior, 1, space - 1)
  if string.sub(prior, space + 1) == fingerprint then
    return {'replayed', prior_id}
  end
  return {'refused', 'idempotency_conflict', prior_id}
end

-- Writes a journal entry and indexes it for the report; returns its id.
local function journal(journal_key, index_key, ...)
  local entry = redis.call('XADD', journal_key, '*', ...)
  redis.call('ZADD', index_key, 0, journal_index_member(entry))
  return entry
end

-- The shard of a key, from its hash tag: `{s<shard>}` or `{s<shard>.<n>}`
-- (src/store/keys.rs, src/store/slots.rs).
local function shard_of_key(key)
  return string.match(key, '^tally:{s(%d+)')
end

-- Lists a journal entry on each customer's list of entries given: a stream
-- per customer, which the console's account page pages through. Each list
-- entry names the journal entry and its journal's shard: on a standalone
-- Redis, a transfer between shards is one entry on the payer's shard,
-- listed for the payee too. (An XADD with `*` cannot fail, so a script may
-- list after its first write.) trim_journal trims the lists by time.
local function index_on_accounts(journal_key, entry, ...)
  local shard = shard_of_key(journal_key)
  for i = 1, select('#', ...) do
    redis.call('XADD', (select(i, ...)), '*', 'entry', entry, 'shard', shard)
  end
end

-- For scripts that journal many entries in one run: writes the entry and
-- keeps its index member in `pending`; `index_journal` then indexes them all
-- in one ZADD before the script returns. The script is atomic, so no reader
-- sees an entry that is not yet indexed. Returns the entry's id.
local function journal_deferred(journal_key, pending, ...)
  local entry = redis.call('XADD', journal_key, '*', ...)
  pending[#pending + 1] = 0
  pending[#pending + 1] = journal_index_member(entry)
  return entry
end

-- The largest balance, either way, a script keeps exact: Lua compares
-- balances as doubles, exact to 2^53 - 1 cents, and HINCRBY fails past 2^63
-- after the other side of a move was already written. Every script that
-- moves money (create_account, create_advance, transfer, place_orders,
-- refund_batch, finish_batches, collect_installment,
-- apply_wallet_transaction) checks both sides of each move, customer and
-- system account alike, before its first write, and refuses a move that
-- would take either past it: a system account (@bank above all) collects
-- every customer's moves, so no per-request bound keeps it in range.
--
-- A sum computed in doubles is exact while it stays within the limit, and
-- rounding keeps order, so a sum past it still compares past it: the
-- comparisons below are exact for any balance and amount below 2^53.
local BALANCE_LIMIT = 9007199254740991

-- True when `cents` (a number) is within BALANCE_LIMIT either way.
local function within_limit(cents)
  return cents <= BALANCE_LIMIT and cents >= -BALANCE_LIMIT
end

-- True when `balance` (text, nil for none) moved by `delta` cents stays
-- within BALANCE_LIMIT.
local function within_balance_limit(balance, delta)
  return within_limit(tonumber(balance or '0') + delta)
end

-- Arguments per variadic call: unpack() is bounded by Lua's C stack.
local UNPACK_CHUNK_MAX = 1000

-- Runs `command key ...values` once per chunk of values (RPUSH, ZADD, HSET:
-- commands that take any number of values). `per_item` values make one
-- item (2 for ZADD's score and member), so a chunk never splits one.
local function call_chunked(command, key, values, per_item)
  assert(per_item >= 1 and per_item <= UNPACK_CHUNK_MAX, 'call_chunked: bad per_item')
  local chunk = UNPACK_CHUNK_MAX - UNPACK_CHUNK_MAX % per_item
  for first = 1, #values, chunk do
    redis.call(command, key, unpack(values, first, math.min(first + chunk - 1, #values)))
  end
end

-- Indexes the entries `journal_deferred` wrote into `pending`.
local function index_journal(index_key, pending)
  call_chunked('ZADD', index_key, pending, 2)
end


-- Rate limits (GCRA, the generic cell rate algorithm). A bucket is one
-- number, its theoretical arrival time (TAT, microseconds on Redis's own
-- clock): when it would be full again if nothing more came. Takes up to
-- `want` tokens, at most a quarter of the burst at once (a process leases
-- them: src/access/rate_limit.rs), and returns granted, retry_after_us:
-- granted > 0 and 0, or 0 and how long until one token is free.
local RATE_LEASE_SHARE_OF_BURST = 4

local function redis_now_us()
  local time = redis.call('TIME')
  return tonumber(time[1]) * 1000000 + tonumber(time[2])
end

local function gcra_take(bucket_key, interval, burst, want, now)
  want = math.min(want, math.max(1, math.floor(burst / RATE_LEASE_SHARE_OF_BURST)))
  local tat = tonumber(redis.call('GET', bucket_key) or '0') or 0
  if tat < now then
    tat = now
  end
  -- A full bucket has TAT = now; each token taken moves it one interval on.
  local available = math.floor((now + burst * interval - tat) / interval)
  local granted = math.min(want, available)
  if granted < 1 then
    return 0, tat + interval - burst * interval - now
  end
  tat = tat + granted * interval
  redis.call('SET', bucket_key, string.format('%d', tat), 'PX', math.ceil((tat - now) / 1000) + 1)
  return granted, 0
end

-- The order saga's last step (finish_orders.lua, and debit_orders.lua for
-- the finishes it carries): each order admitted to its bucket records the
-- epoch it joined, and its intent is dropped so no sweeper takes it up.
-- Writes only what is missing. `first_key` and `first_arg` are where the
-- orders' keys (one each) and arguments (order id, epoch) start.
-- Returns the number of intents dropped.
local function finish_admitted_orders(intents_key, count, first_key, first_arg)
  local ids = {}
  for i = 1, count do
    local order = KEYS[first_key + i - 1]
    local a = first_arg + 2 * (i - 1)
    if redis.call('EXISTS', order) == 1 then
      redis.call('HSETNX', order, 'epoch', ARGV[a + 1])
    end
    ids[#ids + 1] = ARGV[a]
  end
  local dropped = 0
  for first = 1, #ids, UNPACK_CHUNK_MAX do
    dropped = dropped + redis.call('ZREM', intents_key,
      unpack(ids, first, math.min(first + UNPACK_CHUNK_MAX - 1, #ids)))
  end
  return dropped
end

-- For the scripts that remove what the archive has (src/retention.rs): true
-- while the caller still holds the shard's archive lock.
local function holds_archive_lock(lock_key, token)
  return redis.call('GET', lock_key) == token
end

-- Commits the archive files' new lengths a step wrote: `files` pairs of
-- ARGV (the file's day, its length) after ARGV[before]. The same atomic step
-- removes what those bytes hold, so a file's committed length never counts
-- a record Redis still has, nor misses one it forgot.
local function commit_archive_lengths(committed_key, before, files)
  for i = 1, files do
    redis.call('HSET', committed_key, ARGV[before + 2 * i - 1], ARGV[before + 2 * i])
  end
end

-- True when the archive files' lengths a step wrote (as for
-- `commit_archive_lengths`) are committed already: this very step ran, since
-- each step grows its files and a committed length only grows. A second run
-- (a cluster client's resend of a call whose reply was lost) then answers as
-- the first did, writing nothing.
local function archive_step_committed(committed_key, before, files)
  if files == 0 then
    return false
  end
  for i = 1, files do
    if redis.call('HGET', committed_key, ARGV[before + 2 * i - 1]) ~= ARGV[before + 2 * i] then
      return false
    end
  end
  return true
end
