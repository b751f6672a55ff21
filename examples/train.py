"""Data-parallel ResNet training whose gradients are averaged by jax_ddl.

python examples/train.py --help
"""

import sys

from resnet.main import main

if __name__ == "__main__":
    sys.exit(main())
