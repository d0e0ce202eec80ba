"""`python -m bitnet_jax ...` runs the `bitnet-jax` command line (cli.py)."""

from bitnet_jax.cli.main import main

raise SystemExit(main())
