#!/usr/bin/env bash
# The engine benchmark on a CUDA machine: synthetic:7b (the real 7.69 B MOSHI architecture,
# random weights built directly on the GPU), bf16, context 3000, batches up to 64.
#
# Works on a bare GPU box that has python3 + torch but not this project's dependencies:
# wheels found in ./.whl (moshi is pure Python) are installed into a private folder first.
# Everything is overridable, e.g. the local dry run on a CPU:
#   MODEL=synthetic:tiny DEVICE=cpu BATCHES=1,2 STEPS=5 PYTHON=.venv/bin/python bash benchmarks/gpu_engine.sh
# Results: $OUT (or .bench/engine)/gpu_engine.json, plus the log and nvidia-smi's view.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${MODEL:-synthetic:7b}
BATCHES=${BATCHES:-1,2,4,8,16,32,64}
STEPS=${STEPS:-100}
WARMUP=${WARMUP:-12}
CONTEXT=${CONTEXT:-3000}
DEVICE=${DEVICE:-cuda}
DTYPE=${DTYPE:-}
CONTROLS=${CONTROLS:-}
dest=${OUT:-.bench/engine}
mkdir -p "$dest"

if [[ -d .whl ]] && { [[ -n "${FORCE_WHEELS:-}" ]] || ! "$PY" -c 'import moshi' 2>/dev/null; }; then
  site=$(mktemp -d /tmp/xswarm-site.XXXX)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .whl/*.whl
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi > "$dest/nvidia-smi.txt" 2>&1 || true

args=(--model "$MODEL" --batch "$BATCHES" --steps "$STEPS" --warmup "$WARMUP" --context "$CONTEXT"
      --device "$DEVICE" --out "$dest/gpu_engine.json")
[[ -n "$DTYPE" ]] && args+=(--dtype "$DTYPE")
[[ -n "$CONTROLS" ]] && args+=(--controls)
if ! "$PY" benchmarks/engine.py "${args[@]}" 2> >(tee "$dest/gpu_engine.log" >&2); then
  # torch.compile (moshi compiles a few small kernels) needs a working Triton toolchain; if it
  # is what broke, the numbers without it are still the engine's numbers, just labelled so.
  echo "run failed; retrying with NO_TORCH_COMPILE=1" >&2
  NO_TORCH_COMPILE=1 "$PY" benchmarks/engine.py "${args[@]}" 2> >(tee -a "$dest/gpu_engine.log" >&2)
  echo '{"note": "second attempt ran with NO_TORCH_COMPILE=1"}' > "$dest/note.json"
fi
