-- End a job that a worker holds, fenced: nothing happens unless the job is
-- still in that worker's own processing list. If the supervisor recovered it
-- meanwhile (the worker was stopped, or presumed dead), the job belongs to
-- someone else now and this worker's outcome is dropped: never two results.
-- Returns {1 if the job was ours else 0, the next job or nil, dead letters trimmed}.
--
-- KEYS and ARGV, in the order of scripts.py's FinishKeys and FinishArgs:
local processing = KEYS[1]     -- the worker's processing list
local result_key = KEYS[2]     -- the job's result
local done_key = KEYS[3]       -- the job's done marker
local target = KEYS[4]         -- the delayed set, the dead-letter list or a queue
local crashes = KEYS[5]        -- the job's crash counter
local stream = KEYS[6]         -- the job's chunk stream (streaming jobs)
local queue = KEYS[7]          -- the worker's queue, to take its next job from in the same round trip
local stats = KEYS[8]          -- the queue's statistics hash (completed and failed, across hosts)
local trimmed = KEYS[9]        -- the counter of dead letters trimmed (when target is the dead-letter list)
local payload = ARGV[1]        -- the job as it was taken
local result_json = ARGV[2]    -- its result, or "" to write none (a retry)
local done_status = ARGV[3]    -- what the done marker says: ok | failed
local ttl = ARGV[4]            -- seconds the result, the done marker and the stream are kept
local target_op = ARGV[5]      -- what to do with target: "" | zadd | lpush | rpush
local target_member = ARGV[6]  -- what to add to target
local target_score = ARGV[7]   -- its score (zadd)
local stream_maxlen = ARGV[8]  -- the stream's approximate maximum length
local take_next = ARGV[9] == '1'  -- then take the next job of queue into processing, as BLMOVE would
local counted = ARGV[10]       -- the statistics field to count the job under: "" | completed | failed
local keep = tonumber(ARGV[11])  -- the most entries target keeps after an lpush (QUEUE_REMOVE_ON_FAIL); 0: all
local stream_end = {unpack(ARGV, 12)}  -- the stream's last entry, field and value pairs; none for no entry

local function take_next_job()
  if take_next then
    return redis.call('LMOVE', queue, processing, 'RIGHT', 'LEFT')
  end
  return false
end
if redis.call('LREM', processing, -1, payload) == 0 then
  return {0, take_next_job(), 0}
end
if result_json ~= '' then
  redis.call('SET', result_key, result_json, 'EX', ttl)
  redis.call('DEL', done_key)
  redis.call('LPUSH', done_key, done_status)
  redis.call('EXPIRE', done_key, ttl)
  redis.call('DEL', crashes)
end
local cut = 0
if target_op == 'zadd' then
  redis.call('ZADD', target, target_score, target_member)
elseif target_op == 'lpush' then
  redis.call('LPUSH', target, target_member)
  cut = trim_dead_letters(target, keep, trimmed)
elseif target_op == 'rpush' then
  redis.call('RPUSH', target, target_member)
end
if counted ~= '' then
  redis.call('HINCRBY', stats, counted, 1)
end
if #stream_end > 0 then
  redis.call('XADD', stream, 'MAXLEN', '~', stream_maxlen, '*', unpack(stream_end))
  redis.call('EXPIRE', stream, ttl)
end
return {1, take_next_job(), cut}
