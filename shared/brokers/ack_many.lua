-- dramatiq's own ack (its dispatch.lua, "ack"), for many messages of one queue in one call: each id leaves
-- this worker's ack set and, if it was there, the queue's message hash; the worker's heartbeat is refreshed
-- as dispatch.lua does on every call.
-- KEYS: ack set, message hash, heartbeats; ARGV: timestamp, worker id, message ids...
redis.call("zadd", KEYS[3], ARGV[1], ARGV[2])
local acked = 0
for i = 3, #ARGV do
    if redis.call("srem", KEYS[1], ARGV[i]) > 0 then
        redis.call("hdel", KEYS[2], ARGV[i])
        acked = acked + 1
    end
end
return acked
