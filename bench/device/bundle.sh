#!/usr/bin/env bash
# Build bench/device/bundle/site.tar.xz: the Python 3.12 manylinux x86_64 wheels that the bare GPU box lacks for
# reid-ray's code paths (Ray with its dashboard, MLflow's SQLite tracking store, Optuna, faiss-cpu), unpacked
# into one site folder, stripped, and packed as one xz archive of at most 60 MiB (a device call carries 64 MiB,
# the working tree included). Runs here, on the CPU machine, with network access to PyPI; bench/device/run.sh
# unpacks the archive on the box and puts the folder on PYTHONPATH.
#
#     bash bench/device/bundle.sh            # -> bench/device/bundle/site.tar.xz (+ site.txt: what is inside)
#
# Environment: PYTHON (a Python with pip; default .venv/bin/python), BUNDLE_WORK (scratch folder for the
# downloaded wheels and the unpacked site, outside the repository so it is never carried; default
# /tmp/reid-ray-bundle).
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
py=${PYTHON:-$repo/.venv/bin/python}
work=${BUNDLE_WORK:-/tmp/reid-ray-bundle}
out=$here/bundle
limit_mib=60

# The box runs Python 3.12.3 (Ubuntu 24.04's), torch 2.11 from manylinux_2_28 wheels, so glibc >= 2.28: pip
# accepts manylinux_2_28 and every older manylinux tag (manylinux2014 = manylinux_2_17) with this --platform.
target=(--only-binary=:all: --python-version 3.12 --implementation cp --abi cp312
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64)

# What reid-ray needs beyond the image (pyproject.toml's dependencies less torch, torchvision, numpy, pyarrow,
# pillow, pyyaml, rich, matplotlib, scikit-learn; the `cpu` extra's faiss): Ray with the dashboard (Ray Train
# V2's placement-group cleaner needs the state API), MLflow's client and its SQLite store
# (sqlalchemy + alembic), Optuna. mlflow-skinny instead of mlflow: the full package adds the UI's JavaScript,
# Flask, gunicorn, docker and graphene (the tracking server), none of which a run imports.
requirements=("ray[default,train,tune]==2.60.*" mlflow-skinny sqlalchemy alembic optuna "faiss-cpu>=1.15,<2")

# Never bundled: the packages the image is known to have (bench/RESULTS.md, "GPU figures on an NVIDIA H200"), so its own
# builds stay in use. Wheel names are normalised to lower case with underscores. Everything else the resolver
# picks is bundled, even where the image may hold a copy as some package's dependency (typing_extensions,
# filelock, protobuf, packaging, six): a newer pure-Python copy first on PYTHONPATH is harmless, a missing one
# fails at import on a box with no network. (Leaving out the small dependencies of pandas and rich was tried:
# `six`, which opencensus imports in Ray's dashboard, was then missing in a Python 3.12 venv holding only the
# image's packages, and the dashboard did not start.)
image_has='^(torch|torchvision|triton|numpy|pyarrow|pandas|rich|pyyaml|matplotlib|scikit_learn|scipy|pillow'
image_has+='|nvidia_.*|cuda_.*|cupy_.*|onnx|onnxruntime)$'

echo "== resolving and downloading cp312 wheels into $work/wheels"
rm -rf "$work/site"
mkdir -p "$work/wheels" "$work/site" "$out"
# the versions this checkout's .venv runs and its tests pass with (a URL-pinned line cannot constrain a download)
"$py" -m pip freeze --exclude-editable | grep -v ' @ ' > "$work/constraints.txt"
"$py" -m pip download --quiet --disable-pip-version-check "${target[@]}" -c "$work/constraints.txt" \
    -d "$work/wheels" "${requirements[@]}"

# the wheels of this resolution only (the folder may hold older ones from an earlier run)
"$py" - "$work" "$image_has" "${requirements[@]}" <<'EOF'
import re, subprocess, sys
from pathlib import Path

work, image_has, reqs = Path(sys.argv[1]), re.compile(sys.argv[2]), sys.argv[3:]
# pip's report of what it resolved (no download: the wheels are already there)
report = work / "report.json"
subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--dry-run",
                "--ignore-installed", "--no-index", "--find-links", str(work / "wheels"), "--report", str(report),
                "--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
                "--platform", "manylinux_2_28_x86_64", "--platform", "manylinux2014_x86_64",
                "--target", str(work / "dry"), "-c", str(work / "constraints.txt"), *reqs], check=True)
import json
keep, skip = [], []
for item in json.loads(report.read_text())["install"]:
    name = re.sub(r"[-_.]+", "_", item["metadata"]["name"]).lower()
    wheel = Path(item["download_info"]["url"].removeprefix("file://"))
    (skip if image_has.match(name) else keep).append(wheel)
