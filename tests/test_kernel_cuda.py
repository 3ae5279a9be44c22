"""The CUDA selector without a GPU: its algorithm, modelled in NumPy, and its own source,
compiled as one-thread-per-block C++ (``KWTA_HOST_EMULATION``), agree bit for bit with the
`lax.top_k` reference on adversarial rows; nvcc compiles it for sm_90 and the FFI call lowers
for CUDA; on a machine without a CUDA GPU it says why it is unavailable.

What only a GPU can check (``python -m kwta_jax.gpu_check``): the compiled kernel itself, its
races (many threads share the histograms and the buffer) and its speed.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax import export
from kwta_jax.kernels.kwta_pallas import threshold_keys_reference

from kwta_jax.kernels import kwta_cuda, lazy_build
from kwta_jax.rank_keys import rank_keys, where_bits

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16, "float16": jnp.float16}
INF_BITS = {"float32": 0x7F800000, "bfloat16": 0x7F80, "float16": 0x7C00}
SPECIAL = [0.0, -0.0, 1.0, -1.0, 2.0, np.inf, -np.inf, np.nan, -np.nan, 1e-40, -1e-40, 6e4]
KERNEL_CAPACITY = {4: 8192, 2: 16384}  # the kernel's buffer, in keys, by key width


def bits_of(x) -> np.ndarray:
    x = np.asarray(x)
    return x.view(np.dtype(f"u{x.dtype.itemsize}"))


# --------------------------------------------------------------------------------------------
# The NumPy model of kwta_cuda.cu's algorithm (one row at a time, the kernel's passes).
# --------------------------------------------------------------------------------------------


def model_rank_keys(bits: np.ndarray, inf_bits: int, use_abs: bool) -> np.ndarray:
    """`RankKey` of the kernel on unsigned bit patterns."""
    nbits = 8 * bits.dtype.itemsize
    sign = bits.dtype.type(1 << (nbits - 1))
    magnitude = bits.dtype.type((1 << (nbits - 1)) - 1)
    b = bits & magnitude if use_abs else bits.copy()
    is_nan = (b & magnitude) > inf_bits
    b = np.where(b == sign, bits.dtype.type(0), b)
    keys = np.where(b & sign, ~b, b | sign)
    return np.where(is_nan, bits.dtype.type(np.iinfo(bits.dtype).max), keys)


def model_row(keys: np.ndarray, k: int, capacity: int) -> tuple[int, int]:
    """``(threshold, rows read from global memory)`` of one row of keys, pass for pass."""
    nbits = 8 * keys.dtype.itemsize
    shifts = (21, 10, 0) if nbits == 32 else (5, 0)
    full = (1 << nbits) - 1
    prefix, rank, matching, buffer, reads = 0, k, keys.size, None, 0
    for p, shift in enumerate(shifts):
        top = nbits if p == 0 else shifts[p - 1]
        decided = 0 if top >= nbits else (full << top) & full
        fill = buffer is None and p + 1 < len(shifts) and matching <= capacity
        if buffer is None:
            source, reads = keys.astype(np.int64), reads + 1
        else:
            source = buffer
        candidates = source[((source ^ prefix) & decided) == 0]
        hist = np.bincount((candidates >> shift) & ((1 << (top - shift)) - 1), minlength=2048)
        above = np.concatenate([np.cumsum(hist[::-1])[::-1][1:], [0]])  # keys in higher bins
        (digit,) = np.flatnonzero((above < rank) & (above + hist >= rank))
        prefix |= int(digit) << shift
        rank -= int(above[digit])
        matching = int(hist[digit])
        if fill:
            buffer = candidates
    return prefix, reads


def model_threshold_keys(x, dtype_name: str, k: int, use_abs: bool, capacity: int):
    """``(threshold keys [rows], global reads [rows])`` of the model on ``x [rows, n]``."""
    keys = model_rank_keys(bits_of(x), INF_BITS[dtype_name], use_abs)
    out = [model_row(row, k, capacity) for row in keys]
    th = np.array([t for t, _ in out], keys.dtype)
    return th, np.array([r for _, r in out])


# --------------------------------------------------------------------------------------------
# The kernel's own source, built as plain C++ (one thread per block).
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulation(tmp_path_factory):
    cxx = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not cxx:
        pytest.skip("no C++ compiler for the host emulation of the CUDA kernel")
    out = tmp_path_factory.mktemp("emulation") / "kwta_cuda_emulation.so"
    cmd = [cxx, "-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Wno-unknown-pragmas",
           "-DKWTA_HOST_EMULATION", "-x", "c++", str(kwta_cuda.SOURCE), "-o", str(out)]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "warning" not in proc.stderr, proc.stderr[-3000:]
    lib = ctypes.cdll.LoadLibrary(str(out))
    lib.KwtaEmulate.restype = ctypes.c_int64
    lib.KwtaEmulate.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                                ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int,
                                ctypes.c_uint32]  # fmt: skip

    def run(x, dtype_name, k, use_abs, capacity, forward=False):
        bits = np.ascontiguousarray(bits_of(x))
        rows, n = bits.shape
        th = np.zeros(rows, bits.dtype)
        y = np.zeros_like(bits) if forward else None
        reads = lib.KwtaEmulate(
            list(DTYPES).index(dtype_name), bits.ctypes.data, th.ctypes.data,
            None if y is None else y.ctypes.data, rows, n, k, int(use_abs), capacity,
        )  # fmt: skip
        return th, y, reads

    return run


def adversarial_rows(dtype_name: str, n: int, seed: int = 0) -> np.ndarray:
    """Rows that take every route: smooth, all equal, all NaN, signed zeros, ties at the
    threshold, infinities and subnormals, few distinct values."""
    rng = np.random.default_rng(seed)
    rows = [
        rng.standard_normal(n),
        np.full(n, 1.5),  # all equal: every bin overflows the buffer
        np.full(n, np.nan),
        rng.choice([0.0, -0.0], n),
        np.round(rng.standard_normal(n)),  # heavy ties
        rng.choice(SPECIAL, n),
        np.where(rng.random(n) < 0.3, rng.choice(SPECIAL, n), rng.standard_normal(n)),
        rng.standard_normal(n) * 1e-30,  # tiny values (subnormal in 16-bit)
    ]
    with np.errstate(over="ignore"):
        return np.asarray(jnp.asarray(np.stack(rows).astype(np.float32)).astype(DTYPES[dtype_name]))


def reference(x, k, use_abs) -> np.ndarray:
    return np.asarray(threshold_keys_reference(jnp.asarray(x), k, use_abs))


def masked_bits(x, th, use_abs=False) -> np.ndarray:
    """The bit patterns of the k-WTA output for threshold keys ``th``."""
    x = jnp.asarray(x)
    return bits_of(where_bits(rank_keys(x, use_abs) >= jnp.asarray(th)[:, None], x))


@pytest.mark.parametrize("dtype_name", list(DTYPES))
def test_model_rank_keys_are_the_librarys(dtype_name):
    x = np.asarray(jnp.asarray(np.array(SPECIAL * 3, np.float32)).astype(DTYPES[dtype_name]))
    for use_abs in (False, True):
        want = np.asarray(rank_keys(jnp.asarray(x), use_abs))
        np.testing.assert_array_equal(
            model_rank_keys(bits_of(x), INF_BITS[dtype_name], use_abs), want
        )


@pytest.mark.parametrize("dtype_name", list(DTYPES))
@pytest.mark.parametrize("capacity", [1, 16, 300, 8192])
def test_model_and_emulation_are_exact_on_adversarial_rows(emulation, dtype_name, capacity):
    x = adversarial_rows(dtype_name, 300)
    for k, use_abs in ((1, False), (7, True), (30, False), (150, True), (299, False), (300, False)):
        want = reference(x, k, use_abs)
        th, reads = model_threshold_keys(x, dtype_name, k, use_abs, capacity)
        np.testing.assert_array_equal(th, want)
        th_emu, y_emu, reads_emu = emulation(x, dtype_name, k, use_abs, capacity, forward=True)
        np.testing.assert_array_equal(th_emu, want)
        assert reads_emu == reads.sum()  # the model takes the kernel's route, row by row
        np.testing.assert_array_equal(y_emu, masked_bits(x, want, use_abs))


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
def test_every_route_is_taken(dtype_name):
    """Buffer from the first pass (n <= capacity), buffer from the second (the top bin fits),
    and the overflow fallback (all-equal rows), with the global reads each one costs."""
    passes = 3 if dtype_name == "float32" else 2
    x = adversarial_rows(dtype_name, 300)
    k = 30
    _, reads = model_threshold_keys(x, dtype_name, k, False, capacity=300)
    assert set(reads) == {1}  # the whole row fits: one read
    _, reads = model_threshold_keys(x, dtype_name, k, False, capacity=299)
    assert reads[1] == passes  # all equal: every bin overflows
    smooth = np.asarray(jnp.asarray(np.random.default_rng(1).standard_normal((4, 4096)),
                                    DTYPES[dtype_name]))  # fmt: skip
    _, reads = model_threshold_keys(smooth, dtype_name, 409, False, capacity=1024)
    assert set(reads) == {2}  # the top bin fits the buffer: two reads
    # The buffer boundary: exactly `capacity` matching keys are buffered, one more is not.
    row = np.asarray(jnp.asarray(np.r_[np.full(16, 3.0), np.zeros(48)][None], DTYPES[dtype_name]))
    assert model_threshold_keys(row, dtype_name, 5, False, capacity=16)[1][0] == min(2, passes)
    assert model_threshold_keys(row, dtype_name, 5, False, capacity=15)[1][0] == passes


@settings(
    max_examples=25, deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)  # fmt: skip
@given(
    dtype_name=st.sampled_from(list(DTYPES)),
    shape=st.sampled_from([(3, 1), (2, 17), (4, 129), (2, 1000)]),
    capacity=st.sampled_from([1, 8, 64, 8192]),
    use_abs=st.booleans(),
    data=st.data(),
)
@pytest.mark.filterwarnings("ignore:overflow encountered in cast")
def test_emulated_kernel_matches_the_reference(emulation, dtype_name, shape, capacity, use_abs,
                                               data):  # fmt: skip
    elements = st.sampled_from(SPECIAL) | st.integers(-3, 3).map(float) | st.floats(width=32)
    x = data.draw(hnp.arrays(np.float32, shape, elements=elements), label="x")
    x = np.asarray(jnp.asarray(x).astype(DTYPES[dtype_name]))
    k = data.draw(st.integers(1, shape[1]), label="k")
    th, _, _ = emulation(x, dtype_name, k, use_abs, capacity)
    np.testing.assert_array_equal(th, reference(x, k, use_abs))


def test_emulated_kernel_on_long_misaligned_rows(emulation):
    """Rows of 65,537 keys (every row but the first starts off a 16-byte boundary: the
    unaligned head, 16-byte body and tail of the loads) at the kernel's real capacity."""
    for dtype_name in DTYPES:
        x = np.asarray(jax.random.normal(jax.random.key(2), (3, 65537)).astype(DTYPES[dtype_name]))
        capacity = KERNEL_CAPACITY[x.dtype.itemsize]
        for k in (6553, 45875):
            th, y, _ = emulation(x, dtype_name, k, False, capacity, forward=True)
            want = reference(x, k, False)
            np.testing.assert_array_equal(th, want)
            np.testing.assert_array_equal(y, masked_bits(x, want))


