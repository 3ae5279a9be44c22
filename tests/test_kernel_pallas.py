"""The Pallas selector (interpret mode on CPU) returns the `lax.top_k` reference's threshold
keys bit for bit, under every launch configuration; it lowers for TPU (Mosaic) and CUDA
(Triton) on CPU; and ``impl="auto"`` still works when Pallas's Triton backend is gone."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import export
from kwta_jax.kernels.kwta_pallas import (
    RESIDENT_MAX,
    default_config,
    pallas_threshold_keys,
    threshold_keys_reference,
)

from kwta_jax import kwta
from kwta_jax.rank_keys import rank_keys

SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, 6e4]
# (rows, n, k): n=300 with block_cols=128 gives three tiles per row, the last one ragged;
# rows=5 is not a multiple of block_rows (padded).
CONFIGS = [(5, 300, 7), (3, 129, 129), (2, 40, 1)]


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


def assert_selector_matches(x, k, use_abs, **launch):
    launch.setdefault("block_cols", 128)
    th = pallas_threshold_keys(x, k, use_abs, interpret=True, **launch)
    th_ref = threshold_keys_reference(x, k, use_abs)
    assert th.dtype == th_ref.dtype and th.shape == (x.shape[0],)
    np.testing.assert_array_equal(np.asarray(th), np.asarray(th_ref))


@settings(
    max_examples=10,
    deadline=None,
    suppress_health_check=[
        HealthCheck.large_base_example,
        HealthCheck.data_too_large,
        HealthCheck.too_slow,
    ],
)
@given(
    config=st.sampled_from(CONFIGS),
    dtype=st.sampled_from([jnp.float32, jnp.bfloat16, jnp.float16]),
    use_abs=st.booleans(),
    data=st.data(),
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_selector_matches_reference(config, dtype, use_abs, data):
    rows, n, k = config
    elements = st.sampled_from(SPECIAL) | st.integers(-3, 3).map(float) | st.floats(width=32)
    x = data.draw(hnp.arrays(np.float32, (rows, n), elements=elements), label="x")
    assert_selector_matches(jnp.asarray(x, dtype), k, use_abs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_long_rows_many_tiles(dtype):
    """A row of 2000 keys in 128-wide tiles (16 counting tiles, ragged last one)."""
    x = jax.random.normal(jax.random.key(0), (3, 2000), jnp.float32).astype(dtype)
    assert_selector_matches(x, 200, False)


def test_all_nan_and_constant_rows():
    x = jnp.stack([jnp.full((200,), jnp.nan), jnp.full((200,), -0.0), jnp.arange(200.0)])
    for k in (1, 50, 200):
        assert_selector_matches(x, k, False)


def test_through_the_op_and_its_derivatives():
    """The op layer owns the derivative: grad and the hessian through impl='pallas' equal
    impl='topk''s (the selector itself has no JVP rule)."""
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))
    y = kwta(x, ratio=0.3, impl="pallas")
    np.testing.assert_array_equal(bits(y), bits(kwta(x, ratio=0.3, impl="topk")))
    gp = jax.grad(lambda x: kwta(x, ratio=0.3, impl="pallas").sum())(x)
    gt = jax.grad(lambda x: kwta(x, ratio=0.3, impl="topk").sum())(x)
    np.testing.assert_array_equal(bits(gp), bits(gt))
    v = x[:1].reshape(1, -1)[:, :12]
    mask = rank_keys(v) >= threshold_keys_reference(v, 3)[:, None]
    h = jax.hessian(lambda v: jnp.sum(kwta(v, k=3, impl="pallas") ** 2))(v).reshape(12, 12)
    np.testing.assert_array_equal(h, 2.0 * jnp.diag(mask.ravel()))


def test_rejects_bad_arguments():
    x = jnp.ones((2, 10))
    with pytest.raises(ValueError, match="k must be"):
        pallas_threshold_keys(x, 11)
    with pytest.raises(ValueError, match="block_cols"):
        pallas_threshold_keys(x, 1, block_cols=100)
    with pytest.raises(TypeError, match="floating"):
        pallas_threshold_keys(jnp.ones((2, 10), jnp.int32), 1)
    with pytest.raises(ValueError, match="rows, n"):
        pallas_threshold_keys(jnp.ones((10,)), 1)
    with pytest.raises(ValueError, match="radix_bits"):
        pallas_threshold_keys(x, 1, radix_bits=3)
    with pytest.raises(ValueError, match="block_rows"):
        pallas_threshold_keys(x, 1, block_rows=3)
    with pytest.raises(ValueError, match="block_cols must be <= 2"):
        pallas_threshold_keys(x, 1, block_cols=1 << 23)
    with pytest.raises(TypeError, match="unknown launch options \\['split'\\]"):
        pallas_threshold_keys(x, 1, split=True)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_exports_for_accelerators(platform, dtype):
    """Lowering (Mosaic for TPU, Triton for CUDA) succeeds on a CPU-only machine, for a conv
    group of 32*32*64 floats (many tiles per row)."""
    fn = jax.jit(lambda x: pallas_threshold_keys(x, 6553, False))
    # Triton kernels are a custom call without export compatibility guarantees.
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(fn, platforms=[platform], disabled_checks=checks)(
        jax.ShapeDtypeStruct((128, 65536), dtype)
    )
    text = exp.mlir_module()
    assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)


