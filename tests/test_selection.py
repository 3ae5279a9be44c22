"""The fast exact XLA path (impl="select") agrees bit-for-bit with the top_k reference."""

from __future__ import annotations

import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from kwta_jax import kwta
from kwta_jax.ops import topk_threshold_keys
from kwta_jax.rank_keys import apply_threshold, rank_keys
from kwta_jax.selection import kwta_rows_select, select_threshold_keys


def kwta_rows_topk(x, k, use_abs):
    """The reference rows: top_k's threshold keys, applied."""
    return apply_threshold(x, topk_threshold_keys(x, k, use_abs), use_abs)


DTYPES = (jnp.float32, jnp.bfloat16, jnp.float16)
# Values that stress the ordering: many ties, signed zeros, infinities, NaNs of both signs,
# a subnormal (float32) and huge magnitudes.
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, -2.0, 3.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, 6e4]
# Fixed (rows, n, k) so that jitted functions are compiled once per dtype, not per example.
CONFIGS = [(3, 1, 1), (4, 7, 3), (5, 64, 64), (2, 129, 100)]


def bits(a) -> np.ndarray:
    a = np.asarray(a)
    return a.view(np.dtype(f"u{a.dtype.itemsize}"))


@functools.cache
def _pair(k: int, use_abs: bool):
    return (
        jax.jit(lambda x: kwta_rows_select(x, k, use_abs)),
        jax.jit(lambda x: kwta_rows_topk(x, k, use_abs)),
    )


def assert_same_as_topk(x, k, use_abs):
    select, topk = _pair(k, use_abs)
    y, th = select(x)
    y_ref, th_ref = topk(x)
    assert th.dtype == th_ref.dtype
    np.testing.assert_array_equal(np.asarray(th), np.asarray(th_ref))
    np.testing.assert_array_equal(bits(y), bits(y_ref))


def values(draw_floats: bool):
    pool = st.sampled_from(SPECIAL)
    if draw_floats:
        pool = pool | st.floats(width=32, allow_nan=True, allow_infinity=True)
    return pool


