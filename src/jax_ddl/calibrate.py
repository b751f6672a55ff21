"""python -m jax_ddl.calibrate: measure the cost model's terms (jax_ddl/_src/calibrate.py)."""

import sys

from jax_ddl._src.calibrate import main

if __name__ == "__main__":
    sys.exit(main())
