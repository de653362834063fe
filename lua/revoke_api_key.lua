-- revoke_api_key: mark a key revoked, and move its shard's revocation epoch
-- on so that every API process (which watches the sum over the shards)
-- drops its cached records at its next read of it (a few times a second; it
-- stops trusting them within TALLY_API_KEY_CACHE_MS, at most 1 s, if it
-- cannot read it). The record stays, for `keys list`.
--
-- KEYS[1] the key's record (hash)
-- KEYS[2] the revocation epoch of the key's shard (string: a counter)
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
redis.call('INCR', KEYS[2])
return {'revoked', ARGV[1]}
