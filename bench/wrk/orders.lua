-- POST /v1/orders, one unit of a product drawn from [PRODUCT_LO, PRODUCT_HI].
dofile(os.getenv("WRK_DIR") .. "/common.lua")
local lo = tonumber(os.getenv("PRODUCT_LO"))
local hi = tonumber(os.getenv("PRODUCT_HI"))
local path = os.getenv("ORDER_PATH") or "/v1/orders"
local headers = {["Content-Type"] = "application/json"}

request = function()
  local body = string.format('{"userId":%d,"orderLines":[{"productId":%d,"quantity":1}]}',
                             math.random(1, 1000000), math.random(lo, hi))
  return wrk.format("POST", path, headers, body)
end

done = function(summary, latency, requests)
  report(summary, latency)
end
