// Exact k-WTA rows on CPU, an XLA FFI handler (built and registered by kernels/kwta_cpu.py).
//
// For every row of x (all leading dims are rows, the last dim is the row of n units) it finds
// the exact k-th largest rank key (the same order-preserving float -> unsigned map as
// kwta_jax/keys.py `rank_keys`: -0 == +0, every NaN ties above +inf with the largest key,
// subnormals exact; use_abs clears the sign bit first) and writes
//   y = where(key >= threshold, x, 0),   threshold_key[row] = threshold.
//
// Method: radix select in two passes over the row.
//   pass 1  histogram of the top kTopBits bits of every key; the bucket b holding the k-th
//           largest key is found by scanning the histogram from the top.
//   pass 2  every element above bucket b is a winner and every element below a loser, so y is
//           written right away (x or 0, decided with one compare); the positions of the few
//           elements inside bucket b (a few % of a row on smooth data) are gathered.
//   select  the threshold is the (k - count above b)-th largest gathered key: further
//           histogram levels on the gathered keys while they are many, then nth_element.
//   fix-up  y is rewritten at the gathered indices with the exact threshold.
// So x is read twice and y written once; a row of 65,536 float32 (256 KiB) stays in L2
// between the two passes. Everything is integer arithmetic on the bits (no float compare:
// no flush-to-zero of subnormals, NaN payloads copied as they are).
//
// Threads: rows are independent. Chunks of rows are claimed from an atomic counter by the
// calling thread and by helper tasks scheduled on XLA's intra-op thread pool; the caller
// waits only for chunks that a running helper has claimed, so it never waits on a task that
// has not started (no deadlock when the pool is busy, has one thread, or is missing).

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <cstring>
#include <functional>
#include <limits>
#include <memory>
#include <mutex>
#include <string>
#include <type_traits>
#include <vector>

#include "xla/ffi/api/ffi.h"

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

namespace ffi = xla::ffi;

namespace {

// Top-level histogram width: 2^11 uint32 counters = 8 KiB, L1-resident.
constexpr int kTopBits = 11;
// Keys are processed in blocks of this many so that the key transform is a vectorised loop
// into an L1 buffer, and the scalar histogram / gather loops read that buffer.
constexpr int64_t kBlock = 1024;
// Below this many candidates the last step is std::nth_element.
constexpr int64_t kSmallSelect = 2048;

template <typename K>
constexpr int kKeyBits = 8 * sizeof(K);

// rank_keys on raw bits (see kwta_jax/keys.py): non-negative -> bits | sign, negative -> ~bits,
// -0 -> +0's key, NaN (any sign, any payload) -> key max.
template <typename K, K kInfBits, bool kAbs>
inline K RankKey(K bits) {
  // Written with masks, not branches or ?: on loads, so that GCC vectorises the loops.
  constexpr K kSign = K(K(1) << (kKeyBits<K> - 1));
  if (kAbs) bits = K(bits & K(~kSign));
  const K neg = K(K(0) - K(bits >> (kKeyBits<K> - 1)));  // all ones when the sign bit is set
  K key = K(bits ^ K(neg | kSign));
  const K neg_zero = K(K(0) - K(bits == kSign));
  key = K((key & K(~neg_zero)) | (kSign & neg_zero));
  const K nan = K(K(0) - K(K(bits & K(~kSign)) > kInfBits));
  return K(key | nan);
}

template <typename K, K kInfBits, bool kAbs>
inline void KeysOf(const K* __restrict x, int64_t m, K* __restrict keys) {
  for (int64_t i = 0; i < m; ++i) keys[i] = RankKey<K, kInfBits, kAbs>(x[i]);
}

// Appends start + i for every i < m with hit[i] != 0 (hit is 0 or 0xff) to index[c...]; returns
// the new count. Writes up to 16 entries past the returned count. Branch-free: a few % of hits
// at random positions would make a branch mispredict often enough to dominate the pass.
inline int64_t CompactHits(const uint8_t* hit, int64_t m, uint32_t start, uint32_t* index,
                           int64_t c) {
  int64_t i = 0;
#if defined(__SSE2__)
  // 16 hit bytes -> a 16-bit mask; each nibble selects a row of lane offsets (a table of
  // 16 x 4 positions) that is stored whole, and the count advances by the nibble's popcount.
  struct Lut {
    alignas(16) uint32_t offset[16][4];
    uint8_t count[16];
    constexpr Lut() : offset(), count() {
      for (int mask = 0; mask < 16; ++mask) {
        int n = 0;
        for (int lane = 0; lane < 4; ++lane) {
          if (mask & (1 << lane)) offset[mask][n++] = uint32_t(lane);
        }
        count[mask] = uint8_t(n);
      }
    }
  };
  static constexpr Lut kLut;
  for (; i + 16 <= m; i += 16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(hit + i));
    uint32_t mask = uint32_t(_mm_movemask_epi8(h));
    for (int q = 0; q < 4; ++q, mask >>= 4) {
      const uint32_t nib = mask & 15u;
      const __m128i base = _mm_set1_epi32(int(start + uint32_t(i) + 4u * uint32_t(q)));
      const __m128i lanes = _mm_load_si128(reinterpret_cast<const __m128i*>(kLut.offset[nib]));
      _mm_storeu_si128(reinterpret_cast<__m128i*>(index + c), _mm_add_epi32(base, lanes));
      c += kLut.count[nib];
    }
  }
#endif
  for (; i < m; ++i) {
    index[c] = start + uint32_t(i);
    c += hit[i] != 0;
  }
  return c;
}

