-- Product reads (bench/run.py, scenario "reads"), one of READ_MODE:
--   listing: GET /v1/products with a maxPrice no earlier request asked (so the listing
--            cache misses and a database answers), a random sort and one of 3 pages;
--   detail:  GET /v1/products/<random id in PRODUCT_LO..PRODUCT_HI> (the product cache);
--   hot:     GET /v1/products/<PRODUCT_LO>, one product over and over.
dofile(os.getenv("WRK_DIR") .. "/common.lua")
local mode = os.getenv("READ_MODE") or "hot"
local lo = tonumber(os.getenv("PRODUCT_LO") or "1")
local hi = tonumber(os.getenv("PRODUCT_HI") or tostring(lo))
local sorts = { "id", "name", "price", "createdAt" }
-- Each run draws its own queries (READ_SEED): pages a former run cached (the listing
-- cache is shared by every web) would otherwise answer this one's listings.
local seed = tonumber(os.getenv("READ_SEED") or "17")

function init(args)
  math.randomseed(7919 * (thread_id or 0) + seed)
end

request = function()
  if mode == "listing" then
    return wrk.format("GET", string.format(
      "/v1/products?sort=%s&maxPrice=%d&page=%d&size=20",
      sorts[math.random(#sorts)], math.random(100, 1000000000), math.random(1, 3)))
  elseif mode == "detail" then
    return wrk.format("GET", "/v1/products/" .. math.random(lo, hi))
  end
  return wrk.format("GET", "/v1/products/" .. lo)
end

done = function(summary, latency, requests)
  report(summary, latency)
end
