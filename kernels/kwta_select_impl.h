// Exact k-th largest rank key of a row: sample bracket + vectorised partition (Floyd-Rivest).
//
// No include guard on purpose: kwta_cpu.cc includes this file once per instruction set, with
//   KWTA_NS    the namespace of that instance,
//   KWTA_ATTR  its target attribute (empty for the portable build),
//   KWTA_S32   lane ops (kwta_simd.h) for uint32_t keys (float16, bfloat16, float32 inputs),
//   KWTA_S64   lane ops for uint64_t keys (float64 inputs),
// so that every loop below is compiled (and auto-vectorised) for that instruction set.
//
// A row of n keys costs about one pass: a sample of the row brackets the threshold between two
// sample keys [lo, hi] chosen to hold it with high probability; one pass over the row counts
// the keys above hi and compresses the keys inside [lo, hi] (a few % of the row) into a buffer;
// the same step repeats on the buffer, with smaller samples, until a few dozen keys are left.
// If the threshold falls outside a bracket (rare), the keys on its side are gathered instead.
// Everything is exact integer arithmetic on rank keys; the sampling only decides the cost.
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
    acc = S::Count(acc, S::Gt(v, vhi));
    const auto in = S::In(v, vlo, vspan);
    S::Compress(out + c, in, v);
    c += S::Pop(in);
  }
  int64_t up = int64_t(S::Sum(acc));
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
    acc = S::Count(acc, S::Gt(v, vhi));
    const auto in = S::In(v, vlo, vspan);
    S::Compress(out + c, in, v);
    c += S::Pop(in);
  }
  *above = int64_t(S::Sum(acc));
  return PartitionTail<W, K, kInf, kAbs>(x, i, n, lo, hi, out, c, above);
}

// PartitionRaw for a bracket of positive floats: key(+0) < lo (<= with kAbs) and
// hi <= key(+inf). There a key is bits | sign, so [lo, hi] is a range of raw bits; a key is
// above hi if its bits are a larger positive number (positive NaNs included) or a negative NaN.
template <class S, typename K, K kInf, bool kAbs>
KWTA_ATTR int64_t PartitionPositive(const K* x, int64_t n, typename S::W lo, typename S::W hi,
                                    typename S::W* out, int64_t* above) {
  using W = typename S::W;
  using V = typename S::V;
  const W lo_bits = W(K(lo) ^ kSign<K>), hi_bits = W(K(hi) ^ kSign<K>);
  const V vlo = S::Set1(lo_bits), vspan = S::Set1(W(hi_bits - lo_bits));
  const V vhi = S::Set1(hi_bits), vsign = S::Set1(W(kSign<K>));
  const V vnan = S::Set1(SignExtend<W>(K(kSign<K> | kInf)));
  V acc = S::Set1(0);
  int64_t c = 0, i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const V b = S::template Raw<K, kAbs>(x + i);
    const auto up = kAbs ? S::GtS(b, vhi) : S::Or(S::GtS(b, vhi), S::Gt(b, vnan));
    acc = S::Count(acc, up);
    const auto in = S::In(b, vlo, vspan);
    S::Compress(out + c, in, S::OrV(b, vsign));
    c += S::Pop(in);
  }
  *above = int64_t(S::Sum(acc));
  return PartitionTail<W, K, kInf, kAbs>(x, i, n, lo, hi, out, c, above);
}

// PartitionRaw for a bracket of negative floats (not with kAbs): hi < key(-0) = key(+0) and
// key(-inf) <= lo. There a key is ~bits, so [lo, hi] is the raw range [~hi, ~lo]; a key is above
// hi if its bits are below ~hi (every non-negative float, -0, smaller magnitudes) or a NaN.
template <class S, typename K, K kInf>
KWTA_ATTR int64_t PartitionNegative(const K* x, int64_t n, typename S::W lo, typename S::W hi,
                                    typename S::W* out, int64_t* above) {
  using W = typename S::W;
  using V = typename S::V;
  const W lo_bits = SignExtend<W>(K(~K(hi))), hi_bits = SignExtend<W>(K(~K(lo)));
  const V vlo = S::Set1(lo_bits), vspan = S::Set1(W(hi_bits - lo_bits));
  const V vnan = S::Set1(SignExtend<W>(K(kSign<K> | kInf))), vones = S::Set1(kOnes<W>);
  V acc = S::Set1(0);
  int64_t c = 0, i = 0;
  for (; i + S::kLanes <= n; i += S::kLanes) {
    const V b = S::template Raw<K, false>(x + i);
    acc = S::Count(acc, S::Or(S::Gt(vlo, b), S::Gt(b, vnan)));
    const auto in = S::In(b, vlo, vspan);
    S::Compress(out + c, in, S::XorV(b, vones));  // ~bits of a sign-extended negative
    c += S::Pop(in);
  }
  *above = int64_t(S::Sum(acc));
  return PartitionTail<W, K, kInf, false>(x, i, n, lo, hi, out, c, above);
}

