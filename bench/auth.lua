-- wrk script for the bench: every request carries the bench's bearer token.
-- bench/run.py passes the token in RELAY_BENCH_TOKEN (never on the command line).
local token = os.getenv("RELAY_BENCH_TOKEN")
if token ~= nil and token ~= "" then
  wrk.headers["Authorization"] = "Bearer " .. token
end