// Per-thread scratch, reused across calls (grows to the longest row seen).
template <typename K>
struct Scratch {
  std::vector<uint32_t> index;  // positions of the elements in the threshold's top bucket
  std::vector<K> keys;          // their keys
  std::vector<K> work;          // keys being narrowed down by the selection
};

template <typename K>
Scratch<K>& ThreadScratch() {
  thread_local Scratch<K> scratch;
  return scratch;
}

// The r-th largest (1-based) of keys[0..c), all sharing their bits above `shift`. Reorders
// keys. Radix levels while many candidates remain, then nth_element.
template <typename K>
K SelectInBucket(K* keys, int64_t c, int64_t r, int shift) {
  uint32_t hist[1 << kTopBits];
  while (c > kSmallSelect && shift > 0) {
    const int nb = std::min(kTopBits, shift);
    shift -= nb;
    const K mask = K((K(1) << nb) - 1);
    std::memset(hist, 0, sizeof(uint32_t) << nb);
    for (int64_t i = 0; i < c; ++i) ++hist[(keys[i] >> shift) & mask];
    int64_t above = 0;
    int64_t b = (int64_t(1) << nb) - 1;
    while (above + hist[b] < r) above += hist[b--];
    r -= above;
    int64_t m = 0;
    for (int64_t i = 0; i < c; ++i) {
      const K key = keys[i];
      keys[m] = key;
      m += int64_t((key >> shift) & mask) == b;
    }
    c = m;
  }
  if (shift == 0) return keys[0];  // every remaining key is equal
  std::nth_element(keys, keys + (r - 1), keys + c, std::greater<K>());
  return keys[r - 1];
}

