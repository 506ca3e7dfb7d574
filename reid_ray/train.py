"""`python -m reid_ray.train`: the training command (reid_ray/cli/train.py; also `reid-ray train`)."""

import sys

from reid_ray.cli.train import main

if __name__ == "__main__":
    sys.exit(main())
