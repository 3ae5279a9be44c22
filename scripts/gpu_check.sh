#!/usr/bin/env bash
# Every GPU check of kwta-jax in one call, from a bare checkout, with nothing to download:
# exactness of the compiled Pallas kernel and select against lax.top_k, the launch-parameter
# sweep, the benchmark and the train-step timing; JSON under $OUT (default ./gpu_check_out).
#
#   bash scripts/gpu_check.sh            # on a machine with a GPU and jax[cuda], flax, optax
#   OUT=/tmp/out bash scripts/gpu_check.sh --dry-run    # tiny sizes (CPU: interpret mode)
#
# Needs jax (with the GPU plugin), flax, optax, chex, orbax-checkpoint, numpy; not
# tensorflow-datasets or mlxtend. Exit status 1 on any mismatch.
set -euo pipefail
repo="$(cd "$(dirname "$0")/.." && pwd)"
out="${OUT:-$repo/gpu_check_out}"
mkdir -p "$out"
# The package maps the top-level kernels/ to kwta_jax.kernels (pyproject.toml); without an
# install step, lay that mapping out in a scratch directory and put it first on the path.
src="$(mktemp -d)"
trap 'rm -rf "$src"' EXIT
cp -r "$repo/kwta_jax" "$src/kwta_jax"
rm -rf "$src/kwta_jax/kernels"
cp -r "$repo/kernels" "$src/kwta_jax/kernels"
export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
python3 -c 'import jax, sys; print("python", sys.version.split()[0], "jax", jax.__version__, jax.devices())'
cd "$src"
python3 -m kwta_jax.gpu_check --out "$out" "$@"
