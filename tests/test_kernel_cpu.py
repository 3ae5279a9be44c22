"""The C++ FFI selector (impl="cpu") agrees bit-for-bit with top_k and the NumPy reference on
every instruction-set path, and its lazy build and cache degrade cleanly."""

from __future__ import annotations

import ctypes
import os
import pathlib
import shutil
import subprocess
import sys
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
    ISAS,
    CpuKernelUnavailable,
    build_library,
    cpu_forward,
    cpu_kernel_available,
    cpu_kernel_isa,
    cpu_kernel_status,
    cpu_threshold_keys,
)
from kwta_reference import numpy_kwta, numpy_rank_keys, numpy_threshold_keys, same_bits

from kwta_jax import kwta
from kwta_jax.kernels import kwta_cpu, lazy_build
from kwta_jax.ops import resolve_impl, topk_threshold_keys
from kwta_jax.rank_keys import rank_keys

# Only the tests that run the compiled kernel skip without a compiler: the fallback tests
# (no compiler, no home directory) are exactly the ones that matter on such a machine.
needs_kernel = pytest.mark.skipif(
    not cpu_kernel_available(), reason=f"CPU kernel unavailable: {cpu_kernel_status()}"
)

DTYPES = [np.float32, ml_dtypes.bfloat16, np.float16]
# Every instruction-set path of the kernel; the ones this CPU lacks are skipped.
SUPPORTED_ISAS = ISAS[: ISAS.index(cpu_kernel_isa()) + 1] if cpu_kernel_available() else ()
ISA_PARAMS = [
    pytest.param(isa, marks=pytest.mark.skipif(isa not in SUPPORTED_ISAS, reason="CPU lacks it"))
    for isa in ISAS
]
SPECIALS = [0.0, -0.0, np.inf, -np.inf, np.nan, -np.nan, 1.0, -1.0, 2.0, -3.0]
SUBNORMALS = {np.dtype(np.float32): 1e-40, np.dtype(ml_dtypes.bfloat16): 1e-40}
SUBNORMALS[np.dtype(np.float16)] = 1e-6


def assert_matches(x: np.ndarray, k: int, use_abs: bool, isa: str | None = None) -> None:
    """The kernel's threshold keys equal the NumPy reference's (each row's k-th largest key),
    and its fused forward returns the same keys and the reference's output, bit for bit."""
    with jax.enable_x64(x.dtype == np.float64):
        th = np.asarray(cpu_threshold_keys(jnp.asarray(x), k, use_abs, isa=isa))
        y, fused_th = (np.asarray(a) for a in cpu_forward(jnp.asarray(x), k, use_abs, isa=isa))
    want = numpy_threshold_keys(x, k, use_abs)
    assert th.dtype == want.dtype and th.shape == want.shape == x.shape[:-1]
    np.testing.assert_array_equal(th, want)
    np.testing.assert_array_equal(fused_th, want)
    mask = numpy_rank_keys(x, use_abs) >= want[..., None]
    assert same_bits(y, np.where(mask, x, np.zeros((), x.dtype)))


