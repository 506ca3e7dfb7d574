"""`python -m reid_ray.tune`: the sweep command (reid_ray/cli/tune.py; also `reid-ray tune`)."""

import sys

from reid_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main())
