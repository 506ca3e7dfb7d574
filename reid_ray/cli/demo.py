"""`make demo` (= `reid-ray demo`): the headline command on the embedded default, `python -m reid_ray.tune --method mmt
--num-samples 2`.

Writes the synthetic two-domain benchmark into data/ (once), trains the BoT baseline on synth-a once
(cached; its target mAP is the direct-transfer figure), then sweeps MMT's hyperparameters with Ray Tune +
Optuna + ASHA (2 short trials, one Ray Train worker each: MMT's default config, then one sampled by Optuna),
tracked in MLflow (sqlite:///mlflow.db), and prints every trial under the direct-transfer and AdaBN rows with
the best config. Two trials, not the sweep's three: the demo fits in 10 minutes from a fresh clone on 2 cores
(bench/RESULTS.md). Extra arguments go to `python -m reid_ray.tune` (`--num-samples 3` for more).
"""

import sys


def main(argv: list[str] | None = None) -> int:
    from reid_ray.cli.tune import main as tune

    return tune(["--method", "mmt", "--num-samples", "2", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
