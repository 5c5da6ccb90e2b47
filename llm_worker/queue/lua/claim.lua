-- Claim a model for this host before loading it for a job no host holds
-- (model affinity): the claim lasts until the host's published holdings
-- say it holds the model. Another host's live claim wins.
-- Returns 1 if the claim is this host's now, else 0.
--
-- KEYS and ARGV, in the order of scripts.py's ClaimKeys and ClaimArgs:
local claim = KEYS[1]   -- the model's claim
local host = ARGV[1]    -- this host (WORKER_ID)
local claim_ms = ARGV[2]  -- how long the claim lasts

local holder = redis.call('GET', claim)
if holder and holder ~= host then return 0 end
redis.call('SET', claim, host, 'PX', claim_ms)
return 1
