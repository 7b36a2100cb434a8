#!/usr/bin/env bash
# One-shot GPU check: build PyCUDA from the carried sdist, run the GPU tests and
# the GPU benchmark, write logs and results to OUTDIR.
#
# Usage (repository root, on a machine with an NVIDIA GPU, nvcc, Python 3 with
# numpy, and no package registry):
#     bash benchmarks/gpu_check.sh OUTDIR [STEP ...]
# STEPs (default all, in this order): tests bench refine iteration ncu mps (mps
# runs only where time is left, so after a full run it needs a run of its own:
# `bash benchmarks/gpu_check.sh OUT mps`, about 26 s of build and 2 minutes).
# Knobs: LR_BENCH_BOXES (bench_gpu's boxes, default "128 256"); LR_ITER_PARTICLES
# (bench_iteration's particles at box 256, default 3000); LR_ITER_THREADS (its
# --threads: threads preparing the next batch, default 8); LR_ITER_VARIANTS (scoring
# kernels to run the iteration with again, $LOCALREFINE_SCORE_VARIANT, e.g.
# "j64_s64 j64_s64_cells"; default none); LR_ITER_SETTINGS (the iteration again
# with each setting, comma-separated VAR=VALUE words to export and --option=value
# words for bench_iteration.py; default rotation lanes, then rotation lanes and
# wide tiles, then the eighth session's way: CTFs computed on the host, images
# uploaded from pageable memory, batches of 128; "" for none);
# LR_NCU_VARIANTS (kernels profiled by ncu, default "s64 s64_rl s64_wide_rl", 64
# particles at box 256); LR_NCU_SEARCH (particles of the one-batch GPU search whose
# every kernel ncu times, default 256; 0 for none); LR_MPS_PROCESSES (the K of
# the mps step, default "1 2 4 8": benchmarks/bench_processes.py at box 256, each
# process all 256 particles, time-sliced and then under an MPS control daemon
# started with its own pipe and log folders, results appended to bench_gpu.txt).
#
# Needs in .device/ (git-ignored; fill it where pip works, see docs/gpu.md):
#     pycuda-*.tar.gz (sdist) and the wheels of pytools, platformdirs,
#     typing_extensions, siphash24, mako, markupsafe, mrcfile.
# Writes OUTDIR/gpu_check.log (everything), build.log (PyCUDA build),
# gpu_tests.xml (JUnit), bench_gpu.txt and bench_gpu.json, bench_iteration.txt
# (one whole iteration at box 256 where time is left, with its cProfile table and
# the runs with LR_ITER_VARIANTS and LR_ITER_SETTINGS) and bench_iteration.json, and
# ncu.txt (an Nsight Compute profile of the scoring kernels, then the device time
# per kernel of one whole search at box 256, where ncu exists and time is left):
# 8 files, the most a device call brings back.
# Time: ~25 s build on 16 cores, tests and benchmark capped by timeouts so the
# whole script ends within ~8 minutes.
set -u -o pipefail

OUTDIR=${1:?usage: bash benchmarks/gpu_check.sh OUTDIR [STEP ...]}
shift
STEPS=" ${*:-tests bench refine iteration ncu mps} "
want() { [[ $STEPS == *" $1 "* ]]; }
mkdir -p "$OUTDIR"
OUTDIR=$(cd "$OUTDIR" && pwd)
REPO=${LR_REPO:-$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)}
DEVICE_DIR=$REPO/.device
PY=${PYTHON:-python3}
WORK=${LR_GPU_WORK:-/tmp/lr_gpu_check}
T0=$(date +%s)
exec > >(tee "$OUTDIR/gpu_check.log") 2>&1

stamp() { echo "[$(($(date +%s) - T0)) s] $*"; }
status=0

stamp "gpu_check: repo $REPO, python $($PY --version 2>&1), $(nproc) cores"
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm --format=csv,noheader ||
    stamp "nvidia-smi failed"
NVCC=$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)
"$NVCC" --version | tail -2
CUDA_ROOT=
for root in "${CUDA_HOME:-}" "${CUDA_PATH:-}" /usr/local/cuda \
    "$(dirname "$(dirname "$(readlink -f "$NVCC")")")"; do
    if [ -n "$root" ] && [ -f "$root/include/cuda.h" ]; then CUDA_ROOT=$root; break; fi