@settings(
    max_examples=20,
    deadline=None,
    suppress_health_check=[
        HealthCheck.large_base_example,
        HealthCheck.data_too_large,
        HealthCheck.too_slow,
    ],
)
@given(
    config=st.sampled_from(CONFIGS),
    dtype=st.sampled_from(DTYPES),
    use_abs=st.booleans(),
    data=st.data(),
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_select_matches_topk(config, dtype, use_abs, data):
    rows, n, k = config
    x = data.draw(hnp.arrays(np.float32, (rows, n), elements=values(draw_floats=True)), label="x")
    assert_same_as_topk(jnp.asarray(x, dtype), k, use_abs)


@settings(
    max_examples=8,
    deadline=None,
    suppress_health_check=[
        HealthCheck.large_base_example,
        HealthCheck.data_too_large,
        HealthCheck.too_slow,
    ],
)
@given(config=st.sampled_from(CONFIGS), dtype=st.sampled_from(DTYPES), data=st.data())
def test_select_matches_topk_small_integers(config, dtype, data):
    """Small-integer values: the threshold is almost always tied."""
    rows, n, k = config
    x = data.draw(hnp.arrays(np.float32, (rows, n), elements=st.integers(-2, 2).map(float)))
    assert_same_as_topk(jnp.asarray(x, dtype), k, False)


@pytest.mark.parametrize(
    "name",
    ["normal", "relu", "exp2", "constant", "nan_heavy", "two_clusters", "sorted"],
)
@pytest.mark.parametrize("ratio", [0.1, 0.7])
def test_select_distributions(name, ratio):
    """Long rows from distributions that defeat interpolation in different ways."""
    rng = np.random.default_rng(0)
    rows, n = 4, 5000
    if name == "normal":
        x = rng.standard_normal((rows, n))
    elif name == "relu":
        x = np.maximum(rng.standard_normal((rows, n)), 0)
    elif name == "exp2":
        x = 2.0 ** rng.integers(-120, 120, (rows, n)) * rng.choice([-1, 1], (rows, n))
    elif name == "constant":
        x = np.full((rows, n), -7.0)
    elif name == "nan_heavy":
        x = np.where(rng.random((rows, n)) < 0.5, np.nan, rng.standard_normal((rows, n)))
    elif name == "two_clusters":
        x = np.where(rng.random((rows, n)) < 0.5, 1e30, 1e-30) * (1 + rng.random((rows, n)))
    elif name == "sorted":
        x = np.sort(rng.standard_normal((rows, n)), axis=1)
    else:
        raise AssertionError(name)
    k = max(1, int(ratio * n))
    dtype = jnp.bfloat16 if name == "normal" else jnp.float32
    assert_same_as_topk(jnp.asarray(x, dtype), k, False)


def test_select_pass_count_is_bounded_on_adversarial_rows():
    """Keys packed at the two ends of the key range: interpolation is useless; the
    midpoint safeguard must still finish within 2 * 32 + 1 passes."""
    n = 4096
    x = np.full((2, n), np.float32(1e-45))  # smallest subnormal
    x[:, : n // 2] = np.float32(3e38)
    x[:, n // 2 : n // 2 + 3] = [1.0, 2.0, 3.0]
    x = jnp.asarray(x)
    k = n // 2 + 2
    th, passes = jax.jit(lambda x: select_threshold_keys(x, k, return_passes=True))(x)
    np.testing.assert_array_equal(th, kwta_rows_topk(x, k, False)[1])
    assert 1 <= int(passes) <= 65


def test_select_typical_rows_need_few_passes():
    x = jax.random.normal(jax.random.key(0), (16, 65536))
    _, passes = jax.jit(lambda x: select_threshold_keys(x, 6553, return_passes=True))(x)
    assert int(passes) <= 8


def test_select_float64():
    with jax.enable_x64(True):
        rng = np.random.default_rng(1)
        x = jnp.asarray(rng.integers(-3, 4, (3, 200)).astype(np.float64))
        x = x.at[0, :4].set(jnp.array([np.nan, -0.0, np.inf, 1e-310]))
        y, th = jax.jit(lambda x: kwta_rows_select(x, 50, False))(x)
        y_ref, th_ref = kwta_rows_topk(x, 50, False)
        np.testing.assert_array_equal(th, th_ref)
        np.testing.assert_array_equal(bits(y), bits(y_ref))


def test_select_threshold_is_rank_key_of_a_winner():
    x = jax.random.normal(jax.random.key(3), (4, 300))
    th = select_threshold_keys(x, 30)
    keys = rank_keys(x)
    assert bool(jnp.all(jnp.any(keys == th[:, None], axis=1)))
    assert bool(jnp.all(jnp.sum(keys >= th[:, None], axis=1) >= 30))


def test_select_matches_topk_through_the_op_with_gradients():
    x = jax.random.normal(jax.random.key(1), (8, 6, 6, 5))
    y_select = kwta(x, ratio=0.2, groups="channel", impl="select")
    y_topk = kwta(x, ratio=0.2, groups="channel", impl="topk")
    np.testing.assert_array_equal(bits(y_select), bits(y_topk))
    g = jax.random.normal(jax.random.key(2), x.shape)
    ga = jax.grad(lambda x: jnp.vdot(kwta(x, ratio=0.2, impl="select"), g))(x)
    gt = jax.grad(lambda x: jnp.vdot(kwta(x, ratio=0.2, impl="topk"), g))(x)
    np.testing.assert_array_equal(bits(ga), bits(gt))


def test_select_under_vmap():
    x = jax.random.normal(jax.random.key(4), (3, 5, 40))
    y = jax.vmap(lambda a: kwta_rows_select(a, 7, True)[0])(x)
    y_ref = jax.vmap(lambda a: kwta_rows_topk(a, 7, True)[0])(x)
    np.testing.assert_array_equal(bits(y), bits(y_ref))
