// Exact k-th largest rank key of every row on an NVIDIA GPU: the "cuda" selector of kwta_jax.
// kernels/kwta_cuda.py compiles this file with nvcc at first use and registers its two XLA FFI
// handlers (platform CUDA):
//   KwtaCudaSelect   x [..., n] -> threshold_key [...]            (the selector)
//   KwtaCudaForward  x [..., n] -> (y [..., n], threshold_key [...])  (forward only, fused)
// threshold_key is the row's k-th largest rank key, in kwta_jax/rank_keys.py's order (-0 == +0,
// every NaN ties above +inf with the largest key; use_abs clears the sign bit first), of the
// unsigned type of x's width; y = where(key >= threshold, x, +0) moved as bit patterns.
//
// Method: one thread block per row, an MSD radix select with 11-bit digits and a candidate
// buffer in shared memory (the digit widths and the fused filter + next histogram follow AIR
// Top-K, Zhang et al. SC'23, RAFT's select_radix; the per-row block is like its one-block
// variant and PyTorch's single-block radixSelect, with wider digits).
//   pass p   histogram (shared-memory atomics) of digit p of the keys that match the prefix
//            found so far; the bin holding the k-th largest is found from the top with a block
//            scan; its bits join the prefix and k becomes the rank inside that bin.
//   buffer   when the matching keys are known to fit the buffer (the whole row when n <= CAP,
//            else the previous bin's count), the pass that reads them from global memory also
//            appends them to the buffer, and every later pass reads the buffer instead.
//   fallback a bin larger than the buffer (all-equal rows, heavy ties) is simply read from
//            global memory again: exact, one more pass.
// 32-bit keys take digits of 11, 11 and 10 bits (3 passes); 16-bit keys 11 and 5 (2 passes).
// So a float32 row is read from global memory twice on smooth data (three times when the
// top bin overflows the buffer, once when the row fits it), a 16-bit row once or twice.
//
// KWTA_HOST_EMULATION compiles the same kernel as plain C++ with one thread per block (the
// tests build it with the host compiler and run it against lax.top_k, so the pass, buffer
// and digit logic is checked on machines without a GPU; races are not).

#include <cstdint>
#include <cstring>

#ifdef KWTA_HOST_EMULATION
#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static
struct Dim3 {
  unsigned x;
};
static Dim3 threadIdx{0}, blockIdx{0};
static int64_t g_global_reads = 0;  // rows read from "global memory", for the tests
#define KWTA_COUNT_GLOBAL_READ() (++g_global_reads)
inline void __syncthreads() {}
inline uint32_t atomicAdd(uint32_t* p, uint32_t v) {
  const uint32_t old = *p;
  *p += v;
  return old;
}
struct uint4 {
  uint32_t x, y, z, w;
};
namespace cub {
template <typename T, int kThreads>
struct BlockScan {  // one thread: the exclusive sum of a single value is 0
  static_assert(kThreads == 1, "the host emulation runs one thread per block");
  struct TempStorage {};
  explicit BlockScan(TempStorage&) {}
  void ExclusiveSum(T, T& out) { out = 0; }
};
}  // namespace cub
#else
#include <cuda_runtime.h>

#include <cub/block/block_scan.cuh>
#include <string>

#include "xla/ffi/api/ffi.h"
#define KWTA_COUNT_GLOBAL_READ() ((void)0)
#endif

