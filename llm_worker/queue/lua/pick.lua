-- Take a parked job (model affinity) into a worker's processing list, as a
-- BLMOVE would leave it: the oldest job parked longer than the wait bound
-- first, whatever its model (no job waits on affinity past it); then the
-- oldest job of a model this host holds with a free slot ("hot"); then, when
-- the host can load a model without evicting a busy one, the oldest job of a
-- model no other host holds or claims ("cold"), claimed for this host so
-- that two hosts do not load it for the same jobs.
-- Returns {payload, model, why, ms it was parked} or, when nothing was taken,
-- {the number of models with parked jobs}.
--
-- KEYS and ARGV, in the order of scripts.py's PickKeys and PickArgs:
local processing = KEYS[1]        -- the worker's processing list
local index = KEYS[2]             -- the queue's index of parked models (see park.lua)
local parked_prefix = ARGV[1]     -- a model's parked list is this and its label
local claim_prefix = ARGV[2]      -- a model's claim is this and its label
local max_wait_ms = tonumber(ARGV[3])  -- MODEL_AFFINITY_MAX_WAIT
local host = ARGV[4]              -- this host (WORKER_ID), the claim's value
local claim_ms = ARGV[5]          -- how long a claim lasts
local cold = ARGV[6] == '1'       -- whether this host has room to load a model for a parked job
local hot_count = tonumber(ARGV[7])  -- how many of the models are hot; the rest are held by other hosts
local models = {unpack(ARGV, 8)}  -- hot models, most free slots first; then the models other hosts hold

local t = redis.call('TIME')
local now_ms = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)

local function parked_at(entry)
  return tonumber(string.sub(entry, 1, string.find(entry, '|', 1, true) - 1))
end

local function take(model, why)
  local list = parked_prefix .. model
  local entry = redis.call('RPOP', list)
  if not entry then
    redis.call('ZREM', index, model)
    return nil
  end
  local payload = string.sub(entry, string.find(entry, '|', 1, true) + 1)
  redis.call('LPUSH', processing, payload)
  local next_entry = redis.call('LINDEX', list, -1)
  if next_entry then
    redis.call('ZADD', index, parked_at(next_entry), model)
  else
    redis.call('ZREM', index, model)
  end
  return {payload, model, why, now_ms - parked_at(entry)}
end

local oldest = redis.call('ZRANGE', index, 0, 0, 'WITHSCORES')
if oldest[1] and now_ms - tonumber(oldest[2]) >= max_wait_ms then
  local got = take(oldest[1], 'overdue')
  if got then return got end
end
local skip = {}
for i, model in ipairs(models) do
  skip[model] = true
  if i <= hot_count and redis.call('ZSCORE', index, model) then
    local got = take(model, 'hot')
    if got then return got end
  end
end
if cold then
  for _, model in ipairs(redis.call('ZRANGE', index, 0, -1)) do
    if not skip[model] then
      local claim = claim_prefix .. model
      local holder = redis.call('GET', claim)
      if not holder or holder == host then
        redis.call('SET', claim, host, 'PX', claim_ms)
        local got = take(model, 'cold')
        if got then return got end
      end
    end
  end
end
return {redis.call('ZCARD', index)}
