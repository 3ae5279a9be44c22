// Exact k-th largest rank key of a row: sample bracket + vectorised partition (Floyd-Rivest).
//
// No include guard on purpose: kwta_cpu.cc includes this file once per instruction set, with
//   KWTA_NS    the namespace of that instance,
//   KWTA_ATTR  its target attribute (empty for the portable build),
//   KWTA_S32   lane ops (kwta_simd.h) for uint32_t keys (float16, bfloat16, float32 inputs),
//   KWTA_S64   lane ops for uint64_t keys (float64 inputs),
// so that every loop below is compiled (and auto-vectorised) for that instruction set.
//
// A row of n keys costs about one pass: a sample of the row (about n^(2/3) / 4 keys) brackets
// the threshold between two sample keys [lo, hi] chosen to hold it with high probability; one
// vectorised pass over the row counts the keys above hi and compresses the keys inside [lo, hi]
// (a few % of the row) into a buffer. The buffer's answer is then found by more sample brackets
// while it is large, by radix select on the bracket's key range below that, and by branch-free
// counting for the last few dozen keys. If the threshold falls outside a bracket (rare), the keys
// on its side are gathered instead. Everything is exact integer arithmetic on rank keys; the
// sampling only decides the cost.
//
// Small k (the TopK-autoencoder regime, a few winners in long rows) is the same algorithm: the
// bracket's sample rank falls below 1, so it has no upper end, the pass only compresses the
// keys above lo (about n k / ns of them) and nothing is counted. So the choice between the two
// regimes is made by k and n alone, per call.
//
// The pass over the row avoids the full rank-key transform when the bracket lies inside the
// positive or the negative floats: there a key range is a range of the raw bits.

