-- Run before every script (scripts.py): the JSON helpers the scripts share.

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

-- Bytes as a JSON string, cut to `most` bytes. They may not be UTF-8: bytes
-- above 0x7F are escaped (\u00XX) so that the JSON stays valid.
local function json_bytes(bytes, most)
  return (string.gsub(cjson.encode(string.sub(bytes, 1, most)), '[\128-\255]',
    function(c) return string.format('\\u%04x', string.byte(c)) end))
end

