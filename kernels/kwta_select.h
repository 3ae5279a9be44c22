// The k-WTA selection compiled for every instruction set, and the run-time choice among them.
//
// kwta_select_impl.h is included three times (portable, AVX2, AVX-512), each instance in its
// own namespace with its own target attribute, so that one portable build carries the fast
// code for the machine it runs on. Independent of XLA (kwta_cpu.cc wraps it as an FFI handler).

#ifndef KWTA_JAX_KERNELS_KWTA_SELECT_H_
#define KWTA_JAX_KERNELS_KWTA_SELECT_H_

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <type_traits>
#include <vector>

#include "kwta_simd.h"

namespace kwta {

// Per-thread scratch, reused across calls (grows to the longest row seen).
template <typename W>
struct Scratch {
  std::vector<W> a, b;
};

// Brackets that missed the threshold (each costs one more pass), for tests of those paths.
inline std::atomic<int64_t> bracket_misses{0};
inline void CountBracketMiss() { bracket_misses.fetch_add(1, std::memory_order_relaxed); }

template <typename W>
Scratch<W>& ThreadScratch(int64_t size) {
  thread_local Scratch<W> scratch;
  if (int64_t(scratch.a.size()) < size) {
    scratch.a.resize(size_t(size));
    scratch.b.resize(size_t(size));
  }
  return scratch;
}

}  // namespace kwta

#define KWTA_NS portable
#define KWTA_ATTR
#define KWTA_S32 ScalarOps<uint32_t>
#define KWTA_S64 ScalarOps<uint64_t>
#include "kwta_select_impl.h"
#undef KWTA_NS
#undef KWTA_ATTR
#undef KWTA_S32
#undef KWTA_S64

#if defined(KWTA_X86)
#define KWTA_NS avx2
#define KWTA_ATTR KWTA_AVX2
#define KWTA_S32 Avx2x32
#define KWTA_S64 ScalarOps<uint64_t>
#include "kwta_select_impl.h"
#undef KWTA_NS
#undef KWTA_ATTR
#undef KWTA_S32
#undef KWTA_S64

#define KWTA_NS avx512
#define KWTA_ATTR KWTA_AVX512
#define KWTA_S32 Avx512x32
#define KWTA_S64 Avx512x64
#include "kwta_select_impl.h"
#undef KWTA_NS
#undef KWTA_ATTR
#undef KWTA_S32
#undef KWTA_S64
#endif

namespace kwta {

// Instruction sets, in increasing order (the `isa` attribute and KwtaCpuBestIsa use these).
enum Isa : int64_t { kPortable = 0, kAvx2 = 1, kAvx512 = 2 };

inline int64_t BestIsa() {
#if defined(KWTA_X86)
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512dq") && __builtin_cpu_supports("avx512vl") &&
      __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt")) {
    return kAvx512;
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("bmi2") &&
      __builtin_cpu_supports("popcnt")) {
    return kAvx2;
  }
#endif
  return kPortable;
}

// Thresholds of rows [r0, r1) of x [rows, n] (and their k-WTA output when y is not null) with
// instruction set isa (<= BestIsa()).
template <typename K, K kInf, bool kAbs>
inline void SelectRows(int64_t isa, const K* x, K* th, K* y, int64_t r0, int64_t r1, int64_t n,
                       int64_t k) {
#if defined(KWTA_X86)
  if (isa >= kAvx512) return avx512::SelectRows<K, kInf, kAbs>(x, th, y, r0, r1, n, k);
  if (isa >= kAvx2) return avx2::SelectRows<K, kInf, kAbs>(x, th, y, r0, r1, n, k);
#endif
  portable::SelectRows<K, kInf, kAbs>(x, th, y, r0, r1, n, k);
}

}  // namespace kwta

#endif  // KWTA_JAX_KERNELS_KWTA_SELECT_H_
