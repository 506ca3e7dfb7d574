"""`make demo`: the headline command on the embedded default, `python -m reid_ray.tune --method mmt`.

Writes the synthetic two-domain benchmark into data/ (once), trains the BoT baseline on synth-a once
(cached; its target mAP is the direct-transfer figure), then sweeps MMT's hyperparameters with Ray Tune +
Optuna + ASHA (3 short trials, one Ray Train worker each), tracked in MLflow (sqlite:///mlflow.db), and
prints every trial under the direct-transfer row with the best config. Extra arguments go to
`python -m reid_ray.tune`.
"""

import sys

from reid_ray.cli.tune import main

if __name__ == "__main__":
    sys.exit(main(["--method", "mmt", *sys.argv[1:]]))
