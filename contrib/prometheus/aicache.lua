-- aicache's INFO fields as Prometheus metrics, for redis_exporter's -script
-- option (Debian's prometheus-redis-exporter 1.45 does not read module INFO
-- sections itself):
--
--   prometheus-redis-exporter -script /path/to/contrib/prometheus/aicache.lua
--
-- Every numeric field of `INFO aicache` (all of the module's sections) comes
-- out as redis_script_values{key="<field name>"}, e.g.
-- redis_script_values{key="aicache_hits"} 42. Nothing is listed by name, so
-- fields a newer module adds are exported without editing this file.
-- A field whose value is `k=v,k=v` (how Redis prints a dict field) gives one
-- metric per numeric pair, named <field>_<k>.
--
-- The exporter evaluates this with EVAL on every scrape; it reads no keys,
-- so a monitoring user needs only +eval and +info (see redis.conf.example).

-- Go's strconv.ParseFloat must accept every value returned: one value it
-- refuses makes the exporter drop every script metric of that scrape. Lua's
-- tonumber is looser (hex, surrounding spaces), so decimals are matched
-- by pattern instead, and the text is passed on untouched (exact integers).
local function is_decimal(v)
  local mantissa = v:match("^(.-)[eE][-+]?%d+$") or v
  return mantissa:match("^[-+]?%d+%.?%d*$") ~= nil
      or mantissa:match("^[-+]?%.%d+$") ~= nil
end

local function collect(text)
  local out = {}
  local function emit(name, value)
    out[#out + 1] = name
    out[#out + 1] = value
  end
  for line in text:gmatch("[^\r\n]+") do
    if line:sub(1, 1) ~= "#" then
      local name, value = line:match("^([^:]+):(.*)$")
      if name then
        if is_decimal(value) then
          emit(name, value)
        else
          for k, v in value:gmatch("([^,=]+)=([^,]*)") do
            if is_decimal(v) then
              emit(name .. "_" .. k, v)
            end
          end
        end
      end
    end
  end
  return out
end

return collect(redis.call("INFO", "aicache"))
