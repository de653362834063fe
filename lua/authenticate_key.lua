-- authenticate_key: read an API key's record and, if the presented secret
-- matches it and the key is live, take rate-limit tokens for the request's
-- class, in one round trip. A process calls it only when it holds no
-- trusted copy of the record (none yet, or a key was revoked since it read
-- it: src/access/mod.rs), so a busy key costs no round trip of its own.
-- Rust checks the record again (the secret in constant time) before it
-- trusts it; this script's check only decides whether to take tokens, so a
-- caller who knows a key's id but not its secret cannot drain its bucket.
--
-- KEYS[1] the key's record (hash)
-- KEYS[2] the key's bucket for this class (string: GCRA TAT, µs)
-- ARGV[1] hex HMAC of the presented secret
-- ARGV[2] the record's field with the key's own limit (reads_per_s or writes_per_s)
-- ARGV[3] the server's limit per second for the class, used when the key has none
-- ARGV[4] burst, in seconds' worth of the limit
-- ARGV[5] tokens wanted; 0 only reads the record (the process has a token
--         in hand, or a refusal, and only needs the record again)
--
-- Returns one of
--   {"missing"}
--   {"checked", granted, retry_after_us, field, value, field, value, ...}
--     granted 0 and retry_after_us 0 when nothing was wanted, or when the
--     secret, revocation or expiry did not pass: nothing was taken.

local default_per_s, burst_s, want = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5])
if not default_per_s or default_per_s < 1 or not burst_s or burst_s < 1 or not want or want < 0 then
  return redis.error_reply('authenticate_key: bad arguments')
end
local fields = redis.call('HGETALL', KEYS[1])
if #fields == 0 then
  return {'missing'}
end
local record = {}
for i = 1, #fields, 2 do
  record[fields[i]] = fields[i + 1]
end
local now = redis_now_us()
local expires_at = tonumber(record['expires_at'] or '0') or 0
local live = record['secret_hash'] == ARGV[1] and record['revoked_at'] == '0'
  and (expires_at == 0 or now < expires_at * 1000)
local granted, retry_after = 0, 0
if live and want > 0 then
  local per_s = tonumber(record[ARGV[2]] or '0') or 0
  if per_s < 1 then
    per_s = default_per_s
  end
  -- Rounded up: a limit is never looser than asked.
  local interval = math.ceil(1000000 / per_s)
  granted, retry_after = gcra_take(KEYS[2], interval, per_s * burst_s, want, now)
end
local reply = {'checked', granted, retry_after}
for i = 1, #fields do
  reply[#reply + 1] = fields[i]
end
return reply
