"""``python -m ratelimit``: the rate-limit service alone, as ``sidegate ratelimit`` (ratelimit/cli.py)."""

import sys

from sidegate.cli import main

raise SystemExit(main(["ratelimit", *sys.argv[1:]]))
