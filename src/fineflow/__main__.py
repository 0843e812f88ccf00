"""``python -m fineflow``: the same as the ``fineflow`` command."""

from .cli import main

raise SystemExit(main())