namespace {

// Histogram bins (the widest digit) and the candidate buffer, in shared memory: 8 KiB + 32 KiB
// stays under the 48 KiB a block gets without opting in, so two 1024-thread blocks fit an SM.
constexpr int kBins = 2048;
constexpr int kBufferBytes = 32768;

struct F32 {
  using Bits = uint32_t;
  static constexpr Bits kInf = 0x7F800000u;
};
struct BF16 {
  using Bits = uint16_t;
  static constexpr Bits kInf = 0x7F80u;
};
struct F16 {
  using Bits = uint16_t;
  static constexpr Bits kInf = 0x7C00u;
};

template <int kKeyBits>
__host__ __device__ constexpr int NumPasses() {
  return kKeyBits == 32 ? 3 : 2;
}

// Lowest bit of pass p's digit: 32-bit keys 21, 10, 0 (digits of 11, 11, 10 bits); 16-bit
// keys 5, 0 (11 and 5 bits). Pass -1 means "no digit yet": every key bit is undecided.
template <int kKeyBits>
__host__ __device__ constexpr int PassShift(int p) {
  return p < 0 ? kKeyBits : kKeyBits == 32 ? (p == 0 ? 21 : p == 1 ? 10 : 0) : (p == 0 ? 5 : 0);
}

// The rank key of a value's bit pattern (kwta_jax.rank_keys.rank_keys).
template <typename Fmt>
__device__ __forceinline__ typename Fmt::Bits RankKey(typename Fmt::Bits bits, bool use_abs) {
  using Bits = typename Fmt::Bits;
  constexpr Bits kSign = Bits(Bits(1) << (8 * sizeof(Bits) - 1));
  constexpr Bits kMagnitude = Bits(~kSign);
  if (use_abs) bits = Bits(bits & kMagnitude);
  const bool is_nan = Bits(bits & kMagnitude) > Fmt::kInf;
  if (bits == kSign) bits = 0;  // -0 -> +0
  const Bits key = (bits & kSign) ? Bits(~bits) : Bits(bits | kSign);
  return is_nan ? Bits(~Bits(0)) : key;
}

// Splits row [0, n) into an unaligned head, 16-byte words and a tail: calls scalar(i) for this
// thread's head and tail elements and word(v, first) for its words (word v holds elements
// first + v * (16 / sizeof(Bits)) onwards).
template <int kThreads, typename Bits, typename Scalar, typename Word>
__device__ __forceinline__ void SplitRow(const Bits* row, int64_t n, Scalar&& scalar,
                                         Word&& word) {
  constexpr int kVec = 16 / sizeof(Bits);
  const int64_t tid = threadIdx.x;
  const uintptr_t misalign = reinterpret_cast<uintptr_t>(row) % 16;
  int64_t head = misalign ? int64_t((16 - misalign) / sizeof(Bits)) : 0;
  if (head > n) head = n;
  for (int64_t i = tid; i < head; i += kThreads) scalar(i);
  const int64_t words = (n - head) / kVec;
#pragma unroll 4
  for (int64_t v = tid; v < words; v += kThreads) word(v, head);
  for (int64_t i = head + words * kVec + tid; i < n; i += kThreads) scalar(i);
}

// Calls f(i, bits) for each element i of the row that this thread owns, 16 bytes per load.
template <int kThreads, typename Bits, typename Fn>
__device__ __forceinline__ void ForEachInRow(const Bits* __restrict__ row, int64_t n, Fn&& f) {
  constexpr int kVec = 16 / sizeof(Bits);
  SplitRow<kThreads>(
      row, n, [&](int64_t i) { f(i, row[i]); },
      [&](int64_t v, int64_t first) {
        const uint4 word = reinterpret_cast<const uint4*>(row + first)[v];
        Bits parts[kVec];
        memcpy(parts, &word, sizeof(word));
#pragma unroll
        for (int j = 0; j < kVec; ++j) f(first + v * kVec + j, parts[j]);
      });
}

// y = where(key >= threshold, x, +0) on bit patterns, 16 bytes per load and store where x and
// y are aligned alike (XLA's buffers are, so rows at the same offset are), else one at a time.
template <typename Fmt, int kThreads>
__device__ __forceinline__ void WriteRow(const typename Fmt::Bits* __restrict__ row,
                                         typename Fmt::Bits* __restrict__ out, int64_t n,
                                         typename Fmt::Bits threshold, bool use_abs) {
  using Bits = typename Fmt::Bits;
  constexpr int kVec = 16 / sizeof(Bits);
  auto keep = [&](Bits bits) { return RankKey<Fmt>(bits, use_abs) >= threshold ? bits : Bits(0); };
  if ((reinterpret_cast<uintptr_t>(row) - reinterpret_cast<uintptr_t>(out)) % 16 != 0) {
    for (int64_t i = threadIdx.x; i < n; i += kThreads) out[i] = keep(row[i]);
    return;
  }
  SplitRow<kThreads>(
      row, n, [&](int64_t i) { out[i] = keep(row[i]); },
      [&](int64_t v, int64_t first) {
        const uint4 word = reinterpret_cast<const uint4*>(row + first)[v];
        Bits parts[kVec];
        memcpy(parts, &word, sizeof(word));
#pragma unroll
        for (int j = 0; j < kVec; ++j) parts[j] = keep(parts[j]);
        uint4 result;
        memcpy(&result, parts, sizeof(result));
        reinterpret_cast<uint4*>(out + first)[v] = result;
      });
}

// One block per row: th[row] = the row's k-th largest key; with kWriteY also y's row.
template <typename Fmt, int kThreads, bool kWriteY>
__global__ void __launch_bounds__(kThreads, 1024 / kThreads)
    KthKeyKernel(const typename Fmt::Bits* __restrict__ x, typename Fmt::Bits* __restrict__ th,
                 typename Fmt::Bits* __restrict__ y, int64_t n, uint32_t k, bool use_abs,
                 uint32_t capacity) {
  using Bits = typename Fmt::Bits;
  constexpr int kKeyBits = 8 * sizeof(Bits);
  constexpr int kPasses = NumPasses<kKeyBits>();
  constexpr int kPerThread = kBins / kThreads;
  static_assert(kBins % kThreads == 0, "threads must divide the bins");
  using Scan = cub::BlockScan<uint32_t, kThreads>;
  __shared__ uint32_t hist[kBins];
  __shared__ Bits buffer[kBufferBytes / sizeof(Bits)];
  __shared__ typename Scan::TempStorage scan_storage;
  __shared__ uint32_t buffer_count;
  __shared__ Bits found_prefix;
  __shared__ uint32_t found_k, found_count;

  const int tid = threadIdx.x;
  const Bits* row = x + int64_t(blockIdx.x) * n;
  Bits prefix = 0;           // the threshold's bits decided so far
  uint32_t rank = k;         // the threshold's rank among the keys that match the prefix
  int64_t matching = n;      // how many keys match the prefix
  bool from_buffer = false;  // the matching keys are all in `buffer`
  uint32_t buffered = 0;

  for (int p = 0; p < kPasses; ++p) {
    const int shift = PassShift<kKeyBits>(p);
    const int top = PassShift<kKeyBits>(p - 1);  // key bits at and above `top` are decided
    const Bits decided = top >= kKeyBits ? Bits(0) : Bits(Bits(~Bits(0)) << top);
    const uint32_t digit_mask = (1u << (top - shift)) - 1u;
    // Keep the matching keys for the later passes when they fit (never on the last pass).
    const bool fill = !from_buffer && p + 1 < kPasses && matching <= int64_t(capacity);
    for (int i = tid; i < kBins; i += kThreads) hist[i] = 0;
    if (tid == 0) buffer_count = 0;
    __syncthreads();
    auto count = [&](Bits key) {
      atomicAdd(&hist[(key >> shift) & digit_mask], 1u);
    };
    if (from_buffer) {
      for (uint32_t i = tid; i < buffered; i += kThreads) {
        const Bits key = buffer[i];
        if (((key ^ prefix) & decided) == 0) count(key);
      }
    } else {
      KWTA_COUNT_GLOBAL_READ();
      ForEachInRow<kThreads>(row, n, [&](int64_t i, Bits bits) {
        const Bits key = RankKey<Fmt>(bits, use_abs);
        if (p == 0) {  // every key matches the empty prefix
          count(key);
          if (fill) buffer[i] = key;
        } else if (((key ^ prefix) & decided) == 0) {
          count(key);
          if (fill) buffer[atomicAdd(&buffer_count, 1u)] = key;
        }
      });
    }
    __syncthreads();
    // The bin of the k-th largest: thread t owns bins kBins-1-t*kPerThread downwards, so an
    // exclusive sum over threads counts the matching keys in higher bins.
    uint32_t owned[kPerThread];
    uint32_t total = 0;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      owned[j] = hist[kBins - 1 - (tid * kPerThread + j)];
      total += owned[j];
    }
    uint32_t above;
    Scan(scan_storage).ExclusiveSum(total, above);
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      if (above < rank && above + owned[j] >= rank) {  // exactly one bin in the block
        found_prefix = Bits(prefix | (Bits(kBins - 1 - (tid * kPerThread + j)) << shift));
        found_k = rank - above;
        found_count = owned[j];
      }
      above += owned[j];
    }
    __syncthreads();
    prefix = found_prefix;
    rank = found_k;
    if (fill) {
      from_buffer = true;
      buffered = p == 0 ? uint32_t(n) : buffer_count;
    }
    matching = found_count;
    __syncthreads();  // every thread has read the shared results before the next pass
  }
  if (tid == 0) th[blockIdx.x] = prefix;
  if constexpr (kWriteY) WriteRow<Fmt, kThreads>(row, y + int64_t(blockIdx.x) * n, n, prefix, use_abs);
}

}  // namespace

