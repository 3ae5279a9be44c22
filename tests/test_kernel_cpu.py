"""The C++ FFI kernel (impl="cpu") agrees bit-for-bit with top_k and the NumPy reference, and
its lazy build degrades cleanly."""

from __future__ import annotations

import ctypes
import functools
import os
import threading
import time

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kwta_jax.kernels.kwta_cpu import (
    CpuKernelUnavailable,
    build_library,
    cpu_kernel_available,
    cpu_kernel_status,
    kwta_rows_cpu,
)
from kwta_reference import numpy_kwta, same_bits

from kwta_jax import kwta
from kwta_jax.kernels import kwta_cpu
from kwta_jax.ops import kwta_rows_topk, resolve_impl
from kwta_jax.rank_keys import rank_keys

# Only the tests that run the compiled kernel skip without a compiler: the fallback tests
# (no compiler, no home directory) are exactly the ones that matter on such a machine.
needs_kernel = pytest.mark.skipif(
    not cpu_kernel_available(), reason=f"CPU kernel unavailable: {cpu_kernel_status()}"
)

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 2.0, -3.0]
SUBNORMALS = {np.dtype(np.float32): 1e-40, np.dtype(ml_dtypes.bfloat16): 1e-40}
SUBNORMALS[np.dtype(np.float16)] = 1e-6


@functools.cache
def _jitted(k: int, use_abs: bool):
    return (
        jax.jit(lambda x: kwta_rows_cpu(x, k, use_abs)),
        jax.jit(lambda x: kwta_rows_topk(x, k, use_abs)),
    )


def assert_matches(x: np.ndarray, k: int, use_abs: bool) -> None:
    """Kernel == top_k (output bits and threshold keys) == NumPy reference (output bits)."""
    cpu, topk = _jitted(k, use_abs)
    y, th = cpu(x)
    y_ref, th_ref = topk(x)
    assert th.dtype == th_ref.dtype and th.shape == th_ref.shape == x.shape[:-1]
    np.testing.assert_array_equal(np.asarray(th), np.asarray(th_ref))
    assert same_bits(np.asarray(y), np.asarray(y_ref))
    assert same_bits(np.asarray(y), numpy_kwta(x, k, (x.ndim - 1,), use_abs))


def make(rng: np.random.Generator, kind: str, shape, dtype) -> np.ndarray:
    if kind == "normal":
        x = rng.normal(size=shape)
    elif kind == "ties":  # few distinct values, signed zeros, infinities, NaNs of both signs
        x = rng.choice(SPECIALS, size=shape)
    elif kind == "equal":
        x = np.full(shape, -1.5)
    elif kind == "subnormal":  # subnormals of both signs around zeros of both signs
        tiny = SUBNORMALS[np.dtype(dtype)]
        x = rng.choice([tiny, -tiny, 2 * tiny, -2 * tiny, 0.0, -0.0], size=shape)
    elif kind == "nan":  # at least as many NaNs as winners for small k
        x = rng.normal(size=shape)
        x[..., ::2] = np.nan
    else:
        raise ValueError(kind)
    return x.astype(dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["normal", "ties", "equal", "subnormal", "nan"])