// One row: x, y are n raw-bit elements; returns the threshold key.
template <typename K, K kInfBits, bool kAbs>
K KwtaRow(const K* __restrict x, K* __restrict y, int64_t n, int64_t k) {
  constexpr int kShift = kKeyBits<K> - kTopBits;
  constexpr int64_t kBins = int64_t(1) << kTopBits;
  alignas(64) K keys[kBlock];
  // Two interleaved histograms: consecutive equal buckets (common: the bulk of a smooth
  // distribution falls in a few buckets) otherwise serialise on store-to-load forwarding.
  alignas(64) uint32_t hist[2][kBins];
  std::memset(hist, 0, sizeof(hist));

  // Pass 1: histogram of the top bits.
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    KeysOf<K, kInfBits, kAbs>(x + start, m, keys);
    int64_t i = 0;
    for (; i + 1 < m; i += 2) {
      ++hist[0][keys[i] >> kShift];
      ++hist[1][keys[i + 1] >> kShift];
    }
    if (i < m) ++hist[0][keys[i] >> kShift];
  }
  int64_t above = 0;
  int64_t b = kBins - 1;
  for (;;) {
    const int64_t h = int64_t(hist[0][b]) + hist[1][b];
    if (above + h >= k) break;
    above += h;
    --b;
  }
  const K bucket_lo = K(K(b) << kShift);  // smallest key of bucket b
  const K bucket_hi = K(bucket_lo | K((K(1) << kShift) - 1));

  // Pass 2: final y outside bucket b, gather the bucket.
  Scratch<K>& s = ThreadScratch<K>();
  const int64_t in_bucket = int64_t(hist[0][b]) + hist[1][b];
  if (int64_t(s.index.size()) < in_bucket + 16) {  // CompactHits stores up to 16 past the end
    s.index.resize(in_bucket + 16);
    s.keys.resize(in_bucket);
    s.work.resize(in_bucket);
  }
  alignas(64) uint8_t hit[kBlock];
  uint32_t* __restrict index = s.index.data();
  K* __restrict bucket_keys = s.keys.data();
  int64_t c = 0;
  for (int64_t start = 0; start < n; start += kBlock) {
    const int64_t m = std::min(kBlock, n - start);
    const K* xs = x + start;
    K* ys = y + start;
    KeysOf<K, kInfBits, kAbs>(xs, m, keys);
    // Elements of bucket b are provisionally kept; the fix-up below settles them.
    for (int64_t i = 0; i < m; ++i) ys[i] = K(xs[i] & K(K(0) - K(keys[i] >= bucket_lo)));
    // Hits (0xff) in a byte array by a vectorised loop, then compacted to positions.
    for (int64_t i = 0; i < m; ++i) {
      hit[i] = uint8_t(0 - uint8_t(K(keys[i] - bucket_lo) <= K(bucket_hi - bucket_lo)));
    }
    c = CompactHits(hit, m, uint32_t(start), index, c);
  }
  for (int64_t i = 0; i < c; ++i) bucket_keys[i] = RankKey<K, kInfBits, kAbs>(x[index[i]]);

  K threshold;
  if (above + c == k) {
    // Every key of the bucket wins: its smallest is the k-th largest.
    K smallest = bucket_hi;
    for (int64_t i = 0; i < c; ++i) smallest = std::min(smallest, bucket_keys[i]);
    threshold = smallest;
  } else {
    K* work = s.work.data();
    std::memcpy(work, bucket_keys, sizeof(K) * c);
    threshold = SelectInBucket<K>(work, c, k - above, kShift);
  }
  for (int64_t i = 0; i < c; ++i) {
    if (bucket_keys[i] < threshold) y[index[i]] = K(0);
  }
  return threshold;
}