#ifdef KWTA_HOST_EMULATION

namespace {
template <typename Fmt, bool kWriteY>
void EmulateRows(const void* x, void* th, void* y, int64_t rows, int64_t n, int64_t k,
                 bool use_abs, uint32_t capacity) {
  using Bits = typename Fmt::Bits;
  for (int64_t r = 0; r < rows; ++r) {
    blockIdx.x = unsigned(r);
    KthKeyKernel<Fmt, 1, kWriteY>(static_cast<const Bits*>(x), static_cast<Bits*>(th),
                                  static_cast<Bits*>(y), n, uint32_t(k), use_abs, capacity);
  }
}
}  // namespace

// dtype: 0 float32, 1 bfloat16, 2 float16. capacity: the buffer's size in keys (at most the
// kernel's). y may be null (the selector). Returns the rows read from "global memory".
extern "C" int64_t KwtaEmulate(int dtype, const void* x, void* th, void* y, int64_t rows,
                               int64_t n, int64_t k, int use_abs, uint32_t capacity) {
  g_global_reads = 0;
  const bool write_y = y != nullptr;
  if (dtype == 0) {
    write_y ? EmulateRows<F32, true>(x, th, y, rows, n, k, use_abs, capacity)
            : EmulateRows<F32, false>(x, th, y, rows, n, k, use_abs, capacity);
  } else if (dtype == 1) {
    write_y ? EmulateRows<BF16, true>(x, th, y, rows, n, k, use_abs, capacity)
            : EmulateRows<BF16, false>(x, th, y, rows, n, k, use_abs, capacity);
  } else {
    write_y ? EmulateRows<F16, true>(x, th, y, rows, n, k, use_abs, capacity)
            : EmulateRows<F16, false>(x, th, y, rows, n, k, use_abs, capacity);
  }
  return g_global_reads;
}