done
stamp "CUDA root ${CUDA_ROOT:-not found}"
cd "$REPO" || exit 1
git log --oneline -1 2>/dev/null || true

# -- 1. pure-Python dependencies (carried wheels) ---------------------------------
SITE=$WORK/site
mkdir -p "$SITE"
if ! $PY -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "$DEVICE_DIR"/*.whl; then
    stamp "WARNING: some carried wheels did not install (see above)"
fi
export PYTHONPATH=$REPO:$SITE${PYTHONPATH:+:$PYTHONPATH}

# -- 2. PyCUDA from its sdist, objects compiled in parallel -----------------------
HEADERS=$($PY -c "import sysconfig; print(sysconfig.get_paths()['include'])")
if [ ! -f "$HEADERS/Python.h" ]; then
    stamp "ERROR: Python.h not found in $HEADERS: PyCUDA cannot be built here"
    exit 3
fi
LIBCUDA_DIR=${LR_LIBCUDA_DIR:-}
[ -z "$LIBCUDA_DIR" ] && for d in "$CUDA_ROOT/lib64/stubs" "$CUDA_ROOT/targets/x86_64-linux/lib/stubs" \
    /usr/lib/x86_64-linux-gnu /usr/local/nvidia/lib64 /usr/local/nvidia/lib /usr/lib64; do
    if [ -e "$d/libcuda.so" ]; then LIBCUDA_DIR=$d; break; fi
done
if [ -z "$LIBCUDA_DIR" ]; then  # only libcuda.so.1 (the driver's): link against it
    so1=$(ldconfig -p | awk '/libcuda\.so\.1 /{print $NF; exit}' || true)
    [ -z "$so1" ] && so1=$(ls /usr/local/nvidia/lib64/libcuda.so.1 /usr/lib/x86_64-linux-gnu/libcuda.so.1 2>/dev/null | head -1)
    mkdir -p "$WORK/cudalib"
    ln -sf "$so1" "$WORK/cudalib/libcuda.so"
    LIBCUDA_DIR=$WORK/cudalib
fi
stamp "linking PyCUDA against $LIBCUDA_DIR/libcuda.so"

SDIST=$(ls "$DEVICE_DIR"/pycuda-*.tar.gz | head -1)
rm -rf "$WORK/src" && mkdir -p "$WORK/src"
tar xzf "$SDIST" -C "$WORK/src"
SRC=$(ls -d "$WORK"/src/pycuda-*/)
cat > "$WORK/parbuild.py" <<'EOF'
# setup.py build_ext with the object files of each extension compiled in parallel
import os, runpy, sys
from concurrent.futures import ThreadPoolExecutor

def patch(cls):
    def compile(self, sources, output_dir=None, macros=None, include_dirs=None, debug=0,
                extra_preargs=None, extra_postargs=None, depends=None):
        macros, objects, extra_postargs, pp_opts, build = self._setup_compile(
            output_dir, macros, include_dirs, sources, depends, extra_postargs)
        cc_args = self._get_cc_args(pp_opts, debug, extra_preargs)
        def one(obj):
            if obj in build:
                src, ext = build[obj]
                self._compile(obj, src, ext, cc_args, extra_postargs, pp_opts)
        with ThreadPoolExecutor(int(os.environ.get("NJOBS", "8"))) as pool:
            list(pool.map(one, objects))
        return objects
    cls.compile = compile

import setuptools  # noqa: F401  (provides distutils on Python >= 3.12)
try:
    from distutils import ccompiler
    ccompiler.CCompiler._setup_compile, ccompiler.CCompiler._get_cc_args
    patch(ccompiler.CCompiler)
except Exception as exc:  # an unknown distutils: build serially
    print("parbuild: serial build,", exc)
sys.path.insert(0, os.getcwd())
sys.argv = ["setup.py"] + sys.argv[1:]
runpy.run_path("setup.py", run_name="__main__")
EOF
(
    cd "$SRC" &&
        $PY configure.py --cuda-root="$CUDA_ROOT" --no-cuda-enable-curand \
            --cudadrv-lib-dir="$LIBCUDA_DIR" &&
        NJOBS=$(nproc) $PY "$WORK/parbuild.py" build_ext --inplace
) > "$OUTDIR/build.log" 2>&1
build_rc=$?
stamp "PyCUDA build exit $build_rc (log: build.log)"
tail -5 "$OUTDIR/build.log"
export PYTHONPATH=$SRC:$PYTHONPATH
if ! $PY -c "import pycuda.driver as d; d.init(); print('PyCUDA', __import__('pycuda').VERSION_TEXT, 'sees', d.Device(0).name())"; then
    stamp "ERROR: PyCUDA does not import or sees no GPU"
    exit 4
