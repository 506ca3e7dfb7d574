#!/usr/bin/env bash
# One command for a bare GPU box (bench/device/README.md): the GPU figures of bench/gpu.py and the Ray paths
# (Train, the PseudoLabeler actor, Tune + Optuna, MLflow) on one GPU, each part saved into OUT_DIR as it ends.
#
#     bash bench/device/run.sh OUT_DIR [--tiny]
#
# Parts, each under its own `timeout` (a hang costs that part only) and all under one deadline (RUN_BUDGET_S,
# default 510 s, so that with the last part's 20 s to die and the summary the run ends within 9 minutes):
#   0. unpack bench/device/bundle/site.tar.xz (bundle.sh) onto PYTHONPATH, unless this Python has Ray, MLflow,
#      Optuna and faiss already and --tiny is given (the CPU test)
#   1. synth: the Market-shaped set (`python -m reid_ray.cli synth DIR --preset market`; --tiny: 20 identities)
#      and a 100-identity one for the sweep
#   2. gpu: `python -m bench.gpu --sections ... --mmt-iters 50 --steps 30` (GPU_SECTIONS picks the sections)
#   3. baseline: `python -m reid_ray.train --method baseline` under Ray Train on the GPU, 2 epochs: images/s per
#      epoch, beside the bare loop's of part 2 (compare.json)
#   4. mmt: `python -m reid_ray.train --method mmt` from part 3's checkpoint, 1 epoch of 20 iterations (its
#      refresh: both mean nets' features of the 12,936 target images, k-means k = 100 in the PseudoLabeler actor
#      with the torch engine, `clustering.backend=torch`; on a 1-GPU box the actor has no GPU share beside the
#      worker's whole GPU, reid_ray/distributed/resources.py, so it clusters on its CPU), then the evaluation
#      of both mean nets on the source and target test sets (the same set: 4 x 19,281 images)
#   5. tune: `python -m reid_ray.tune --method mmt --num-samples 2`, two trials at once on the one GPU
#      (0.25 GPU a worker, so each trial's actor gets its own 0.25 GPU share and clusters on the GPU), 2 epochs
#      of 20 iterations, on the 100-identity set (a 1-epoch source pretraining first)
#   6. graph: part 3 again with `--set model.cuda_graph=true` (the whole step captured in one CUDA graph), its
#      images/s beside part 3's in compare.json; skipped with --tiny (a CPU cannot capture)
# OUT_DIR holds at most 8 files, as the device tool brings back (2 folders deep at most): run.log (every part's
# output), summary.json (every figure; rewritten after each part), compare.json, mlflow.db (the MLflow store, a
# copy of the work folder's: its artifacts stay behind), gpu/gpu.json and gpu/gpu.md, and ray-logs.tar.xz when a
# Ray part failed.
# Environment: PYTHON (default: python, else python3), DEVICE_WORK (datasets, checkpoints, the MLflow store;
# default /tmp/rr-work), RUN_BUDGET_S, GPU_SECTIONS (default: every section of bench.gpu but eval; training, kmeans, mmt, graphcheck first).
set -uo pipefail