#else  // the XLA FFI handlers

namespace {

namespace ffi = xla::ffi;

template <typename Fmt, bool kWriteY, int kThreads>
void LaunchWith(cudaStream_t stream, const void* x, void* th, void* y, int64_t rows, int64_t n,
                uint32_t k, bool use_abs) {
  using Bits = typename Fmt::Bits;
  KthKeyKernel<Fmt, kThreads, kWriteY><<<unsigned(rows), kThreads, 0, stream>>>(
      static_cast<const Bits*>(x), static_cast<Bits*>(th), static_cast<Bits*>(y), n, k, use_abs,
      uint32_t(kBufferBytes / sizeof(Bits)));
}

template <typename Fmt, bool kWriteY>
void Launch(cudaStream_t stream, const void* x, void* th, void* y, int64_t rows, int64_t n,
            uint32_t k, bool use_abs) {
  // Short rows: fewer threads, so that the per-pass histogram clear and scan stay cheap. Long
  // rows: 512 threads and (launch bounds) at most 64 registers, so two blocks share an SM.
  if (n <= 2048) {
    LaunchWith<Fmt, kWriteY, 256>(stream, x, th, y, rows, n, k, use_abs);
  } else {
    LaunchWith<Fmt, kWriteY, 512>(stream, x, th, y, rows, n, k, use_abs);
  }
}

template <bool kWriteY>
ffi::Error Dispatch(cudaStream_t stream, ffi::AnyBuffer x, void* y, ffi::Result<ffi::AnyBuffer> th,
                    int64_t k, bool use_abs) {
  const auto dims = x.dimensions();
  if (dims.size() < 1) return ffi::Error::InvalidArgument("kwta_cuda: x must be [..., n].");
  const int64_t n = dims.back();
  const int64_t rows = n == 0 ? 0 : int64_t(x.element_count()) / n;
  if (rows == 0) return ffi::Error::Success();
  if (k < 1 || k > n) {
    return ffi::Error::InvalidArgument("kwta_cuda: k=" + std::to_string(k) + " must be in [1, n=" +
                                       std::to_string(n) + "].");
  }
  if (n > int64_t(INT32_MAX) || rows > int64_t(INT32_MAX)) {
    return ffi::Error::InvalidArgument("kwta_cuda: rows and n must be below 2^31.");
  }
  if (int64_t(th->element_count()) != rows) {
    return ffi::Error::InvalidArgument("kwta_cuda: threshold_key must have one key per row.");
  }
  const void* xp = x.untyped_data();
  void* tp = th->untyped_data();
  const uint32_t kk = uint32_t(k);
  switch (x.element_type()) {
    case ffi::DataType::F32:
      if (th->element_type() != ffi::DataType::U32) break;
      Launch<F32, kWriteY>(stream, xp, tp, y, rows, n, kk, use_abs);
      break;
    case ffi::DataType::BF16:
      if (th->element_type() != ffi::DataType::U16) break;
      Launch<BF16, kWriteY>(stream, xp, tp, y, rows, n, kk, use_abs);
      break;
    case ffi::DataType::F16:
      if (th->element_type() != ffi::DataType::U16) break;
      Launch<F16, kWriteY>(stream, xp, tp, y, rows, n, kk, use_abs);
      break;
    default:
      return ffi::Error::InvalidArgument("kwta_cuda: x must be float32, bfloat16 or float16.");
  }
  const cudaError_t status = cudaGetLastError();
  if (status != cudaSuccess) {
    return ffi::Error::Internal(std::string("kwta_cuda: kernel launch failed: ") +
                                cudaGetErrorString(status));
  }
  return ffi::Error::Success();
}

ffi::Error SelectImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> th,
                      int64_t k, bool use_abs) {
  return Dispatch<false>(stream, x, nullptr, th, k, use_abs);
}

ffi::Error ForwardImpl(cudaStream_t stream, ffi::AnyBuffer x, ffi::Result<ffi::AnyBuffer> y,
                       ffi::Result<ffi::AnyBuffer> th, int64_t k, bool use_abs) {
  if (y->element_type() != x.element_type() || y->element_count() != x.element_count()) {
    return ffi::Error::InvalidArgument("kwta_cuda: y must be shaped like x.");
  }
  return Dispatch<true>(stream, x, y->untyped_data(), th, k, use_abs);
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(KwtaCudaSelect, SelectImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [..., n]
                                  .Ret<xla::ffi::AnyBuffer>()  // threshold_key [...]
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("use_abs"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(KwtaCudaForward, ForwardImpl,
                              xla::ffi::Ffi::Bind()
                                  .Ctx<xla::ffi::PlatformStream<cudaStream_t>>()
                                  .Arg<xla::ffi::AnyBuffer>()  // x [..., n]
                                  .Ret<xla::ffi::AnyBuffer>()  // y, like x
                                  .Ret<xla::ffi::AnyBuffer>()  // threshold_key [...]
                                  .Attr<int64_t>("k")
                                  .Attr<bool>("use_abs"));

#endif  // KWTA_HOST_EMULATION
