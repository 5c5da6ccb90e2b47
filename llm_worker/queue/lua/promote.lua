-- Move retries that are due from the delayed set back to the serving end of
-- their queues. A member is "<queue>\n<payload>"; one without a queue cannot
-- be placed and goes to the dead-letter list rather than vanish.
-- Returns {the number moved, dead letters trimmed}.
--
-- KEYS and ARGV, in the order of scripts.py's PromoteKeys and PromoteArgs:
local delayed = KEYS[1]          -- the delayed set
local dead_letter = KEYS[2]      -- the dead-letter list
local trimmed = KEYS[3]          -- the counter of dead letters trimmed
local now_ms = ARGV[1]           -- now, ms since the epoch
local most = ARGV[2]             -- the most members to move
local raw_keep = tonumber(ARGV[3])  -- the bytes of a member that a dead letter keeps
local entry_template = ARGV[4]   -- the dead letter of a member that names no queue (templates.py)
local keep = tonumber(ARGV[5])   -- the most dead letters kept (QUEUE_REMOVE_ON_FAIL); 0: all

local due = redis.call('ZRANGEBYSCORE', delayed, '-inf', now_ms, 'LIMIT', 0, most)
local pushed = false
for _, member in ipairs(due) do
  local nl = string.find(member, '\n', 1, true)
  if nl and nl > 1 then
    redis.call('RPUSH', string.sub(member, 1, nl - 1), string.sub(member, nl + 1))
  else
    redis.call('LPUSH', dead_letter, fill(entry_template, {raw = json_bytes(member, raw_keep)}))
    pushed = true
  end
  redis.call('ZREM', delayed, member)
end
local cut = 0
if pushed then cut = trim_dead_letters(dead_letter, keep, trimmed) end
return {#due, cut}
