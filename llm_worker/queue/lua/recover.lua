-- Hand back the jobs of a worker that is gone, atomically, so that two
-- supervisors recovering the same worker cannot both requeue a job.
-- Jobs go to the serving (right) end of their queue, oldest served first.
-- A job that has now been in hand of JOB_MAX_CRASHES dead workers is
-- dead-lettered with errorType "crashed", and its failure result written.
-- Returns {requeued, dead_lettered, dead letters trimmed}, or {-1, 0, 0} when
-- the worker is alive.
--
-- KEYS and ARGV, in the order of scripts.py's RecoverKeys and RecoverArgs:
local processing = KEYS[1]       -- the dead worker's processing list
local queue = KEYS[2]            -- its queue
local dead_letter = KEYS[3]      -- the dead-letter list
local events = KEYS[4]           -- the events stream
local heartbeat = KEYS[5]        -- the dead worker's heartbeat key
local registry = KEYS[6]         -- the worker registry hash
local stats = KEYS[7]            -- the queue's statistics hash
local trimmed = KEYS[8]          -- the counter of dead letters trimmed
local count_crash = ARGV[1] == '1'  -- count a crash; else hand back only (QUIT, drain timeout)
local max_crashes = tonumber(ARGV[2])  -- JOB_MAX_CRASHES
local only_if_expired = ARGV[3] == '1'  -- only if the heartbeat key has expired (another host's worker)
local worker_id = ARGV[4]        -- the dead worker's id
local max_job_bytes = tonumber(ARGV[5])  -- MAX_JOB_BYTES: a larger payload is not decoded (it would
                                         -- block Redis), only an id that leads it is read, as workers do
local raw_keep = tonumber(ARGV[6])  -- the bytes of a payload that is not JSON that a dead letter keeps
local result_prefix = ARGV[7]    -- a job's result key: this, then its id
local done_prefix = ARGV[8]      -- a job's done marker: this, then its id
local crashes_prefix = ARGV[9]   -- a job's crash counter: this, then its id (or its payload's SHA-1)
local result_ttl = ARGV[10]      -- seconds a result and its done marker are kept
local crash_counter_ttl = ARGV[11]  -- seconds a crash counter is kept
local events_maxlen = ARGV[12]   -- the events stream's approximate maximum length
local done_status = ARGV[13]     -- what the done marker of a dead-lettered job says
local counted = ARGV[14]         -- the statistics field it is counted under
local reason_format = ARGV[15]   -- its reason; %d: the crashes counted
local result_template = ARGV[16]  -- its failure result (templates.py's CrashTemplates, with the slots)
local entry_template = ARGV[17]  -- its dead letter, when the payload is JSON
local raw_entry_template = ARGV[18]  -- its dead letter, when it is not
local event_template = ARGV[19]  -- the data of its events
local failed_event = ARGV[20]    -- the type of the first event
local dead_lettered_event = ARGV[21]  -- the type of the second
local keep = tonumber(ARGV[22])  -- the most dead letters kept (QUEUE_REMOVE_ON_FAIL); 0: all

if only_if_expired and redis.call('EXISTS', heartbeat) == 1 then
  return {-1, 0, 0}
end
local requeued, dead = 0, 0
while true do
  local raw = redis.call('LPOP', processing)
  if not raw then break end
  local job, id = nil, nil
  if #raw > max_job_bytes then
    id = string.match(string.sub(raw, 1, 4096), '^%s*{%s*"id"%s*:%s*"([%w._:%-]+)"')
  else
    local ok, value = pcall(cjson.decode, raw)
    if ok and type(value) == 'table' then job = value end
    id = job and type(job['id']) == 'string' and job['id'] or nil
  end
  -- Only an id a worker would accept (JOB_ID) gets a result key.
  if id and (#id > 128 or not string.match(id, '^[%w._:%-]+$')) then id = nil end
  local crashes = 0
  if count_crash then
    local counter = crashes_prefix .. (id or redis.sha1hex(raw))
    crashes = redis.call('INCR', counter)
    redis.call('EXPIRE', counter, crash_counter_ttl)
  end
  if count_crash and crashes >= max_crashes then
    local slots = {reason = cjson.encode(string.format(reason_format, crashes)),
      attempts = cjson.encode(crashes), id = id and cjson.encode(id) or 'null'}
    if job then
      slots.job = raw
      redis.call('LPUSH', dead_letter, fill(entry_template, slots))
    else
      slots.raw = json_bytes(raw, raw_keep)
      redis.call('LPUSH', dead_letter, fill(raw_entry_template, slots))
    end
    redis.call('HINCRBY', stats, counted, 1)
    if id then
      local fields = job or {}  -- an oversized payload's fields are not read
      slots.model = json_string_or_null(fields['model'])
      slots.correlation = json_string_or_null(fields['correlationId'])
      slots.retries = cjson.encode(tonumber(fields['retryCount']) or 0)
      redis.call('SET', result_prefix .. id, fill(result_template, slots), 'EX', result_ttl)
      local done = done_prefix .. id
      redis.call('DEL', done)
      redis.call('LPUSH', done, done_status)
      redis.call('EXPIRE', done, result_ttl)
    end
    local data = fill(event_template, slots)
    redis.call('XADD', events, 'MAXLEN', '~', events_maxlen, '*', 'type', failed_event, 'data', data)
    redis.call('XADD', events, 'MAXLEN', '~', events_maxlen, '*', 'type', dead_lettered_event, 'data', data)
    dead = dead + 1
  else
    redis.call('RPUSH', queue, raw)
    requeued = requeued + 1
  end
end
local cut = 0
if dead > 0 then cut = trim_dead_letters(dead_letter, keep, trimmed) end
redis.call('DEL', heartbeat)
redis.call('HDEL', registry, worker_id)
return {requeued, dead, cut}