fi

# -- 3. GPU tests (a missing GPU fails, never skips) --------------------------------
export LOCALREFINE_REQUIRE=gpu
export PYTHONUNBUFFERED=1
if want tests; then
    stamp "GPU tests"
    timeout 240 $PY -m pytest -p no:cacheprovider tests/test_gpu_kernels.py -m "gpu and not slow" \
        -v -rs -s --durations=8 -W "ignore::DeprecationWarning" --junitxml="$OUTDIR/gpu_tests.xml" ||
        status=5
fi

# -- 4. GPU benchmark ----------------------------------------------------------------
if want bench; then
    stamp "GPU benchmark"
    # shellcheck disable=SC2086  # the boxes are separate words
    timeout 270 $PY benchmarks/bench_gpu.py --boxes ${LR_BENCH_BOXES:-128 256} \
        --json "$OUTDIR/bench_gpu.json" | tee "$OUTDIR/bench_gpu.txt" || status=6
fi

# -- 5. the small full refinement, GPU against CPU (if time is left) ----------------
left=$((470 - ($(date +%s) - T0)))
if ! want refine; then
    :
elif [ $left -gt 40 ]; then
    stamp "refinement test (timeout $left s)"
    timeout $left $PY -m pytest -p no:cacheprovider tests/test_gpu_kernels.py -m "gpu and slow" \
        -v -rs -s -W "ignore::DeprecationWarning" || status=7
else
    stamp "no time left for the refinement test"
fi
# -- 6. one whole iteration of the refine command at box 256 on the GPU (if time left):
#       its steps' times and the 10^6-particle estimate made from them, its cProfile
#       table, and the same iteration with each of LR_ITER_VARIANTS' kernels
ITER=$OUTDIR/bench_iteration.txt
iteration() {  # iteration LABEL [ARG ...]: one bench_iteration run into $ITER
    local label=$1 left
    shift
    left=$((500 - ($(date +%s) - T0)))
    if [ $left -le 60 ]; then
        stamp "no time left for the iteration ($label)" | tee -a "$ITER"
        return
    fi
    stamp "one iteration at box 256, $label (timeout $left s): bench_iteration.txt"
    echo "=== $label" >> "$ITER"
    timeout $left $PY benchmarks/bench_iteration.py --device cuda --box 256 \
        --n-particles "${LR_ITER_PARTICLES:-3000}" --threads "${LR_ITER_THREADS:-8}" \
        "$@" >> "$ITER" 2>&1
    stamp "bench_iteration exit $?"
    tail -4 "$ITER"
}
if want iteration; then
    rm -f "$WORK/iteration_profile.txt"
    iteration "default kernels" --json "$OUTDIR/bench_iteration.json" \
        --profile "$WORK/iteration_profile.txt"
    for variant in ${LR_ITER_VARIANTS:-}; do
        export LOCALREFINE_SCORE_VARIANT=$variant
        iteration "kernel $variant"
    done
    unset LOCALREFINE_SCORE_VARIANT
    for setting in ${LR_ITER_SETTINGS-LOCALREFINE_SCORE_LANES=rotations \
        LOCALREFINE_SCORE_LANES=rotations,LOCALREFINE_SCORE_WIDE=1 \
        LOCALREFINE_GPU_CTF=host,LOCALREFINE_GPU_PINNED=0,--batch-size=128}; do
        (   # VAR=VALUE words are exported, --words go to bench_iteration.py
            args=()
            for word in ${setting//,/ }; do
                case $word in --*) args+=("$word") ;; *) export "${word?}" ;; esac
            done
            iteration "${setting//,/ }" ${args[@]+"${args[@]}"}
        )
    done
    if [ -f "$WORK/iteration_profile.txt" ]; then
        { echo "=== cProfile of the default run (main thread)"; cat "$WORK/iteration_profile.txt"; } >> "$ITER"
    fi
