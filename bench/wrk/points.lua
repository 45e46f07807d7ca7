-- POST /v1/points/charge of 1 point for a user drawn from [USER_LO, USER_HI].
dofile(os.getenv("WRK_DIR") .. "/common.lua")
local lo = tonumber(os.getenv("USER_LO"))
local hi = tonumber(os.getenv("USER_HI"))
local headers = {["Content-Type"] = "application/json"}

request = function()
  local body = string.format('{"userId":%d,"amount":1}', math.random(lo, hi))
  return wrk.format("POST", "/v1/points/charge", headers, body)
end

done = function(summary, latency, requests)
  report(summary, latency)
end
