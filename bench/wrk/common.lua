-- Shared by the scenario scripts: thread numbering and seeding, a monotonic clock,
-- percentiles, and wrk's summary as one JSON line for bench/run.py.
local ffi = require("ffi")
ffi.cdef [[
typedef struct { long tv_sec; long tv_nsec; } bench_timespec;
int clock_gettime(int clk_id, bench_timespec *tp);
]]
local CLOCK_MONOTONIC = 1
local ts = ffi.new("bench_timespec")

-- Microseconds on the monotonic clock (wrk's Lua has no sub-second wall clock).
function now_us()
  ffi.C.clock_gettime(CLOCK_MONOTONIC, ts)
  return tonumber(ts.tv_sec) * 1000000 + math.floor(tonumber(ts.tv_nsec) / 1000)
end

-- Main state: every thread gets a number (1..N), and done() can read their globals.
threads = {}
function setup(thread)
  table.insert(threads, thread)
  thread:set("thread_id", #threads)
end

-- Thread state: without a seed of its own every thread would draw the same
-- sequence (LuaJIT's fixed default seed), all users hitting the same product in step.
function init(args)
  math.randomseed(7919 * (thread_id or 0) + 17)
end

-- Nearest-rank percentile of a sorted array (0 when empty).
function percentile(sorted, p)
  local n = #sorted
  if n == 0 then
    return 0
  end
  local rank = math.ceil(p / 100 * n)
  if rank < 1 then
    rank = 1
  end
  return sorted[rank]
end

-- extra: a table of numbers added to the JSON line (closed-loop counters).
function report(summary, latency, extra)
  local fields = {
    string.format('"requests":%d', summary.requests),
    string.format('"duration_us":%d', summary.duration),
    string.format('"non2xx":%d', summary.errors.status),
    string.format('"socket_errors":%d', summary.errors.connect + summary.errors.read
      + summary.errors.write + summary.errors.timeout),
    string.format('"timeouts":%d', summary.errors.timeout),
    string.format('"p50_us":%d', latency:percentile(50)),
    string.format('"p99_us":%d', latency:percentile(99)),
    string.format('"max_us":%d', latency.max),
  }
  for name, value in pairs(extra or {}) do
    table.insert(fields, string.format('"%s":%d', name, value))
  end
  io.write("WRK_JSON {" .. table.concat(fields, ",") .. "}\n")
end