// Runs fn(chunk) for chunk in [0, nchunks) on the calling thread and the intra-op pool.
class ParallelFor {
 public:
  template <typename F>
  static void Run(ffi::ThreadPool& pool, int64_t nchunks, F fn) {
    if (nchunks <= 0) return;
    const int64_t threads = pool.num_threads();
    const int64_t helpers = std::min<int64_t>(threads, nchunks - 1);
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

template <typename K, K kInfBits, bool kAbs>
void KwtaRows(ffi::ThreadPool& pool, const K* x, K* y, K* th, int64_t rows, int64_t n,
              int64_t k) {
  // Aim for a few chunks per thread (load balance) of at least ~64K elements (overhead).
  const int64_t threads = std::max<int64_t>(1, pool.num_threads() + 1);
  const int64_t by_size = std::max<int64_t>(1, (rows * n) / 65536);
  const int64_t nchunks = std::max<int64_t>(1, std::min({rows, 4 * threads, by_size}));
  ParallelFor::Run(pool, nchunks, [=](int64_t c) {
    const int64_t r0 = rows * c / nchunks;
    const int64_t r1 = rows * (c + 1) / nchunks;
    for (int64_t r = r0; r < r1; ++r) {
      th[r] = KwtaRow<K, kInfBits, kAbs>(x + r * n, y + r * n, n, k);
    }
  });
}

template <typename K, K kInfBits>
void Dispatch(ffi::ThreadPool& pool, const void* x, void* y, void* th, int64_t rows, int64_t n,
              int64_t k, bool use_abs) {
  auto* xk = static_cast<const K*>(x);
  auto* yk = static_cast<K*>(y);
  auto* tk = static_cast<K*>(th);
  if (use_abs) {
    KwtaRows<K, kInfBits, true>(pool, xk, yk, tk, rows, n, k);
  } else {
    KwtaRows<K, kInfBits, false>(pool, xk, yk, tk, rows, n, k);
  }
}

ffi::Error KwtaImpl(ffi::ThreadPool pool, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                    ffi::Result<ffi::AnyBuffer> th, int64_t k, bool use_abs) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) {
    return ffi::Error::InvalidArgument("kwta_cpu: x must have rank >= 1 ([..., n]).");
  }
  const int64_t n = dims.back();
  const int64_t rows = n == 0 ? 0 : int64_t(x.element_count()) / n;
  if (rows == 0) return ffi::Error::Success();
  if (k < 1 || k > n) {
    return ffi::Error::InvalidArgument("kwta_cpu: k=" + std::to_string(k) +
                                       " must be in [1, n=" + std::to_string(n) + "].");
  }
  if (n > int64_t(std::numeric_limits<uint32_t>::max())) {
    return ffi::Error::InvalidArgument("kwta_cpu: rows longer than 2^32 - 1 are not supported.");
  }
  if (y->element_type() != x.element_type() || y->element_count() != x.element_count() ||
      int64_t(th->element_count()) != rows) {
    return ffi::Error::InvalidArgument("kwta_cpu: output shapes/dtypes do not match x.");
  }
  const void* xp = x.untyped_data();
  void* yp = y->untyped_data();
  void* tp = th->untyped_data();
  switch (x.element_type()) {
    case ffi::DataType::F32:
      if (th->element_type() != ffi::DataType::U32) break;
      Dispatch<uint32_t, 0x7f800000u>(pool, xp, yp, tp, rows, n, k, use_abs);
      return ffi::Error::Success();
    case ffi::DataType::BF16:
      if (th->element_type() != ffi::DataType::U16) break;
      Dispatch<uint16_t, 0x7f80u>(pool, xp, yp, tp, rows, n, k, use_abs);
      return ffi::Error::Success();
    case ffi::DataType::F16:
      if (th->element_type() != ffi::DataType::U16) break;
      Dispatch<uint16_t, 0x7c00u>(pool, xp, yp, tp, rows, n, k, use_abs);
      return ffi::Error::Success();
    case ffi::DataType::F64:
      if (th->element_type() != ffi::DataType::U64) break;
      Dispatch<uint64_t, 0x7ff0000000000000ull>(pool, xp, yp, tp, rows, n, k, use_abs);
      return ffi::Error::Success();
    default:
      return ffi::Error::InvalidArgument(
          "kwta_cpu: x must be float16, bfloat16, float32 or float64.");
  }
  return ffi::Error::InvalidArgument(
      "kwta_cpu: threshold_key must be the unsigned type of x's width.");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KwtaCpu, KwtaImpl,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::AnyBuffer>()  // x [..., n]
                                  .Ret<ffi::AnyBuffer>()  // y, like x
                                  .Ret<ffi::AnyBuffer>()  // threshold_key [...] unsigned
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("use_abs"));
