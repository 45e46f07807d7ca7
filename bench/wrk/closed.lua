-- Closed-loop users: run with as many threads as connections (-tN -cN), so one
-- thread's state is one user's.  A user POSTs a one-unit order of a product drawn
-- from [PRODUCT_LO, PRODUCT_HI], waits for its job to finish, then starts the next.
--
-- PREFER_WAIT=n adds `Prefer: wait=n` to the POST (client model a): a 200 carrying
-- the finished job ends the cycle in one request; a 202 falls back to polling.
-- Without it (model b) every POST is followed by `GET /v1/jobs/{id}?wait=POLL_WAIT`
-- until the job is no longer PENDING.  A 200 whose body is not a job status document
-- (the straight design's `{"orderId", "status": "READY"}`) ends the cycle too.
dofile(os.getenv("WRK_DIR") .. "/common.lua")
local lo = tonumber(os.getenv("PRODUCT_LO"))
local hi = tonumber(os.getenv("PRODUCT_HI"))
local prefer = os.getenv("PREFER_WAIT") or ""
local poll_wait = os.getenv("POLL_WAIT") or "5"
local path = os.getenv("ORDER_PATH") or "/v1/orders"
local user_base = tonumber(os.getenv("USER_BASE") or "700000000")
local post_headers = {["Content-Type"] = "application/json"}
if prefer ~= "" then
  post_headers["Prefer"] = "wait=" .. prefer
end

-- Per user (thread) state; the counters are globals so done() can read them.
local job = nil       -- the job being awaited; nil: the next request is a POST
local started = 0     -- when this cycle's POST was written
cycles = 0            -- orders whose outcome the user saw
succeeded = 0
failed = 0            -- jobs that finished FAILED (a business refusal)
direct = 0            -- cycles answered by the POST itself (200)
posts = 0
polls = 0
bad = 0               -- non-2xx answers or a 2xx without a job id: the cycle is abandoned
cycle_us = {}

local function has_status(body, state)
  -- Keys may come in any order and the result nests an order "status": look for
  -- the job's own states, which the result never carries.
  return body:find('"status"%s*:%s*"' .. state .. '"') ~= nil
end

local function finish(body)
  cycles = cycles + 1
  cycle_us[#cycle_us + 1] = now_us() - started
  if has_status(body, "FAILED") and not has_status(body, "SUCCEEDED") then
    failed = failed + 1
  else
    succeeded = succeeded + 1
  end
end

request = function()
  if job ~= nil then
    polls = polls + 1
    return wrk.format("GET", "/v1/jobs/" .. job .. "?wait=" .. poll_wait)
  end
  posts = posts + 1
  started = now_us()
  local body = string.format('{"userId":%d,"orderLines":[{"productId":%d,"quantity":1}]}',
                             user_base + (thread_id or 0), math.random(lo, hi))
  return wrk.format("POST", path, post_headers, body)
end

response = function(status, headers, body)
  if job == nil then
    -- The answer to an order POST.
    if status == 202 or (status == 200 and has_status(body, "PENDING")) then
      job = body:match('"jobId"%s*:%s*"([^"]+)"')
      if job == nil then
        bad = bad + 1
      end
    elseif status == 200 then
      direct = direct + 1
      finish(body)
    else
      bad = bad + 1
    end
    return
  end
  -- The answer to a poll.
  if status ~= 200 then
    bad = bad + 1
    job = nil
  elseif not has_status(body, "PENDING") then
    job = nil
    finish(body)
  end
end

done = function(summary, latency, requests)
  local totals = {cycles = 0, succeeded = 0, failed = 0, direct = 0, posts = 0, polls = 0,
                  bad = 0}
  local all = {}
  for _, thread in ipairs(threads) do
    for name, value in pairs(totals) do
      totals[name] = value + (thread:get(name) or 0)
    end
    for _, us in ipairs(thread:get("cycle_us") or {}) do
      all[#all + 1] = us
    end
  end
  table.sort(all)
  totals.cycle_p50_us = percentile(all, 50)
  totals.cycle_p99_us = percentile(all, 99)
  totals.cycle_max_us = all[#all] or 0
  report(summary, latency, totals)
end