namespace kwta {
namespace KWTA_NS {

// Keys of a[0, m) inside [lo, hi] are written to out (room for count + kLanes needed), in order;
// returns their count and sets *above to the number of keys > hi.
template <class S>
KWTA_ATTR int64_t PartitionKeys(const typename S::W* a, int64_t m, typename S::W lo,
                                typename S::W hi, typename S::W* out, int64_t* above) {
  using W = typename S::W;
  using V = typename S::V;
  const V vlo = S::Set1(lo), vspan = S::Set1(W(hi - lo)), vhi = S::Set1(hi);
  V acc = S::Set1(0);
  int64_t c = 0, i = 0;
  for (; i + S::kLanes <= m; i += S::kLanes) {
    const V v = S::Load(a + i);
    acc = S::Count(acc, S::Le(v, vhi));
    const auto in = S::In(v, vlo, vspan);
    S::Compress(out + c, in, v);
    c += S::Pop(in);
  }
  int64_t up = i - int64_t(S::Sum(acc));
  for (; i < m; ++i) {
    const W v = a[i];
    up += v > hi;
    out[c] = v;
    c += W(v - lo) <= W(hi - lo);
  }
  *above = up;
  return c;
}

// Tail of a pass over raw bits x[i, n): scalar rank keys, same contract as PartitionKeys.
template <typename W, typename K, K kInf, bool kAbs>
inline int64_t PartitionTail(const K* x, int64_t i, int64_t n, W lo, W hi, W* out, int64_t c,
                             int64_t* above) {
  for (; i < n; ++i) {
    const W v = RankKey<K, kInf, kAbs>(x[i]);
    *above += v > hi;
    out[c] = v;
    c += W(v - lo) <= W(hi - lo);
  }
  return c;
}

// PartitionKeys on the rank keys of raw bits x[0, n), for any bracket.
template <class S, typename K, K kInf, bool kAbs>
KWTA_ATTR int64_t PartitionRaw(const K* x, int64_t n, typename S::W lo, typename S::W hi,
                               typename S::W* out, int64_t* above) {
  using W = typename S::W;
  using V = typename S::V;
  const V vlo = S::Set1(lo), vspan = S::Set1(W(hi - lo)), vhi = S::Set1(hi);
  V acc = S::Set1(0);
  int64_t c = 0, i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const V v = S::template Keys<K, kInf, kAbs>(x + i);
    acc = S::Count(acc, S::Le(v, vhi));
    const auto in = S::In(v, vlo, vspan);
    S::Compress(out + c, in, v);
    c += S::Pop(in);
  }
  *above = i - int64_t(S::Sum(acc));
  return PartitionTail<W, K, kInf, kAbs>(x, i, n, lo, hi, out, c, above);
}

// Fast passes for brackets inside one sign of the floats, where a key range is a range of the
// raw bits: about half the vector operations of PartitionRaw. They store raw bits (KeysFromRaw
// turns the few compressed ones into keys) and leave NaNs out: a row holding a NaN (seen through
// a running maximum of |bits|, which costs less than a compare per vector) returns -1 and goes
// through PartitionRaw instead.
enum class Sign { kPositive, kNegative, kPositiveNoUpper };

// kPositive: key(+0) < lo (<= with kAbs), hi <= key(+inf); a key is bits | sign, [lo, hi] is
//   [lo ^ sign, hi ^ sign] in bits, and a key is above hi iff its bits are signed > hi ^ sign.
// kPositiveNoUpper: as kPositive with hi = the largest key (k small: nothing above the bracket).
// kNegative (not kAbs): hi < key(-0) = key(+0), key(-inf) <= lo; a key is ~bits, [lo, hi] is
//   [~hi, ~lo] in (sign-extended) bits, and a key is above hi iff its bits are unsigned < ~hi.
template <class S, typename K, K kInf, bool kAbs, Sign kSign_>
KWTA_ATTR int64_t PartitionSigned(const K* x, int64_t n, typename S::W lo, typename S::W hi,
                                  typename S::W* out, int64_t* above) {
  using W = typename S::W;
  using V = typename S::V;
  W lo_bits, hi_bits;
  if constexpr (kSign_ == Sign::kNegative) {
    lo_bits = SignExtend<W>(K(~K(hi)));
    hi_bits = SignExtend<W>(K(~K(lo)));
  } else {
    lo_bits = W(K(lo) ^ kSign<K>);
    hi_bits = kSign_ == Sign::kPositive ? W(K(hi) ^ kSign<K>) : W(kInf);
  }
  const V vlo = S::Set1(lo_bits), vspan = S::Set1(W(hi_bits - lo_bits));
  const V vhi = S::Set1(hi_bits), vmag = S::Set1(W(K(~kSign<K>)));
  const V vbelow = S::Set1(W(lo_bits - 1));  // kNegative: bits < ~hi, i.e. <= ~hi - 1
  // NaNs: only a negative NaN escapes the counts of kPositive and kNegative (unsigned max of the
  // bits), kPositiveNoUpper misses both signs (max of |bits|); with kAbs there is no sign.
  constexpr bool kAnyNan = kSign_ == Sign::kPositiveNoUpper;
  const W nan_bound = kAnyNan ? W(kInf) : SignExtend<W>(K(kSign<K> | kInf));
  V acc = S::Set1(0), maxbits = S::Set1(0);
  int64_t c = 0, i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const V b = S::template Raw<K, kAbs>(x + i);
    if constexpr (kAnyNan) {
      maxbits = S::MaxU(maxbits, kAbs ? b : S::AndV(b, vmag));
    } else if constexpr (!kAbs) {
      maxbits = S::MaxU(maxbits, b);
    }
    if constexpr (kSign_ == Sign::kPositive) acc = S::Count(acc, S::GtS(b, vhi));
    if constexpr (kSign_ == Sign::kNegative) acc = S::Count(acc, S::Le(b, vbelow));
    const auto in = S::In(b, vlo, vspan);
    S::Compress(out + c, in, b);
    c += S::Pop(in);
  }
  if (S::MaxLane(maxbits) > nan_bound) return -1;
  for (int64_t j = 0; j < c; ++j) {  // raw bits -> keys
    out[j] = kSign_ == Sign::kNegative ? W(~out[j]) : W(out[j] | W(kSign<K>));
  }
  for (int64_t j = i; j < n; ++j) {  // tail: any NaN sends the row to PartitionRaw
    if (K(x[j] & K(~kSign<K>)) > kInf) return -1;
  }
  *above = int64_t(S::Sum(acc));
  return PartitionTail<W, K, kInf, kAbs>(x, i, n, lo, hi, out, c, above);
}

