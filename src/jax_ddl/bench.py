"""`python -m jax_ddl.bench`: the allreduce benchmark (see src/jax_ddl/_src/bench.py)."""

import sys

from jax_ddl._src.bench import main

if __name__ == "__main__":
    sys.exit(main())
