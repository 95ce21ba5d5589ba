// AVX-512 (F, BW, VNNI) kernel for SlimMatMul's int8 path at M <= 4 rows, the decode case
// (compiled with -mavx512f -mavx512bw -mavx512vnni, chosen at run time). Everything else, and int8
// products of more rows, run the AVX2 kernels (kernels_avx2.cc), whose loop this one follows.
//
// Loop structure, per pair of column tiles (t, t+1) (threads split tiles; an odd last tile is paired
// with itself and stored once):
//   for each scale group g:
//     for each block b of the group, both tiles' blocks decoded into one 512-bit register, tile t in
//     the low 256 bits and tile t+1 in the high ones, laid out exactly as the AVX2 decoder does it
//     (entry e of a tile in byte e of its half, column c in int32 lane c):
//       sparse: acc += vpdpbusd(pshufb(a_u8[8b..8b+7] in every 64-bit word, positions), values)
//       dense:  acc += vpdpbusd(a_u8[8b..8b+3] in every word, k 0..3) + vpdpbusd(a_u8[8b+4..], k 4..7)
//     y[16 columns] += (acc - corr_g) * a_scale[row, g] * w_scale[g, 16 columns]
// vpdpbusd adds four u8 x s8 products into an int32 lane in one instruction, so there is no int16
// stage to widen (AVX2's pmaddubsw + pmaddwd); two accumulators per row hide its latency.
#include <immintrin.h>

// GCC 12 reports the intentionally undefined pass-through operands inside its own AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>

#include "slim_kernels.h"

namespace slim {
namespace {

// 16 bytes of tile t's block in both 128-bit lanes of the low half, tile u's in the high half.
inline __m512i Records(const uint8_t* t, const uint8_t* u) {
  const __m256i lo = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(t)));
  const __m256i hi = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(u)));
  return _mm512_inserti64x4(_mm512_zextsi256_si512(lo), hi, 1);
}

inline __m512i ValueBytes(const uint8_t* t, const uint8_t* u) {
  __m512i v = _mm512_srlv_epi64(Records(t, u), _mm512_set_epi64(4, 4, 0, 0, 4, 4, 0, 0));
  v = _mm512_and_si512(v, _mm512_set1_epi8(0x0F));
  return _mm512_sub_epi8(v, _mm512_set1_epi8(8));
}

inline __m512i PositionBytes(const uint8_t* t, const uint8_t* u) {
  int64_t pt, pu;
  std::memcpy(&pt, t, 8);
  std::memcpy(&pu, u, 8);
  const __m512i p = _mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_set1_epi64x(pt)), _mm256_set1_epi64x(pu), 1);
  __m512i x = _mm512_and_si512(_mm512_srlv_epi64(p, _mm512_set_epi64(6, 4, 2, 0, 6, 4, 2, 0)), _mm512_set1_epi8(3));
  return _mm512_or_si512(x, _mm512_set1_epi32(0x04040000));  // slots 2, 3 sit in the block's second group of 4
}

inline __m512i Broadcast8(const uint8_t* p) {
  int64_t x;
  std::memcpy(&x, p, 8);
  return _mm512_set1_epi64(x);
}

inline __m512i Broadcast4(const uint8_t* p) {
  int32_t x;
  std::memcpy(&x, p, 4);
  return _mm512_set1_epi32(x);
}

struct SparsePair {
  __m512i w, pos;
  SparsePair(const uint8_t* t, const uint8_t* u) : w(ValueBytes(t, u)), pos(PositionBytes(t + 16, u + 16)) {}
  __m512i Dot(__m512i acc, const uint8_t* a) const {
    return _mm512_dpbusd_epi32(acc, _mm512_shuffle_epi8(Broadcast8(a), pos), w);
  }
};

struct DensePair {
  __m512i lo, hi;  // k 0..3, k 4..7
  DensePair(const uint8_t* t, const uint8_t* u) : lo(ValueBytes(t, u)), hi(ValueBytes(t + 16, u + 16)) {}
  __m512i Dot(__m512i acc, const uint8_t* a) const {
    return _mm512_dpbusd_epi32(_mm512_dpbusd_epi32(acc, Broadcast4(a), lo), Broadcast4(a + 4), hi);
  }
};

// Tile t's 8 values in the low half, tile u's in the high half.
inline __m512 PairFloats(const float* t, const float* u) {
  return _mm512_castsi512_ps(_mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_castps_si256(_mm256_loadu_ps(t))),
                                                _mm256_castps_si256(_mm256_loadu_ps(u)), 1));
}
inline __m512i PairInts(const int32_t* t, const int32_t* u) {
  return _mm512_inserti64x4(_mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(t))),
                            _mm256_loadu_si256(reinterpret_cast<const __m256i*>(u)), 1);
}