@pytest.mark.parametrize("rows,n", [(1, 1), (5, 1), (1, 2), (7, 33), (3, 1025), (2, 3001)])
def test_small_rows_all_k(rows, n, kind, dtype):
    rng = np.random.default_rng(rows * 1000 + n)
    x = make(rng, kind, (rows, n), dtype)
    for k in sorted(k for k in {1, 2, n // 2, n - 1, n} if 1 <= k <= n):
        for use_abs in (False, True):
            assert_matches(x, k, use_abs)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES, ids=lambda d: np.dtype(d).name)
def test_long_rows(dtype):
    # 65,537 (just above a power of two, crosses block boundaries) and many rows
    rng = np.random.default_rng(1)
    x = make(rng, "normal", (9, 65_537), dtype)
    x[0, :100] = np.nan
    x[1] = 0.0
    x[1, ::3] = -0.0
    for k in (1, 6_553, 65_537):
        assert_matches(x, k, use_abs=False)
    assert_matches(x, 45_875, use_abs=True)


@needs_kernel
def test_row_longer_than_2_20():
    n = 2**20 + 3
    rng = np.random.default_rng(2)
    x = rng.normal(size=(1, n)).astype(np.float32)
    x[0, rng.integers(0, n, 1000)] = 1.25  # a tie block inside the threshold's bucket
    assert_matches(x, n // 10, use_abs=False)
    assert_matches(x, 1, use_abs=True)


@needs_kernel
def test_dense_bucket_needs_second_level():
    # All values inside one top-level bucket with many distinct keys: the selection runs its
    # radix levels on the gathered bucket before nth_element.
    rng = np.random.default_rng(3)
    x = (1.0 + rng.random((3, 50_000)) * 0.2).astype(np.float32)
    for k in (1, 17, 25_000, 49_999):
        assert_matches(x, k, use_abs=False)


@needs_kernel
def test_float64_when_x64_enabled():
    rng = np.random.default_rng(4)
    x = rng.choice([*SPECIALS, 1e-310, -1e-310, 0.5], size=(6, 301))
    with jax.enable_x64(True):
        xj = jnp.asarray(x, jnp.float64)
        for k in (1, 100, 301):
            y, th = kwta_rows_cpu(xj, k, False)
            y_ref, th_ref = kwta_rows_topk(xj, k, False)
            assert th.dtype == jnp.uint64
            np.testing.assert_array_equal(np.asarray(th), np.asarray(th_ref))
            assert same_bits(np.asarray(y), np.asarray(y_ref))


@needs_kernel
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow],
)
@given(
    shape=st.sampled_from([(1, 5), (3, 17), (4, 64), (2, 300)]),
    dtype=st.sampled_from(DTYPES),
    use_abs=st.booleans(),
    data=st.data(),
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_property_matches_topk(shape, dtype, use_abs, data):
    elements = st.sampled_from([*SPECIALS, 1e-40, -1e-40]) | st.floats(width=32)
    x = data.draw(hnp.arrays(np.float64, shape, elements=elements), label="x").astype(dtype)
    k = data.draw(st.integers(1, shape[1]), label="k")
    assert_matches(x, k, use_abs)


# ---------------------------------------------------------------------------------------------
# Transformations, through the public op.
# ---------------------------------------------------------------------------------------------


@needs_kernel
def test_auto_picks_the_kernel_on_cpu():
    assert jax.default_backend() == "cpu"
    assert resolve_impl("auto") == "cpu"


@needs_kernel
def test_auto_keeps_select_for_several_cpu_devices(monkeypatch):
    # Data parallelism: XLA would gather the sharded batch onto every device for the FFI call.
    monkeypatch.setattr(jax, "local_device_count", lambda *a, **k: 2)
    assert resolve_impl("auto") == "select"


@needs_kernel
def test_jit_and_vmap_equal_stacked():
    rng = np.random.default_rng(5)
    xs = jnp.asarray(rng.normal(size=(3, 4, 6, 5)), jnp.float32)
    f = jax.jit(lambda x: kwta(x, ratio=0.3, impl="cpu"))
    stacked = jnp.stack([f(x) for x in xs])
    assert same_bits(np.asarray(jax.vmap(f)(xs)), np.asarray(stacked))
    # the batched call is one kernel call on [3, 4, 30] (every leading dim is a row)
    _, th = jax.vmap(lambda x: kwta_rows_cpu(x, 7, False))(xs.reshape(3, 4, 30))
    assert th.shape == (3, 4)
    want = jnp.stack([kwta_rows_topk(x, 7, False)[1] for x in xs.reshape(3, 4, 30)])
    np.testing.assert_array_equal(np.asarray(th), np.asarray(want))


@needs_kernel
@pytest.mark.parametrize("use_abs", [False, True])
def test_grad_is_upstream_times_mask(use_abs):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0], size=(5, 40)), jnp.float32)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    k = 9
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(kwta(x, k=k, use_abs=use_abs, impl="cpu"), g)))
    _, th = kwta_rows_topk(x, k, use_abs)
    mask = rank_keys(x, use_abs) >= th[:, None]
    np.testing.assert_array_equal(np.asarray(grad(x)), np.asarray(jnp.where(mask, g, 0.0)))


@needs_kernel
def test_jvp_matches_topk():
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.normal(size=(4, 3, 3, 5)), jnp.bfloat16)
    t = jnp.asarray(rng.normal(size=x.shape), jnp.bfloat16)
    got = jax.jvp(lambda x: kwta(x, ratio=0.2, impl="cpu"), (x,), (t,))
    want = jax.jvp(lambda x: kwta(x, ratio=0.2, impl="topk"), (x,), (t,))
    for a, b in zip(got, want, strict=True):
        assert same_bits(np.asarray(a), np.asarray(b))


