"""What a run would use here: Ray cluster, torch/CUDA, faiss, datasets, MLflow; each problem with its fix.

    reid-ray doctor                            # joins $RAY_ADDRESS or this node's Ray, else starts one briefly
    reid-ray doctor --data-root /data --no-ray # skip Ray; check the datasets under /data
    python -m reid_ray.doctor --strict         # exit 1 when a problem is found (for setup scripts)

Exit code 0 whenever it could report (problems included, unless --strict); 2 on a usage error.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
from dataclasses import dataclass, field
from pathlib import Path

import reid_ray

GPU_FAISS = "faiss-gpu-cu13-cuvs"   # the `gpu` extra: CUDA 13, as torch 2.14.1's wheels
GPU_EXTRA_FIX = f"pip uninstall -y faiss-cpu && pip install -e '.[gpu]' (installs {GPU_FAISS})"
# the oldest NVIDIA driver for each CUDA major (CUDA's minor-version compatibility)
MIN_DRIVER = {11: 450, 12: 525, 13: 580}
FAISS_DISTS = ("faiss-cpu", "faiss-gpu-cu13-cuvs", "faiss-gpu-cu12-cuvs", "faiss-gpu-cu12", "faiss-gpu-cu11",
               "faiss-gpu-cuvs", "faiss-gpu", "faiss-cuda")


@dataclass
class Report:
    rows: list[tuple[str, str, str]] = field(default_factory=list)        # (section, item, value)
    datasets: list[tuple[str, ...]] = field(default_factory=list)
    problems: list[tuple[str, str]] = field(default_factory=list)         # (problem, fix)

    def add(self, section: str, item: str, value: str) -> None:
        self.rows.append((section, item, value))

    def problem(self, what: str, fix: str) -> None:
        self.problems.append((what, fix))


def check_torch(r: Report) -> int:
    import torch

    r.add("torch", "version", torch.__version__)
    r.add("torch", "CUDA build", torch.version.cuda or "none (CPU-only build)")
    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    names = ", ".join(torch.cuda.get_device_name(i) for i in range(n))
    r.add("torch", "GPUs", f"{n}" + (f": {names}" if names else ""))
    if n == 0:
        r.problem("no GPU visible to torch: training runs on CPU (fine for the synthetic demo only)",
                  "run real datasets on a GPU node (ray up clusters/aws-gpu.yaml) with the gpu extra: "
                  + GPU_EXTRA_FIX)
    return n


def _installed(dists: tuple[str, ...]) -> dict[str, str]:
    """{distribution: version} of those of `dists` that pip has installed, in their order."""
    from importlib import metadata

    found = {}
    for dist in dists:
        try:
            found[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return found


def installed_faiss() -> list[str]:
    """The faiss distributions pip has installed (two builds of one `faiss` module overwrite each other)."""
    return list(_installed(FAISS_DISTS))


def cuda_major(name_or_version: str | None) -> int | None:
    """12 from "12.8" or from "faiss-gpu-cu12"; None when it names no CUDA version."""
    import re

    if not name_or_version:
        return None
    m = re.search(r"cu(\d{2})", name_or_version) or re.match(r"(\d+)\.", name_or_version)
    return int(m.group(1)) if m else None


def cuda_runtime() -> str | None:
    """The CUDA runtime torch's wheels brought (the nvidia-cuda-runtime package), if any."""
    return next(iter(_installed(("nvidia-cuda-runtime", "nvidia-cuda-runtime-cu13", "nvidia-cuda-runtime-cu12")).values()),
                None)


def nvidia_driver() -> str | None:
    """The NVIDIA driver version (nvidia-smi), or None without one."""
    import shutil
    import subprocess

    if not shutil.which("nvidia-smi"):
        return None
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20).stdout.split()
    except (OSError, subprocess.SubprocessError):
        return None
    return out[0] if out else None


def cuda_stack_problems(torch_cuda: str | None, torch_gpus: int, driver: str | None, faiss_dists: list[str],
                        faiss_gpus: int) -> list[tuple[str, str]]:
    """What does not match in torch's CUDA build, the driver and the faiss build, each with its fix."""
    problems = []
    gpu_dists = [d for d in faiss_dists if d != "faiss-cpu"]
    if "faiss-cpu" in faiss_dists and gpu_dists:
        problems.append((f"two faiss builds installed (faiss-cpu and {gpu_dists[0]}): they share the `faiss` "
                         "module, whichever was installed last wins",
                         f"pip uninstall -y faiss-cpu {gpu_dists[0]} && pip install -e '.[gpu]'"))
    torch_major = cuda_major(torch_cuda)
    for dist in gpu_dists:
        major = cuda_major(dist)
        if torch_major and major and major != torch_major:
            problems.append((f"{dist} is built for CUDA {major}, torch for CUDA {torch_major}: two CUDA "
                             "runtimes in one process", f"pip uninstall -y {dist} && pip install -e '.[gpu]'"))
    # torch sees CUDA, faiss is the CPU build: not a problem, clustering.backend=auto runs k-means and the kNN in
    # torch on the GPU (check_faiss says so in its rows)
    if driver and not torch_major:
        problems.append(("an NVIDIA driver is installed but torch is a CPU-only build: training runs on the CPU",
                         "pip install --force-reinstall torch==2.14.1 torchvision==0.29.1 (PyPI's CUDA 13 build)"))
    too_old = False
    if driver and torch_major in MIN_DRIVER:  # a driver too old for torch's CUDA: torch then sees no GPU at all
        try:
            too_old = int(driver.split(".")[0]) < MIN_DRIVER[torch_major]
        except ValueError:
            pass
        if too_old:
            problems.append((f"NVIDIA driver {driver} is older than CUDA {torch_major} needs "
                             f"(>= {MIN_DRIVER[torch_major]})",
                             f"boot an image with driver >= {MIN_DRIVER[torch_major]} (docs/scale-out.md) or "
                             "upgrade the driver"))
    if driver and torch_major and not torch_gpus and not too_old:
        problems.append((f"NVIDIA driver {driver} is installed but torch (CUDA {torch_cuda}) sees no GPU",
                         "check CUDA_VISIBLE_DEVICES and that nvidia-smi lists the GPUs (a container needs "
                         "--gpus all)"))
    return problems


