#!/usr/bin/env bash
# Every GPU path of tinysaver, one line each: PASS/FAIL, seconds, what ran. For a machine with one
# CUDA GPU, run from the repository root after the README's install:  bash benchmarks/gpu_check.sh
# Budget: under 8 minutes in all (each path has its own timeout). No test of the suite needs a GPU;
# this is the check that the CUDA paths still work where users serve.
set -u
cd "$(dirname "$0")/.."
TMP=$(mktemp -d)
trap 'kill $(jobs -p) 2>/dev/null; rm -rf "$TMP"' EXIT
PORT=${PORT:-8765}
fails=0

line() {  # NAME TIMEOUT COMMAND...: one line, the command's output kept in $TMP/NAME.log
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  if timeout "$limit" "$@" >"$TMP/$name.log" 2>&1; then
    printf 'PASS %5ds  %s\n' $((SECONDS - t0)) "$name"
  else
    printf 'FAIL %5ds  %s (rc %s): %s\n' $((SECONDS - t0)) "$name" "$?" "$(tail -n 1 "$TMP/$name.log")"
    fails=$((fails + 1))
  fi
}

python - "$TMP/imgs" <<'PY'
import sys, pathlib
import numpy as np
from PIL import Image
root = pathlib.Path(sys.argv[1]); rng = np.random.default_rng(0)
for c in range(2):
    (root / f"c{c}").mkdir(parents=True)
    for i in range(32):
        Image.fromarray(rng.integers(0, 255, (28, 28), dtype=np.uint8)).save(root / f"c{c}/{i}.png")
PY
python -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name(0))" \
  || { echo "FAIL     0s  cuda (no CUDA device: nothing else can run)"; exit 1; }

CK=zoo_index/checkpoints/fashion-mnist/resnet10t.safetensors
line profile-cuda 120 python -m tinysaver profile --zoo gpu-check --model resnet10t --checkpoint "$CK" \
  --num-classes 10 --in-chans 1 --split val="imagefolder:$TMP/imgs" --device cuda --batch-sizes 1 32 --quiet \
  --root "$TMP/zoo"
line cascade-half-channels-last 120 python - <<'PY'
import numpy as np, torch
from tinysaver.cascade import build_cascade
from tinysaver.selector import SelectorConfig, select
from tinysaver.zoo import load_zoo
zoo = load_zoo("fashion-mnist")
sel = select(zoo, "resnet10t", SelectorConfig()).best
ref = build_cascade(sel, zoo).predict(torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
gpu = build_cascade(sel, zoo, device="cuda", half=True, channels_last=True).predict(
    torch.randint(0, 256, (256, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0)))
agree = float((ref.pred == gpu.pred).mean())
assert agree >= 0.98, f"half-precision answers agree with CPU float32 on only {agree:.3f}"
print(f"agreement with CPU {agree:.3f}")
PY
line infer-cuda 120 python -m tinysaver infer --zoo fashion-mnist --base resnet10t --device cuda "$TMP/imgs"

serve_layout() {  # LAYOUT EXTRA-ARGS...: start, wait for /healthz, 20 requests, stop
  local layout=$1; shift
  python -m tinysaver serve --zoo fashion-mnist --base resnet10t --layout "$layout" --port "$PORT" "$@" \
    >"$TMP/serve-$layout.out" 2>&1 &
  local pid=$!
  for _ in $(seq 90); do
    curl -sf "http://127.0.0.1:$PORT/healthz" >/dev/null && break
    kill -0 $pid 2>/dev/null || { tail -n 1 "$TMP/serve-$layout.out"; return 1; }  # it stopped: say why now
    sleep 1
  done
  local ok=0
  for f in "$TMP"/imgs/c0/*.png; do
    curl -sf -H 'Content-Type: image/png' --data-binary @"$f" "http://127.0.0.1:$PORT/predict" >/dev/null && ok=$((ok + 1))
    [ $ok -ge 20 ] && break
  done
  kill -INT $pid; wait $pid
  [ $ok -ge 20 ] || { echo "only $ok of 20 requests answered; see serve output"; tail -n 5 "$TMP/serve-$layout.out"; return 1; }
  echo "$ok answered"
}
export -f serve_layout
export TMP PORT
line serve-fused-gpu 150 bash -c 'serve_layout fused --num-gpus 1'
line serve-per-stage-base-on-gpu 150 bash -c 'serve_layout per-stage --num-gpus 0,1 --num-cpus 0.5,0.5'
line cuda-test 120 python -m pytest -q -m gpu tests/

echo "$fails path(s) failed"
exit $((fails > 0))
