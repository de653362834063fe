-- finish_orders: the order saga's last step, on the customers' shard, for
-- orders whose next debit call did not carry it (an idle shard, a sweeper):
-- each order admitted to its bucket (admit_orders.lua) records the epoch it
-- joined, and its intent is dropped, so no sweeper takes it up again. Writes
-- only what is missing: safe to run twice, and for orders already finished.
--
-- KEYS[1] order intents (sorted set)
-- then KEYS[1 + i] the i-th order (hash)
-- ARGV: two per order, at offset a = 2 * (i - 1): a+1 order id, a+2 epoch
--
-- Returns the number of intents dropped.

local count = #KEYS - 1
if #ARGV ~= 2 * count then
  return redis.error_reply('finish_orders: expected one order key and two arguments per order')
end
return finish_admitted_orders(KEYS[1], count, 2, 1)
