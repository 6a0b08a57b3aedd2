#!/usr/bin/env bash
# One call on a lent H100/H200, about 6-8 minutes: the triton scan tests on the GPU for real (no
# interpreter), then bench/bench_gpu.py (scan µs per backend at L = 65 536, end-to-end `fusion
# pansharpen` of wv3_spacenet2 with the official 420.pth in fp32 and bf16, training patches/s).
# Results come back in $OUT: gpu_bench.md (the tables), gpu_bench.jsonl, pytest_gpu.log,
# triton_aot.jsonl and device_bench.log.
#
# Before the call, here (once):
#   - rasterio for the pansharpen section (the GPU image has no rasterio; Python 3.12 there):
#       echo /.whl/ >> .git/info/exclude   # (.whl/ is in .gitignore already)
#       python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#         --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
#         -d .whl rasterio affine cligj click-plugins
#   - the shared data, which does not travel beside the repo: an ignored link whose files travel when
#     `carry` names paths through it (nothing is copied into the repo):
#       echo /.shared_data >> .git/info/exclude; ln -s ../shared/data .shared_data
# The call (device tool):
#   run(command="OUT=$OUT bash scripts/device_bench.sh", timeout_s=540,
#       carry=[".whl", ".shared_data/fusionmamba_official/420.pth",
#              ".shared_data/fusionmamba_official/golden/scan_case.npz", ".shared_data/wv3_spacenet2"])
# Sections whose inputs are missing (no rasterio, no data) are skipped with the reason in the table.
#
# Environment: PY (python3), OUT (out/device_bench), TEST_TIMEOUT (240 s), BENCH_TIMEOUT (420 s),
# BENCH_ARGS (extra bench_gpu.py arguments, e.g. "--sections scan"). CPU check of the logic:
#   DRY=1 PY=/path/to/venv/python OUT=/tmp/db bash scripts/device_bench.sh
set -uo pipefail

OUT=${OUT:-out/device_bench}
PY=${PY:-python3}
mkdir -p "$OUT"
LOG="$OUT/device_bench.log"
export PYTHONUNBUFFERED=1
export TRITON_DEFAULT_FP_FUSION=${TRITON_DEFAULT_FP_FUSION:-1}  # triton 3.9 warns when unset

# Install: carried wheels (rasterio and its few needs) into /tmp/site; the project runs from the tree.
if compgen -G ".whl/*.whl" >/dev/null; then
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl/*.whl 2>&1 | tail -3 | tee -a "$LOG"
fi
[ -d /tmp/site ] && export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
[ -d .shared_data ] && export FUSION_SHARED_DATA=${FUSION_SHARED_DATA:-$PWD/.shared_data}

{
  echo "== $(date -u +%FT%TZ) device_bench.sh on $(hostname)"
  command -v nvidia-smi >/dev/null && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  "$PY" -c "import sys, torch; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.cuda.is_available())"
  "$PY" -c "import triton; print('triton', triton.__version__)" 2>&1 | tail -1
  "$PY" -c "import rasterio; print('rasterio', rasterio.__version__)" 2>&1 | tail -1
  echo "shared data: ${FUSION_SHARED_DATA:-../shared/data}"
} 2>&1 | tee -a "$LOG"

status=0
T0=$(date +%s)
if [ -n "${DRY:-}" ]; then
  # CPU: the interpreter for the tests and the bench's tiny sizes.
  export TRITON_INTERPRET=1
  BENCH=(--dry-run)
else
  unset TRITON_INTERPRET  # the real compiler: this is what the run is for
  BENCH=()
fi

# 1. The scan tests, compiled for the GPU (the interpreter's tests are CI's; these are the real ones).
echo "== pytest triton scan: start $(date -u +%T)" | tee -a "$LOG"
if ! timeout "${TEST_TIMEOUT:-240}" "$PY" -m pytest -q -p no:cacheprovider -rs \
    tests/test_scan_triton.py tests/test_scan.py > "$OUT/pytest_gpu.log" 2>&1; then
  status=1
fi
tail -15 "$OUT/pytest_gpu.log" | tee -a "$LOG"
echo "== pytest: $(( $(date +%s) - T0 )) s" | tee -a "$LOG"

# 2. What ptxas makes of the kernels for this machine's architecture (registers, spills).
ARCH=$("$PY" -c "import torch; c = torch.cuda.get_device_capability() if torch.cuda.is_available() else (9, 0); print(c[0] * 10 + c[1])" 2>/dev/null || echo 90)
env -u TRITON_INTERPRET timeout 120 "$PY" bench/triton_aot_check.py --arch "$ARCH" > "$OUT/triton_aot.jsonl" 2>>"$LOG" || status=1

# 3. The benchmark; it writes gpu_bench.md after every section, so a timeout keeps what it measured.
echo "== bench_gpu: start $(date -u +%T)" | tee -a "$LOG"
# shellcheck disable=SC2086
timeout "${BENCH_TIMEOUT:-420}" "$PY" bench/bench_gpu.py --out "$OUT" "${BENCH[@]}" ${BENCH_ARGS:-} 2>&1 \
  | tee -a "$LOG" | grep -E '^\{|^note|Error|error' | cut -c1-300
[ "${PIPESTATUS[0]}" -eq 0 ] || status=1
echo "== all: $(( $(date +%s) - T0 )) s, status $status" | tee -a "$LOG"
exit $status
