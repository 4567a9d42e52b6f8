#!/usr/bin/env bash
# The GPU run of issues #15 and #19, prepared: one command on a GPU machine (H100/H200, Python 3.12
# with PyTorch, CuPy and CUDA, no network, no TensorRT) that installs the carried wheels, runs the GPU
# backends' tests, the null-model host benchmark (and its py-spy profile) and the end-to-end sweep,
# burst and swap at 128² and 64² on PyTorch-CUDA, and writes its figures to the output folder, each
# step under its own time limit (all of them together within 8 minutes).
#
#   benchmarks/gpu_check.sh --fill-wheelhouse     # here, with the network: the wheels the GPU box lacks
#   benchmarks/gpu_check.sh                       # there: results in $OUT (or --out DIR)
#   benchmarks/gpu_check.sh --dry-run --out DIR   # here, on the CPU: the same steps, tiny and quick (~1 min)
#
# Options: --out DIR (default $OUT, else gpu-check-out), --wheelhouse DIR (default .whl, which
# .gitignore ignores; the device tool carries it with carry=[".whl"]), --backend NAME (default
# PyTorch-CUDA; the dry run uses ONNXRuntime-CPU). PYTHON overrides the interpreter (default python3
# there, .venv/bin/python for the dry run and the fill).
#
# Output (at most 8 files, as the device tool brings back): gpu_check.log (every step's output),
# summary.json (rewritten after each step: rc, seconds, the tests' summary line, the host table and
# the end-to-end figures), host.json, e2e-128.json, e2e-64.json (benchmarks/run.py --json rows,
# rewritten after each row), sweep-128.png, sweep-64.png. A step that fails or runs out of time is
# recorded and the next one runs; the exit status is 0 only if every step passed.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

DRY=0
FILL=0
OUTDIR=${OUT:-gpu-check-out}
WHEELS=.whl
BACKEND=PyTorch-CUDA
while [ $# -gt 0 ]; do
    case $1 in
        --dry-run) DRY=1 ;;
        --fill-wheelhouse) FILL=1 ;;
        --out) OUTDIR=$2; shift ;;
        --wheelhouse) WHEELS=$2; shift ;;
        --backend) BACKEND=$2; shift ;;
        -h|--help) sed -n '2,24p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check: unknown option $1 (see --help)" >&2; exit 2 ;;
    esac
    shift
done

# What the GPU box lacks of the project's runtime dependencies (its image has numpy, h5py, onnx,
# onnxruntime, rich, scikit-image, matplotlib, scipy, protobuf, torch, pytest, pytest-timeout):
# the EPICS stack, the PV-database parser and its dependencies, lz4, and onnx2torch for the
# PyTorch backend's conversion of zoo models. Versions: those of this checkout's .venv.
CARRIED="p4p pvxslibs epicscorelibs setuptools-dso caproto whatrecord apischema graphql-core lark lz4
epicsmacrolib ply nose2 graphviz tzdata"
ONNX2TORCH=onnx2torch==1.5.15
PLATFORMS="--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
--platform manylinux2014_x86_64 --platform manylinux1_x86_64"

if [ "$FILL" = 1 ]; then
    PY=${PYTHON:-.venv/bin/python}
    mkdir -p "$WHEELS"
    specs=$("$PY" -c 'import sys, importlib.metadata as m; print(" ".join(f"{n}=={m.version(n)}" for n in sys.argv[1:]))' $CARRIED) || exit 1
    rc=0
    for spec in $specs $ONNX2TORCH; do
        name=${spec%%==*}
        if ls "$WHEELS/${name//-/_}-${spec##*==}-"*.whl >/dev/null 2>&1; then
            continue  # already there
        fi
        # shellcheck disable=SC2086
        if ! "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
                $PLATFORMS -d "$WHEELS" "$spec" 2>/dev/null; then
            # no Python 3.12 wheel on the index (epicsmacrolib 0.6.1 has cp311 ones only): build one
            # with a local Python 3.12 (pyenv's, or PY312=/path/to/python3.12)
            py312=${PY312:-$(PYENV_VERSION=$(pyenv versions --bare 2>/dev/null | grep '^3\.12' | tail -1) \
                              pyenv which python3.12 2>/dev/null || command -v python3.12)}
            if [ -n "$py312" ] && "$py312" -m pip wheel -q --no-deps -w "$WHEELS" "$spec"; then
                echo "gpu_check: built $spec with $py312"
            else
                echo "gpu_check: no Python 3.12 wheel of $spec, and none could be built (set PY312)" >&2
                rc=1
            fi
        fi
    done
    ls -l "$WHEELS"
    du -sh "$WHEELS"
    exit $rc
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
    T_INSTALL=30; T_ENV=30; T_TESTS=60; T_HOST=90; T_E2E=90
else
    PY=${PYTHON:-python3}
    QUICK=
    HOST_SIZES=64,128,256,516
    SIZES="128 64"
    RATES=1000,2000,4000,6000,8000
    STEP_S=2
    PROFILE=()
    TESTS_K="test_infer or torch_backend or torch_cuda"
    MODULES="numpy onnxruntime torch cupy p4p caproto whatrecord onnx2torch ptychostream"
    # 30 + 20 + 60 + 190 + 2 x 90 = 480 s; a step cut short keeps the rows it wrote
    T_INSTALL=30; T_ENV=20; T_TESTS=60; T_HOST=190; T_E2E=90