// The pass over a row with the cheapest variant that is exact for [lo, hi].
template <class S, typename K, K kInf, bool kAbs>
KWTA_ATTR int64_t PartitionRow(const K* x, int64_t n, typename S::W lo, typename S::W hi,
                               typename S::W* out, int64_t* above) {
  using W = typename S::W;
  constexpr W kZeroKey = kSign<K>;
  constexpr W kInfKey = W(K(kSign<K> | kInf));
  constexpr W kMinusInfKey = W(K(~K(kSign<K> | kInf)));
  int64_t count = -1;
  if (lo <= hi && (kAbs ? lo >= kZeroKey : lo > kZeroKey)) {
    if (hi <= kInfKey) {
      count = PartitionSigned<S, K, kInf, kAbs, Sign::kPositive>(x, n, lo, hi, out, above);
    } else if (hi == W(kOnes<K>) && lo <= kInfKey) {
      count = PartitionSigned<S, K, kInf, kAbs, Sign::kPositiveNoUpper>(x, n, lo, hi, out, above);
      *above = 0;
    }
  } else if (!kAbs && lo <= hi && hi < kZeroKey && lo >= kMinusInfKey) {
    count = PartitionSigned<S, K, kInf, false, Sign::kNegative>(x, n, lo, hi, out, above);
  }
  if (count >= 0) return count;
  return PartitionRaw<S, K, kInf, kAbs>(x, n, lo, hi, out, above);
}

// The a-th and b-th largest (1-based) of the m <= 64 keys in s, by counting for every key the
// keys above it: O(m^2) but branch-free (on random keys a sort or nth_element mispredicts about
// every other comparison). Each vector of candidates s[j..] keeps its counts of larger keys in a
// register while all m keys go by.
template <class S>
KWTA_ATTR void CountGreater(const typename S::W* s, int m, typename S::W* greater) {
  using W = typename S::W;
  using V = typename S::V;
  constexpr int kMax = 64;
  W padded[kMax + S::kLanes];
  for (int j = 0; j < m; ++j) padded[j] = s[j];
  for (int j = m; j < kMax + S::kLanes; ++j) padded[j] = 0;
  for (int j = 0; j < m; j += S::kLanes) {
    const V sj = S::Load(padded + j);
    V count = S::Set1(0);
    for (int i = 0; i < m; ++i) count = S::Count(count, S::Gt(S::Set1(s[i]), sj));
    S::Store(greater + j, count);
  }
}

// The a-th largest (1-based) of the m keys s with `greater` counts: the smallest key with fewer
// than a keys above it. Whole vectors (s and greater padded to them, padding lanes never
// chosen); the minimum is taken as the maximum of complements, with the lane ops at hand.
template <class S>
KWTA_ATTR typename S::W OrderStat(const typename S::W* s, const typename S::W* greater, int m,
                                  int a) {
  using W = typename S::W;
  using V = typename S::V;
  const V ones = S::Set1(kOnes<W>), va = S::Set1(W(a));
  V best = S::Set1(0);  // max of ~key over the chosen keys
  for (int j = 0; j < m; j += S::kLanes) {
    // Count(ones, chosen) is 0 on chosen lanes and all ones elsewhere.
    const V keep = S::Count(ones, S::Gt(va, S::Load(greater + j)));
    best = S::MaxU(best, S::XorV(S::OrV(S::Load(s + j), keep), ones));
  }
  return W(~S::MaxLane(best));
}

template <class S>
KWTA_ATTR void SmallOrderStats(const typename S::W* s, int m, int a, int b,
                               typename S::W* at_a, typename S::W* at_b) {
  using W = typename S::W;
  W padded[64 + S::kLanes], greater[64 + S::kLanes];
  CountGreater<S>(s, m, greater);
  for (int j = 0; j < m; ++j) padded[j] = s[j];
  for (int j = m; j < 64 + S::kLanes; ++j) {
    padded[j] = kOnes<W>;
    greater[j] = kOnes<W>;  // never fewer than a keys above
  }
  *at_a = OrderStat<S>(padded, greater, m, a);
  *at_b = b == a ? *at_a : OrderStat<S>(padded, greater, m, b);
}

// Sample ranks (1-based, from the top) of the bracket around the r-th largest of m keys, for a
// sample of ns keys: [a, b] holds about ns * r / m +- z standard deviations. a < 1 means "no
// upper bound", b > ns "no lower bound".
inline void BracketRanks(int64_t m, int64_t r, int64_t ns, double z, int64_t* a, int64_t* b) {
  const double p = double(r) / double(m);
  const double centre = p * double(ns);
  const double width = z * std::sqrt(double(ns) * p * (1.0 - p)) + 1.0;
  *a = int64_t(std::floor(centre - width));
  *b = int64_t(std::ceil(centre + width));
}

