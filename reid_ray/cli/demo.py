"""`make demo` (= `reid-ray demo`): the headline command on the embedded default, `python -m reid_ray.tune --method mmt`.

Writes the synthetic two-domain benchmark into data/ (once), trains the BoT baseline on synth-a once
(cached; its target mAP is the direct-transfer figure), then sweeps MMT's hyperparameters with Ray Tune +
Optuna + ASHA (3 short trials, one Ray Train worker each), tracked in MLflow (sqlite:///mlflow.db), and
prints every trial under the direct-transfer row with the best config. Extra arguments go to
`python -m reid_ray.tune`.
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from reid_ray.cli.tune import main as tune

    return tune(["--method", "mmt", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
