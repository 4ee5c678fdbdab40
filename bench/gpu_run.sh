#!/usr/bin/env bash
# The one prepared GPU check of a session (the device tool's `run`, which sets $OUT):
#   bash bench/gpu_run.sh [extra gpu_ecm.py flags, e.g. --quick]
# Writes $OUT/gpu_ecm.txt (every printed line), $OUT/gpu_ecm.json (the record, rewritten after each line) and
# $OUT/report.md (bench/gpu_report.py: cases and targets). Needs only torch on that machine; a kill by the time limit
# keeps every line and the record up to that point, and the report is still written from what was recorded.
# --profile: the cases behind the targets are also profiled (device time by kind of kernel, bench/kernel_profile.py).
# BUDGET (default 540 s) is gpu_ecm.py's --time-budget; the hard limit is BUDGET + 50 s.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_out}
mkdir -p "$OUT"
PY=${PY:-$(command -v /opt/torch/.venv/bin/python || command -v python3 || command -v python)}
BUDGET=${BUDGET:-540}
{
  echo "[gpu_run] $(date -u +%FT%TZ) python $PY"
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv 2>&1 | head -3
  "$PY" -c "import torch; print('[gpu_run] torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)"
} 2>&1 | tee "$OUT/gpu_ecm.txt"
PYTHONUNBUFFERED=1 timeout $((BUDGET + 50)) "$PY" bench/gpu_ecm.py --compile-full --profile --time-budget "$BUDGET" \
  --json "$OUT/gpu_ecm.json" "$@" 2>&1 | grep -v -E "^\s*(warnings\.warn|torch\._dynamo.*Warning)" | tee -a "$OUT/gpu_ecm.txt"
rc=${PIPESTATUS[0]}
echo "[gpu_run] gpu_ecm.py exit status $rc" | tee -a "$OUT/gpu_ecm.txt"
if [ -f "$OUT/gpu_ecm.json" ]; then
  "$PY" bench/gpu_report.py "$OUT/gpu_ecm.json" > "$OUT/report.md" && cat "$OUT/report.md"
fi
exit "$rc"
