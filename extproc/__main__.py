"""``python -m extproc``: serve the ext_proc sidecar alone (flags as ``sidegate serve``)."""

from sidegate.cli import serve_main

raise SystemExit(serve_main(["extproc"]))
