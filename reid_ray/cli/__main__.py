import sys

from reid_ray.cli import main

sys.exit(main())
