"""`python -m reid_ray.doctor`: what a run would use here (reid_ray/cli/doctor.py; also `reid-ray doctor`)."""

import sys

from reid_ray.cli.doctor import main

if __name__ == "__main__":
    sys.exit(main())
