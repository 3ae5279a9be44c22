// Lane operations for the k-WTA selector (kwta_select.h), one struct per instruction set.
//
// Every struct has the same static interface, so that the selection is written once and
// instantiated per instruction set (kwta_cpu.cc compiles it for scalar, AVX2 and AVX-512 in one
// translation unit, each with its own target attribute, and picks one at run time):
//
//   W, V, M, kLanes          key type (uint32_t or uint64_t), vector of kLanes keys, lane mask
//   Set1(w), Load(p), Store  broadcast; load / store kLanes keys
//   Keys<K, kInf, kAbs>(p)   kLanes rank keys of raw float bits (16-bit inputs widen to 32 bits)
//   Raw<K, kAbs>(p)          kLanes raw bits, sign-extended to W (|x| bits with kAbs)
//   Le(a, b), Gt(a, b)       unsigned a <= b, a > b per lane
//   GtS(a, b)                signed a > b per lane
//   In(x, lo, span)          lo <= x <= lo + span (unsigned, wrapping)
//   Or(m, n), Pop(m)         mask union, number of set lanes
//   OrV, XorV, AndV, MaxU    bitwise ops, unsigned max per lane
//   MaxLane(v)               largest lane (unsigned)
//   Count(acc, m), Sum(acc)  per-lane counters: acc += m; their total
//   Compress(out, m, v)      stores the lanes of v selected by m contiguously at out; may write
//                            kLanes keys (the caller leaves room), advances nothing
//
// Rank keys are those of kwta_jax/rank_keys.py: non-negative x -> bits | sign, negative ->
// ~bits, -0 -> +0's key, every NaN -> all ones. Integer operations only (no float compare: XLA's
// threads may flush subnormals to zero).

#ifndef KWTA_JAX_KERNELS_KWTA_SIMD_H_
#define KWTA_JAX_KERNELS_KWTA_SIMD_H_

#include <cstdint>
#include <type_traits>

#if defined(__x86_64__) || defined(_M_X64)
#define KWTA_X86 1
#include <immintrin.h>
#endif

namespace kwta {

template <typename K>
constexpr K kSign = K(K(1) << (8 * sizeof(K) - 1));
template <typename K>
constexpr K kOnes = K(~K(0));

// Scalar rank key of raw bits (written with masks so that loops over it vectorise).
template <typename K, K kInf, bool kAbs>
inline K RankKey(K bits) {
  if (kAbs) bits = K(bits & K(~kSign<K>));
  const K neg = K(K(0) - K(bits >> (8 * sizeof(K) - 1)));  // all ones when the sign bit is set
  K key = K(bits ^ K(neg | kSign<K>));
  const K neg_zero = K(K(0) - K(bits == kSign<K>));
  key = K((key & K(~neg_zero)) | (kSign<K> & neg_zero));
  const K nan = K(K(0) - K(K(bits & K(~kSign<K>)) > kInf));
  return K(key | nan);
}

// v as a W, sign-extended from K's width (so that signed compares in W order K's signed values).
template <typename W, typename K>
constexpr W SignExtend(K v) {
  return W(std::make_signed_t<W>(std::make_signed_t<K>(v)));
}

// One lane: the portable fallback (any architecture; the compiler may vectorise parts).
template <typename Wt>
struct ScalarOps {
  using W = Wt;
  using V = W;
  using M = bool;
  static constexpr int kLanes = 1;
  static V Set1(W w) { return w; }
  static V Load(const W* p) { return *p; }
  static void Store(W* p, V v) { *p = v; }
  template <typename K, K kInf, bool kAbs>
  static V Keys(const K* p) {
    return W(RankKey<K, kInf, kAbs>(*p));
  }
  template <typename K, bool kAbs>
  static V Raw(const K* p) {
    return SignExtend<W>(kAbs ? K(*p & K(~kSign<K>)) : *p);
  }
  static M Le(V a, V b) { return a <= b; }
  static M Gt(V a, V b) { return a > b; }
  static M GtS(V a, V b) { return std::make_signed_t<W>(a) > std::make_signed_t<W>(b); }
  static M In(V x, V lo, V span) { return W(x - lo) <= span; }
  static M Or(M a, M b) { return a | b; }
  static int Pop(M m) { return m; }
  static V OrV(V a, V b) { return a | b; }
  static V XorV(V a, V b) { return a ^ b; }
  static V AndV(V a, V b) { return a & b; }
  static V MaxU(V a, V b) { return a > b ? a : b; }
  static W MaxLane(V v) { return v; }
  static V Count(V acc, M m) { return acc + W(m); }
  static uint64_t Sum(V acc) { return acc; }
  static void Compress(W* out, M, V v) { *out = v; }
};

#if defined(KWTA_X86)

#define KWTA_AVX2 __attribute__((target("avx2,bmi,bmi2,popcnt")))
#define KWTA_AVX512 __attribute__((target("avx512f,avx512bw,avx512dq,avx512vl,bmi,bmi2,popcnt")))

// Lane permutations that compress 8 lanes by an 8-bit mask (AVX2 has no compress).
struct CompressTable8 {
  alignas(32) uint32_t index[256][8];
  constexpr CompressTable8() : index() {
    for (int mask = 0; mask < 256; ++mask) {
      int n = 0;
      for (int lane = 0; lane < 8; ++lane) {
        if (mask & (1 << lane)) index[mask][n++] = uint32_t(lane);
      }
    }
  }
};
inline constexpr CompressTable8 kCompressTable8{};

// 8 x 32-bit lanes. Masks stay vectors (all-ones lanes): counting is then one subtraction.
// AVX2 has no unsigned compare (max + equality instead) and no compress (a permutation from a
// table indexed by the 8-bit mask).
struct Avx2x32 {
  using W = uint32_t;
  using V = __m256i;
  using M = __m256i;
  static constexpr int kLanes = 8;

