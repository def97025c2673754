"""`python -m unweight_jax.cli`: the `unweight` command without its console script."""

from . import main

raise SystemExit(main())
