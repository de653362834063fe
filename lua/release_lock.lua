-- release_lock: drop a lock only if this holder still holds it (a lock that
-- ran out may already be someone else's).
--
-- KEYS[1] the lock (string: holder token)
-- ARGV[1] the holder's token
--
-- Returns 1 when released, 0 when the lock was not this holder's.

if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
  return 1
end
return 0