fi

log() { echo "$*" | tee -a "$LOG"; }

# step NAME SECONDS COMMAND...: run under a time limit (SIGTERM to its process group, SIGKILL 10 s
# later), output to the log and to $TMPD/NAME.log, rc and seconds to the summary
step() {
    local name=$1 limit=$2 t0 rc
    shift 2
    log "== $name (at most ${limit} s): $*"
    t0=$(date +%s%N)
    timeout -k 10 "$limit" "$@" 2>&1 | tee "$TMPD/$name.log" >>"$LOG"
    rc=${PIPESTATUS[0]}
    printf '%s\t%s\t%s\t%s\n' "$name" "$rc" "$limit" "$(( ($(date +%s%N) - t0) / 1000000 ))" >>"$STEPS"
    log "== $name: rc $rc$([ "$rc" = 124 ] && echo ' (time limit)')"
    summary
    return 0
}

# summary.json: the steps so far, the tests' summary line, the host table and the end-to-end rows
summary() {
    "$PY" - "$OUTDIR" "$STEPS" "$TMPD" "$DRY" "$BACKEND" <<'EOF' || true
import json, platform, subprocess, sys
from pathlib import Path
out, steps, tmp, dry, backend = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3]), sys.argv[4] == "1", sys.argv[5]
rows = [line.split("\t") for line in steps.read_text().splitlines() if line]
res = {"dry_run": dry, "backend": backend, "machine": f"{platform.node()} {platform.machine()}, Python "
       f"{platform.python_version()}", "steps": [{"name": n, "rc": int(rc), "limit_s": int(lim), "seconds": int(ms) / 1000}
                                            for n, rc, lim, ms in rows]}
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
        res[name] = [{k: r[k] for k in ("bench", "what", "value", "unit", "ceiling", "ceiling_what", "ratio")}
                     for r in data if r["bench"] != "sweep" or "sustained" in r["data"]]
(out / "summary.json").write_text(json.dumps(res, indent=1))
EOF
}

log "# gpu_check $(date -u +%FT%TZ) dry-run=$DRY backend=$BACKEND out=$OUTDIR python=$PY"

# 1. the carried wheels (the dry run installs nothing: the venv has the packages; it lists the wheelhouse)
if [ "$DRY" = 1 ]; then
    step install "$T_INSTALL" bash -c "ls $WHEELS/*.whl 2>/dev/null | sed 's/^/would install /' || true; echo 'dry run: the venv has them'"
else
    SITE=/tmp/ptychostream-site
    step install "$T_INSTALL" bash -c "ls $WHEELS/*.whl >/dev/null || { echo 'no wheels in $WHEELS: run benchmarks/gpu_check.sh --fill-wheelhouse where pip works, and carry $WHEELS'; exit 1; }
        $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target $SITE $WHEELS/*.whl"
    export PYTHONPATH=$SITE:$ROOT/src${PYTHONPATH:+:$PYTHONPATH}
fi

# 2. what is there
step env "$T_ENV" bash -c "nvidia-smi || true; $PY -c '
import platform, importlib
print(\"python\", platform.python_version())
for m in \"$MODULES\".split():
    try:
        mod = importlib.import_module(m)
        print(m, getattr(mod, \"__version__\", \"\"), getattr(mod, \"__file__\", \"\"))
    except Exception as exc:
        print(m, \"MISSING:\", type(exc).__name__, exc)
if \"torch\" in \"$MODULES\".split():
    import torch
    print(\"torch.cuda\", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else \"\")
from ptychostream.model.backends import backend_unavailable_reason as r
for b in (\"ONNXRuntime-CPU\", \"TensorRT\", \"PyTorch-CUDA\"):
    print(\"backend\", b, r(b) or \"available\")
'"

# 3. the GPU backends' tests (on the CPU they skip): the inference tests and the PyTorch backend's
step tests "$T_TESTS" "$PY" -m pytest -q -p no:cacheprovider tests/test_infer.py tests/test_train.py \
    -k "$TESTS_K"

# 4. the null-model host path at each frame size, next to a bare p4p client, and its py-spy profile
step host "$T_HOST" "$PY" benchmarks/run.py --only host,profile $QUICK --backend "$BACKEND" \
    --host-sizes "$HOST_SIZES" ${PROFILE[@]+"${PROFILE[@]}"} --json "$OUTDIR/host.json"

# 5. end to end (simdet -> reconstructor -> mosaic): sweep (absolute rates: a GPU's inference
#    ceiling is beyond what simdet publishes), burst and swap
for size in $SIZES; do
    step "e2e-$size" "$T_E2E" "$PY" benchmarks/run.py --only sweep,burst,swap $QUICK --backend "$BACKEND" \
        --size "$size" --rates "$RATES" --step-s "$STEP_S" --max-rate 4000 --json "$OUTDIR/e2e-$size.json" \
        --plot "$OUTDIR/sweep-$size.png"
done

failed=$(awk -F'\t' '$2 != 0 {print $1}' "$STEPS" | tr '\n' ' ')
log "# gpu_check done: $(wc -l <"$STEPS") steps, failed: ${failed:-none}; results in $OUTDIR"
[ -z "$failed" ]
