-- wrk script for hack/bench-webhook.sh: POSTs one AdmissionReview body
-- (path in REVIEW_FILE) to /mutate on every request, over keep-alive.
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
local file = assert(io.open(os.getenv("REVIEW_FILE"), "rb"))
wrk.body = file:read("*a")
file:close()

done = function(summary, latency, requests)
  local seconds = summary.duration / 1e6
  io.write(string.format("admissions/s: %.0f\n", summary.requests / seconds))
  io.write(string.format("p50: %.3f ms  p99: %.3f ms  max: %.3f ms\n",
    latency:percentile(50) / 1000, latency:percentile(99) / 1000, latency.max / 1000))
  local errors = summary.errors
  io.write(string.format("errors: connect %d, read %d, write %d, status %d, timeout %d\n",
    errors.connect, errors.read, errors.write, errors.status, errors.timeout))
end