@needs_kernel
def test_bad_arguments():
    with pytest.raises(ValueError, match="k=0"):
        kwta_rows_cpu(jnp.ones((2, 3)), 0, False)
    with pytest.raises(ValueError, match="k=4"):
        kwta_rows_cpu(jnp.ones((2, 3)), 4, False)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        kwta_rows_cpu(jnp.ones((2, 3), jnp.int32), 1, False)


# ---------------------------------------------------------------------------------------------
# Lazy build: concurrent builders, and no compiler.
# ---------------------------------------------------------------------------------------------


@needs_kernel
def test_concurrent_builds_into_an_empty_cache(tmp_path):
    paths, errors = [], []

    def build():
        try:
            paths.append(build_library(directory=tmp_path))
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=build) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert len(set(paths)) == 1
    assert [p.name for p in tmp_path.iterdir()] == [paths[0].name]  # no temp file left over
    assert ctypes.CDLL(str(paths[0])).KwtaCpu  # a complete, loadable library
    assert build_library(directory=tmp_path) == paths[0]  # cached: no rebuild


def test_missing_compiler_falls_back_to_select(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KWTA_JAX_CACHE_DIR", str(tmp_path / "cache"))
    with pytest.raises(CpuKernelUnavailable, match="no-such-compiler"):
        build_library()
    # A fresh process state: the build fails once, availability is False, auto -> select.
    monkeypatch.setattr(kwta_cpu, "_state", {})
    assert cpu_kernel_available() is False
    assert "no-such-compiler" in cpu_kernel_status()
    assert resolve_impl("auto") == "select"
    x = jnp.asarray(np.random.default_rng(8).normal(size=(3, 10)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(kwta(x, k=2)), np.asarray(kwta(x, k=2, impl="topk")))
    with pytest.raises(CpuKernelUnavailable, match="no-such-compiler"):
        kwta(x, k=2, impl="cpu")


@needs_kernel
def test_compile_error_names_command_and_output(tmp_path, monkeypatch):
    monkeypatch.setenv("CXX", "c++ -DKWTA_NO_SUCH_FLAG_VALUE -fno-such-option")
    with pytest.raises(CpuKernelUnavailable, match="(?s)command: c\\+\\+ .*-fno-such-option"):
        build_library(directory=tmp_path)
    assert list(tmp_path.iterdir()) == []  # the failed temp file is removed


@needs_kernel
def test_cache_key_covers_extra_flags_and_source(tmp_path, monkeypatch):
    base = kwta_cpu.library_path(directory=tmp_path)
    monkeypatch.setenv("KWTA_JAX_CXXFLAGS", "-march=native")
    native = kwta_cpu.library_path(directory=tmp_path)
    assert native != base and native.parent == base.parent == tmp_path
    monkeypatch.delenv("KWTA_JAX_CXXFLAGS")
    source = tmp_path / "kwta_cpu.cc"
    source.write_bytes(kwta_cpu.SOURCE.read_bytes() + b"\n// edited\n")
    monkeypatch.setattr(kwta_cpu, "SOURCE", source)
    assert kwta_cpu.library_path(directory=tmp_path) not in (base, native)


def test_no_home_directory_falls_back_to_select(monkeypatch):
    """HOME unset and no passwd entry: Path.home() raises; the kernel is unavailable (with the
    way out in the message) and kwta still works through select."""
    monkeypatch.delenv("KWTA_JAX_CACHE_DIR", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(kwta_cpu.Path, "home", staticmethod(no_home))
    monkeypatch.setattr(kwta_cpu, "_state", {})
    assert cpu_kernel_available() is False
    assert "KWTA_JAX_CACHE_DIR" in cpu_kernel_status()
    assert resolve_impl("auto") == "select"
    x = jnp.asarray(np.random.default_rng(9).normal(size=(3, 10)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(kwta(x, k=2)), np.asarray(kwta(x, k=2, impl="topk")))


@needs_kernel
def test_built_library_is_readable_by_other_users(tmp_path):
    path = build_library(directory=tmp_path)
    assert path.stat().st_mode & 0o755 == 0o755


@needs_kernel
def test_stale_temporaries_of_killed_builds_are_removed(tmp_path):
    final = kwta_cpu.library_path(directory=tmp_path)
    stale = tmp_path / f"{final.stem}.killed.tmp"
    fresh = tmp_path / f"{final.stem}.running.tmp"
    stale.write_bytes(b"")
    fresh.write_bytes(b"")
    old = time.time() - 2 * kwta_cpu._STALE_TMP_S
    os.utime(stale, (old, old))
    build_library(directory=tmp_path)
    assert not stale.exists()  # a build killed long ago
    assert fresh.exists()  # may belong to a build still running
