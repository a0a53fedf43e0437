"""`python -m rival_jax`, for where the `rival-jax` console script is not on PATH."""

import sys

from rival_jax.cli import main

sys.exit(main())
