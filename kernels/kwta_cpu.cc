// Exact k-WTA thresholds on CPU, an XLA FFI handler (built and registered by kernels/kwta_cpu.py).
//
// For every row of x (all leading dims are rows, the last dim is the row of n units) it returns
// the exact k-th largest rank key (kwta_jax/rank_keys.py `rank_keys`: -0 == +0, every NaN ties
// above +inf, subnormals exact; use_abs clears the sign bit first). Two handlers:
//   KwtaCpu         selects only: under differentiation the op layer (kwta_jax/ops.py) applies
//                   y = where(key(x) >= threshold, x, 0) and the derivative as plain XLA, which
//                   fuses with the neighbouring ops;
//   KwtaCpuForward  the undifferentiated forward: also writes y, each row right after its
//                   selection while the row is still in cache (x is read once, not twice).
//
// Method (kwta_select_impl.h): per row, a sample brackets the threshold and one vectorised
// pass counts the keys above the bracket and compresses the keys inside it; the bracket's keys
// are narrowed the same way. Integer arithmetic on the bits only.
//
// Instruction sets: the selection is compiled three times in this translation unit (portable,
// AVX2, AVX-512, each with its own target attribute) and the best one the CPU supports is
// picked at run time, so the default portable build is fast on the machine it runs on. The
// `isa` attribute forces a lower one (tests run every path). Off x86 only the portable build
// exists (the compiler auto-vectorises parts of it, e.g. NEON).
//
// Threads: rows are independent. Chunks of rows are claimed from an atomic counter by the
// calling thread and by helper tasks scheduled on XLA's intra-op thread pool; the caller
// waits only for chunks that a running helper has claimed, so it never waits on a task that
// has not started (no deadlock when the pool is busy, has one thread, or is missing). Small
// inputs run on the calling thread alone: scheduling costs more than it saves there.

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>

#include "kwta_select.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

using kwta::SelectRows;

const int64_t kBestIsa = kwta::BestIsa();

// Work below which a call stays on the calling thread, and the least work per chunk.
constexpr int64_t kMinParallelWork = int64_t(1) << 16;
constexpr int64_t kMinChunkWork = int64_t(1) << 15;

// Runs fn(chunk) for chunk in [0, nchunks) on the calling thread and the intra-op pool.
//
// As many workers as the pool has threads (one thread per core), the caller among them: one
// helper fewer than the pool's size. A helper per pool thread (one more worker than cores)
// slowed the derivative forms, where XLA's own parallel loops follow this call: without it
// they took 2-40 % less time in 8 of 9 comparisons on the 2-core machine of
// docs/benchmarks.md (grad Σy² on [256,4096]: 2.2-3.0x ReLU against 3.4-3.6x, same process,
// interleaved), and the selector alone lost nothing.
class ParallelFor {
 public:
  // Threads that run chunks at once: the caller and its helpers.
  static int64_t Workers(ffi::ThreadPool& pool) { return std::max<int64_t>(1, pool.num_threads()); }

  template <typename F>
  static void Run(ffi::ThreadPool& pool, int64_t nchunks, F fn) {
    if (nchunks <= 0) return;
    const int64_t helpers = std::min<int64_t>(Workers(pool) - 1, nchunks - 1);
    if (helpers <= 0) {
      for (int64_t c = 0; c < nchunks; ++c) fn(c);
      return;
    }
    // State shared with helper tasks, which may start after this call returned (they then
    // find no chunk left and touch nothing but this state).
    struct State {
      std::atomic<int64_t> next{0};
      std::atomic<int64_t> done{0};
      int64_t nchunks = 0;
      std::mutex mu;
      std::condition_variable cv;
      std::function<void(int64_t)> fn;
    };
    auto state = std::make_shared<State>();
    state->nchunks = nchunks;
    state->fn = std::move(fn);
    auto work = [](State& st) {
      for (;;) {
        const int64_t c = st.next.fetch_add(1, std::memory_order_relaxed);
        if (c >= st.nchunks) return;
        st.fn(c);
        if (st.done.fetch_add(1, std::memory_order_acq_rel) + 1 == st.nchunks) {
          // Taking the lock orders this notify after the waiter's predicate check.
          { std::lock_guard<std::mutex> lock(st.mu); }
          st.cv.notify_all();
        }
      }
    };
    for (int64_t h = 0; h < helpers; ++h) {
      pool.Schedule([state, work]() { work(*state); });
    }
    work(*state);
    std::unique_lock<std::mutex> lock(state->mu);
    state->cv.wait(lock, [&] {
      return state->done.load(std::memory_order_acquire) == state->nchunks;
    });
    // Every chunk is done; a helper that starts later finds none and never calls fn.
  }
};

template <typename K, K kInf, bool kAbs>
void Thresholds(ffi::ThreadPool& pool, int64_t isa, const K* x, K* th, K* y, int64_t rows,
                int64_t n, int64_t k) {
  const int64_t work = rows * n;
  if (work < kMinParallelWork || rows == 1) {
    SelectRows<K, kInf, kAbs>(isa, x, th, y, 0, rows, n, k);
    return;
  }
  // A few chunks per thread (load balance), each of at least kMinChunkWork elements.
  const int64_t workers = ParallelFor::Workers(pool);
  const int64_t nchunks = std::max<int64_t>(1, std::min({rows, 4 * workers, work / kMinChunkWork}));
  ParallelFor::Run(pool, nchunks, [=](int64_t c) {
    SelectRows<K, kInf, kAbs>(isa, x, th, y, rows * c / nchunks, rows * (c + 1) / nchunks, n, k);
  });
}