if [ $# -lt 1 ] || [[ "$1" == -* ]]; then
    echo "usage: bash bench/device/run.sh OUT_DIR [--tiny]" >&2
    exit 2
fi
start=$(date +%s)
mkdir -p "$1"
out=$(cd "$1" && pwd)
tiny=0
[ "${2:-}" = --tiny ] && tiny=1
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
cd "$repo"
py=${PYTHON:-$(command -v python || command -v python3)}
work=${DEVICE_WORK:-/tmp/rr-work}
mkdir -p "$work"
work=$(cd "$work" && pwd)
# Ray's sockets live under its temp folder, whose path must stay short (107 bytes a socket path); one folder per
# run, so a `ray start` cluster elsewhere on the machine is never joined
export RAY_TMPDIR=/tmp/rr.$$
mkdir -p "$RAY_TMPDIR"
export PYTHONUNBUFFERED=1 PYTHONDONTWRITEBYTECODE=1
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"  # reid_ray and bench from this tree, in Ray's workers too
mlflow_db=$work/mlflow.db  # its artifacts land in mlruns/ beside it: the store stays here, a copy goes to OUT_DIR
# a rerun in the same work folder keeps the data (and the unpacked bundle) but starts the runs afresh: a Ray Train
# run of the same name in the same folder would continue, and the store would hold two runs of each name
rm -rf "$work/outputs" "$work/mlruns" "$mlflow_db"
exec > >(tee -a "$out/run.log") 2>&1

if [ $tiny = 1 ]; then
    data=$work/market-tiny; sweep_data=$data
    gpu_flag=false; gpus_per_worker=0; concurrent=1
    # the bench.gpu --tiny sizes: the `small` backbone at 64x32, P x K = 4 x 4
    size=(--set model.arch=small --set transform.height=64 --set transform.width=32
          --set loader.num_identities=4 --set loader.num_workers=0)
    k_full=10; k_sweep=10; iters=4
    sweep_epochs=1  # the CPU test checks that each trial runs, refreshes and reports, not its learning curve
    scale=3  # each part's budget x 3 on 2 CPU cores: Ray's fixed costs alone are ~35 s a TorchTrainer.fit()
else
    data=$work/market; sweep_data=$work/market-100
    gpu_flag=true; gpus_per_worker=0.25; concurrent=2
    size=()  # the defaults: ResNet-50 at 256x128, P x K = 16 x 4, loader processes from the worker's CPUs
    k_full=100; k_sweep=50; iters=20
    sweep_epochs=2
    scale=1
fi
budget=${RUN_BUDGET_S:-$(( 510 * scale ))}
deadline=$(( start + budget ))
uri=sqlite:///$mlflow_db
echo "== bench/device/run.sh $* on $(uname -n), $(date -u +%Y-%m-%dT%H:%MZ); python $py; work $work; budget ${budget} s"
common=(--source market1501 --target market1501 --mlflow-uri "$uri" --output "$work/outputs" --experiment device
        --verbose)

parts_file=$work/parts.jsonl  # one line a part; summary.json carries them
: > "$parts_file"
failed=0
summarise() {
    "$py" "$here/summary.py" --out "$out" --parts "$parts_file" --mlflow-db "$mlflow_db" \
        --sweep-dir "$work/outputs/tune/device-sweep" --tiny "$tiny" || echo "summary.py failed (rc $?)"
}
save_store() {  # a consistent copy of the SQLite store (sqlite3's backup API), into OUT_DIR
    [ -f "$mlflow_db" ] || return 0
    "$py" -c "import sqlite3, sys; d = sqlite3.connect(sys.argv[2]); sqlite3.connect(sys.argv[1]).backup(d); d.close()" \
        "$mlflow_db" "$out/mlflow.db.tmp" && mv "$out/mlflow.db.tmp" "$out/mlflow.db"
}
# part NAME BUDGET_S COMMAND...: runs COMMAND under `timeout` (its whole process group: Ray's daemons too),
# within the run's deadline; records its exit status and wall time
part() {
    local name=$1 want=$(( $2 * scale ))
    shift 2
    local now left t rc t0 t1
    now=$(date +%s)
    left=$(( deadline - now - 10 ))  # 10 s kept for the summary
    t=$(( want < left ? want : left ))
    if [ "$t" -lt 15 ]; then
        echo "== part $name: skipped, ${left} s left of the run's budget"
        printf '{"part": "%s", "rc": null, "skipped": true, "budget_s": %d}\n' "$name" "$want" >> "$parts_file"
        summarise
        return 0
    fi
    echo "== part $name (timeout ${t} s): $*"
    t0=$(date +%s.%N)
    timeout --kill-after=20 "$t" "$@"
    rc=$?
    t1=$(date +%s.%N)
    [ $rc = 124 ] && echo "== part $name: TIMED OUT after ${t} s"
    echo "== part $name: rc $rc, $(awk "BEGIN {printf \"%.1f\", $t1 - $t0}") s"
    printf '{"part": "%s", "rc": %d, "wall_s": %s, "timeout_s": %d, "budget_s": %d}\n' \
        "$name" "$rc" "$(awk "BEGIN {printf \"%.1f\", $t1 - $t0}")" "$t" "$want" >> "$parts_file"
    [ $rc = 0 ] || failed=$(( failed + 1 ))
    save_store
    summarise
    return 0
}

# -- 0. the bundle -------------------------------------------------------------------------------------------
has_packages() { "$py" -c "import ray, mlflow, optuna, faiss" 2>/dev/null; }
# the parts that are shell functions run under `timeout` as `bash -c NAME`: they and what they read are exported
export py here work data sweep_data tiny
unpack() {
    local site=$work/site
    rm -rf "$site" && mkdir -p "$site" && tar -C "$site" -xJf "$here/bundle/site.tar.xz" &&
        PYTHONPATH="$site:$PYTHONPATH" "$py" -c "import ray, mlflow, optuna, faiss, sqlalchemy, alembic
print('bundle: ray', ray.__version__, 'mlflow', mlflow.__version__, 'optuna', optuna.__version__, 'faiss', faiss.__version__)"
}
export -f unpack
if [ $tiny = 1 ] && has_packages; then
    echo "== part bundle: not needed ($py has ray, mlflow, optuna and faiss)"
elif [ -f "$here/bundle/site.tar.xz" ]; then
    part bundle 25 bash -c unpack
    # after the tree (reid_ray and bench are the tree's), before the image's site-packages (the bundle's copies win)
    export PYTHONPATH="$repo:$work/site${PYTHONPATH#"$repo"}"
elif ! has_packages; then
    echo "run.sh: $here/bundle/site.tar.xz is missing and $py lacks ray, mlflow, optuna or faiss; build the bundle" \
         "with bash bench/device/bundle.sh and carry bench/device/bundle" >&2
    exit 2
fi
"$py" -c "import torch; c = torch.cuda.is_available(); print('torch', torch.__version__, torch.cuda.get_device_name(0) if c else 'CPU')"

# -- 1. the data ---------------------------------------------------------------------------------------------
synth() {
    # `reid-ray synth --preset market` writes the whole of Market's shape; it has no flag for fewer identities, so
    # the smaller sets (bench.gpu --tiny's 20, the sweep's 100: Market's first ones) come from the function
    few() { "$py" -c "import sys; from reid_ray.data.synthetic import generate_market_shaped as g
print(g(sys.argv[1], ids=int(sys.argv[2])))" "$1" "$2"; }
    if [ $tiny = 1 ]; then
        [ -d "$data/Market-1501-v15.09.15" ] || few "$data" 20
        return
    fi
    [ -d "$data/Market-1501-v15.09.15" ] || "$py" -m reid_ray.cli synth "$data" --preset market || return
    [ -d "$sweep_data/Market-1501-v15.09.15" ] || few "$sweep_data" 100
}
export -f synth
part synth 45 bash -c synth

# -- 2. bench/gpu.py -----------------------------------------------------------------------------------------
# every section this checkout's bench/gpu.py has, training first (its end-to-end figure is the bare loop that
# part 3 is compared with), eval last-but-dropped (re-ranking and evaluate_rank were measured on the H200 already)
# order: what the issue's goals name first (training img/s, k-means on the GPU, the MMT iteration), then whether
# the captured step (model.cuda_graph) trains as the uncaptured one (graphcheck), each section
# saved as it ends; 30 steps a timed run keep the section within its budget (the H200's run 1, 50 steps and
# --compile, took most of a 10-minute call)
# (--tiny leaves graphcheck out too: on a CPU it is the capture's stand-in, which tests/test_bench_gpu.py runs)
sections=${GPU_SECTIONS:-$("$py" -c "import sys; from bench.gpu import SECTIONS as s
first = [x for x in ('training', 'kmeans', 'mmt', 'graphcheck') if x in s]
left_out = ['eval'] + (['graphcheck'] if sys.argv[1] == '1' else [])
print(' '.join(x for x in first + [x for x in s if x not in first] if x not in left_out))" "$tiny")}
gpu_args=(--out "$out/gpu" --data "$data" --sections $sections)
[ $tiny = 1 ] && gpu_args+=(--tiny) || gpu_args+=(--mmt-iters 50 --steps 30)
part gpu 160 "$py" -m bench.gpu "${gpu_args[@]}"

# -- 3. the baseline under Ray Train ---------------------------------------------------------------------------
part baseline 80 "$py" -m reid_ray.train --method baseline "${common[@]}" --data-root "$data" --workers 1 \
    --epochs 2 --eval-every 2 --name baseline-device --set use_gpu=$gpu_flag "${size[@]}"

# -- 4. MMT under Ray Train, the PseudoLabeler actor clustering with torch -------------------------------------
# both nets from part 3's checkpoint (params.two_sources=false: no second source pretraining on the clock);
# without one, the driver pretrains the source for 1 epoch first
ckpt=$(ls -1d "$work"/outputs/baseline-device/checkpoint_*/checkpoint.pt 2>/dev/null | sort | tail -1)
init=(--set pretrain_epochs=1)
[ -n "$ckpt" ] && init=(--init "$ckpt")
part mmt 110 "$py" -m reid_ray.train --method mmt "${common[@]}" --data-root "$data" --workers 1 --epochs 1 \
    --eval-every 1 --name mmt-device "${init[@]}" --set params.two_sources=false --set params.iters=$iters \
    --set params.num_clusters=$k_full --set clustering.backend=torch --set use_gpu=$gpu_flag "${size[@]}"

# -- 5. a Tune + Optuna sweep of MMT, two trials sharing the GPU ----------------------------------------------
# bench/device/mmt-space.yaml leaves iters and k to the flags (the real-benchmark space samples 400-800 iterations).
# The source model: part 3's where the sweep trains on part 3's set (--tiny), else a 1-epoch pretraining
sweep_init=(--set pretrain_epochs=1)
[ -n "$ckpt" ] && [ "$sweep_data" = "$data" ] && sweep_init=(--set "init=$ckpt")
part tune 110 "$py" -m reid_ray.tune --method mmt --num-samples 2 "${common[@]}" --data-root "$sweep_data" \
    --search-space "$here/mmt-space.yaml" --workers-per-trial 1 --gpus-per-worker $gpus_per_worker \
    --max-concurrent $concurrent --epochs $sweep_epochs --name device-sweep --set eval_every=1 "${sweep_init[@]}" \
    --set params.two_sources=false --set params.iters=$iters --set params.num_clusters=$k_sweep \
    --set clustering.backend=torch "${size[@]}"

# -- 6. the baseline again, its step captured in one CUDA graph (model.cuda_graph) ------------------------------
# last, so that a run short of time loses only this part; a CPU cannot capture (the flag is an error there)
if [ $tiny = 1 ]; then
    echo "== part graph: skipped (--tiny: model.cuda_graph needs a CUDA GPU)"
else
    part graph 80 "$py" -m reid_ray.train --method baseline "${common[@]}" --data-root "$data" --workers 1 \
        --epochs 2 --eval-every 2 --name baseline-graph-device --set use_gpu=true --set model.cuda_graph=true
fi

# -- 7. the store and the summary ----------------------------------------------------------------------------
save_store
summarise
if [ "$failed" != 0 ]; then  # Ray's own logs (workers, raylet, GCS, dashboard) for whatever failed
    tar -C "$RAY_TMPDIR" -cJf "$out/ray-logs.tar.xz" --exclude='*.so' --exclude='runtime_resources' . 2>/dev/null &&
        echo "Ray's logs: $out/ray-logs.tar.xz ($(du -h "$out/ray-logs.tar.xz" | cut -f1))"
fi
rm -rf "$RAY_TMPDIR"
echo "== done in $(( $(date +%s) - start )) s: $out/summary.json"
"$py" -c "import json, sys
for p in json.load(open(sys.argv[1]))['parts']: print(f\"{p['part']:9} rc {p['rc']}  {p.get('wall_s', '-')} s\")" "$out/summary.json"