// The pass over a row with the cheapest variant that is exact for [lo, hi].
template <class S, typename K, K kInf, bool kAbs>
KWTA_ATTR int64_t PartitionRow(const K* x, int64_t n, typename S::W lo, typename S::W hi,
                               typename S::W* out, int64_t* above) {
  constexpr K kZeroKey = kSign<K>;
  constexpr K kInfKey = K(kSign<K> | kInf);
  constexpr K kMinusInfKey = K(~kInfKey);
  if ((kAbs ? lo >= kZeroKey : lo > kZeroKey) && hi <= kInfKey && lo <= hi) {
    return PartitionPositive<S, K, kInf, kAbs>(x, n, lo, hi, out, above);
  }
  if (!kAbs && hi < kZeroKey && lo >= kMinusInfKey && lo <= hi) {
    return PartitionNegative<S, K, kInf>(x, n, lo, hi, out, above);
  }
  return PartitionRaw<S, K, kInf, kAbs>(x, n, lo, hi, out, above);
}

// The a-th and b-th largest (1-based, a <= b) of the m keys in s: the smallest key with fewer
// than a (resp. b) keys above it. O(m^2) counting, for samples of a few dozen keys.
template <typename W>
KWTA_ATTR void SmallOrderStats(const W* s, int m, int a, int b, W* at_a, W* at_b) {
  int greater[64];
  for (int j = 0; j < m; ++j) greater[j] = 0;
  for (int i = 0; i < m; ++i) {
    for (int j = 0; j < m; ++j) greater[j] += s[i] > s[j];
  }
  W va = kOnes<W>, vb = kOnes<W>;
  for (int j = 0; j < m; ++j) {
    if (greater[j] < a && s[j] < va) va = s[j];
    if (greater[j] < b && s[j] < vb) vb = s[j];
  }
  *at_a = va;
  *at_b = vb;
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

constexpr int64_t kTinySelect = 48;  // below this many keys: std::nth_element
constexpr int kInnerSample = 32;     // sample of a buffer level (<= 64, see SmallOrderStats)
constexpr double kInnerZ = 1.5;

// The r-th largest (1-based) of the m keys in a; b is scratch of the same size. Both are
// reordered. Each level shrinks the candidates to a sample bracket (about a third of them).
template <class S>
KWTA_ATTR typename S::W SelectRank(typename S::W* a, typename S::W* b, int64_t m, int64_t r) {
  using W = typename S::W;
  for (;;) {
    if (m <= kTinySelect) {
      std::nth_element(a, a + (r - 1), a + m, std::greater<W>());
      return a[r - 1];
    }
    W sample[kInnerSample];
    const int64_t stride = m / kInnerSample;
    for (int j = 0; j < kInnerSample; ++j) sample[j] = a[j * stride + stride / 2];
    int64_t ra, rb;
    BracketRanks(m, r, kInnerSample, kInnerZ, &ra, &rb);
    W hi = kOnes<W>, lo = 0, at_a, at_b;
    SmallOrderStats<W>(sample, kInnerSample, int(std::max<int64_t>(ra, 1)),
                       int(std::min<int64_t>(rb, kInnerSample)), &at_a, &at_b);
    if (ra >= 1) hi = at_a;
    if (rb <= kInnerSample) lo = at_b;
    int64_t above;
    const int64_t count = PartitionKeys<S>(a, m, lo, hi, b, &above);
    if (r > above && r <= above + count) {
      if (lo == hi) return lo;
      if (count == m) {  // no progress (e.g. lo and hi are the extremes): finish exactly
        std::nth_element(a, a + (r - 1), a + m, std::greater<W>());
        return a[r - 1];
      }
      r -= above;
      m = count;
    } else if (r <= above) {  // the threshold is above hi: keep the keys above it
      CountBracketMiss();
      m = PartitionKeys<S>(a, m, W(hi + 1), kOnes<W>, b, &above);
    } else {  // below lo: keep the keys below it
      CountBracketMiss();
      r -= above + count;
      m = PartitionKeys<S>(a, m, 0, W(lo - 1), b, &above);
    }
    std::swap(a, b);
  }
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

constexpr int64_t kDirectRow = 256;  // rows up to this long: all keys into the buffer
constexpr double kRowZ = 2.5;        // half-width of the row's bracket, in standard deviations

// Keys in the row's sample: about n^(2/3) / 2 (Floyd-Rivest's order), whole vectors, <= n / 4.
template <class S>
inline int64_t RowSampleChunks(int64_t n) {
  const double want = 0.5 * std::cbrt(double(n) * double(n));
  const int64_t keys = std::min<int64_t>({int64_t(want), 1024, n / 4});
  return std::max<int64_t>(2, keys / S::kLanes);
}

// The k-th largest rank key of the row x[0, n) (raw float bits). a and b: scratch of n + 64.
template <typename K, K kInf, bool kAbs>
KWTA_ATTR K SelectRow(const K* x, int64_t n, int64_t k, typename LaneOps<K>::W* a,
                      typename LaneOps<K>::W* b) {
  using S = LaneOps<K>;
  using W = typename S::W;
  if (n <= kDirectRow) {
    KeysOf<S, K, kInf, kAbs>(x, n, a);
    return K(SelectRank<S>(a, b, n, k));
  }
  // Sample: whole vectors of contiguous keys spread over the row, twice (selection reorders).
  const int64_t chunks = RowSampleChunks<S>(n);
  const int64_t ns = chunks * S::kLanes;
  for (int64_t j = 0; j < chunks; ++j) {
    const int64_t start = j * (n - S::kLanes) / (chunks - 1);
    S::Store(a + j * S::kLanes, S::template Keys<K, kInf, kAbs>(x + start));
  }
  std::memcpy(a + ns, a, sizeof(W) * size_t(ns));
  int64_t ra, rb;
  BracketRanks(n, k, ns, kRowZ, &ra, &rb);
  const W top = W(kOnes<K>);
  const W hi = ra >= 1 ? SelectRank<S>(a, b, ns, ra) : top;
  const W lo = rb <= ns ? SelectRank<S>(a + ns, b, ns, rb) : W(0);

  int64_t above;
  const int64_t count = PartitionRow<S, K, kInf, kAbs>(x, n, lo, hi, a, &above);
  const int64_t r = k - above;
  if (r >= 1 && r <= count) return K(lo == hi ? lo : SelectRank<S>(a, b, count, r));
  int64_t unused;
  CountBracketMiss();
  if (r < 1) {  // more than k keys above hi: the threshold is among them
    const int64_t m = PartitionRaw<S, K, kInf, kAbs>(x, n, W(hi + 1), top, a, &unused);
    return K(SelectRank<S>(a, b, m, k));
  }
  const int64_t m = PartitionRaw<S, K, kInf, kAbs>(x, n, W(0), W(lo - 1), a, &unused);
  return K(SelectRank<S>(a, b, m, r - count));
}

// Rows [r0, r1) of x [rows, n] -> their threshold keys th[r0, r1).
template <typename K, K kInf, bool kAbs>
KWTA_ATTR void SelectRows(const K* x, K* th, int64_t r0, int64_t r1, int64_t n, int64_t k) {
  using W = typename LaneOps<K>::W;
  Scratch<W>& s = ThreadScratch<W>(n + 64);
  for (int64_t r = r0; r < r1; ++r) {
    th[r] = SelectRow<K, kInf, kAbs>(x + r * n, n, k, s.a.data(), s.b.data());
  }
}

}  // namespace KWTA_NS
}  // namespace kwta
