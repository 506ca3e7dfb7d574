import os

# before torch starts OpenMP: passive waiting, as train.init_ray gives Ray's workers (see there)
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402

from reid_ray.data.synthetic import SynthConfig, generate_synthetic  # noqa: E402

# A small benchmark shared by every test of a session: 12 train + 8 test ids per domain.
TINY = SynthConfig(train_ids=12, test_ids=8, images_per_id=(6, 8), cameras_per_id=(2, 3), num_cameras=3)


@pytest.fixture(scope="session")
def tiny_synth(tmp_path_factory):
    root = tmp_path_factory.mktemp("synth")
    generate_synthetic(root, TINY)
    return root


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    # manifests cached by a test never leak into the user's ~/.cache or other tests
    monkeypatch.setenv("REID_RAY_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def ray_local():
    """One local Ray per test module (PLATFORM_NOTES.md: sharing it saves ~4 s per test), started as the
    CLI starts it: a new instance even beside a `ray start` cluster, with its API server named for Ray Train's
    placement-group cleaner (otherwise a stale /tmp/ray/ray_current_cluster costs every run 12 s at its end)."""
    import ray

    from reid_ray.distributed.runtime import init_ray
    init_ray()
    yield
    ray.shutdown()
