-- release_wallet_account: a worker is done with an account for now. If its
-- queue is empty, clear the "on the stream" flag; otherwise put the account
-- back on the stream (behind the others, for fairness). Then acknowledge the
-- job. One atomic step, so an account is never on the stream twice, and
-- never left with a queue but off the stream.
--
-- KEYS[1] the account's queue (list)   KEYS[2] the account's "on the stream" flag
-- KEYS[3] wallet jobs (stream)
-- ARGV[1] consumer group   ARGV[2] the job's stream id   ARGV[3] account id
--
-- Returns {"released"} | {"requeued"}

if redis.call('XACK', KEYS[3], ARGV[1], ARGV[2]) == 0 then
  -- Another delivery of this job (taken over while this one ran) already
  -- released the account: requeueing again would put it on the stream twice.
  return {'released'}
end
if redis.call('LLEN', KEYS[1]) == 0 then
  redis.call('DEL', KEYS[2])
  return {'released'}
end
redis.call('XADD', KEYS[3], '*', 'account_id', ARGV[3])
return {'requeued'}
