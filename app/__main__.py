"""`python -m app` runs the replicate-gateway command."""

from app.cli import main

raise SystemExit(main())