# Launch configurations the selector must be exact under: 1/2/4-bit digits, resident (one
# tile) and streaming rows, several rows per program.
LAUNCHES = [
    dict(radix_bits=1, block_cols=128),
    dict(radix_bits=2, block_cols=128, block_rows=2),
    dict(radix_bits=4, block_cols=512, block_rows=1),  # resident: the row fits one tile
]


@pytest.mark.parametrize(
    "launch", LAUNCHES, ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items())
)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_every_launch_configuration_is_exact(launch, dtype):
    rng = np.random.default_rng(3)
    x = rng.standard_normal((5, 300)).astype(np.float32)
    x[0, :50] = np.nan
    x[1] = 1.0  # one long tie
    x[2, ::7] = -0.0
    x[3, :40] = rng.choice(SPECIAL, 40)
    x = jnp.asarray(x, dtype)
    for k, use_abs in ((1, False), (30, True), (299, False), (300, False)):
        assert_selector_matches(x, k, use_abs, **launch)


@pytest.mark.slow
def test_rows_longer_than_2_24_are_exact():
    """Counts are int32: a row of 2^24 + 2^20 keys with k = 2^24 + 500 (float32 counts drift
    past 2^24 and kept about a million extra units)."""
    n, k = (1 << 24) + (1 << 20), (1 << 24) + 500
    x = jax.random.normal(jax.random.key(0), (1, n), jnp.float32)
    th = pallas_threshold_keys(x, k, radix_bits=4, block_cols=1 << 22, interpret=True)
    assert int(th[0]) == int(threshold_keys_reference(x, k)[0])


def test_empty_batch_and_float64():
    th = pallas_threshold_keys(jnp.zeros((0, 7), jnp.bfloat16), 2, interpret=True)
    assert th.shape == (0,) and th.dtype == jnp.uint16
    with jax.enable_x64(True):
        x = jax.random.normal(jax.random.key(5), (3, 50), jnp.float64)
        np.testing.assert_array_equal(pallas_threshold_keys(x, 5), threshold_keys_reference(x, 5))


def test_gpu_default_configurations():
    """Rows up to RESIDENT_MAX keys stay in registers (one tile as wide as the row); longer
    rows stream 16384-key tiles; TPU keeps one native tile of sublanes."""
    small = default_config(256, 512, jnp.float32, "gpu")
    assert small.block_cols == 512
    assert default_config(128, RESIDENT_MAX, jnp.float32, "gpu").block_cols == RESIDENT_MAX
    big = default_config(128, 65536, jnp.float32, "gpu")
    assert (big.block_rows, big.block_cols, big.radix_bits) == (1, 16384, 2)
    assert default_config(4, 8192, jnp.float32, "gpu").block_cols == 8192  # never padded wider
    assert default_config(128, 65536, jnp.bfloat16, "tpu").block_rows == 16


_NO_TRITON = textwrap.dedent(
    """
    import sys
    sys.modules["jax.experimental.pallas.triton"] = None  # the import now fails
    import jax, jax.numpy as jnp, numpy as np
    from kwta_jax import ops
    from kwta_jax.kernels import kwta_pallas
    assert not kwta_pallas.triton_available()
    cpu = ops.resolve_impl("auto")
    x = jax.random.normal(jax.random.key(0), (4, 6, 6, 8))
    y, ref = ops.kwta(x, ratio=0.1, impl="auto"), ops.kwta(x, ratio=0.1, impl="topk")
    assert np.array_equal(np.asarray(y).view(np.uint32), np.asarray(ref).view(np.uint32))
    jax.default_backend = lambda: "gpu"  # what auto would pick on a GPU without Triton
    gpu = ops.resolve_impl("auto")
    assert gpu in ops.IMPLEMENTATIONS and gpu != "pallas", gpu
    print(cpu, gpu)
    """
)


def test_auto_works_when_the_triton_backend_is_gone():
    proc = subprocess.run(
        [sys.executable, "-c", _NO_TRITON], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    cpu, gpu = proc.stdout.split()
    assert cpu in ("cpu", "select") and gpu == "select"  # no CUDA device here: not "cuda"
