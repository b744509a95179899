"""`python -m proxy` runs the command line (same as the `sandbox-proxy` script)."""

from proxy.cli import main

raise SystemExit(main())
