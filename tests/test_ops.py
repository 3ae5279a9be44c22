"""The k-WTA op against a plain NumPy reference, its derivative, and its argument checks."""

from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
import zlib

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kwta_jax.kernels.kwta_cpu import cpu_kernel_available
from kwta_jax.kernels.kwta_cuda import cuda_kernel_available
from kwta_reference import numpy_kwta, same_bits

from kwta_jax import kwta, kwta_bpda, kwta_mask, num_winners, ops
from kwta_jax.ops import IMPLEMENTATIONS, competition_axes, topk_threshold_keys
from kwta_jax.rank_keys import apply_threshold, rank_keys

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan]
# Interpret-mode Pallas is too slow for the full sweep on CPU; tests/test_kernel_pallas.py runs
# the kernel against the reference on its own (smaller) property tests. The C++ kernel ("cpu")
# joins the sweep where a compiler could build it (tests/test_kernel_cpu.py says why not).
IMPLS = sorted(
    name
    for name in IMPLEMENTATIONS
    if name != "pallas"
    and (name != "cpu" or cpu_kernel_available())
    and (name != "cuda" or cuda_kernel_available())
)


@functools.cache
def jitted_kwta(**kwargs):
    return jax.jit(functools.partial(kwta, **kwargs))


def tie_heavy(rng: np.random.Generator, shape, dtype, special_rate: float = 0.05) -> np.ndarray:
    """Small integers (many ties, both signs) sprinkled with ±0, ±inf and NaNs of both signs."""
    x = rng.integers(-3, 4, size=shape).astype(np.float64)
    specials = rng.random(shape) < special_rate
    x[specials] = rng.choice(SPECIALS, size=int(specials.sum()))
    return x.astype(dtype)


def reference_axes(ndim: int, groups: str, axes) -> tuple[int, ...]:
    if axes is not None:
        return tuple(sorted(a % ndim for a in axes))
    return tuple(range(1, ndim if groups == "sample" else ndim - 1))


# ---------------------------------------------------------------------------------------------
# Agreement with the NumPy reference.
# ---------------------------------------------------------------------------------------------