# --------------------------------------------------------------------------------------------
# The wrapper, the build and the FFI lowering.
# --------------------------------------------------------------------------------------------


def test_unavailable_without_a_cuda_gpu(monkeypatch):
    monkeypatch.setattr(kwta_cuda, "_state", {})
    assert jax.default_backend() == "cpu"
    assert "needs a CUDA GPU backend" in kwta_cuda.cuda_kernel_status()
    assert kwta_cuda.cuda_kernel_available() is False
    with pytest.raises(kwta_cuda.CudaKernelUnavailable, match="CUDA GPU backend"):
        kwta_cuda.cuda_threshold_keys(jnp.ones((2, 8)), 3)
    monkeypatch.setattr(kwta_cuda, "_state", {})
    monkeypatch.setenv("KWTA_JAX_CUDA_KERNEL", "0")
    assert "disabled by KWTA_JAX_CUDA_KERNEL=0" in kwta_cuda.cuda_kernel_status()


def test_wrapper_validates_and_delegates():
    with pytest.raises(ValueError, match="k must be"):
        kwta_cuda.cuda_threshold_keys(jnp.ones((2, 8)), 9)
    with pytest.raises(TypeError, match="floating"):
        kwta_cuda.cuda_threshold_keys(jnp.ones((2, 8), jnp.int32), 1)
    with pytest.raises(ValueError, match="rows, n"):
        kwta_cuda.cuda_threshold_keys(jnp.ones(8), 1)
    # float64 (keys of 64 bits) and empty batches never reach the kernel.
    x = np.random.default_rng(0).standard_normal((3, 20))
    with jax.enable_x64(True):
        with pytest.raises(TypeError, match="float32, bfloat16 or float16"):
            kwta_cuda.cuda_kwta_forward(jnp.ones((2, 8), jnp.float64), 1)
        got = kwta_cuda.cuda_threshold_keys(jnp.asarray(x, jnp.float64), 4)
        np.testing.assert_array_equal(got, reference(jnp.asarray(x, jnp.float64), 4, False))
    assert kwta_cuda.cuda_threshold_keys(jnp.zeros((0, 5), jnp.bfloat16), 2).shape == (0,)


