-- End a job that a worker holds, fenced: nothing happens unless the job is
-- still in that worker's own processing list. If the supervisor recovered it
-- meanwhile (the worker was stopped, or presumed dead), the job belongs to
-- someone else now and this worker's outcome is dropped: never two results.
--
-- KEYS[1] the worker's processing list
-- KEYS[2] result key                  KEYS[3] done key
-- KEYS[4] target key (delayed zset, dead-letter list or queue)
-- KEYS[5] the job's crash counter     KEYS[6] the job's stream (streaming jobs)
-- KEYS[7] the worker's queue, to take its next job from in the same round trip
-- KEYS[8] the queue's statistics hash (completed and failed, across hosts)
-- ARGV[1] the payload as it was taken
-- ARGV[2] result JSON, or "" to write none (a retry)
-- ARGV[3] done status: ok | failed
-- ARGV[4] ttl of result and done marker, seconds
-- ARGV[5] target operation: "" | zadd | lpush | rpush
-- ARGV[6] target member       ARGV[7] target score (zadd)
-- ARGV[8] last stream entry: "" | done | error     ARGV[9] its error text
-- ARGV[10] stream approximate maximum length
-- ARGV[11] "1": then take the next job of KEYS[7] into KEYS[1], as BLMOVE would
-- ARGV[12] the statistics field to count the job under: "" | completed | failed
-- Returns {1 if the job was ours else 0, the next job or nil}.
local function take_next()
  if ARGV[11] == '1' then
    return redis.call('LMOVE', KEYS[7], KEYS[1], 'RIGHT', 'LEFT')
  end
  return false
end
if redis.call('LREM', KEYS[1], -1, ARGV[1]) == 0 then
  return {0, take_next()}
end
if ARGV[2] ~= '' then
  redis.call('SET', KEYS[2], ARGV[2], 'EX', ARGV[4])
  redis.call('DEL', KEYS[3])
  redis.call('LPUSH', KEYS[3], ARGV[3])
  redis.call('EXPIRE', KEYS[3], ARGV[4])
  redis.call('DEL', KEYS[5])
end
local op = ARGV[5]
if op == 'zadd' then
  redis.call('ZADD', KEYS[4], ARGV[7], ARGV[6])
elseif op == 'lpush' then
  redis.call('LPUSH', KEYS[4], ARGV[6])
elseif op == 'rpush' then
  redis.call('RPUSH', KEYS[4], ARGV[6])
end
if ARGV[12] ~= '' then
  redis.call('HINCRBY', KEYS[8], ARGV[12], 1)
end
if ARGV[8] == 'done' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[10], '*', 'event', 'done')
  redis.call('EXPIRE', KEYS[6], ARGV[4])
elseif ARGV[8] == 'error' then
  redis.call('XADD', KEYS[6], 'MAXLEN', '~', ARGV[10], '*', 'event', 'error', 'error', ARGV[9])
  redis.call('EXPIRE', KEYS[6], ARGV[4])
end
return {1, take_next()}