# Each configuration checks every one of its rows at up to 3 values of k: 1,650 rows x 2 abs x
# 3 dtypes x 3 k = up to 29,700 row cases per implementation, on top of the random-shape property
# test.
SWEEP = [
    # (shape, groups, axes, rows per sample)
    ((300, 17), "sample", None, 1),
    ((150, 4, 4, 3), "sample", None, 1),
    ((100, 3, 5, 4), "channel", None, 4),
    ((100, 3, 2, 5), None, (1, 3), 2),
    ((50, 6, 2, 3), None, (-1,), 12),
]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("shape,groups,axes,rows", SWEEP)
def test_sweep_matches_numpy_bit_for_bit(shape, groups, axes, rows, use_abs, dtype, impl):
    del rows  # documents the number of competition groups per sample
    # A stable seed per case (hash() of a str changes with every process).
    rng = np.random.default_rng(zlib.crc32(repr((shape, use_abs, np.dtype(dtype).name)).encode()))
    x = tie_heavy(rng, shape, dtype)
    comp = reference_axes(len(shape), groups or "sample", axes)
    n = int(np.prod([shape[a] for a in comp]))
    for winners in sorted({1, n // 3 or 1, n}):
        kwargs = dict(k=winners, use_abs=use_abs, impl=impl)
        kwargs.update(groups=groups) if groups else kwargs.update(axes=axes)
        got = np.asarray(jitted_kwta(**kwargs)(x))
        want = numpy_kwta(x, winners, comp, use_abs)
        assert same_bits(got, want), f"mismatch for k={winners}"


@st.composite
def kwta_cases(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.sampled_from([1, 2, 3, 5, 8])) for _ in range(ndim))
    dtype = draw(st.sampled_from(DTYPES))
    elements = st.one_of(
        st.integers(-4, 4).map(float),
        st.sampled_from(SPECIALS),
        st.floats(-1e4, 1e4, width=16),
    )
    x = draw(hnp.arrays(np.float64, shape, elements=elements)).astype(dtype)
    mode = draw(st.sampled_from(["sample", "channel", "axes"] if ndim >= 3 else ["sample", "axes"]))
    if mode == "axes":
        axes = tuple(
            draw(st.lists(st.integers(1, ndim - 1), min_size=1, max_size=ndim - 1, unique=True))
        )
        kwargs, comp = dict(axes=axes), tuple(sorted(axes))
    else:
        kwargs, comp = dict(groups=mode), reference_axes(ndim, mode, None)
    n = int(np.prod([shape[a] for a in comp]))
    if draw(st.booleans()):
        ratio = draw(st.sampled_from([0.01, 0.1, 0.2, 1 / 3, 0.5, 0.7, 0.99, 1.0]))
        kwargs["ratio"], k = ratio, max(1, int(ratio * n))
    else:
        k = draw(st.integers(1, n))
        kwargs["k"] = k
    kwargs["use_abs"] = draw(st.booleans())
    return x, kwargs, comp, k


@settings(max_examples=100, deadline=None)
@given(kwta_cases())
def test_random_shapes_match_numpy(case):
    x, kwargs, comp, k = case
    got = np.asarray(jitted_kwta(**kwargs)(x))
    assert same_bits(got, numpy_kwta(x, k, comp, kwargs["use_abs"]))


def test_batch_independence():
    """kwta(batch) is the stack of kwta(sample): the threshold never leaks across samples."""
    x = jax.random.normal(jax.random.key(0), (16, 6, 6, 4))
    x = x * jnp.arange(1, 17, dtype=x.dtype)[:, None, None, None]  # very different scales
    batched = kwta(x, ratio=0.1)
    one_by_one = jnp.concatenate([kwta(x[i : i + 1], ratio=0.1) for i in range(16)])
    np.testing.assert_array_equal(batched, one_by_one)
    # The first sample's threshold applied to everyone would zero all of sample 0's losers in
    # the others too; check the count of winners per sample instead.
    np.testing.assert_array_equal((batched != 0).reshape(16, -1).sum(1), 14)


def test_ties_at_the_threshold_are_all_kept():
    x = jnp.array([[5.0, 2.0, 2.0, 2.0, 1.0]])
    np.testing.assert_array_equal(kwta(x, k=2), [[5.0, 2.0, 2.0, 2.0, 0.0]])


def test_signed_zeros_tie_and_keep_their_sign():
    x = jnp.array([[-0.0, 0.0, -1.0, -2.0]])
    y = np.asarray(kwta(x, k=1))
    assert same_bits(y, np.array([[-0.0, 0.0, 0.0, 0.0]], np.float32))


def test_nan_ranks_above_inf_and_propagates():
    x = jnp.array([[jnp.inf, jnp.nan, 1.0, -jnp.nan]])
    y = np.asarray(kwta(x, k=1))
    assert np.isnan(y[0, 1]) and np.isnan(y[0, 3]) and y[0, 0] == 0 and y[0, 2] == 0
    np.testing.assert_array_equal(np.asarray(kwta(x, k=3))[0, [0, 2]], [np.inf, 0.0])


def test_subnormals_are_ordered_without_flush_to_zero():
    tiny = np.float32(1e-45)  # the smallest positive subnormal
    x = jnp.array([[tiny, 0.0, -tiny, -1.0]])
    assert same_bits(np.asarray(kwta(x, k=1)), np.array([[tiny, 0, 0, 0]], np.float32))
    assert same_bits(
        np.asarray(kwta(-x, k=1, use_abs=True)), np.array([[0, 0, 0, 1.0]], np.float32)
    )


def test_use_abs_ranks_by_magnitude_keeps_sign():
    x = jnp.array([[-5.0, 4.0, -1.0, 0.5]])
    np.testing.assert_array_equal(kwta(x, k=2, use_abs=True), [[-5.0, 4.0, 0.0, 0.0]])


@pytest.mark.parametrize(
    "n,ratio,expected", [(10, 0.7, 7), (30, 0.1, 3), (100, 0.29, 28), (5, 0.1, 1), (7, 1.0, 7)]
)
def test_num_winners_truncates_like_the_official_code(n, ratio, expected):
    assert num_winners(n, ratio=ratio) == expected == max(1, int(ratio * n))


def test_rank_keys_preserve_order():
    values = np.array([-np.inf, -3e38, -1.0, -1e-45, -0.0, 0.0, 1e-45, 1.0, 3e38, np.inf, np.nan])
    keys = np.asarray(rank_keys(jnp.asarray(values, jnp.float32)))
    assert np.all(np.diff(keys.astype(np.int64)[[0, 1, 2, 3, 4, 6, 7, 8, 9, 10]]) > 0)
    assert keys[4] == keys[5]  # -0 and +0 tie
    assert keys[10] == rank_keys(jnp.float32(-np.nan))  # NaNs of both signs tie


# ---------------------------------------------------------------------------------------------
# Derivatives and transformations.
# ---------------------------------------------------------------------------------------------


def smooth_input(key, shape):
    """Distinct values with gaps >= 0.1, so that small perturbations never change the winners."""
    n = int(np.prod(shape[1:]))
    perms = jax.vmap(lambda k: jax.random.permutation(k, n))(jax.random.split(key, shape[0]))
    return (perms.astype(jnp.float32) * 0.1 - 1.0).reshape(shape)


@pytest.mark.parametrize("use_abs", [False, True])
@pytest.mark.parametrize("shape,groups", [((4, 20), "sample"), ((3, 4, 4, 3), "channel")])
def test_vjp_is_upstream_times_mask(shape, groups, use_abs):
    x = jax.random.normal(jax.random.key(1), shape)
    g = jax.random.normal(jax.random.key(2), shape)
    f = functools.partial(kwta, ratio=0.3, groups=groups, use_abs=use_abs)
    _, vjp = jax.vjp(f, x)
    mask = kwta_mask(x, ratio=0.3, groups=groups, use_abs=use_abs)
    np.testing.assert_array_equal(vjp(g)[0], g * mask)
    _, tangent = jax.jvp(f, (x,), (g,))
    np.testing.assert_array_equal(tangent, g * mask)


def test_gradient_matches_finite_differences_away_from_the_threshold():
    x = smooth_input(jax.random.key(3), (3, 30))
    w = jax.random.normal(jax.random.key(4), x.shape)

    def loss(x):
        return jnp.sum(w * jnp.tanh(kwta(x, ratio=0.2)))

    grad = jax.grad(loss)(x.astype(jnp.float64) if jax.config.x64_enabled else x)
    eps = 1e-3
    directions = jax.random.normal(jax.random.key(5), (5,) + x.shape)
    for d in directions:
        numeric = (loss(x + eps * d) - loss(x - eps * d)) / (2 * eps)
        np.testing.assert_allclose(jnp.vdot(grad, d), numeric, rtol=2e-2, atol=1e-3)


def test_non_finite_upstream_gradient_stays_at_winners():
    x = jnp.array([[1.0, 2.0, 3.0]])
    _, vjp = jax.vjp(functools.partial(kwta, k=1), x)
    np.testing.assert_array_equal(vjp(jnp.array([[jnp.inf, jnp.nan, 1.0]]))[0], [[0, 0, 1.0]])


@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_jit_vmap_grad_remat_compose(dtype):
    x = smooth_input(jax.random.key(6), (3, 4, 10)).astype(dtype)
    f = functools.partial(kwta, ratio=0.2)
    stacked = jax.jit(jax.vmap(f))(x)  # vmap over an outer axis of batches
    np.testing.assert_array_equal(stacked, jnp.stack([f(b) for b in x]))

    def loss(x):
        return jnp.sum(jax.checkpoint(f)(x).astype(jnp.float32) ** 2)

    grads = jax.jit(jax.vmap(jax.grad(loss)))(x)
    expected = 2 * stacked.astype(jnp.float32)
    np.testing.assert_allclose(grads.astype(jnp.float32), expected, rtol=1e-2)
    assert grads.dtype == dtype
    hessian_diag = jax.jvp(jax.grad(loss), (x[0],), (jnp.ones_like(x[0]),))[1]
    np.testing.assert_allclose(hessian_diag.astype(jnp.float32), 2.0 * (f(x[0]) != 0), rtol=1e-2)


def test_bpda_forward_is_kwta_backward_is_surrogate():
    x = jnp.array([[-1.0, 2.0, 3.0, 0.5]])
    y = kwta_bpda(x, k=1, surrogate="identity")
    np.testing.assert_array_equal(y, kwta(x, k=1))
    grad_identity = jax.grad(lambda x: kwta_bpda(x, k=1).sum())(x)
    np.testing.assert_array_equal(grad_identity, jnp.ones_like(x))
    grad_relu = jax.grad(lambda x: kwta_bpda(x, k=1, surrogate="relu").sum())(x)
    np.testing.assert_array_equal(grad_relu, [[0.0, 1.0, 1.0, 1.0]])


def test_partial_is_a_drop_in_activation():
    from flax import nnx

    act = functools.partial(kwta, ratio=0.25)
    mlp = nnx.Sequential(
        nnx.Linear(8, 16, rngs=nnx.Rngs(0)), act, nnx.Linear(16, 3, rngs=nnx.Rngs(1))
    )
    hidden = act(mlp.layers[0](jnp.ones((2, 8))))
    assert mlp(jnp.ones((2, 8))).shape == (2, 3)
    np.testing.assert_array_equal((hidden != 0).sum(1), [4, 4])


# ---------------------------------------------------------------------------------------------
# Bad input: clear errors at trace time.
# ---------------------------------------------------------------------------------------------

X = jnp.ones((2, 3, 3, 4))


@pytest.mark.parametrize(
    "kwargs,error,match",
    [
        (dict(), ValueError, "exactly one of ratio"),
        (dict(ratio=0.1, k=2), ValueError, "exactly one of ratio"),
        (dict(ratio=0.0), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(ratio=1.5), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(ratio=-0.1), ValueError, r"ratio must be in \(0, 1\]"),
        (dict(ratio=True), TypeError, "ratio must be a Python float"),
        (dict(ratio="0.1"), TypeError, "ratio must be a Python float"),
        (dict(k=0), ValueError, "k must be >= 1"),
        (dict(k=37), ValueError, "larger than the competition group size n=36"),
        (dict(k=2.0), TypeError, "k must be a Python int"),
        (dict(k=1, groups="pixel"), ValueError, "groups must be one of"),
        (dict(k=1, axes=(0, 1)), ValueError, "contains the batch axis"),
        (dict(k=1, axes=(4,)), ValueError, "out of range"),
        (dict(k=1, axes=(-5,)), ValueError, "out of range"),
        (dict(k=1, axes=(1, -3)), ValueError, "names an axis twice"),
        (dict(k=1, axes=()), ValueError, "at least one axis"),
        (dict(k=1, axes=(1.0,)), TypeError, "axes must be a sequence of ints"),
        (dict(k=1, groups="channel", axes=(1,)), ValueError, "either groups= or axes="),
        (dict(k=1, use_abs=1), TypeError, "use_abs must be a bool"),
        (dict(k=1, impl="sort"), ValueError, "impl must be 'auto' or one of"),
    ],
)
def test_bad_arguments_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        jax.jit(functools.partial(kwta, **kwargs))(X)


@pytest.mark.parametrize("dtype", [jnp.int32, jnp.bool_, jnp.uint8])
def test_non_floating_input_is_a_type_error(dtype):
    with pytest.raises(TypeError, match="floating dtype"):
        kwta(jnp.ones((2, 4), dtype), k=1)


@pytest.mark.parametrize(
    "shape,groups,match",
    [((5,), "sample", "rank >= 2"), ((2, 5), "channel", "rank >= 3"), ((2, 0), "sample", "empty")],
)
def test_rank_too_low_for_groups(shape, groups, match):
    with pytest.raises(ValueError, match=match):
        kwta(jnp.ones(shape), k=1, groups=groups)


def test_competition_axes_layouts():
    assert competition_axes(2) == (1,)
    assert competition_axes(4) == (1, 2, 3)
    assert competition_axes(4, "channel") == (1, 2)
    assert competition_axes(4, axes=(-1, 2)) == (2, 3)


# Every implementation that runs here, Pallas in interpret mode included (small inputs).
ALL_IMPLS = IMPLS + ["pallas"]


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_derivatives_of_every_implementation(impl):
    """grad is upstream * mask, and the JVP of the gradient (a Hessian-vector product) is
    2 * mask for sum(kwta(x)^2): the op is piecewise linear, differentiable twice."""
    x = smooth_input(jax.random.key(11), (3, 24))
    g = jax.random.normal(jax.random.key(12), x.shape)
    f = functools.partial(kwta, ratio=0.25, impl=impl)
    mask = kwta_mask(x, ratio=0.25, impl="topk")
    np.testing.assert_array_equal(jax.grad(lambda v: jnp.vdot(f(v), g))(x), g * mask)

    def loss(v):
        return jnp.sum(f(v) ** 2)

    hvp = jax.jvp(jax.grad(loss), (x,), (jnp.ones_like(x),))[1]
    np.testing.assert_array_equal(hvp, 2.0 * mask)
    hessian = jax.hessian(loss)(x[:1, :8])
    np.testing.assert_array_equal(
        hessian.reshape(8, 8), 2.0 * jnp.diag(kwta_mask(x[:1, :8], ratio=0.25, impl="topk")[0])
    )


# bfloat16 bit patterns: signalling NaNs (0x7F81, 0xFF81; quieted by a float conversion),
# quiet NaNs with payloads (0x7FC1, 0xFFC3; canonicalised to 0x7FC0 / 0xFFC0 by XLA:CPU's
# float32 round trip), subnormals of both signs, ordinary values.
PAYLOAD_BITS = np.array([0x0001, 0x7FC1, 0xFFC3, 0x3F80, 0x7F81, 0x8001, 0x4000, 0xFF81], np.uint16)
PAYLOAD_NANS = {0x7FC1, 0xFFC3, 0x7F81, 0xFF81}


@pytest.mark.parametrize("impl", ALL_IMPLS)
@pytest.mark.parametrize("groups", ["sample", "channel"])
def test_winners_keep_every_bit(impl, groups):
    """bfloat16 NaN payloads (signalling ones too) and subnormals come out bit for bit, under
    jit, through the transposes of channel groups too (XLA:CPU's float where/transpose/convert
    would canonicalise them)."""
    x = jnp.asarray(np.tile(PAYLOAD_BITS, 2).view(jnp.bfloat16)).reshape(2, 2, 4)
    k = 1 if groups == "channel" else 6
    y = jax.jit(functools.partial(kwta, k=k, groups=groups, impl=impl))(x)
    got = np.asarray(y).view(np.uint16).ravel()
    want = np.asarray(kwta(x, k=k, groups=groups, impl="topk"))
    np.testing.assert_array_equal(got, want.view(np.uint16).ravel())
    bits = np.asarray(x).view(np.uint16).ravel()
    kept = got != 0
    np.testing.assert_array_equal(got[kept], bits[kept])  # the winners' own bit patterns
    assert PAYLOAD_NANS <= set(got.tolist())  # every NaN payload wins and survives


def test_a_fused_forward_kernel_serves_the_forward_only(monkeypatch):
    """The hook for kernels that write y themselves: used for the plain forward; under
    differentiation the op's selector + apply_threshold (the one derivative rule) take over."""
    calls = []

    def fused(x2d, k, use_abs):
        calls.append(x2d.shape)
        threshold_key = topk_threshold_keys(x2d, k, use_abs)
        return apply_threshold(x2d, threshold_key, use_abs)

    monkeypatch.setitem(ops.FUSED_FORWARD, "topk", fused)
    x = smooth_input(jax.random.key(21), (3, 20))
    g = jax.random.normal(jax.random.key(22), x.shape)
    monkeypatch.delitem(ops.FUSED_FORWARD, "topk")
    want_y = kwta(x, ratio=0.25, impl="topk")
    want_grad = jax.grad(lambda v: jnp.vdot(kwta(v, ratio=0.25, impl="topk"), g))(x)
    monkeypatch.setitem(ops.FUSED_FORWARD, "topk", fused)
    np.testing.assert_array_equal(kwta(x, ratio=0.25, impl="topk"), want_y)
    assert calls
    grad = jax.jit(jax.grad(lambda v: jnp.vdot(kwta(v, ratio=0.25, impl="topk"), g)))(x)
    np.testing.assert_array_equal(grad, want_grad)
    hessian = jax.hessian(lambda v: jnp.sum(kwta(v, ratio=0.25, impl="topk") ** 2))(x[:1, :8])
    mask = np.asarray(kwta_mask(x[:1, :8], ratio=0.25, impl="topk"))[0]
    np.testing.assert_array_equal(hessian.reshape(8, 8), 2.0 * np.diag(mask))


def test_selectors_have_no_derivative_rule_and_see_no_tangents(monkeypatch):
    """The op hands selectors stop_gradient values: a selector that is not differentiable at
    all (here: a host callback) still gives grad, jvp and vmap of kwta."""

    def host_selector(x2d, k, use_abs):
        keys = jax.pure_callback(
            lambda a: np.sort(np.asarray(a), axis=-1)[..., a.shape[-1] - k],
            jax.ShapeDtypeStruct(x2d.shape[:-1], np.uint32),
            rank_keys(x2d, use_abs),
            vmap_method="expand_dims",
        )
        return keys

    monkeypatch.setitem(IMPLEMENTATIONS, "host", host_selector)
    x = smooth_input(jax.random.key(23), (3, 12))
    g = jax.random.normal(jax.random.key(24), x.shape)
    mask = kwta_mask(x, k=4, impl="topk")
    grad = jax.grad(lambda v: jnp.vdot(kwta(v, k=4, impl="host"), g))(x)
    np.testing.assert_array_equal(grad, jnp.where(mask, g, 0.0))
    tangent = jax.jvp(lambda v: kwta(v, k=4, impl="host"), (x,), (g,))[1]
    np.testing.assert_array_equal(tangent, jnp.where(mask, g, 0.0))
    stacked = jax.vmap(lambda v: kwta(v, k=4, impl="host"))(jnp.stack([x, -x]))
    np.testing.assert_array_equal(stacked[1], kwta(-x, k=4, impl="topk"))


def test_nested_lists_are_arrays():
    np.testing.assert_array_equal(kwta([[1.0, 3.0, 2.0]], k=1), [[0.0, 3.0, 0.0]])
    with pytest.raises(TypeError, match="floating dtype"):
        kwta([[1, 3, 2]], k=1)


@pytest.mark.parametrize("impl", ALL_IMPLS)
def test_empty_batch_gives_an_empty_result(impl):
    y = kwta(jnp.zeros((0, 10)), k=2, impl=impl)
    assert y.shape == (0, 10) and y.dtype == jnp.float32


_SHARD_MAP_SCRIPT = r"""
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kwta_jax import kwta
from kwta_jax.ops import IMPLEMENTATIONS, resolve_impl

assert jax.device_count() == 2, jax.devices()
mesh = Mesh(np.asarray(jax.devices()), ("b",))
x = jax.random.normal(jax.random.key(0), (8, 6, 6, 4))
want = np.asarray(kwta(x, ratio=0.1, impl="topk"))
out = {"auto": resolve_impl("auto")}
for impl in sys.argv[1:]:
    f = functools.partial(kwta, ratio=0.1, impl=impl)
    try:
        mapped = jax.jit(jax.shard_map(f, mesh=mesh, in_specs=P("b"), out_specs=P("b")))(x)
        out[impl + " shard_map"] = bool(np.array_equal(np.asarray(mapped), want))
    except NotImplementedError as e:
        out[impl + " shard_map"] = "NotImplementedError: " + str(e)[:40]
    sharded = jax.device_put(x, NamedSharding(mesh, P("b")))
    y = jax.jit(f)(sharded)
    out[impl + " jit sharded"] = bool(np.array_equal(np.asarray(y), want))
    g = jax.jit(jax.grad(lambda v: jnp.sum(f(v) ** 2)))(sharded)
    out[impl + " grad sharded"] = bool(np.array_equal(np.asarray(g), 2 * want))
print(json.dumps(out))
"""


@pytest.mark.slow
def test_every_cpu_implementation_under_shard_map_and_sharded_jit():
    """2 forced CPU devices: kwta inside jax.shard_map and jit on a batch-sharded input equal
    one device, for every implementation (Pallas's interpreter cannot run under shard_map:
    a clear NotImplementedError; its compiled kernels were checked there on a GPU)."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, "-c", _SHARD_MAP_SCRIPT, *ALL_IMPLS, "auto"],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    assert out["auto"] == "select"  # several CPU devices: XLA partitions select
    for impl in [*ALL_IMPLS, "auto"]:
        assert out[f"{impl} jit sharded"] is True, (impl, out)
        assert out[f"{impl} grad sharded"] is True, (impl, out)
        if impl == "pallas":
            assert str(out["pallas shard_map"]).startswith("NotImplementedError"), out
        else:
            assert out[f"{impl} shard_map"] is True, (impl, out)


_PAYLOAD_SCRIPT = r"""
import functools, json, sys
import jax, jax.numpy as jnp, numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from kwta_jax import kwta

assert jax.device_count() == 2, jax.devices()
mesh = Mesh(np.asarray(jax.devices()), ("b",))
bits = np.array(json.loads(sys.argv[1]), np.uint16)
x = jnp.asarray(np.tile(bits, 8).view(jnp.bfloat16)).reshape(4, 2, 2, 4)
sharded = jax.device_put(x, NamedSharding(mesh, P("b")))
out = {}
for impl in sys.argv[2:]:
    for groups in ("sample", "channel"):
        f = jax.jit(functools.partial(kwta, ratio=0.5, groups=groups, impl=impl))
        want = np.asarray(kwta(x, ratio=0.5, groups=groups, impl="topk")).view(np.uint16)
        got = np.asarray(f(sharded)).view(np.uint16)
        values = sorted(set(got.ravel().tolist()))
        out[f"{impl} {groups}"] = [bool(np.array_equal(got, want)), values]
print(json.dumps(out))
"""


@pytest.mark.slow
def test_bfloat16_nan_payloads_survive_a_batch_sharded_jit():
    """2 CPU devices, a batch-sharded bfloat16 input with NaN payloads: every selector keeps
    the winners' bits (issue 21). XLA:CPU runs a bfloat16 all-gather in float32 (convert,
    all-gather, convert back), which canonicalises NaNs; an opaque FFI call makes XLA gather its
    input, so the op only lets the gathered copy choose the threshold (all NaNs share one rank
    key) and selects the output from the shard's own bits."""
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2")
    proc = subprocess.run(
        [sys.executable, "-c", _PAYLOAD_SCRIPT, json.dumps(PAYLOAD_BITS.tolist()), *IMPLS],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    for name, (equal, values) in out.items():
        assert equal, (name, [hex(v) for v in values])
        assert PAYLOAD_NANS <= set(values), (name, [hex(v) for v in values])
