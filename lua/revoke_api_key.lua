-- revoke_api_key: mark a key revoked. The record stays (for `keys list` and
-- for the log of who did what); every API process refuses the key once its
-- cached copy runs out (TALLY_API_KEY_CACHE_MS, at most 1 s).
--
-- KEYS[1] the key's record (hash)
-- ARGV[1] now, ms since the Unix epoch
--
-- Returns one of
--   {"revoked", revoked_at}
--   {"revoked", revoked_at}        already revoked: the first time stands
--   {"refused", "not_found"}

local revoked_at = redis.call('HGET', KEYS[1], 'revoked_at')
if not revoked_at then
  return {'refused', 'not_found'}
end
if revoked_at ~= '0' then
  return {'revoked', revoked_at}
end
redis.call('HSET', KEYS[1], 'revoked_at', ARGV[1])
return {'revoked', ARGV[1]}