constexpr int kSmall = 32;        // at most this many keys: SmallOrderStats (branch-free)
constexpr int kSmallSample = 64;  // a row sample this small: SmallOrderStats for both ends
constexpr int kMaxRadixBits = 8;
// More keys: a sample bracket first (vectorised, no scatter). 128 rather than 512 (with 32-key
// level samples, not 24): per row 47 % less time at n = 512, r = 0.7, and 5-11 % less at
// n = 4096 to 65,536 (standalone harness, one core; docs/benchmarks.md).
constexpr int64_t kMaxRadix = 128;
constexpr int kLevelSample = 32;
constexpr double kLevelZ = 1.0;

// One sample-bracket step on the m keys of a (into b): the keys of a sample bracket around the
// r-th largest, or, if the bracket missed it (rare), the keys on its side. Updates m, r, lo, hi
// (bounds of the kept keys) and returns false when the r-th largest is already known (in lo).
template <class S>
KWTA_ATTR bool BracketStep(const typename S::W* a, typename S::W* b, int64_t* m, int64_t* r,
                           typename S::W* lo, typename S::W* hi) {
  using W = typename S::W;
  W sample[kLevelSample];
  const int64_t stride = *m / kLevelSample;
  for (int j = 0; j < kLevelSample; ++j) sample[j] = a[j * stride + stride / 2];
  int64_t ra, rb;
  BracketRanks(*m, *r, kLevelSample, kLevelZ, &ra, &rb);
  W at_a, at_b;
  SmallOrderStats<S>(sample, kLevelSample, int(std::max<int64_t>(ra, 1)),
                     int(std::min<int64_t>(rb, kLevelSample)), &at_a, &at_b);
  const W b_hi = ra >= 1 ? at_a : *hi, b_lo = rb <= kLevelSample ? at_b : *lo;
  int64_t above;
  const int64_t count = PartitionKeys<S>(a, *m, b_lo, b_hi, b, &above);
  if (*r > above && *r <= above + count) {
    *r -= above;
    *m = count;
    *lo = b_lo;
    *hi = b_hi;
    return b_lo != b_hi;
  }
  CountBracketMiss();
  if (*r <= above) {  // the r-th largest is above the bracket
    *m = PartitionKeys<S>(a, *m, W(b_hi + 1), *hi, b, &above);
    *lo = W(b_hi + 1);
  } else {
    *r -= above + count;
    *m = PartitionKeys<S>(a, *m, *lo, W(b_lo - 1), b, &above);
    *hi = W(b_lo - 1);
  }
  return true;
}

// The r-th largest (1-based) of the m keys in a, all inside [lo, hi]; b is scratch of the same
// size, and both are reordered. Many keys: sample-bracket steps (vectorised partitions). Then
// radix select on the key range: a histogram over [lo, hi] (about m / 4 bins, at most 256) finds
// the bin of the r-th largest, whose keys are compressed into the other buffer; the range
// shrinks at least 16-fold per level. A few dozen keys: SmallOrderStats.
template <class S>
KWTA_ATTR typename S::W RadixSelect(typename S::W* a, typename S::W* b, int64_t m, int64_t r,
                                    typename S::W lo, typename S::W hi) {
  using W = typename S::W;
  // Tighten the range to the keys' own (a bracket end may be "no bound": all keys above lo).
  W min_key = kOnes<W>, max_key = 0;
  for (int64_t i = 0; i < m; ++i) {
    min_key = std::min(min_key, a[i]);
    max_key = std::max(max_key, a[i]);
  }
  lo = std::max(lo, min_key);
  hi = std::min(hi, max_key);
  uint32_t hist[1 << kMaxRadixBits];
  bool brackets = true;  // until a sample bracket fails to shrink the keys (heavy ties)
  for (;;) {
    if (lo == hi) return lo;
    if (m <= kSmall) {
      W at_r, unused;
      SmallOrderStats<S>(a, int(m), int(r), int(r), &at_r, &unused);
      return at_r;
    }
    if (brackets && m > kMaxRadix) {
      const int64_t before = m;
      if (!BracketStep<S>(a, b, &m, &r, &lo, &hi)) return lo;
      std::swap(a, b);
      brackets = m < before;
      continue;
    }

    const W span = W(hi - lo);
    const int span_bits = int(8 * sizeof(W)) - (sizeof(W) == 8 ? __builtin_clzll(uint64_t(span))
                                                                : __builtin_clz(uint32_t(span)));
    int radix_bits = 4;
    while (radix_bits < kMaxRadixBits && (int64_t(4) << radix_bits) < m) ++radix_bits;
    const int shift = span_bits > radix_bits ? span_bits - radix_bits : 0;
    const int bins = int(span >> shift) + 1;
    std::memset(hist, 0, sizeof(uint32_t) * size_t(bins));
    for (int64_t i = 0; i < m; ++i) ++hist[(a[i] - lo) >> shift];
    int64_t above = 0;
    int j = bins - 1;
    while (above + hist[j] < r) above += hist[j--];
    const W bin_lo = W(lo + (W(j) << shift));
    const W bin_hi = j == bins - 1 ? hi : W(bin_lo + ((W(1) << shift) - 1));
    int64_t unused;
    m = PartitionKeys<S>(a, m, bin_lo, bin_hi, b, &unused);
    r -= above;
    lo = bin_lo;
    hi = bin_hi;
    std::swap(a, b);
  }
}

