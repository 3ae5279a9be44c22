"""The fused Pallas kernel (interpret mode on CPU) agrees bit-for-bit with the reference, its
custom_vjp gives ``g * mask``, and it lowers for TPU (Mosaic) and CUDA (Triton) on CPU."""

from __future__ import annotations

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
    kwta_pallas,
    kwta_reference,
    kwta_rows_pallas,
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


def assert_kernel_matches(x, k, use_abs, block_cols=128):
    y, th = kwta_rows_pallas(x, k, use_abs, block_cols=block_cols, interpret=True)
    y_ref, th_ref = kwta_reference(x, k, use_abs)
    assert th.dtype == th_ref.dtype and y.dtype == x.dtype
    np.testing.assert_array_equal(np.asarray(th), np.asarray(th_ref))
    np.testing.assert_array_equal(bits(y), bits(y_ref))


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
def test_kernel_matches_reference(config, dtype, use_abs, data):
    rows, n, k = config
    elements = st.sampled_from(SPECIAL) | st.integers(-3, 3).map(float) | st.floats(width=32)
    x = data.draw(hnp.arrays(np.float32, (rows, n), elements=elements), label="x")
    assert_kernel_matches(jnp.asarray(x, dtype), k, use_abs)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_kernel_long_rows_many_tiles(dtype):
    """A row of 2000 keys in 128-wide tiles (16 counting tiles, ragged last one)."""
    x = jax.random.normal(jax.random.key(0), (3, 2000), jnp.float32).astype(dtype)
    assert_kernel_matches(x, 200, False)


def test_kernel_all_nan_and_constant_rows():
    x = jnp.stack([jnp.full((200,), jnp.nan), jnp.full((200,), -0.0), jnp.arange(200.0)])
    for k in (1, 50, 200):
        assert_kernel_matches(x, k, False)


def test_kernel_custom_vjp_is_g_times_mask():
    x = jax.random.normal(jax.random.key(1), (4, 300))
    g = jax.random.normal(jax.random.key(2), (4, 300)).at[0, 0].set(jnp.inf)
    y, vjp = jax.vjp(lambda x: kwta_pallas(x, 30, False), x)
    (gx,) = vjp(g)
    _, th = kwta_reference(x, 30, False)
    mask = rank_keys(x) >= th[:, None]
    np.testing.assert_array_equal(bits(gx), bits(jnp.where(mask, g, 0.0)))
    np.testing.assert_array_equal(bits(y), bits(kwta_reference(x, 30, False)[0]))


def test_kernel_through_the_op():
    x = jax.random.normal(jax.random.key(3), (2, 4, 4, 8))
    y = kwta(x, ratio=0.3, impl="pallas")
    np.testing.assert_array_equal(bits(y), bits(kwta(x, ratio=0.3, impl="topk")))
    gp = jax.grad(lambda x: kwta(x, ratio=0.3, impl="pallas").sum())(x)
    gt = jax.grad(lambda x: kwta(x, ratio=0.3, impl="topk").sum())(x)
    np.testing.assert_array_equal(bits(gp), bits(gt))


def test_kernel_rejects_bad_arguments():
    x = jnp.ones((2, 10))
    with pytest.raises(ValueError, match="k must be"):
        kwta_rows_pallas(x, 11)
    with pytest.raises(ValueError, match="block_cols"):
        kwta_rows_pallas(x, 1, block_cols=100)
    with pytest.raises(TypeError, match="floating"):
        kwta_rows_pallas(jnp.ones((2, 10), jnp.int32), 1)
    with pytest.raises(ValueError, match="rows, n"):
        kwta_rows_pallas(jnp.ones((10,)), 1)


