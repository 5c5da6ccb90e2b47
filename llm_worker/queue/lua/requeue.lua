-- Move one dead letter back to its queue, atomically: it leaves the
-- dead-letter list only as it enters the queue, and the job's old result,
-- done marker and crash counter go, so a producer waiting afresh does not
-- read the old answer. Returns 1 if moved, 0 if the entry was gone.
--
-- KEYS and ARGV, in the order of scripts.py's RequeueKeys and RequeueArgs:
local dead_letter = KEYS[1]  -- the dead-letter list
local queue = KEYS[2]        -- the job's queue
local result_key = KEYS[3]   -- the job's result
local done_key = KEYS[4]     -- its done marker
local crashes = KEYS[5]      -- its crash counter
local entry = ARGV[1]        -- the dead letter, as it is in the list
local payload = ARGV[2]      -- the job to queue

if redis.call('LREM', dead_letter, 1, entry) == 0 then return 0 end
redis.call('LPUSH', queue, payload)
redis.call('DEL', result_key, done_key, crashes)
return 1
