"""The run without Ray: the epoch loop and evaluation (loop.py), the optimiser and its schedule (optim.py), and
the checkpoint format (checkpoint.py). The Ray layer (reid_ray/distributed/) calls these from its workers."""
