-- Hand back the jobs of a worker that is gone, atomically, so that two
-- supervisors recovering the same worker cannot both requeue a job.
-- Jobs go to the serving (right) end of their queue, oldest served first.
-- A job that has now been in hand of JOB_MAX_CRASHES dead workers is
-- dead-lettered with errorType "crashed", and its failure result written.
--
-- KEYS[1] the dead worker's processing list   KEYS[2] its queue
-- KEYS[3] dead-letter list                    KEYS[4] events stream
-- KEYS[5] the dead worker's heartbeat key     KEYS[6] the worker registry hash
-- ARGV[1] "1" to count a crash, "0" to hand back only (QUIT, drain timeout)
-- ARGV[2] JOB_MAX_CRASHES      ARGV[3] key prefix     ARGV[4] now, ISO 8601
-- ARGV[5] dead worker id       ARGV[6] result ttl, s  ARGV[7] events maxlen
-- ARGV[8] "1": only if the heartbeat key has expired (another host's worker)
-- ARGV[9] crash counter ttl, s
-- ARGV[10] MAX_JOB_BYTES: a larger payload is not decoded (it would block Redis),
--          only an id that leads it is read, as the workers do
-- Returns {requeued, dead_lettered}, or {-1, 0} when the worker is alive.
if ARGV[8] == '1' and redis.call('EXISTS', KEYS[5]) == 1 then
  return {-1, 0}
end
local requeued, dead = 0, 0
while true do
  local raw = redis.call('LPOP', KEYS[1])
  if not raw then break end
  local job, id = nil, nil
  if #raw > tonumber(ARGV[10]) then
    id = string.match(string.sub(raw, 1, 4096), '^%s*{%s*"id"%s*:%s*"([%w._:%-]+)"')
  else
    local ok, value = pcall(cjson.decode, raw)
    if ok and type(value) == 'table' then job = value end
    id = job and type(job['id']) == 'string' and job['id'] or nil
  end
  -- Only an id a worker would accept (JOB_ID) gets a result key.
  if id and (#id > 128 or not string.match(id, '^[%w._:%-]+$')) then id = nil end
  local crashes = 0
  if ARGV[1] == '1' then
    local counter = ARGV[3] .. 'crashes:' .. (id or redis.sha1hex(raw))
    crashes = redis.call('INCR', counter)
    redis.call('EXPIRE', counter, ARGV[9])
  end
  if ARGV[1] == '1' and crashes >= tonumber(ARGV[2]) then
    local reason = 'job was in hand of ' .. crashes .. ' workers that died (JOB_MAX_CRASHES ' .. ARGV[2] .. ')'
    local entry = cjson.encode({queue = KEYS[2], error = reason, errorType = 'crashed',
      failedAt = ARGV[4], attempts = crashes, workerId = ARGV[5]})
    if job then
      entry = '{"job":' .. raw .. ',' .. string.sub(entry, 2)
    else
      -- Not JSON, so maybe not UTF-8 either: escape high bytes so the entry stays valid JSON.
      local text = string.gsub(cjson.encode(string.sub(raw, 1, 65536)), '[\128-\255]',
        function(c) return string.format('\\u%04x', string.byte(c)) end)
      entry = '{"raw":' .. text .. ',' .. string.sub(entry, 2)
    end
    redis.call('LPUSH', KEYS[3], entry)
    redis.call('HINCRBY', ARGV[3] .. 'stats:' .. KEYS[2], 'failed', 1)
    local str = function(v) if type(v) == 'string' then return v end return cjson.null end
    if id then
      local fields = job or {}  -- an oversized payload's fields are not read
      local model = str(fields['model'])
      local result = cjson.encode({jobId = id, success = false, response = cjson.null,
        error = reason, errorType = 'crashed', processingTime = 0, queueTime = cjson.null,
        model = model, requestedModel = model, tokensUsed = cjson.null,
        promptTokens = cjson.null, completionTokens = cjson.null,
        retryCount = tonumber(fields['retryCount']) or 0, fallbackUsed = false, cacheHit = false,
        workerId = ARGV[5], correlationId = str(fields['correlationId']), completedAt = ARGV[4]})
      redis.call('SET', ARGV[3] .. 'result:' .. id, result, 'EX', ARGV[6])
      local done = ARGV[3] .. 'done:' .. id
      redis.call('DEL', done)
      redis.call('LPUSH', done, 'failed')
      redis.call('EXPIRE', done, ARGV[6])
    end
    local data = cjson.encode({jobId = id or cjson.null, workerId = ARGV[5], timestamp = ARGV[4],
      queue = KEYS[2], error = reason, errorType = 'crashed', attempts = crashes})
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'type', 'llm.request.failed', 'data', data)
    redis.call('XADD', KEYS[4], 'MAXLEN', '~', ARGV[7], '*', 'type', 'llm.request.dead_lettered', 'data', data)
    dead = dead + 1
  else
    redis.call('RPUSH', KEYS[2], raw)
    requeued = requeued + 1
  end
end
redis.call('DEL', KEYS[5])
redis.call('HDEL', KEYS[6], ARGV[5])
return {requeued, dead}
