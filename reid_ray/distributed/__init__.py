"""The Ray layer: everything in reid-ray that imports `ray` lives in this package.

    driver.py      one training run under Ray Train (TorchTrainer, ScalingConfig, FailureConfig)
    worker.py      the per-worker loop (prepare_model, get_checkpoint, report; numbered)
    sweep.py       the Tune sweep (Tuner, OptunaSearch, ASHA, TuneReportCallback)
    actor.py       the PseudoLabeler actor and its client
    resources.py   the one resource planner for train and tune (pure arithmetic: no ray import)
    runtime.py     ray.init, and GPU requests to the autoscaler
    cluster_info.py  `reid-ray doctor`'s Ray section

It holds no re-ID math and names no method (docs/architecture.md). Importing this package imports
nothing from Ray; its modules do.
"""
