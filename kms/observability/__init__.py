"""What an operator sees of a running KMS: JSON log lines (logs.py), Prometheus metrics
(metrics.py), one access-log line and a request id per request (middleware.py), and the probes
and /metrics routes (routes.py).

Log lines name the route template (`/keys/<ref>`), never the raw path: a raw path carries the
key reference. Bodies and headers are never logged.
"""