def check_faiss(r: Report, torch_gpus: int) -> None:
    try:
        import faiss
    except ImportError:
        r.add("faiss", "version", "not installed")
        r.problem("faiss is not installed (clustering needs it)",
                  "pip install -e '.[cpu]' (faiss-cpu) or, on CUDA machines, pip install -e '.[gpu]'")
        return
    dists = installed_faiss()
    r.add("faiss", "version", getattr(faiss, "__version__", "?") + (f" ({', '.join(dists)})" if dists else ""))
    gpus = faiss.get_num_gpus() if hasattr(faiss, "get_num_gpus") else 0
    r.add("faiss", "GPUs", str(gpus))
    import torch

    driver = nvidia_driver()
    r.add("cuda", "NVIDIA driver", driver or "none found (nvidia-smi)")
    r.add("cuda", "torch CUDA build", torch.version.cuda or "none (CPU-only build)")
    r.add("cuda", "CUDA runtime (pip)", cuda_runtime() or "none")
    if torch_gpus:
        r.add("cuda", "bf16 autocast", "yes" if torch.cuda.is_bf16_supported() else "no (float16 + GradScaler)")
        r.add("clustering", "k-means / kNN on the GPU", "faiss (its GPU build)" if gpus else
              "torch (faiss here is the CPU build; clustering.backend=auto; the gpu extra adds faiss's GPU build)")
    for problem, fix in cuda_stack_problems(torch.version.cuda, torch_gpus, driver, dists, gpus):
        r.problem(problem, fix)


def check_datasets(r: Report, root: str) -> None:
    from reid_ray.data.layouts import LAYOUTS
    from reid_ray.data.readers import DatasetError, dataset_names, read_dataset

    base = Path(root).expanduser().resolve()
    r.add("data", "root", str(base) + ("" if base.is_dir() else " (does not exist)"))
    for name in dataset_names():
        tops = [lo.top for lo in LAYOUTS[name]]
        if not any((base / t).is_dir() for t in tops):
            r.datasets.append((name, "-", "-", "-", "not found (expected " + " or ".join(f"{t}/" for t in tops) + ")"))
            continue
        try:
            st = read_dataset(name, base).stats()
        except DatasetError as e:  # the folder is there but partial or not in the published layout
            r.datasets.append((name, "-", "-", "-", "broken"))
            r.problem(f"{name}: {e}", "restore the dataset's published layout (docs/datasets.md)")
            continue
        r.datasets.append((name, *(f"{st[s]['ids']} / {st[s]['images']}" for s in ("train", "query", "gallery")),
                           "ok"))


def check_mlflow(r: Report, uri: str, cluster: bool) -> None:
    from reid_ray.tracking import resolve_uri

    resolved = resolve_uri(uri)
    r.add("mlflow", "tracking URI", resolved)
    if cluster and resolved.startswith(("sqlite:", "file:")):
        r.problem("a local MLflow store on a Ray cluster: workers on other nodes cannot write to it",
                  "run a shared MLflow server and pass --mlflow-uri http://HOST:5000 (or MLFLOW_TRACKING_URI)")


def collect(args: argparse.Namespace) -> Report:
    r = Report()
    r.add("reid-ray", "version", f"{reid_ray.__version__} (Python {platform.python_version()})")
    from reid_ray.distributed.cluster_info import check_ray

    nodes = check_ray(r, use_ray=not args.no_ray)
    check_faiss(r, check_torch(r))
    check_datasets(r, args.data_root)
    check_mlflow(r, args.mlflow_uri, cluster=bool(os.environ.get("RAY_ADDRESS")) or nodes > 1)
    return r


def render(r: Report) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    def table(title: str, columns: tuple[str, ...], rows: list[tuple[str, ...]], right: tuple[str, ...] = ()):
        t = Table(title=title)
        for col in columns:  # fold, never truncate: paths and fixes must stay whole
            t.add_column(col, overflow="fold", justify="right" if col in right else "left")
        for row in rows:
            t.add_row(*(escape(str(v)) for v in row))  # "[gpu]" is text, not rich markup
        return t

    console = Console()
    console.print(table("reid-ray doctor: what a run would use here", ("part", "item", "value"), r.rows))
    console.print(table("datasets (ids / images per split)", ("dataset", "train", "query", "gallery", "status"),
                        r.datasets, right=("train", "query", "gallery")))
    if r.problems:
        console.print(table(f"{len(r.problems)} problem(s)", ("problem", "fix"), r.problems))
    else:
        console.print("no problems found")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="reid-ray doctor", description=__doc__.split("\n")[0])
    p.add_argument("--data-root", default="data", help="folder holding the datasets' own top folders (default: data)")
    p.add_argument("--mlflow-uri", default="", help="default: $MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--no-ray", action="store_true", help="skip the Ray cluster check (no Ray is started)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any problem is found")
    return p


def main(argv=None) -> int:
    from reid_ray.cli import run_cli

    args = build_parser().parse_args(argv)

    def _run(a):
        report = collect(a)
        render(report)
        return 1 if a.strict and report.problems else 0

    return run_cli(_run, args)


if __name__ == "__main__":
    sys.exit(main())
