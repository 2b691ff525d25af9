-- wrk script for the bench: every request carries the bench's bearer token.
-- bench/run.py passes the token in RELAY_BENCH_TOKEN (never on the command line), and an
-- Origin to send in RELAY_BENCH_ORIGIN for the CORS-on run of W1.
local token = os.getenv("RELAY_BENCH_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
local origin = os.getenv("RELAY_BENCH_ORIGIN")
if origin ~= nil and origin ~= "" then
  wrk.headers["Origin"] = origin
end