  KWTA_AVX2 static V Set1(W w) { return _mm256_set1_epi32(int(w)); }
  KWTA_AVX2 static V Load(const W* p) { return _mm256_loadu_si256((const __m256i*)p); }
  KWTA_AVX2 static void Store(W* p, V v) { _mm256_storeu_si256((__m256i*)p, v); }
  template <typename K, bool kAbs>
  KWTA_AVX2 static V Raw(const K* p) {
    V b;
    if constexpr (sizeof(K) == 2) {
      b = _mm256_cvtepi16_epi32(_mm_loadu_si128((const __m128i*)p));
    } else {
      b = _mm256_loadu_si256((const __m256i*)p);
    }
    if (kAbs) b = _mm256_and_si256(b, Set1(W(K(~kSign<K>))));
    return b;
  }
  template <typename K, K kInf, bool kAbs>
  KWTA_AVX2 static V Keys(const K* p) {
    const V b = Raw<K, kAbs>(p);
    const V sign = Set1(W(kSign<K>));
    // Negative (sign-extended): ~b, which is ~bits zero-extended; else bits | sign.
    V key = _mm256_xor_si256(b, _mm256_or_si256(_mm256_srai_epi32(b, 31), sign));
    if (!kAbs) {  // -0: ~b + 1 is +0's key
      key = _mm256_sub_epi32(key, _mm256_cmpeq_epi32(b, Set1(SignExtend<W>(kSign<K>))));
    }
    const V mag = _mm256_and_si256(b, Set1(W(K(~kSign<K>))));
    const V nan = _mm256_cmpgt_epi32(mag, Set1(W(kInf)));
    return _mm256_or_si256(key, _mm256_and_si256(nan, Set1(W(kOnes<K>))));
  }
  KWTA_AVX2 static M Le(V a, V b) { return _mm256_cmpeq_epi32(_mm256_max_epu32(a, b), b); }
  KWTA_AVX2 static M Gt(V a, V b) { return _mm256_xor_si256(Le(a, b), Set1(~0u)); }
  KWTA_AVX2 static M GtS(V a, V b) { return _mm256_cmpgt_epi32(a, b); }
  KWTA_AVX2 static M In(V x, V lo, V span) { return Le(_mm256_sub_epi32(x, lo), span); }
  KWTA_AVX2 static M Or(M a, M b) { return _mm256_or_si256(a, b); }
  KWTA_AVX2 static uint32_t Bits(M m) { return uint32_t(_mm256_movemask_ps(_mm256_castsi256_ps(m))); }
  KWTA_AVX2 static int Pop(M m) { return __builtin_popcount(Bits(m)); }
  KWTA_AVX2 static V OrV(V a, V b) { return _mm256_or_si256(a, b); }
  KWTA_AVX2 static V XorV(V a, V b) { return _mm256_xor_si256(a, b); }
  KWTA_AVX2 static V AndV(V a, V b) { return _mm256_and_si256(a, b); }
  KWTA_AVX2 static V MaxU(V a, V b) { return _mm256_max_epu32(a, b); }
  KWTA_AVX2 static W MaxLane(V v) {
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256((__m256i*)lanes, v);
    uint32_t m = 0;
    for (uint32_t l : lanes) m = l > m ? l : m;
    return m;
  }
  KWTA_AVX2 static V Count(V acc, M m) { return _mm256_sub_epi32(acc, m); }
  KWTA_AVX2 static uint64_t Sum(V acc) {
    alignas(32) uint32_t lanes[8];
    _mm256_store_si256((__m256i*)lanes, acc);
    uint64_t s = 0;
    for (uint32_t v : lanes) s += v;
    return s;
  }
  KWTA_AVX2 static void Compress(W* out, M m, V v) {
    const V perm = _mm256_load_si256((const __m256i*)kCompressTable8.index[Bits(m)]);
    _mm256_storeu_si256((__m256i*)out, _mm256_permutevar8x32_epi32(v, perm));
  }
};

// 16 x 32-bit lanes with mask registers and a native compress.
struct Avx512x32 {
  using W = uint32_t;
  using V = __m512i;
  using M = __mmask16;
  static constexpr int kLanes = 16;
  KWTA_AVX512 static V Set1(W w) { return _mm512_set1_epi32(int(w)); }
  KWTA_AVX512 static V Load(const W* p) { return _mm512_loadu_si512(p); }
  KWTA_AVX512 static void Store(W* p, V v) { _mm512_storeu_si512(p, v); }
  template <typename K, bool kAbs>
  KWTA_AVX512 static V Raw(const K* p) {
    V b;
    if constexpr (sizeof(K) == 2) {
      b = _mm512_cvtepi16_epi32(_mm256_loadu_si256((const __m256i*)p));
    } else {
      b = _mm512_loadu_si512(p);
    }
    if (kAbs) b = _mm512_and_si512(b, Set1(W(K(~kSign<K>))));
    return b;
  }
  template <typename K, K kInf, bool kAbs>
  KWTA_AVX512 static V Keys(const K* p) {
    const V b = Raw<K, kAbs>(p);
    V key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi32(b, 31), Set1(W(kSign<K>))));
    if (!kAbs) {
      const M neg_zero = _mm512_cmpeq_epi32_mask(b, Set1(SignExtend<W>(kSign<K>)));
      key = _mm512_mask_mov_epi32(key, neg_zero, Set1(W(kSign<K>)));
    }
    const V mag = _mm512_and_si512(b, Set1(W(K(~kSign<K>))));
    const M nan = _mm512_cmpgt_epu32_mask(mag, Set1(W(kInf)));
    return _mm512_mask_mov_epi32(key, nan, Set1(W(kOnes<K>)));
  }
  KWTA_AVX512 static M Le(V a, V b) { return _mm512_cmple_epu32_mask(a, b); }
  KWTA_AVX512 static M Gt(V a, V b) { return _mm512_cmpgt_epu32_mask(a, b); }
  KWTA_AVX512 static M GtS(V a, V b) { return _mm512_cmpgt_epi32_mask(a, b); }
  KWTA_AVX512 static M In(V x, V lo, V span) {
    return _mm512_cmple_epu32_mask(_mm512_sub_epi32(x, lo), span);
  }
  KWTA_AVX512 static M Or(M a, M b) { return M(a | b); }
  KWTA_AVX512 static int Pop(M m) { return __builtin_popcount(m); }
  KWTA_AVX512 static V OrV(V a, V b) { return _mm512_or_si512(a, b); }
  KWTA_AVX512 static V XorV(V a, V b) { return _mm512_xor_si512(a, b); }
  KWTA_AVX512 static V AndV(V a, V b) { return _mm512_and_si512(a, b); }
  KWTA_AVX512 static V MaxU(V a, V b) { return _mm512_max_epu32(a, b); }
  KWTA_AVX512 static W MaxLane(V v) { return _mm512_reduce_max_epu32(v); }
  KWTA_AVX512 static V Count(V acc, M m) {
    return _mm512_mask_sub_epi32(acc, m, acc, _mm512_set1_epi32(-1));
  }
  KWTA_AVX512 static uint64_t Sum(V acc) { return uint32_t(_mm512_reduce_add_epi32(acc)); }
  KWTA_AVX512 static void Compress(W* out, M m, V v) {
    // Compress in a register, then a plain store: a compressing store to memory is slow on
    // some cores (AMD Zen 4).
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi32(m, v));
  }
};

