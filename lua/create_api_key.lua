-- create_api_key: store a new API key's record (never its secret: only the
-- keyed hash of it) and index it for listing.
--
-- KEYS[1] the key's record (hash)
-- KEYS[2] every key by creation time (sorted set)
-- ARGV[1] key id              ARGV[2] role
-- ARGV[3] bound account id, or "" for none
-- ARGV[4] secret hash (hex HMAC-SHA256)
-- ARGV[5] now, ms since the Unix epoch
-- ARGV[6] expiry, ms since the Unix epoch, or "0" for none
-- ARGV[7] label, or ""
-- ARGV[8] reads per second, or "0" for the server's default
-- ARGV[9] writes per second, or "0" for the server's default
--
-- Returns {"created", key_id}.

-- Safe to run twice: an id is random, so a record with this id means this
-- very call ran already; answer as it did, writing nothing.
if redis.call('EXISTS', KEYS[1]) == 1 then
  return {'created', ARGV[1]}
end
redis.call('HSET', KEYS[1], 'id', ARGV[1], 'role', ARGV[2], 'account', ARGV[3],
  'secret_hash', ARGV[4], 'created_at', ARGV[5], 'expires_at', ARGV[6],
  'revoked_at', '0', 'label', ARGV[7], 'reads_per_s', ARGV[8], 'writes_per_s', ARGV[9])
redis.call('ZADD', KEYS[2], ARGV[5], ARGV[1])
return {'created', ARGV[1]}
