-- Move retries that are due from the delayed set back to the serving end of
-- their queues. A member is "<queue>\n<payload>"; one without a queue cannot
-- be placed and goes to the dead-letter list rather than vanish.
--
-- KEYS[1] delayed zset   KEYS[2] dead-letter list
-- ARGV[1] now, ms since the epoch   ARGV[2] most to move   ARGV[3] now, ISO 8601
-- Returns the number moved.
local due = redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', ARGV[1], 'LIMIT', 0, ARGV[2])
for _, member in ipairs(due) do
  local nl = string.find(member, '\n', 1, true)
  if nl and nl > 1 then
    redis.call('RPUSH', string.sub(member, 1, nl - 1), string.sub(member, nl + 1))
  else
    -- Escape high bytes: the member may not be UTF-8, the entry must stay valid JSON.
    local entry = string.gsub(cjson.encode({raw = string.sub(member, 1, 65536),
      error = 'delayed entry names no queue', errorType = 'validation', queue = KEYS[1],
      failedAt = ARGV[3]}), '[\128-\255]', function(c) return string.format('\\u%04x', string.byte(c)) end)
    redis.call('LPUSH', KEYS[2], entry)
  end
  redis.call('ZREM', KEYS[1], member)
end
return #due
