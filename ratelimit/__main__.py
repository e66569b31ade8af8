"""``python -m ratelimit``: serve the rate-limit sidecar alone (flags as ``sidegate serve``)."""

from sidegate.cli import serve_main

raise SystemExit(serve_main(["ratelimit"]))
