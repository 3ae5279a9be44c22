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
from kwta_jax.kernels.kwta_pallas import kwta_pallas, kwta_reference, kwta_rows_pallas

from kwta_jax import kwta
from kwta_jax.keys import rank_keys

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