template <typename K, K kInf>
void Dispatch(ffi::ThreadPool& pool, int64_t isa, const void* x, void* th, void* y, int64_t rows,
              int64_t n, int64_t k, bool use_abs) {
  auto* xk = static_cast<const K*>(x);
  auto* tk = static_cast<K*>(th);
  auto* yk = static_cast<K*>(y);
  if (use_abs) {
    Thresholds<K, kInf, true>(pool, isa, xk, tk, yk, rows, n, k);
  } else {
    Thresholds<K, kInf, false>(pool, isa, xk, tk, yk, rows, n, k);
  }
}

// Both handlers: the threshold keys th of x's rows and, when y is given, the k-WTA output.
ffi::Error Select(ffi::ThreadPool& pool, ffi::AnyBuffer& x, ffi::AnyBuffer* y, ffi::AnyBuffer& th,
                  int64_t k, bool use_abs, int64_t isa) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) {
    return ffi::Error::InvalidArgument("kwta_cpu: x must have rank >= 1 ([..., n]).");
  }
  const int64_t n = dims.back();
  const int64_t rows = n == 0 ? 0 : int64_t(x.element_count()) / n;
  if (isa < 0) isa = kBestIsa;
  if (isa > kBestIsa) {
    return ffi::Error::InvalidArgument("kwta_cpu: isa=" + std::to_string(isa) +
                                       " is not supported by this CPU (best: " +
                                       std::to_string(kBestIsa) + ").");
  }
  if (rows == 0) return ffi::Error::Success();
  if (k < 1 || k > n) {
    return ffi::Error::InvalidArgument("kwta_cpu: k=" + std::to_string(k) +
                                       " must be in [1, n=" + std::to_string(n) + "].");
  }
  if (n > int64_t(std::numeric_limits<int32_t>::max())) {
    return ffi::Error::InvalidArgument("kwta_cpu: rows longer than 2^31 - 1 are not supported.");
  }
  if (int64_t(th.element_count()) != rows) {
    return ffi::Error::InvalidArgument("kwta_cpu: threshold_key must have one entry per row.");
  }
  if (y != nullptr &&
      (y->element_type() != x.element_type() || y->element_count() != x.element_count())) {
    return ffi::Error::InvalidArgument("kwta_cpu: y must have x's dtype and size.");
  }
  const void* xp = x.untyped_data();
  void* tp = th.untyped_data();
  void* yp = y == nullptr ? nullptr : y->untyped_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      if (th.element_type() != ffi::DataType::U32) break;
      Dispatch<uint32_t, 0x7f800000u>(pool, isa, xp, tp, yp, rows, n, k, use_abs);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      if (th.element_type() != ffi::DataType::U16) break;
      Dispatch<uint16_t, 0x7f80u>(pool, isa, xp, tp, yp, rows, n, k, use_abs);
      return ffi::Error::Success();
    case ffi::DataType::F16:
      if (th.element_type() != ffi::DataType::U16) break;
      Dispatch<uint16_t, 0x7c00u>(pool, isa, xp, tp, yp, rows, n, k, use_abs);
      return ffi::Error::Success();
    case ffi::DataType::F64:
      if (th.element_type() != ffi::DataType::U64) break;
      Dispatch<uint64_t, 0x7ff0000000000000ull>(pool, isa, xp, tp, yp, rows, n, k, use_abs);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "kwta_cpu: x must be float16, bfloat16, float32 or float64.");
  }
  return ffi::Error::InvalidArgument(
      "kwta_cpu: threshold_key must be the unsigned type of x's width.");
}

ffi::Error KwtaImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> th,
                    int64_t k, bool use_abs, int64_t isa) {
  return Select(pool, x, nullptr, *th, k, use_abs, isa);
}

ffi::Error KwtaForwardImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                           ffi::Result<ffi::AnyBuffer> th, int64_t k, bool use_abs, int64_t isa) {
  return Select(pool, x, &*y, *th, k, use_abs, isa);
}

}  // namespace

// The best instruction set this CPU supports (0 portable, 1 AVX2, 2 AVX-512), for reports.
extern "C" int64_t KwtaCpuBestIsa() { return kBestIsa; }

// Brackets that missed the threshold since the library was loaded (tests force the fallback).
extern "C" int64_t KwtaCpuBracketMisses() { return kwta::bracket_misses.load(); }

XLA_FFI_DEFINE_HANDLER_SYMBOL(KwtaCpu, KwtaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [..., n]
                                  .Ret<ffi::AnyBuffer>()  // threshold_key [...] unsigned
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("use_abs")
                                  .Attr<int64_t>("isa"));

// The forward without differentiation: y, written row by row while the row is still in cache
// from its selection (one read of x instead of two), and the threshold keys.
XLA_FFI_DEFINE_HANDLER_SYMBOL(KwtaCpuForward, KwtaForwardImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [..., n]
                                  .Ret<ffi::AnyBuffer>()  // y [..., n], x's dtype
                                  .Ret<ffi::AnyBuffer>()  // threshold_key [...] unsigned
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("use_abs")
                                  .Attr<int64_t>("isa"));