def test_reference_keys_are_the_thresholds_of_the_reference_op():
    """numpy_threshold_keys (bits) and numpy_kwta (float compares) agree, and top_k agrees."""
    rng = np.random.default_rng(0)
    for dtype in (*DTYPES, np.float64):
        x = rng.choice([*SPECIALS, 1e-40, -1e-40, 0.25], size=(40, 23)).astype(dtype)
        for k in (1, 7, 23):
            for use_abs in (False, True):
                mask = numpy_rank_keys(x, use_abs) >= numpy_threshold_keys(x, k, use_abs)[:, None]
                want = numpy_kwta(x, k, (1,), use_abs)
                assert same_bits(np.where(mask, x, np.zeros((), x.dtype)), want)
    x = rng.normal(size=(5, 300)).astype(np.float32)
    np.testing.assert_array_equal(topk_threshold_keys(x, 30), numpy_threshold_keys(x, 30))


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
@pytest.mark.parametrize("isa", ISA_PARAMS)
@pytest.mark.parametrize("dtype", [*DTYPES, np.float64], ids=lambda d: np.dtype(d).name)
def test_every_instruction_set_path(isa, dtype):
    """Row lengths around the vector widths and the direct/sampled switch, brackets inside the
    positive floats, the negative floats and across zero, small and large k, specials."""
    rng = np.random.default_rng(11)
    for n in (17, 257, 4099):
        x = rng.normal(size=(3, n))
        x[1] = rng.choice(SPECIALS, size=n)  # ties, +-0, +-inf, NaNs of both signs
        x[2, ::5] = -0.0
        x = x.astype(dtype)
        for k in sorted({1, 3, n // 10, (7 * n) // 10, n}):
            for use_abs in (False, True):
                assert_matches(x, k, use_abs, isa)


def sample_positions(n: int, lanes: int) -> np.ndarray:
    """Where the kernel samples a row of n > 256 keys (white box: kwta_select_impl.h)."""
    keys = min(int(0.25 * np.cbrt(float(n) * n)), 1024, n // 4)
    chunks = max(2, keys // lanes)
    starts = [j * (n - lanes) // (chunks - 1) for j in range(chunks)]
    return np.unique(np.concatenate([np.arange(s, s + lanes) for s in starts]))


@needs_kernel
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_brackets_that_miss_fall_back_exactly(isa):
    """Rows whose sampled keys are all extreme: the sample's bracket misses the threshold
    (above and below), and the kernel gathers that side instead; still exact."""
    lanes = {"portable": 1, "avx2": 8, "avx512": 16}[isa]
    misses = kwta_cpu._state["lib"].KwtaCpuBracketMisses
    misses.restype = ctypes.c_int64
    before = misses()
    rng = np.random.default_rng(12)
    for n, dtype in ((5000, np.float32), (3001, ml_dtypes.bfloat16)):
        pos = sample_positions(n, lanes)
        x = rng.normal(size=(2, n))
        x[0, pos] = 100.0  # the sample says the threshold is 100: too high for k = n / 2
        x[1, pos] = -100.0  # too low for small k
        x = x.astype(dtype)
        for k in (1, 5, n // 2, n - 3):
            for use_abs in (False, True):
                assert_matches(x, k, use_abs, isa)
    assert misses() > before  # the fallback ran


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
@pytest.mark.parametrize("isa", ISA_PARAMS)
def test_heavy_ties_in_long_rows(isa):
    """A bracket holding thousands of keys of two or three values cannot shrink by sampling:
    the selection must notice and finish by key range (this once looped forever)."""
    rng = np.random.default_rng(14)
    x = rng.choice([1.0, 2.0, 3.0], size=(2, 20_000)).astype(np.float32)
    x[1, :5] = [0.5, 4.0, -0.0, 2.5, 1.5]  # a few other keys among the ties
    for k in (1, 7_000, 10_000, 13_000, 19_999):
        for use_abs in (False, True):
            assert_matches(x, k, use_abs, isa)


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
    for k in (1, 100, 301):
        assert_matches(x, k, False)
    with jax.enable_x64(True):
        assert cpu_threshold_keys(jnp.asarray(x), 1, False).dtype == jnp.uint64


@needs_kernel
@pytest.mark.parametrize("dtype", [*DTYPES, np.float64], ids=lambda d: np.dtype(d).name)
@pytest.mark.parametrize("kind", ["normal", "ties", "nan", "subnormal"])
def test_small_k_in_long_rows(kind, dtype):
    """TopK-autoencoder regime (k <= 256, k << n): ties at the threshold, NaN, +-0."""
    rng = np.random.default_rng(13)
    x = make(rng, kind, (3, 20_000), dtype if dtype != np.float64 else np.float32).astype(dtype)
    if kind == "normal":
        x[0, rng.integers(0, 20_000, 40)] = x[0].max()  # a tie block at the top
    for k in (1, 32, 64, 256):
        for use_abs in (False, True):
            assert_matches(x, k, use_abs)


@needs_kernel
@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.data_too_large, HealthCheck.too_slow],
)
@given(
    shape=st.sampled_from([(1, 5), (3, 17), (4, 64), (2, 300), (1, 700)]),
    dtype=st.sampled_from(DTYPES),
    use_abs=st.booleans(),
    isa=st.sampled_from(SUPPORTED_ISAS or ("portable",)),
    data=st.data(),
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_property_matches_topk(shape, dtype, use_abs, isa, data):
    elements = st.sampled_from([*SPECIALS, 1e-40, -1e-40]) | st.floats(width=32)
    x = data.draw(hnp.arrays(np.float64, shape, elements=elements), label="x").astype(dtype)
    k = data.draw(st.integers(1, shape[1]), label="k")
    assert_matches(x, k, use_abs, isa)


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
    th = jax.vmap(lambda x: cpu_threshold_keys(x, 7, False))(xs.reshape(3, 4, 30))
    assert th.shape == (3, 4)
    want = jnp.stack([topk_threshold_keys(x, 7, False) for x in xs.reshape(3, 4, 30)])
    np.testing.assert_array_equal(np.asarray(th), np.asarray(want))


@needs_kernel
@pytest.mark.parametrize("use_abs", [False, True])
def test_grad_is_upstream_times_mask(use_abs):
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.choice([-2.0, -1.0, 0.0, 1.0, 2.0, 3.0], size=(5, 40)), jnp.float32)
    g = jnp.asarray(rng.normal(size=x.shape), jnp.float32)
    k = 9
    grad = jax.jit(jax.grad(lambda x: jnp.vdot(kwta(x, k=k, use_abs=use_abs, impl="cpu"), g)))
    th = topk_threshold_keys(x, k, use_abs)
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
def test_the_plain_forward_is_one_fused_call_and_derivatives_use_the_selector():
    """Undifferentiated, kwta is the fused kernel alone (x read once); differentiated, it is
    the selector plus the XLA apply (the op's one derivative rule), with the same values."""
    x = jnp.asarray(np.random.default_rng(8).normal(size=(6, 50)), jnp.float32)
    g = jnp.asarray(np.random.default_rng(9).normal(size=x.shape), jnp.float32)
    forward = jax.jit(lambda v: kwta(v, ratio=0.2, impl="cpu")).lower(x).as_text()
    assert (
        f"@{kwta_cpu.FORWARD_TARGET_NAME}(" in forward
        and f"@{kwta_cpu.TARGET_NAME}(" not in forward
    )
    y, pullback = jax.vjp(jax.jit(lambda v: kwta(v, ratio=0.2, impl="cpu")), x)
    vjp_text = jax.jit(lambda v: jax.vjp(lambda u: kwta(u, ratio=0.2, impl="cpu"), v)[0])
    assert f"@{kwta_cpu.TARGET_NAME}(" in vjp_text.lower(x).as_text()
    assert same_bits(np.asarray(y), np.asarray(kwta(x, ratio=0.2, impl="topk")))
    mask = np.asarray(y) != 0  # no zeros in x: the winners are the nonzero outputs
    np.testing.assert_array_equal(np.asarray(pullback(g)[0]), np.where(mask, np.asarray(g), 0))


@needs_kernel
def test_fused_forward_vmaps_as_one_call_on_the_stacked_rows():
    xs = jnp.asarray(np.random.default_rng(10).normal(size=(3, 4, 30)), jnp.float32)
    y, th = jax.vmap(lambda x: cpu_forward(x, 7, False))(xs)
    assert y.shape == xs.shape and th.shape == (3, 4)
    want = jnp.stack([kwta(x, k=7, impl="topk") for x in xs])
    assert same_bits(np.asarray(y), np.asarray(want))


@needs_kernel
@pytest.mark.parametrize("fn", [cpu_threshold_keys, cpu_forward])
def test_bad_arguments(fn):
    name = fn.__name__
    with pytest.raises(ValueError, match=f"{name}: k=0"):
        fn(jnp.ones((2, 3)), 0, False)
    with pytest.raises(ValueError, match="k=4"):
        fn(jnp.ones((2, 3)), 4, False)
    with pytest.raises(TypeError, match="float16, bfloat16, float32 or float64"):
        fn(jnp.ones((2, 3), jnp.int32), 1, False)
    with pytest.raises(ValueError, match="isa must be one of"):
        fn(jnp.ones((2, 3)), 1, False, isa="sse9")


# ---------------------------------------------------------------------------------------------
# Lazy build and cache: concurrent builders, no compiler, damaged caches.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def fake_cxx(tmp_path):
    """A "compiler" that copies the library this session already built: the cache's logic
    without a real compilation (seconds each) per test."""
    real = build_library()
    script = tmp_path / "fake-cxx"
    script.write_text(
        "#!/bin/sh\n"
        'if [ "$1" = "--version" ]; then echo "fake-cxx 1.0"; exit 0; fi\n'
        'if [ -n "$FAKE_CXX_FAILS" ]; then echo "fake-cxx: broken" >&2; exit 1; fi\n'
        'while [ $# -gt 0 ]; do [ "$1" = "-o" ] && out="$2"; shift; done\n'
        f'cp "{real}" "$out"\n'
    )
    script.chmod(0o755)
    return [str(script)]


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
    # no temp file left over: the library and its size/SHA-256 record
    assert sorted(p.name for p in tmp_path.iterdir()) == [paths[0].name, paths[0].name + ".sha256"]
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
def test_cache_key_covers_extra_flags_and_sources(tmp_path, monkeypatch):
    base = kwta_cpu.library_path(directory=tmp_path)
    monkeypatch.setenv("KWTA_JAX_CXXFLAGS", "-march=native")
    native = kwta_cpu.library_path(directory=tmp_path)
    assert native != base and native.parent == base.parent == tmp_path
    monkeypatch.delenv("KWTA_JAX_CXXFLAGS")
    for name, attr in (("kwta_cpu.cc", "SOURCE"), ("kwta_simd.h", None)):
        edited = tmp_path / "edited" / name
        edited.parent.mkdir(exist_ok=True)
        original = kwta_cpu.SOURCE.with_name(name)
        edited.write_bytes(original.read_bytes() + b"\n// edited\n")
        with monkeypatch.context() as m:
            if attr:
                m.setattr(kwta_cpu, attr, edited)
            else:
                headers = tuple(edited if h.name == name else h for h in kwta_cpu.HEADERS)
                m.setattr(kwta_cpu, "HEADERS", headers)
            assert kwta_cpu.library_path(directory=tmp_path) not in (base, native)


@needs_kernel
def test_cache_key_is_content_not_paths(tmp_path, monkeypatch):
    """Another clone (sources elsewhere) or venv (FFI headers elsewhere) with the same contents
    reuses the build; a changed FFI header does not (issue 21, item 19)."""
    base = kwta_cpu.library_path(directory=tmp_path)
    clone = tmp_path / "clone"
    clone.mkdir()
    for source in (kwta_cpu.SOURCE, *kwta_cpu.HEADERS):
        (clone / source.name).write_bytes(source.read_bytes())
    monkeypatch.setattr(kwta_cpu, "SOURCE", clone / kwta_cpu.SOURCE.name)
    monkeypatch.setattr(kwta_cpu, "HEADERS", tuple(clone / h.name for h in kwta_cpu.HEADERS))
    venv_include = tmp_path / "venv" / "include"
    shutil.copytree(jax.ffi.include_dir(), venv_include)
    monkeypatch.setattr(jax.ffi, "include_dir", lambda: str(venv_include))
    assert kwta_cpu.library_path(directory=tmp_path) == base
    header = venv_include / "xla" / "ffi" / "api" / "ffi.h"
    header.write_bytes(header.read_bytes() + b"\n// a new jaxlib\n")
    assert kwta_cpu.library_path(directory=tmp_path) != base


@needs_kernel
def test_a_truncated_cached_library_is_rebuilt(tmp_path, fake_cxx):
    """A cut-off .so in the cache is never loaded (that can be a SIGBUS): its size/SHA-256
    record does not match, so the build replaces it (issue 21, item 11)."""
    cache = tmp_path / "cache"
    path = build_library(fake_cxx, cache)
    assert lazy_build.library_problem(path) is None
    good = path.read_bytes()
    assert lazy_build.sidecar_path(path).read_text().split()[0] == str(len(good))
    path.write_bytes(good[: len(good) // 3])
    assert "truncated or damaged" in lazy_build.library_problem(path)
    with pytest.raises(lazy_build.BuildError, match="not loading .*truncated or damaged"):
        lazy_build.load_library(path)
    assert build_library(fake_cxx, cache) == path
    assert path.read_bytes() == good and lazy_build.library_problem(path) is None
    lazy_build.sidecar_path(path).unlink()  # a library without its record is not trusted either
    assert "missing" in lazy_build.library_problem(path)
    build_library(fake_cxx, cache)
    assert lazy_build.library_problem(path) is None


@needs_kernel
def test_a_bad_cached_library_that_cannot_be_rebuilt_is_skipped(tmp_path, fake_cxx, monkeypatch):
    """Damaged and the rebuild fails: the kernel is off, its status says both, auto -> select."""
    cache = tmp_path / "cache"
    path = build_library(fake_cxx, cache)
    path.write_bytes(path.read_bytes()[:1000])
    monkeypatch.setenv("KWTA_JAX_CACHE_DIR", str(cache))
    monkeypatch.setenv("CXX", fake_cxx[0])
    monkeypatch.setenv("FAKE_CXX_FAILS", "1")
    monkeypatch.setattr(kwta_cpu, "_state", {})
    status = cpu_kernel_status()
    assert "truncated or damaged" in status and "fake-cxx: broken" in status
    assert resolve_impl("auto") == "select"
    assert path.stat().st_size == 1000  # left alone, never loaded


_LOAD_FROM_CACHE = """
import jax.numpy as jnp
from kwta_jax import kwta
from kwta_jax.kernels.kwta_cpu import cpu_kernel_status
print(cpu_kernel_status(), kwta(jnp.arange(6.0)[None], k=2, impl="cpu").tolist())
"""


@needs_kernel
@pytest.mark.slow
def test_a_new_process_survives_a_truncated_cache(tmp_path, fake_cxx):
    """The reported fault: a truncated library in KWTA_JAX_CACHE_DIR killed the next process
    with a Bus error. Now the next process rebuilds it and runs."""
    cache = tmp_path / "cache"
    env = dict(os.environ, KWTA_JAX_CACHE_DIR=str(cache), CXX=fake_cxx[0])
    path = build_library(fake_cxx, cache)
    path.write_bytes(path.read_bytes()[:4096])
    proc = subprocess.run(
        [sys.executable, "-c", _LOAD_FROM_CACHE], env=env, capture_output=True, text=True,
        timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.split("\n")[0] == "None [[0.0, 0.0, 0.0, 0.0, 4.0, 5.0]]"
    assert lazy_build.library_problem(path) is None


def test_no_home_directory_falls_back_to_select(monkeypatch):
    """HOME unset and no passwd entry: Path.home() raises; the kernel is unavailable (with the
    way out in the message) and kwta still works through select."""
    monkeypatch.delenv("KWTA_JAX_CACHE_DIR", raising=False)
    monkeypatch.delenv("HOME", raising=False)

    def no_home():
        raise RuntimeError("Could not determine home directory.")

    monkeypatch.setattr(pathlib.Path, "home", staticmethod(no_home))
    monkeypatch.setattr(kwta_cpu, "_state", {})
    assert cpu_kernel_available() is False
    assert "KWTA_JAX_CACHE_DIR" in cpu_kernel_status()
    assert resolve_impl("auto") == "select"
    x = jnp.asarray(np.random.default_rng(9).normal(size=(3, 10)), jnp.float32)
    np.testing.assert_array_equal(np.asarray(kwta(x, k=2)), np.asarray(kwta(x, k=2, impl="topk")))


@needs_kernel
def test_built_library_is_readable_by_other_users(tmp_path, fake_cxx):
    path = build_library(fake_cxx, tmp_path / "cache")
    assert path.stat().st_mode & 0o755 == 0o755
    assert lazy_build.sidecar_path(path).stat().st_mode & 0o644 == 0o644


@needs_kernel
def test_stale_temporaries_of_killed_builds_are_removed(tmp_path, fake_cxx):
    cache = tmp_path / "cache"
    cache.mkdir()
    final = kwta_cpu.library_path(fake_cxx, cache)
    stale = cache / f"{final.name}.killed.tmp"
    stale_other_key = cache / "kwta_cpu-0123456789abcdef0123.so.killed.tmp"  # an older source
    fresh = cache / f"{final.name}.running.tmp"
    others = cache / "kwta_cuda-0123456789abcdef0123.so.killed.tmp"  # not this stem's
    old = time.time() - 2 * lazy_build._STALE_TMP_S
    for tmp in (stale, stale_other_key, fresh, others):
        tmp.write_bytes(b"")
        if tmp is not fresh:
            os.utime(tmp, (old, old))
    build_library(fake_cxx, cache)
    assert not stale.exists() and not stale_other_key.exists()  # builds killed long ago
    assert fresh.exists()  # may belong to a build still running
    assert others.exists()  # the CUDA build cleans up after its own