// The r-th largest (1-based) of the m keys in a (reordered); b is scratch of the same size.
template <class S>
KWTA_ATTR typename S::W SelectRank(typename S::W* a, typename S::W* b, int64_t m, int64_t r) {
  return RadixSelect<S>(a, b, m, r, 0, kOnes<typename S::W>);
}

// Keys of raw bits x[0, n) into out.
template <class S, typename K, K kInf, bool kAbs>
KWTA_ATTR void KeysOf(const K* x, int64_t n, typename S::W* out) {
  int64_t i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    S::Store(out + i, S::template Keys<K, kInf, kAbs>(x + i));
  }
  for (; i < n; ++i) out[i] = RankKey<K, kInf, kAbs>(x[i]);
}

template <typename K>
using LaneOps = std::conditional_t<sizeof(K) == 8, KWTA_S64, KWTA_S32>;

constexpr int64_t kDirectRow = 4 * kSmall;  // rows up to this long: all keys into the buffer
constexpr double kRowZ = 2.5;  // half-width of the row's bracket, in standard deviations

// Keys in the row's sample: about n^(2/3) / 4 (Floyd-Rivest's order), whole vectors, <= n / 4.
template <class S>
inline int64_t RowSampleChunks(int64_t n) {
  const double want = std::max(double(kSmall), 0.25 * std::cbrt(double(n) * double(n)));
  const int64_t keys = std::min<int64_t>({int64_t(want), 1024, n / 4});
  return std::max<int64_t>(2, keys / S::kLanes);
}

// What every row of a call shares: its sample's size and the sample ranks of its bracket
// (computed once per call: they need floating-point library calls).
struct RowPlan {
  int64_t chunks, ns, ra, rb;
};

template <class S>
inline RowPlan PlanRows(int64_t n, int64_t k) {
  RowPlan plan{};
  if (n <= kDirectRow) return plan;
  plan.chunks = RowSampleChunks<S>(n);
  plan.ns = plan.chunks * S::kLanes;
  BracketRanks(n, k, plan.ns, kRowZ, &plan.ra, &plan.rb);
  return plan;
}

