-- POST /v1/points/charge of 1 point for a user drawn from [USER_LO, USER_HI].
local lo = tonumber(os.getenv("USER_LO"))
local hi = tonumber(os.getenv("USER_HI"))
local headers = {["Content-Type"] = "application/json"}

request = function()
  local body = string.format('{"userId":%d,"amount":1}', math.random(lo, hi))
  return wrk.format("POST", "/v1/points/charge", headers, body)
end

done = function(summary, latency, requests)
  io.write(string.format(
    'WRK_JSON {"requests":%d,"duration_us":%d,"non2xx":%d,"socket_errors":%d,"p50_us":%d,"p99_us":%d}\n',
    summary.requests, summary.duration, summary.errors.status,
    summary.errors.connect + summary.errors.read + summary.errors.write + summary.errors.timeout,
    latency:percentile(50), latency:percentile(99)))
end