fi
# -- 7. where the scoring kernels stand, by Nsight Compute (if present and time left)
NCU=$(command -v ncu || ls "$CUDA_ROOT"/bin/ncu /opt/nvidia/nsight-compute/*/ncu 2>/dev/null | head -1)
left=$((520 - ($(date +%s) - T0)))
if ! want ncu; then
    :
elif [ -n "$NCU" ] && [ $left -gt 45 ]; then
    stamp "Nsight Compute profile of the scoring kernels (timeout $left s): ncu.txt"
    timeout $left "$NCU" --clock-control none -k regex:score_tiles --section SpeedOfLight \
        --section MemoryWorkloadAnalysis --section Occupancy \
        $PY benchmarks/profile_scoring.py --box 256 --particles 64 \
        --variants ${LR_NCU_VARIANTS:-s64 s64_rl s64_wide_rl} \
        > "$OUTDIR/ncu.txt" 2>&1
    stamp "ncu exit $? ($(wc -l < "$OUTDIR/ncu.txt") lines)"
    left=$((560 - ($(date +%s) - T0)))
    m=${LR_NCU_SEARCH:-256}
    if [ "$m" -gt 0 ] && [ $left -gt 30 ]; then
        # every kernel of one whole search batch, timed by ncu (no replay of
        # other metrics); the summary goes to the end of ncu.txt
        stamp "device time per kernel of one GPU search of $m particles (timeout $left s)"
        timeout $left "$NCU" --clock-control none --csv --metrics gpu__time_duration.sum \
            $PY benchmarks/profile_scoring.py --box 256 --search "$m" \
            > "$WORK/ncu_search.csv" 2>&1
        stamp "ncu exit $?"
        { echo; echo "=== device time per kernel, one GPU search of $m particles at box 256"
          grep -v '^"' "$WORK/ncu_search.csv" | grep -v '^==PROF==' | tail -3
          $PY benchmarks/profile_scoring.py --summarise "$WORK/ncu_search.csv"
        } >> "$OUTDIR/ncu.txt" 2>&1
        tail -12 "$OUTDIR/ncu.txt"
    fi
else
    stamp "no ncu profile (ncu: ${NCU:-not found}; $left s left)"
fi
# -- 8. K processes on one GPU, without and under MPS (where the control daemon
#       exists and time is left; its results are appended to bench_gpu.txt)
MPS=$(command -v nvidia-cuda-mps-control || true)
left=$((585 - ($(date +%s) - T0)))
if ! want mps; then
    :
elif [ -z "$MPS" ]; then
    stamp "no MPS measurement (nvidia-cuda-mps-control not found)"
elif [ $left -le 90 ]; then
    stamp "no time left for the MPS measurement ($left s)"
else
    half=$(((left - 20) / 2))
    stamp "K processes without MPS (timeout $half s): bench_gpu.txt"
    timeout $half $PY benchmarks/bench_processes.py --box 256 \
        --processes ${LR_MPS_PROCESSES:-1 2 4 8} --label "time-sliced (no MPS)" \
        | tee -a "$OUTDIR/bench_gpu.txt"
    # a control daemon of this script's own: its pipe and log folders under
    # $WORK; the GPU's settings (compute mode) stay as they are
    export CUDA_MPS_PIPE_DIRECTORY=$WORK/mps_pipe CUDA_MPS_LOG_DIRECTORY=$WORK/mps_log
    mkdir -p "$CUDA_MPS_PIPE_DIRECTORY" "$CUDA_MPS_LOG_DIRECTORY"
    if timeout 20 "$MPS" -d; then
        stamp "K processes under MPS (timeout $half s): bench_gpu.txt"
        timeout $half $PY benchmarks/bench_processes.py --box 256 \
            --processes ${LR_MPS_PROCESSES:-1 2 4 8} --label "MPS (own control daemon)" \
            | tee -a "$OUTDIR/bench_gpu.txt"
        stamp "bench_processes exit $?"
        echo quit | timeout 20 "$MPS" || stamp "the MPS control daemon did not quit in 20 s"
        sleep 2
        tail -3 "$CUDA_MPS_LOG_DIRECTORY/control.log" 2>/dev/null
    else
        stamp "the MPS control daemon did not start"
    fi
    unset CUDA_MPS_PIPE_DIRECTORY CUDA_MPS_LOG_DIRECTORY
fi
stamp "gpu_check done, status $status"
sleep 1  # let tee finish the log
exit $status