// Software prefetch this many bytes ahead in each of the two tiles' streams: with weights that do not
// fit the last-level cache (a model's decode step), 4096x4096 at one row ran 0.274 -> 0.250 ms per
// layer on a 2-core AMD EPYC (tools/bench_op.py --chain 8; 1 KiB ahead gave 0.256), unchanged in cache.
constexpr int64_t kPrefetchAhead = 4096;

template <typename Pair, int R>
void TilePairRows(const Matrix4& w, int64_t t, int64_t u, const uint8_t* aq, const float* ascale, int64_t lda,
                  float* acc) {
  __m512 y[R];
  for (int r = 0; r < R; ++r) y[r] = _mm512_setzero_ps();
  const int64_t bytes = w.block_bytes();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t b0 = g * w.blocks_per_group, nb = std::min(w.Kb - b0, w.blocks_per_group);
    const uint8_t* pt = w.tile(t) + b0 * bytes;
    const uint8_t* pu = w.tile(u) + b0 * bytes;
    __m512i even[R], odd[R];
    for (int r = 0; r < R; ++r) even[r] = odd[r] = _mm512_setzero_si512();
    int64_t b = 0;
    for (; b + 2 <= nb; b += 2) {
      _mm_prefetch(reinterpret_cast<const char*>(pt + b * bytes + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(pu + b * bytes + kPrefetchAhead), _MM_HINT_T0);
      const Pair p0(pt + b * bytes, pu + b * bytes), p1(pt + (b + 1) * bytes, pu + (b + 1) * bytes);
      for (int r = 0; r < R; ++r) {
        const uint8_t* a = aq + r * lda + (b0 + b) * kBlockK;
        even[r] = p0.Dot(even[r], a);
        odd[r] = p1.Dot(odd[r], a + kBlockK);
      }
    }
    if (b < nb) {
      const Pair p0(pt + b * bytes, pu + b * bytes);
      for (int r = 0; r < R; ++r) even[r] = p0.Dot(even[r], aq + r * lda + (b0 + b) * kBlockK);
    }
    const int64_t at = (t * w.groups + g) * kTileN, au = (u * w.groups + g) * kTileN;
    const __m512 wscale = PairFloats(w.scales + at, w.scales + au);
    const __m512i corr = PairInts(w.corr + at, w.corr + au);
    for (int r = 0; r < R; ++r) {
      const __m512 d = _mm512_cvtepi32_ps(_mm512_sub_epi32(_mm512_add_epi32(even[r], odd[r]), corr));
      y[r] = _mm512_fmadd_ps(d, _mm512_mul_ps(wscale, _mm512_set1_ps(ascale[r * w.groups + g])), y[r]);
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(acc + r * 2 * kTileN, y[r]);
}

// The AVX2 table this one extends (set once by Avx512Kernels).
const KernelTable* g_avx2 = nullptr;

template <typename Pair>
void GemmI8Impl(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda, float* y,
                int64_t ldy, int64_t t0, int64_t t1, bool accumulate) {
  alignas(64) float acc[4 * 2 * kTileN];  // [row][16]: tile t, then tile u
  alignas(64) float tile_u[4 * kTileN];
  for (int64_t t = t0; t < t1; t += 2) {
    const int64_t u = std::min(t + 1, t1 - 1);
    switch (M) {
      case 4: TilePairRows<Pair, 4>(w, t, u, aq, ascale, lda, acc); break;
      case 3: TilePairRows<Pair, 3>(w, t, u, aq, ascale, lda, acc); break;
      case 2: TilePairRows<Pair, 2>(w, t, u, aq, ascale, lda, acc); break;
      default: TilePairRows<Pair, 1>(w, t, u, aq, ascale, lda, acc); break;
    }
    // StoreTile reads [M][8] accumulators: compact tile t's rows in place, tile u's into tile_u.
    for (int64_t m = 0; m < M; ++m) {
      std::memcpy(tile_u + m * kTileN, acc + m * 2 * kTileN + kTileN, kTileN * sizeof(float));
      std::memmove(acc + m * kTileN, acc + m * 2 * kTileN, kTileN * sizeof(float));
    }
    StoreTile(acc, M, t, w.N, y, ldy, accumulate);
    if (u != t) StoreTile(tile_u, M, u, w.N, y, ldy, accumulate);
  }
}

void GemmI8(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda, float* y, int64_t ldy,
            int64_t t0, int64_t t1, bool accumulate) {
  if (M > 4) return g_avx2->gemm_i8(w, aq, ascale, M, lda, y, ldy, t0, t1, accumulate);
  (w.sparse ? GemmI8Impl<SparsePair> : GemmI8Impl<DensePair>)(w, aq, ascale, M, lda, y, ldy, t0, t1, accumulate);
}

}  // namespace

const KernelTable* Avx512Kernels(const KernelTable& avx2) {
  static const KernelTable table = [&] {
    g_avx2 = &avx2;
    KernelTable t = avx2;
    t.name = "avx512";
    t.gemm_i8 = GemmI8;
    return t;
  }();
  return &table;
}

}  // namespace slim