def test_nvcc_search_order(monkeypatch, tmp_path):
    monkeypatch.setenv("KWTA_JAX_NVCC", "ccache /opt/nvcc")
    assert kwta_cuda.nvcc_command() == ["ccache", "/opt/nvcc"]
    monkeypatch.delenv("KWTA_JAX_NVCC")
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setenv("CUDA_HOME", str(tmp_path / "cuda"))
    monkeypatch.setattr(kwta_cuda.importlib.util, "find_spec", lambda name: None)
    monkeypatch.setattr(kwta_cuda.os, "access", lambda path, mode: False)
    with pytest.raises(kwta_cuda.CudaKernelUnavailable, match="no CUDA compiler"):
        kwta_cuda.nvcc_command()


@pytest.mark.slow
@pytest.mark.skipif(not shutil.which("nvcc"), reason="needs nvcc")
def test_nvcc_builds_for_sm_90_and_the_call_lowers_for_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("KWTA_JAX_CACHE_DIR", str(tmp_path))
    path = kwta_cuda.build_library(arch="90")
    assert lazy_build.library_problem(path) is None and path.parent == tmp_path
    assert kwta_cuda.build_library(arch="90") == path  # cached: same content, same file
    kwta_cuda._register(path)  # loads without a GPU (static CUDA runtime)
    monkeypatch.setattr(kwta_cuda, "_ensure_registered", lambda: None)  # as on a CUDA GPU

    def op(x2d):  # the op layer's contract: the selector on stop_gradient-ed input
        th = kwta_cuda.cuda_threshold_keys(jax.lax.stop_gradient(x2d), 6553)
        return where_bits(rank_keys(x2d) >= th[:, None], x2d)

    programs = {
        kwta_cuda.SELECT_TARGET: jax.grad(lambda x: jnp.vdot(op(x), x).astype(jnp.float32)),
        kwta_cuda.FORWARD_TARGET: lambda x: kwta_cuda.cuda_kwta_forward(x, 6553, True),
    }
    for target, fn in programs.items():
        for dtype in (jnp.float32, jnp.bfloat16):
            exp = export.export(
                jax.jit(fn),
                platforms=["cuda"],
                disabled_checks=[export.DisabledSafetyCheck.custom_call(target)],
            )(jax.ShapeDtypeStruct((128, 65536), dtype))
            assert exp.mlir_module().count(f"custom_call @{target}") == 1


