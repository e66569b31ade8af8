"""``python -m sidegate`` = the ``sidegate`` command."""

from sidegate.cli import main

raise SystemExit(main())
