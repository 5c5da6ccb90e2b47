-- Run before every script (scripts.py): the JSON helpers the scripts share, and
-- the bound of the dead-letter list.

-- A template that Python rendered (templates.py) with its slots filled: each
-- slot, the JSON string "\u0001<name>", becomes values[name], JSON text.
local function fill(template, values)
  return (string.gsub(template, '"\\u0001(%a+)"', values))
end

-- A value read from a payload, as JSON text: a string as itself, anything else null.
local function json_string_or_null(value)
  if type(value) == 'string' then return cjson.encode(value) end
  return 'null'
end

-- Keep the newest `keep` entries of the dead-letter list `list` (QUEUE_REMOVE_ON_FAIL;
-- 0: keep all), in the script that pushed, and add what is cut to the counter
-- `trimmed`. Returns how many entries were cut.
local function trim_dead_letters(list, keep, trimmed)
  if keep <= 0 then return 0 end
  local over = redis.call('LLEN', list) - keep
  if over <= 0 then return 0 end
  redis.call('LTRIM', list, 0, keep - 1)
  redis.call('INCRBY', trimmed, over)
  return over
end

-- Bytes as a JSON string, cut to `most` bytes. They may not be UTF-8: bytes
-- above 0x7F are escaped (\u00XX) so that the JSON stays valid.
local function json_bytes(bytes, most)
  return (string.gsub(cjson.encode(string.sub(bytes, 1, most)), '[\128-\255]',
    function(c) return string.format('\\u%04x', string.byte(c)) end))
end

