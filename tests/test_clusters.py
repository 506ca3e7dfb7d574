"""clusters/*.yaml: Ray's own launcher validation, scale-from-zero GPUs, the dashboard, and one tune command.

The launcher configs go through what `ray up` runs before it contacts any cloud: prepare_config
(defaults of the provider, merged setup commands) then validate_config (ray-schema.json).
"""

import copy
import re
import shlex
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
LAUNCHER = ["clusters/aws-gpu.yaml", "clusters/gcp-gpu.yaml"]
KUBERAY = "clusters/kuberay-rayjob.yaml"
GUIDE = "docs/scale-out.md"
TUNE = re.compile(r"python -m reid_ray\.tune\b[^\n'\"`]*")


def load(path: str) -> dict:
    return yaml.safe_load((ROOT / path).read_text())


def prepared(path: str) -> dict:
    from ray.autoscaler._private.util import prepare_config, validate_config

    config = prepare_config(copy.deepcopy(load(path)))
    validate_config(config)
    return config


@pytest.mark.parametrize("path", LAUNCHER)
def test_launcher_config_passes_rays_validation(path):
    prepared(path)


def test_validation_is_real():
    import jsonschema
    from ray.autoscaler._private.util import prepare_config, validate_config

    bad = load(LAUNCHER[0])
    bad["max_wokers"] = 4  # a typo: the schema allows no unknown keys
    with pytest.raises(jsonschema.ValidationError):
        validate_config(prepare_config(bad))


@pytest.mark.parametrize("path", LAUNCHER)
def test_gpus_scale_from_zero(path):
    config = prepared(path)
    types = config["available_node_types"]
    head = types[config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0 and head["max_workers"] == 0
    gpu_types = {name: t for name, t in types.items() if t["resources"].get("GPU", 0) > 0}
    assert {t["resources"]["GPU"] for t in gpu_types.values()} >= {1, 4}
    for name, t in gpu_types.items():
        assert t["min_workers"] == 0, name
        assert 0 < t["max_workers"] <= config["max_workers"], name
    assert 0 < config["idle_timeout_minutes"] <= 60


@pytest.mark.parametrize("path", LAUNCHER)
def test_dashboard_on_gpu_extra_and_data(path):
    config = prepared(path)
    head_start = [c for c in config["head_start_ray_commands"] if "ray start" in c]
    assert len(head_start) == 1 and "--head" in head_start[0] and "--dashboard-host=0.0.0.0" in head_start[0]
    for key in ("head_setup_commands", "worker_setup_commands"):  # setup_commands merged into both
        assert any("pip install" in c and "[gpu]" in c for c in config[key]), key
    run_options = config["docker"]["run_options"]
    assert any("/data:/data" in opt for opt in run_options) and any("/outputs:/outputs" in opt for opt in run_options)
    init = config["initialization_commands"]
    assert any(re.search(r"(s3 sync|storage rsync|gsutil .*rsync) .*(s3|gs)://\S+ /data( |$)", c) for c in init)
    # multi-node Ray Train needs checkpoints on storage every node shares
    assert any(re.search(r"mount -t nfs\S* .* /outputs$", c) for c in init)


def test_no_config_turns_the_dashboard_off():
    # Ray Train V2 frees stopped trials' resources through the dashboard
    for path in LAUNCHER:
        config = prepared(path)
        commands = config["head_start_ray_commands"] + config["worker_start_ray_commands"]
        assert not any("include-dashboard" in c for c in commands), path
    head = load(KUBERAY)["spec"]["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]
    assert str(head.get("include-dashboard", "true")).lower() == "true"


def test_kuberay_rayjob_structure():
    job = load(KUBERAY)
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("python -m reid_ray.tune ")
    cluster = spec["rayClusterSpec"]
    assert cluster["enableInTreeAutoscaling"] is True
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["dashboard-host"] == "0.0.0.0"
    pods = [head["template"]["spec"]]
    assert cluster["workerGroupSpecs"]
    for group in cluster["workerGroupSpecs"]:
        assert group["minReplicas"] == 0 and group["maxReplicas"] >= 1, group["groupName"]
        pod = group["template"]["spec"]
        pods.append(pod)
        assert all(int(c["resources"]["limits"]["nvidia.com/gpu"]) >= 1 for c in pod["containers"])
    for pod in pods:  # the datasets: a PVC mounted at /data in every container
        claims = {v["name"] for v in pod["volumes"] if "persistentVolumeClaim" in v}
        for c in pod["containers"]:
            for path in ("/data", "/outputs"):
                assert any(m["mountPath"] == path and m["name"] in claims for m in c["volumeMounts"]), (c["name"], path)


def tune_commands(path: str) -> list[str]:
    return [" ".join(m.split()) for m in TUNE.findall((ROOT / path).read_text())]


def test_one_tune_command_everywhere():
    found = {path: tune_commands(path) for path in [*LAUNCHER, KUBERAY, GUIDE]}
    for path, commands in found.items():
        assert commands, f"{path} shows no `python -m reid_ray.tune ...` command"
    distinct = {c for commands in found.values() for c in commands}
    assert len(distinct) == 1, f"the tune command differs between files: {found}"
    command = distinct.pop()
    assert command == load(KUBERAY)["spec"]["entrypoint"]
    assert command in " ".join((ROOT / "README.md").read_text().split()), "README's Ray cluster command differs"
    args = shlex.split(command)[3:]

    from reid_ray.config.presets import resolve_preset
    resolve_preset(args[args.index("--preset") + 1])
    assert args[args.index("--data-root") + 1] == "/data" and args[args.index("--output") + 1] == "/outputs"
    from reid_ray.cli.tune import build_parser
    build_parser().parse_args(args)  # the command parses with tune's own parser


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.mark.parametrize("path", [*LAUNCHER, KUBERAY])
def test_no_config_opens_ingress_beyond_ssh_and_every_ray_start_needs_the_token(path):
    """Nothing reachable from the internet but SSH (the dashboard, the Ray client and MLflow go through the
    SSH tunnel or the pod network), token auth on every node."""
    cfg = load(path)
    for key, value in _walk(cfg):
        text = str(value)
        assert "0.0.0.0/0" not in text and "::/0" not in text, (key, text)  # no world-open rule or source range
        assert not re.search(r"(?i)serviceType|LoadBalancer|NodePort|enableIngress", f"{key} {text}"), (key, text)
        if "ray start" in text:
            assert "RAY_AUTH_MODE=token" in text, (key, text)
        assert "ray-client-server-port" not in text, (key, text)


def test_the_guide_puts_mlflow_behind_authentication_on_a_private_network():
    guide = (ROOT / GUIDE).read_text()
    assert "--app-name basic-auth" in guide and "private network" in guide and "--host 0.0.0.0" not in guide