@pytest.mark.parametrize("platform", ["tpu", "cuda"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernel_exports_for_accelerators(platform, dtype):
    """Lowering (Mosaic for TPU, Triton for CUDA) succeeds on a CPU-only machine, for a conv
    group of 32*32*64 floats (many tiles per row)."""
    fn = jax.jit(lambda x: kwta_rows_pallas(x, 6553, False, interpret=False))
    # Triton kernels are a custom call without export compatibility guarantees.
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(fn, platforms=[platform], disabled_checks=checks)(
        jax.ShapeDtypeStruct((128, 65536), dtype)
    )
    text = exp.mlir_module()
    assert ("tpu_custom_call" in text) if platform == "tpu" else ("triton" in text)


# Launch configurations the kernel must be exact under: the single launch with 1/2/4-bit
# digits, resident (one tile) and streaming rows, several rows per program, and split mode.
LAUNCHES = [
    dict(radix_bits=1, block_cols=128),
    dict(radix_bits=2, block_cols=128, block_rows=2),
    dict(radix_bits=4, block_cols=512, block_rows=1),  # resident: the row fits one tile
    dict(radix_bits=2, block_cols=128, split=True),
    dict(radix_bits=4, block_cols=256, block_rows=2, split=True),
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
        y, th = kwta_rows_pallas(x, k, use_abs, interpret=True, **launch)
        y_ref, th_ref = kwta_reference(x, k, use_abs)
        np.testing.assert_array_equal(np.asarray(th), np.asarray(th_ref))
        np.testing.assert_array_equal(bits(y), bits(y_ref))


@pytest.mark.slow
def test_rows_longer_than_2_24_are_exact():
    """Counts are int32: a row of 2^24 + 2^20 keys with k = 2^24 + 500 (float32 counts drift
    past 2^24 and kept about a million extra units)."""
    n, k = (1 << 24) + (1 << 20), (1 << 24) + 500
    x = jax.random.normal(jax.random.key(0), (1, n), jnp.float32)
    for launch in (dict(block_cols=1 << 22), dict(block_cols=1 << 22, split=True)):
        y, th = kwta_rows_pallas(x, k, radix_bits=4, interpret=True, **launch)
        y_ref, th_ref = kwta_reference(x, k)
        assert int(th[0]) == int(th_ref[0])
        kept = int(jnp.sum(y != 0))
        assert kept == int(jnp.sum(y_ref != 0)) and k <= kept < k + 10  # a few exact ties


def test_launch_parameters_are_validated():
    x = jnp.ones((2, 10))
    with pytest.raises(ValueError, match="radix_bits"):
        kwta_rows_pallas(x, 1, radix_bits=3)
    with pytest.raises(ValueError, match="block_rows"):
        kwta_rows_pallas(x, 1, block_rows=3)
    with pytest.raises(ValueError, match="block_cols must be <= 2"):
        kwta_rows_pallas(x, 1, block_cols=1 << 23)
    with pytest.raises(TypeError, match="split"):
        kwta_rows_pallas(x, 1, split="yes")


def test_hessian_through_the_kernel():
    """The kernel's own custom_jvp: kwta can be differentiated twice with impl='pallas'."""
    x = jax.random.normal(jax.random.key(4), (2, 12))

    def loss(v):
        return jnp.sum(kwta(v, k=3, impl="pallas") ** 2)

    mask = rank_keys(x) >= kwta_reference(x, 3)[1][:, None]
    h = jax.hessian(loss)(x).reshape(24, 24)
    np.testing.assert_array_equal(h, 2.0 * jnp.diag(mask.ravel()))


def test_empty_batch():
    y, th = kwta_rows_pallas(jnp.zeros((0, 7), jnp.bfloat16), 2, interpret=True)
    assert y.shape == (0, 7) and y.dtype == jnp.bfloat16 and th.shape == (0,)


def test_gpu_default_configurations():
    """Rows up to RESIDENT_MAX keys stay in registers (one tile as wide as the row); longer
    rows stream 16384-key tiles; TPU keeps one native tile of sublanes."""
    small = default_config(256, 512, jnp.float32, "gpu")
    assert small.block_cols == 512 and not small.split
    assert default_config(128, RESIDENT_MAX, jnp.float32, "gpu").block_cols == RESIDENT_MAX
    big = default_config(128, 65536, jnp.float32, "gpu")
    assert (big.block_rows, big.block_cols, big.radix_bits, big.split) == (1, 16384, 2, False)
    assert default_config(4, 8192, jnp.float32, "gpu").block_cols == 8192  # never padded wider
    assert default_config(128, 65536, jnp.bfloat16, "tpu").block_rows == 16


@pytest.mark.parametrize("split", [False, True])
def test_split_and_streaming_lower_for_cuda(split):
    fn = jax.jit(lambda x: kwta_rows_pallas(x, 6553, False, interpret=False, split=split))
    checks = [export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")]
    exp = export.export(fn, platforms=["cuda"], disabled_checks=checks)(
        jax.ShapeDtypeStruct((128, 65536), jnp.float16)
    )
    text = exp.mlir_module()
    assert text.count("triton") >= 1
    assert ("kwta_count" in text) == split
