-- Move parked jobs of a queue back to its serving end (model affinity turned
-- off at a host's start, an operator's purge), ahead of the jobs queued, the
-- oldest parked served first, at most ``most`` of them per call so that a long backlog does not
-- hold Redis for long. Each job leaves its parked list and enters the queue
-- in this one script: it is always in exactly one list.
-- Returns how many moved (fewer than ``most``: none are left).
--
-- KEYS and ARGV, in the order of scripts.py's UnparkKeys and UnparkArgs:
local index = KEYS[1]           -- the queue's index of parked models (see park.lua)
local queue = KEYS[2]           -- the queue
local parked_prefix = ARGV[1]   -- a model's parked list is this and its label
local most = tonumber(ARGV[2])  -- the most jobs to move

local moved = 0
for _, model in ipairs(redis.call('ZRANGE', index, 0, -1)) do
  local list = parked_prefix .. model
  while moved < most do
    -- Newest first, each pushed past the last at the serving end: the oldest is served first.
    local entry = redis.call('LPOP', list)
    if not entry then break end
    redis.call('RPUSH', queue, string.sub(entry, string.find(entry, '|', 1, true) + 1))
    moved = moved + 1
  end
  if redis.call('LLEN', list) == 0 then redis.call('ZREM', index, model) end
  if moved >= most then break end
end
return moved
