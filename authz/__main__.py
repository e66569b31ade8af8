"""``python -m authz``: serve the authz sidecar alone (flags as ``sidegate serve``)."""

from sidegate.cli import serve_main

raise SystemExit(serve_main(["authz"]))
