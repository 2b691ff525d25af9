"""The Redis directory's atomic operations, one Lua script each (see relay/directory/redis.py
for the data model they maintain).

Every script takes the key prefix ``P`` in ARGV and builds the keys of *other* instances
(their lease, index and lost list) from the entry it read. That keeps each operation one round
trip, and it is why the directory runs on a single Redis (or Sentinel), not on Redis Cluster.

An entry is **alive** when its owner's lease key holds the lease token written in the entry.
An entry without a ``lease`` field was written by a relay of the older per-entry-TTL layout
(during a rolling upgrade): it carries its own TTL, so it counts as alive while it exists.
"""

from __future__ import annotations

__all__ = ["AUDIT", "CLEAR_INSTANCE", "HEARTBEAT", "LOOKUP", "PRUNE", "REGISTER", "SWEEP",
           "UNREGISTER"]

# KEYS[1] = own index, KEYS[2] = own lease, KEYS[3] = instance set, KEYS[4..n+3] = entries
# ARGV = instance, url, lease token, ttl_ms, mode, P, epochs.., hosts..
# Returns one 1 (written) or 0 (left alone) per host, then 1 if our lease was live, 0 if this
# call had to recreate it (it had lapsed or Redis lost it: the caller must resync).
# 'force' (a new tunnel): last write wins. 'reclaim' (rewriting what we hold after Redis lost
# it): only where the entry is gone, dead, or still ours, so we never steal a host that moved.
REGISTER = """
local n = #KEYS - 3
local me, url, token, ttl, mode, p = ARGV[1], ARGV[2], ARGV[3], tonumber(ARGV[4]), ARGV[5], ARGV[6]
local lease_ok = redis.call('GET', KEYS[2]) == token
if not lease_ok then
  redis.call('SET', KEYS[2], token, 'PX', ttl)
  redis.call('SADD', KEYS[3], me)
end
local results = {}
for i = 1, n do
  local key, epoch, host = KEYS[i + 3], ARGV[6 + i], ARGV[6 + n + i]
  local stored = redis.call('HMGET', key, 'instance', 'epoch', 'lease')
  local owner, stored_epoch, stored_lease = stored[1], stored[2], stored[3]
  local alive = false
  if owner then
    alive = (not stored_lease) or redis.call('GET', p .. 'lease:' .. owner) == stored_lease
  end
  local write = mode ~= 'reclaim' or (not alive) or stored_epoch == epoch
  if write then
    if owner and owner ~= me then
      redis.call('SREM', p .. 'instance:' .. owner, host)
      if alive and stored_lease then
        -- Tell the live owner, at its next heartbeat, that its tunnel is now stale.
        local lost = p .. 'lost:' .. owner
        redis.call('RPUSH', lost, host, stored_epoch)
        redis.call('PEXPIRE', lost, ttl)
      end
    end
    redis.call('DEL', key)
    redis.call('HSET', key, 'instance', me, 'url', url, 'epoch', epoch, 'lease', token)
    redis.call('SADD', KEYS[1], host)
    results[i] = 1
  else
    results[i] = 0
  end
end
results[n + 1] = lease_ok and 1 or 0
return results
"""

# KEYS[1] = own index, KEYS[2..n+1] = entries; ARGV = epochs.., hosts..
# Deletes each entry only if it still carries the given epoch. Returns 1/0 per host.
UNREGISTER = """
local n = #KEYS - 1
local results = {}
for i = 1, n do
  local key, epoch, host = KEYS[i + 1], ARGV[i], ARGV[n + i]
  if redis.call('HGET', key, 'epoch') == epoch then
    redis.call('DEL', key)
    redis.call('SREM', KEYS[1], host)
    results[i] = 1
  else
    results[i] = 0
  end
end
return results
"""

# KEYS[1] = own lease, KEYS[2] = own lost list, KEYS[3] = own index, KEYS[4] = instance set
# ARGV = lease token, ttl_ms, max lost pairs to return, instance
# Returns {status, index size, lost pairs still queued, {host, epoch, host, epoch, ...}} where
# status is 'renewed' (the lease was live), 'recreated' (it had lapsed or Redis lost it) or
# 'conflict' (another process with our instance id holds it). A fixed handful of commands,
# whatever the number of tunnels: this is what makes the directory cost O(relays).
HEARTBEAT = """
local token, ttl, me = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local current = redis.call('GET', KEYS[1])
local status = 'renewed'
if current == token then
  redis.call('PEXPIRE', KEYS[1], ttl)
else
  status = current and 'conflict' or 'recreated'
  redis.call('SET', KEYS[1], token, 'PX', ttl)
  redis.call('SADD', KEYS[4], me)
end
local max = 2 * tonumber(ARGV[3])
local lost = redis.call('LRANGE', KEYS[2], 0, max - 1)
local queued = 0
if #lost > 0 then
  redis.call('LTRIM', KEYS[2], max, -1)
  queued = redis.call('LLEN', KEYS[2]) / 2
end
return {status, redis.call('SCARD', KEYS[3]), queued, lost}
"""

