-- GET of one fixed path (WRK_PATH): the ceiling of the HTTP stack.
dofile(os.getenv("WRK_DIR") .. "/common.lua")
local path = os.getenv("WRK_PATH") or "/"

request = function()
  return wrk.format("GET", path)
end

done = function(summary, latency, requests)
  report(summary, latency)
end
