"""OpenMP waiting policy under CPU contention: one baseline training process, 6 iterations an epoch.

    python -m bench.bench_omp_wait 0 2                       # flush-denormal off, 2 torch threads
    OMP_WAIT_POLICY=PASSIVE python -m bench.bench_omp_wait 0 2

Run it while another training uses the cores (the situation of every Ray worker beside Ray's daemons,
the pseudo-label actor or a second worker). Prints each epoch's wall time and one Adam step's time.
"""
import sys
import time

import torch

from reid_ray.config import resolve_config
from reid_ray.data.domains import ensure_data
from reid_ray.methods import METHODS, EpochContext
from reid_ray.training.loop import train_epoch

torch.set_num_threads(int(sys.argv[2]))
if sys.argv[1] == "1":
    torch.set_flush_denormal(True)
cfg = resolve_config("baseline", flags=dict(data_root="data"))
d = ensure_data(cfg)
m = METHODS["baseline"](cfg, d, torch.device("cpu"))
m.setup()
m.iterations = lambda: 6
ctx = EpochContext(epoch=0)
for e in range(3):
    t = time.perf_counter()
    train_epoch(m, ctx)
    print(sys.argv[1], "epoch", e, round(time.perf_counter() - t, 2), flush=True)
t = time.perf_counter()
for _ in range(5):
    m.optimizer.step()
print("adam step", (time.perf_counter() - t) / 5)