# KEYS[1] = entry; ARGV = P, host. Returns {instance, url, epoch} or nil.
# An entry whose owner's lease is gone (crashed relay) or belongs to an older run of the same
# instance id (restarted relay) reads as offline and is deleted on the spot: the lazy sweep.
LOOKUP = """
local e = redis.call('HMGET', KEYS[1], 'instance', 'url', 'epoch', 'lease')
if not e[1] then
  return nil
end
if (not e[4]) or redis.call('GET', ARGV[1] .. 'lease:' .. e[1]) == e[4] then
  return {e[1], e[2], e[3]}
end
redis.call('DEL', KEYS[1])
redis.call('SREM', ARGV[1] .. 'instance:' .. e[1], ARGV[2])
return nil
"""

# KEYS[1] = own index, KEYS[2] = own lease, KEYS[3] = own lost list, KEYS[4] = instance set
# ARGV = instance, P, new lease token ('' = release: drop the lease), ttl_ms
# Deletes every entry the index names that this instance id still owns (whatever run wrote it),
# then the index and lost list; at start-up it writes the new run's lease, at release it drops
# it. Returns how many entries were deleted.
CLEAR_INSTANCE = """
local me, p, token = ARGV[1], ARGV[2], ARGV[3]
local deleted = 0
for _, host in ipairs(redis.call('SMEMBERS', KEYS[1])) do
  local key = p .. 'host:' .. host
  if redis.call('HGET', key, 'instance') == me then
    redis.call('DEL', key)
    deleted = deleted + 1
  end
end
redis.call('DEL', KEYS[1], KEYS[3])
if token ~= '' then
  redis.call('SET', KEYS[2], token, 'PX', tonumber(ARGV[4]))
  redis.call('SADD', KEYS[4], me)
else
  redis.call('DEL', KEYS[2])
  redis.call('SREM', KEYS[4], me)
end
return deleted
"""

# KEYS[1] = instance set; ARGV = P, own instance, batch, sample
# Looks at up to `sample` random instances (every relay sweeps, so a dead one is found soon;
# a bounded sample keeps the fleet's sweeping O(relays), not O(relays²)). For each whose lease
# is gone, pops up to `batch` members (in total) from its index and deletes those entries it
# still owns; forgets an instance once its index is empty.
# Returns {entries deleted, 1 if dead entries remain among those looked at, else 0}.
SWEEP = """
local p, me, budget = ARGV[1], ARGV[2], tonumber(ARGV[3])
local removed, more = 0, 0
for _, inst in ipairs(redis.call('SRANDMEMBER', KEYS[1], tonumber(ARGV[4]))) do
  if inst ~= me and redis.call('EXISTS', p .. 'lease:' .. inst) == 0 then
    local index = p .. 'instance:' .. inst
    if budget > 0 then
      local hosts = redis.call('SPOP', index, budget)
      budget = budget - #hosts
      for _, host in ipairs(hosts) do
        local key = p .. 'host:' .. host
        local e = redis.call('HMGET', key, 'instance', 'lease')
        if e[1] == inst and e[2] then
          redis.call('DEL', key)
          removed = removed + 1
        end
      end
    end
    if redis.call('SCARD', index) == 0 then
      redis.call('SREM', KEYS[1], inst)
      redis.call('DEL', p .. 'lost:' .. inst)
    else
      more = 1
    end
  end
end
return {removed, more}
"""

# KEYS[1..n] = entries; ARGV = epochs.., hosts.. Read-only.
# Returns {missing hosts, taken hosts}: gone from Redis, or carrying another epoch.
AUDIT = """
local n = #KEYS
local missing, taken = {}, {}
for i = 1, n do
  local stored = redis.call('HGET', KEYS[i], 'epoch')
  if not stored then
    missing[#missing + 1] = ARGV[n + i]
  elseif stored ~= ARGV[i] then
    taken[#taken + 1] = ARGV[n + i]
  end
end
return {missing, taken}
"""

# KEYS[1] = own index, KEYS[2..n+1] = entries; ARGV = instance, keep epochs.., hosts..
# Index members this relay no longer holds: deletes the entry when it is ours and does not
# carry the epoch to keep, and drops the member from the index. Returns how many were dropped.
PRUNE = """
local n = #KEYS - 1
local dropped = 0
for i = 1, n do
  local key, keep, host = KEYS[i + 1], ARGV[1 + i], ARGV[1 + n + i]
  local e = redis.call('HMGET', key, 'instance', 'epoch')
  if e[1] == ARGV[1] and e[2] == keep then
    -- registered again meanwhile: keep it
  else
    if e[1] == ARGV[1] then
      redis.call('DEL', key)
    end
    redis.call('SREM', KEYS[1], host)
    dropped = dropped + 1
  end
end
return dropped
"""