// The k-th largest rank key of the row x[0, n) (raw float bits). a and b: scratch of n + 64.
template <typename K, K kInf, bool kAbs>
KWTA_ATTR K SelectRow(const K* x, int64_t n, int64_t k, const RowPlan& plan,
                      typename LaneOps<K>::W* a, typename LaneOps<K>::W* b) {
  using S = LaneOps<K>;
  using W = typename S::W;
  if (n <= kDirectRow) {
    KeysOf<S, K, kInf, kAbs>(x, n, a);
    return K(SelectRank<S>(a, b, n, k));
  }
  // Sample: whole vectors of contiguous keys spread over the row, twice (selection reorders).
  const int64_t chunks = plan.chunks, ns = plan.ns, ra = plan.ra, rb = plan.rb;
  for (int64_t j = 0; j < chunks; ++j) {
    const int64_t start = j * (n - S::kLanes) / (chunks - 1);
    S::Store(a + j * S::kLanes, S::template Keys<K, kInf, kAbs>(x + start));
  }
  std::memcpy(a + ns, a, sizeof(W) * size_t(ns));
  const W top = W(kOnes<K>);
  W hi = top, lo = 0;
  if (ns <= kSmallSample) {
    W at_a, at_b;
    SmallOrderStats<S>(a, int(ns), int(std::max<int64_t>(ra, 1)), int(std::min(rb, ns)), &at_a,
                       &at_b);
    if (ra >= 1) hi = at_a;
    if (rb <= ns) lo = at_b;
  } else {
    if (ra >= 1) hi = SelectRank<S>(a, b, ns, ra);
    if (rb <= ns) lo = SelectRank<S>(a + ns, b, ns, rb);
  }

  int64_t above;
  const int64_t count = PartitionRow<S, K, kInf, kAbs>(x, n, lo, hi, a, &above);
  const int64_t r = k - above;
  if (r >= 1 && r <= count) return K(RadixSelect<S>(a, b, count, r, lo, hi));
  int64_t unused;
  CountBracketMiss();
  if (r < 1) {  // more than k keys above hi: the threshold is among them
    const int64_t m = PartitionRaw<S, K, kInf, kAbs>(x, n, W(hi + 1), top, a, &unused);
    return K(RadixSelect<S>(a, b, m, k, W(hi + 1), top));
  }
  const int64_t m = PartitionRaw<S, K, kInf, kAbs>(x, n, W(0), W(lo - 1), a, &unused);
  return K(RadixSelect<S>(a, b, m, r - count, W(0), W(lo - 1)));
}

// The k-WTA output of the row x[0, n) with threshold key t: x's own bits where its rank key is
// >= t, +0 elsewhere (kwta_jax/rank_keys.py `apply_threshold`, bit for bit). Written while the
// row is still in cache from its selection (the compiler vectorises the line loop).
//
// y is prefetched for writing kApplyPrefetchLines lines ahead. Without it, in about a third of
// the processes (depending on where XLA placed x and y), this loop ran 3-4x slower on every
// shape: a CPU profile put the time on the use of each load of x, behind stores to y still
// waiting for their lines. With it: 0 slow processes in 48 (11 in 32 before), and 0-7 % less
// time per row on rows of 4,096 keys and more in a standalone harness (5-9 % more on 512-key
// rows); docs/benchmarks.md.
constexpr int64_t kApplyPrefetchLines = 16;

// y_room: elements of y that may be written from y on (this row's and the following rows' of
// the call), so that the prefetches stay inside the buffer.
template <typename K, K kInf, bool kAbs>
KWTA_ATTR void ApplyRow(const K* x, int64_t n, K t, K* y, int64_t y_room) {
  constexpr int64_t kLine = 64 / sizeof(K);  // elements per cache line
  constexpr int64_t kAhead = kApplyPrefetchLines * kLine;
  int64_t i = 0;
  for (; i + kLine <= n; i += kLine) {
    if (i + kAhead < y_room) __builtin_prefetch(y + i + kAhead, /*rw=*/1, /*locality=*/3);
    for (int64_t j = i; j < i + kLine; ++j) {
      y[j] = RankKey<K, kInf, kAbs>(x[j]) >= t ? x[j] : K(0);
    }
  }
  for (; i < n; ++i) y[i] = RankKey<K, kInf, kAbs>(x[i]) >= t ? x[i] : K(0);
}

// Rows [r0, r1) of x [rows, n] -> their threshold keys th[r0, r1), and, when y is not null,
// their k-WTA output y[r0 * n, r1 * n).
template <typename K, K kInf, bool kAbs>
KWTA_ATTR void SelectRows(const K* x, K* th, K* y, int64_t r0, int64_t r1, int64_t n,
                          int64_t k) {
  using W = typename LaneOps<K>::W;
  Scratch<W>& s = ThreadScratch<W>(n + 64);
  const RowPlan plan = PlanRows<LaneOps<K>>(n, k);
  for (int64_t r = r0; r < r1; ++r) {
    th[r] = SelectRow<K, kInf, kAbs>(x + r * n, n, k, plan, s.a.data(), s.b.data());
    if (y != nullptr) ApplyRow<K, kInf, kAbs>(x + r * n, n, th[r], y + r * n, (r1 - r) * n);
  }
}

}  // namespace KWTA_NS
}  // namespace kwta
