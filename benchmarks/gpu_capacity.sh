#!/usr/bin/env bash
# Calls per card on one big CUDA GPU (benchmarks/capacity.py): synthetic:7b, each LM weights ×
# KV cache choice, 12 GB and 24 GB cards emulated with a capped allocator, the whole GPU up to
# batch 128+, a 4090 roofline beside each figure, and logits agreement with bf16.
#
# Works on a bare GPU box that has python3 + torch (>= 2.11 for torchao 0.18) but nothing else
# of this project: the wheels in ./.whl (moshi, torchao, and their pure-Python or
# per-Python-version dependencies) are installed into a private folder for whichever modules
# python3 cannot import yet. No network is needed.
# Everything is overridable, e.g. the dry run on a CPU:
#   MODEL=synthetic:tiny DEVICE=cpu PYTHON=.venv/bin/python EXTRA="--steps 4 --max-batch 4 \
#     --calibrate-batch 2 --big-batch 4 --fidelity-steps 4 --target-ms 200" bash benchmarks/gpu_capacity.sh
# Results: $OUT (or .bench/capacity)/gpu_capacity.json, the log, and nvidia-smi's view.
#
# Filling ./.whl (git-ignored) on a machine that reaches PyPI, for the GPU box's Python (e.g. 3.12):
#   python3 -m pip download -d .whl --no-deps --only-binary=:all: --python-version 3.12 \
#     --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 moshi==0.2.13 torchao==0.18.0 \
#     einops sentencepiece safetensors huggingface_hub tqdm pyyaml requests urllib3 idna certifi \
#     charset-normalizer pydantic pydantic-core pydantic-settings python-dotenv annotated-types \
#     typing-inspection typing-extensions filelock fsspec packaging
# The run takes about 5.5 minutes (the sweep starts no new choice after BUDGET_S, default 300 s).
# Then keep the JSON as benchmarks/results/gpu_capacity_<gpu>_synthetic7b.json and rebuild the
# packaged figures that `xswarm capacity` and doctor read (and the README's table, printed):
#   .venv/bin/python benchmarks/capacity_table.py benchmarks/results/gpu_engine_h200_synthetic7b.json \
#     benchmarks/results/gpu_capacity_<gpu>_synthetic7b.json
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
MODEL=${MODEL:-synthetic:7b}
DEVICE=${DEVICE:-cuda}
WEIGHTS=${WEIGHTS:-int8,int4,bf16}
KV=${KV:-int8,fp8,bf16}
CONTEXT=${CONTEXT:-3000}
BUDGET_S=${BUDGET_S:-300}
EXTRA=${EXTRA:-}
dest=${OUT:-.bench/capacity}
mkdir -p "$dest"

# module to import -> distribution to install from ./.whl
missing=()
for pair in moshi:moshi torchao:torchao einops:einops sentencepiece:sentencepiece safetensors:safetensors \
            huggingface_hub:huggingface_hub tqdm:tqdm yaml:pyyaml requests:requests urllib3:urllib3 \
            idna:idna certifi:certifi charset_normalizer:charset-normalizer pydantic:pydantic \
            pydantic_core:pydantic-core pydantic_settings:pydantic-settings dotenv:python-dotenv \
            annotated_types:annotated-types typing_inspection:typing-inspection filelock:filelock \
            fsspec:fsspec packaging:packaging; do
  "$PY" -c "import ${pair%%:*}" 2>/dev/null || missing+=("${pair#*:}")
done
# pydantic 2.14 needs a newer typing_extensions than torch may have brought: bring ours along.
[[ " ${missing[*]} " == *" pydantic "* ]] && missing+=(typing-extensions)
if (( ${#missing[@]} )); then
  [[ -d .whl ]] || { echo "missing ${missing[*]} and no ./.whl folder to install them from" >&2; exit 2; }
  site=$(mktemp -d /tmp/xswarm-site.XXXX)
  echo "installing from ./.whl: ${missing[*]}" >&2
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --find-links .whl --target "$site" "${missing[@]}"
  export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONUNBUFFERED=1
command -v nvidia-smi >/dev/null && nvidia-smi > "$dest/nvidia-smi.txt" 2>&1 || true

# shellcheck disable=SC2206
args=(--model "$MODEL" --device "$DEVICE" --weights "$WEIGHTS" --kv-cache "$KV" --context "$CONTEXT"
      --budget-s "$BUDGET_S" --out "$dest/gpu_capacity.json" $EXTRA)
if ! "$PY" benchmarks/capacity.py "${args[@]}" > /dev/null 2> >(tee "$dest/gpu_capacity.log" >&2); then
  # torch.compile (moshi compiles its gating, norm and RoPE kernels) needs a working Triton
  # toolchain; if that is what broke, the run without it still measures memory and agreement.
  echo "run failed; retrying with NO_TORCH_COMPILE=1" >&2
  [[ -f "$dest/gpu_capacity.json" ]] && mv "$dest/gpu_capacity.json" "$dest/gpu_capacity_failed_partial.json"
  NO_TORCH_COMPILE=1 "$PY" benchmarks/capacity.py "${args[@]}" --budget-s $(( BUDGET_S / 2 )) > /dev/null \
    2> >(tee -a "$dest/gpu_capacity.log" >&2)
  echo '{"note": "second attempt ran with NO_TORCH_COMPILE=1"}' > "$dest/note.json"
fi