def test_the_build_cache_is_content_keyed_validated_and_atomic(tmp_path):
    builds = []

    def build(out):
        builds.append(out)
        out.write_bytes(b"library " * 100)

    a = lazy_build.cached_library("demo", [b"source", b"flags"], build, tmp_path / "a")
    assert lazy_build.cached_library("demo", [b"source", b"flags"], build, tmp_path / "a") == a
    assert len(builds) == 1  # cached
    b = lazy_build.cached_library("demo", [b"source", b"flags"], build, tmp_path / "b")
    assert a.name == b.name  # the name depends on the inputs, not on where the cache is
    assert a.name != lazy_build.cached_library("demo", [b"source2"], build, tmp_path / "a").name
    assert lazy_build.sidecar_path(a).read_text().split()[0] == "800"  # size and SHA-256
    a.write_bytes(a.read_bytes()[:10])  # truncated (a killed copy, a full disk): rebuilt
    assert "truncated or damaged" in lazy_build.library_problem(a)
    with pytest.raises(lazy_build.BuildError, match="not loading"):
        lazy_build.load_library(a)
    assert lazy_build.cached_library("demo", [b"source", b"flags"], build, tmp_path / "a") == a
    assert lazy_build.library_problem(a) is None and len(builds) == 4

    def failing(out):
        out.write_bytes(b"half")
        lazy_build.run_tool(["false"], "the compiler")

    with pytest.raises(lazy_build.BuildError, match="the compiler failed"):
        lazy_build.cached_library("demo", [b"other"], failing, tmp_path / "c")
    assert [p.name for p in (tmp_path / "c").iterdir()] == []  # no partial file left
    a.write_bytes(b"damaged")  # a bad cached library whose rebuild fails: both reasons
    with pytest.raises(lazy_build.BuildError, match="(?s)the compiler failed.*truncated or dam"):
        lazy_build.cached_library("demo", [b"source", b"flags"], failing, tmp_path / "a")
    assert a.read_bytes() == b"damaged"  # left alone, and never loaded (above)
    blocker = tmp_path / "file"
    blocker.write_text("")
    with pytest.raises(lazy_build.BuildError, match="cannot write to the cache directory"):
        lazy_build.cached_library("demo", [b"x"], build, blocker / "cache")
