"""`make demo`: the main job on the embedded default.

Writes the synthetic two-domain benchmark into data/ (once), then trains the BoT
baseline on synth-a under Ray Train with 2 CPU workers and reports supervised
source mAP and direct-transfer target mAP, tracked in MLflow (sqlite:///mlflow.db).
Extra arguments go to `python -m reid_ray.train`.
"""

import sys

from reid_ray.train import main

if __name__ == "__main__":
    sys.exit(main(["--method", "baseline", *sys.argv[1:]]))