// 8 x 64-bit lanes (float64).
struct Avx512x64 {
  using W = uint64_t;
  using V = __m512i;
  using M = __mmask8;
  static constexpr int kLanes = 8;
  KWTA_AVX512 static V Set1(W w) { return _mm512_set1_epi64(int64_t(w)); }
  KWTA_AVX512 static V Load(const W* p) { return _mm512_loadu_si512(p); }
  KWTA_AVX512 static void Store(W* p, V v) { _mm512_storeu_si512(p, v); }
  template <typename K, bool kAbs>
  KWTA_AVX512 static V Raw(const K* p) {
    static_assert(sizeof(K) == 8, "64-bit lanes hold float64 bits");
    V b = _mm512_loadu_si512(p);
    if (kAbs) b = _mm512_and_si512(b, Set1(W(~kSign<K>)));
    return b;
  }
  template <typename K, K kInf, bool kAbs>
  KWTA_AVX512 static V Keys(const K* p) {
    const V b = Raw<K, kAbs>(p);
    V key = _mm512_xor_si512(b, _mm512_or_si512(_mm512_srai_epi64(b, 63), Set1(kSign<K>)));
    if (!kAbs) {
      const M neg_zero = _mm512_cmpeq_epi64_mask(b, Set1(kSign<K>));
      key = _mm512_mask_mov_epi64(key, neg_zero, Set1(kSign<K>));
    }
    const V mag = _mm512_and_si512(b, Set1(W(~kSign<K>)));
    const M nan = _mm512_cmpgt_epu64_mask(mag, Set1(W(kInf)));
    return _mm512_mask_mov_epi64(key, nan, Set1(kOnes<K>));
  }
  KWTA_AVX512 static M Le(V a, V b) { return _mm512_cmple_epu64_mask(a, b); }
  KWTA_AVX512 static M Gt(V a, V b) { return _mm512_cmpgt_epu64_mask(a, b); }
  KWTA_AVX512 static M GtS(V a, V b) { return _mm512_cmpgt_epi64_mask(a, b); }
  KWTA_AVX512 static M In(V x, V lo, V span) {
    return _mm512_cmple_epu64_mask(_mm512_sub_epi64(x, lo), span);
  }
  KWTA_AVX512 static M Or(M a, M b) { return M(a | b); }
  KWTA_AVX512 static int Pop(M m) { return __builtin_popcount(m); }
  KWTA_AVX512 static V OrV(V a, V b) { return _mm512_or_si512(a, b); }
  KWTA_AVX512 static V XorV(V a, V b) { return _mm512_xor_si512(a, b); }
  KWTA_AVX512 static V AndV(V a, V b) { return _mm512_and_si512(a, b); }
  KWTA_AVX512 static V MaxU(V a, V b) { return _mm512_max_epu64(a, b); }
  KWTA_AVX512 static W MaxLane(V v) { return _mm512_reduce_max_epu64(v); }
  KWTA_AVX512 static V Count(V acc, M m) {
    return _mm512_mask_sub_epi64(acc, m, acc, _mm512_set1_epi64(-1));
  }
  KWTA_AVX512 static uint64_t Sum(V acc) { return uint64_t(_mm512_reduce_add_epi64(acc)); }
  KWTA_AVX512 static void Compress(W* out, M m, V v) {
    _mm512_storeu_si512(out, _mm512_maskz_compress_epi64(m, v));
  }
};

#endif  // KWTA_X86

}  // namespace kwta

#endif  // KWTA_JAX_KERNELS_KWTA_SIMD_H_