(work / "keep.txt").write_text("".join(f"{w}\n" for w in sorted(keep)))
print(f"{len(keep)} wheels to bundle; left to the image: {', '.join(sorted(w.name.split('-')[0] for w in skip))}")
EOF

echo "== unpacking into $work/site"
# pip installs each wheel as it would on the box (its .data folders, dist-info for importlib.metadata), for
# Python 3.12, without byte-compiling with this Python (its .pyc files would be 3.11's)
xargs -a "$work/keep.txt" "$py" -m pip install --quiet --disable-pip-version-check --no-deps --no-index \
    --no-compile --target "$work/site" "${target[@]}"

unpacked=$(du -sm "$work/site" | cut -f1)
echo "unpacked: ${unpacked} MiB"

echo "== stripping what no run on the box loads"
site=$work/site
# - ray/jars: Ray's Java workers (35 MB; no Java here)
# - *.map: the dashboard's JavaScript source maps (7 MB); the dashboard itself (its Python HTTP server, the state
#   API, and the built web client) stays: Ray Train V2 needs the state API
# - tests/test folders and __pycache__: nothing imports them at run time
# - bin/: console scripts whose shebang is this machine's Python; on the box `python -m ray.scripts.scripts`
#   is the `ray` CLI
# - virtualenv's embedded seed wheels (pip, setuptools: 6 MB of zip files that xz cannot shrink): used only to
#   create a virtualenv for a runtime_env with pip/uv packages, which no reid-ray run asks for
rm -rf "$site/ray/jars" "$site/bin" "$site/virtualenv/seed/wheels/embed"/*.whl
find "$site" -name '*.map' -type f -delete
find "$site" -depth -type d \( -name tests -o -name test -o -name __pycache__ \) -prune -exec rm -rf {} +
# The ELF files' symbol tables (what a debugger reads; the dynamic symbols that loading and linking use stay):
# Ray's _raylet.so, gcs_server and raylet ship unstripped, 120 -> 84 MB, which alone put the archive over
# 60 MiB (61.3 MiB measured without this step). --strip-unneeded is what distributions do to every package.
find "$site" -type f \( -name '*.so' -o -name '*.so.*' -o -perm -u+x \) -print0 |
    while IFS= read -r -d '' f; do
        if [ "$(head -c4 "$f" | od -An -tx1 | tr -d ' \n')" = 7f454c46 ]; then strip --strip-unneeded "$f"; fi
    done
if [ ! -d "$site/ray/dashboard" ] || [ ! -f "$site/ray/dashboard/dashboard.py" ]; then
    echo "bundle.sh: the Ray dashboard is missing from the site folder; Ray Train V2 needs it" >&2
    exit 1
fi
stripped=$(du -sm "$site" | cut -f1)
echo "stripped: ${stripped} MiB"

echo "== packing $out/site.tar.xz"
rm -f "$out/site.tar.xz"
# -9, one thread: 674 MiB of memory to pack, 65 MiB to unpack, 3 s to unpack here. Measured on the same site
# folder: 46.9 MiB, against 49.9 MiB with -T0 (blocks compressed apart); the margin under 64 MiB matters more
# than the minutes it takes to pack
XZ_OPT="-9 -T1" tar -C "$site" -cJf "$out/site.tar.xz.tmp" .
mv "$out/site.tar.xz.tmp" "$out/site.tar.xz"
size=$(stat -c %s "$out/site.tar.xz")
{
    echo "site.tar.xz: $size bytes ($(( size / 1048576 )) MiB); unpacked ${stripped} MiB (${unpacked} MiB before stripping)"
    echo "built $(date -u +%Y-%m-%dT%H:%MZ) by bench/device/bundle.sh"
    echo
    echo "wheels:"
    xargs -a "$work/keep.txt" -n1 basename
    echo
    echo "largest files:"
    # (awk, not head: it reads to the end, so sort never dies of SIGPIPE under pipefail)
    find "$site" -type f -printf '%s %P\n' | sort -rn | awk 'NR <= 15 {printf "%8.1f MiB  %s\n", $1 / 1048576, $2}'
    echo
    echo "largest top-level folders:"
    du -sm "$site"/*/ | sort -rn | awk 'NR <= 15' | sed "s|$site/||"
} > "$out/site.txt"
cat "$out/site.txt"
if [ "$size" -gt $(( limit_mib * 1048576 )) ]; then
    echo "bundle.sh: site.tar.xz is $(( size / 1048576 )) MiB, over the ${limit_mib} MiB limit (a device call carries" \
         "64 MiB with the working tree); see the largest files above and strip more" >&2
    exit 1
fi
echo "ok: $out/site.tar.xz, $(( size / 1048576 )) MiB (limit ${limit_mib} MiB)"
