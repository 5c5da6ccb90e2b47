-- Park a job its worker will not run now (model affinity): from the worker's
-- processing list to the end of its model's parked list, for a host that holds
-- the model. Fenced like every finish: nothing happens unless the job is still
-- in that worker's list, so a job is always in exactly one list. An entry is
-- "<ms parked>|<payload>", the time read from Redis's clock (every host reads
-- the same one), so the oldest parked job's age is known without decoding it.
-- Returns 1 if parked, 0 if the job was no longer ours.
--
-- KEYS and ARGV, in the order of scripts.py's ParkKeys and ParkArgs:
local processing = KEYS[1]  -- the worker's processing list
local parked = KEYS[2]      -- the model's parked list (of this queue)
local index = KEYS[3]       -- the queue's index of parked models: model -> when its oldest job was parked (ms)
local payload = ARGV[1]     -- the job as it was taken
local model = ARGV[2]       -- its model's label

if redis.call('LREM', processing, -1, payload) == 0 then return 0 end
local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('LPUSH', parked, now_ms .. '|' .. payload)
redis.call('ZADD', index, 'NX', now_ms, model)
return 1
