// AVX2 + FMA kernels for SlimMatMul (compiled with -mavx2 -mfma -mf16c, chosen at run time).
//
// Loop structure, per column tile of 8 (threads split tiles):
//   for each scale group g of the tile:
//     the group's blocks come either straight from the packed weights, decoded in registers
//     (M <= 4: every block is used once), or from a "panel" decoded once per group into L1/L2
//     and reused by every chunk of 4 rows (M > 4);
//     for each chunk of up to 4 rows, per block:
//       float sparse: y += vpermps(a[8b..8b+7], pos_s) * w_s, s = 0..3 (w_s: slot s, scale folded in)
//       float dense:  y += broadcast(a[8b+k]) * w_k, k = 0..7
//       int8 sparse:  acc16 += pmaddubsw(pshufb(a_u8[8b..8b+7], pos), w)
//       int8 dense:   acc16 += pmaddubsw(bcast32(a_u8[8b..8b+3]), w_lo) + pmaddubsw(bcast32(a_u8[8b+4..]), w_hi)
//     int8 sums are widened to int32 before int16 can overflow and turned into float once per group:
//       y += (dot - corr_g) * a_scale[row, g] * w_scale[g].
//
// Decoding uses the layout's design: a 16-byte nibble record broadcast to both 128-bit lanes and
// shifted right by (0, 0, 4, 4) bits per 64-bit word, masked to 0x0F, gives entry e in byte e; the
// 8 position bytes broadcast to all four 64-bit words and shifted by (0, 2, 4, 6) give entry e's
// 2-bit position in byte e. Entry e = column e/4, slot e%4, i.e. int32 lane c holds column c.
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "slim_kernels.h"

namespace slim {
namespace {

// Broadcasts straight from memory (one load uop each; going through a general register is slower).
inline __m256i Broadcast8Bytes(const uint8_t* p) {
  return _mm256_broadcastq_epi64(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p)));
}
inline __m256i Broadcast4Bytes(const uint8_t* p) {
  return _mm256_castps_si256(_mm256_broadcast_ss(reinterpret_cast<const float*>(p)));
}

// Signed 4-bit values of a 16-byte nibble record, entry e in byte e.
inline __m256i ValueBytes(const uint8_t* rec) {
  __m256i v = _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(rec)));
  v = _mm256_srlv_epi64(v, _mm256_set_epi64x(4, 4, 0, 0));
  v = _mm256_and_si256(v, _mm256_set1_epi8(0x0F));
  return _mm256_sub_epi8(v, _mm256_set1_epi8(8));
}

// k inside the block (0..7) of each sparse entry, entry e in byte e.
inline __m256i PositionBytes(const uint8_t* pos) {
  __m256i x = _mm256_srlv_epi64(Broadcast8Bytes(pos), _mm256_set_epi64x(6, 4, 2, 0));
  x = _mm256_and_si256(x, _mm256_set1_epi8(3));
  return _mm256_or_si256(x, _mm256_set1_epi32(0x04040000));  // slots 2, 3 sit in the block's second group of 4
}

// Byte s of each int32 lane, sign-extended, as float: slot s of the 8 columns.
template <int S>
inline __m256 SlotFloat(__m256i bytes) {
  return _mm256_cvtepi32_ps(_mm256_srai_epi32(_mm256_slli_epi32(bytes, 24 - 8 * S), 24));
}

// ---- decoded blocks: what one block contributes, and how it multiplies one row ----------------------

struct SparseI8Block {
  __m256i w, pos;
  static constexpr int kMaddsPerBlock = 1;
  static SparseI8Block Decode(const uint8_t* blk, __m256) { return {ValueBytes(blk), PositionBytes(blk + 16)}; }
  __m256i Dot(const uint8_t* a) const {
    return _mm256_maddubs_epi16(_mm256_shuffle_epi8(Broadcast8Bytes(a), pos), w);
  }
};

struct DenseI8Block {
  __m256i lo, hi;  // k 0..3, k 4..7
  static constexpr int kMaddsPerBlock = 2;
  static DenseI8Block Decode(const uint8_t* blk, __m256) { return {ValueBytes(blk), ValueBytes(blk + 16)}; }
  __m256i Dot(const uint8_t* a) const {
    return _mm256_add_epi16(_mm256_maddubs_epi16(Broadcast4Bytes(a), lo), _mm256_maddubs_epi16(Broadcast4Bytes(a + 4), hi));
  }
};

struct SparseF32Block {
  __m256 w[4];
  __m256i pos[4];
  static SparseF32Block Decode(const uint8_t* blk, __m256 scale) {
    const __m256i v = ValueBytes(blk), p = PositionBytes(blk + 16);
    // vpermps reads the low 3 bits of each lane: shifting byte s down is enough.
    return {{_mm256_mul_ps(SlotFloat<0>(v), scale), _mm256_mul_ps(SlotFloat<1>(v), scale),
             _mm256_mul_ps(SlotFloat<2>(v), scale), _mm256_mul_ps(SlotFloat<3>(v), scale)},
            {p, _mm256_srli_epi32(p, 8), _mm256_srli_epi32(p, 16), _mm256_srli_epi32(p, 24)}};
  }
  // Two accumulators per row: one FMA chain would wait on the FMA latency.
  void Fma(const float* a, __m256& even, __m256& odd) const {
    const __m256 av = _mm256_loadu_ps(a);
    for (int s = 0; s < 4; s += 2) {
      even = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(av, pos[s]), w[s], even);
      odd = _mm256_fmadd_ps(_mm256_permutevar8x32_ps(av, pos[s + 1]), w[s + 1], odd);
    }
  }
};

struct DenseF32Block {
  __m256 w[8];
  static DenseF32Block Decode(const uint8_t* blk, __m256 scale) {
    DenseF32Block out;
    for (int h = 0; h < 2; ++h) {
      const __m256i v = ValueBytes(blk + 16 * h);
      out.w[4 * h + 0] = _mm256_mul_ps(SlotFloat<0>(v), scale);
      out.w[4 * h + 1] = _mm256_mul_ps(SlotFloat<1>(v), scale);
      out.w[4 * h + 2] = _mm256_mul_ps(SlotFloat<2>(v), scale);
      out.w[4 * h + 3] = _mm256_mul_ps(SlotFloat<3>(v), scale);
    }
    return out;
  }
  void Fma(const float* a, __m256& even, __m256& odd) const {
    for (int k = 0; k < 8; k += 2) {
      even = _mm256_fmadd_ps(_mm256_broadcast_ss(a + k), w[k], even);
      odd = _mm256_fmadd_ps(_mm256_broadcast_ss(a + k + 1), w[k + 1], odd);
    }
  }
};

// What a panel stores for a decoded block. A sparse float block is expanded to 8 dense k-vectors
// (zeros included): per row that costs 8 broadcast-FMAs instead of 4 vpermps + 4 FMAs, and vpermps
// is the bottleneck once the decode is shared by many rows.
template <typename Block>
struct PanelEntry {
  using type = Block;
  static const Block& From(const Block& b) { return b; }
};

template <>
struct PanelEntry<SparseF32Block> {
  using type = DenseF32Block;
  static DenseF32Block From(const SparseF32Block& b) {
    DenseF32Block out;
    const __m256i low3 = _mm256_set1_epi32(7);
    for (int k = 0; k < 8; ++k) {
      const __m256i kv = _mm256_set1_epi32(k);
      const int s0 = k < 4 ? 0 : 2;  // slots 0, 1 hold k 0..3; slots 2, 3 hold k 4..7
      const __m256 m0 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b.pos[s0], low3), kv));
      const __m256 m1 = _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(b.pos[s0 + 1], low3), kv));
      out.w[k] = _mm256_add_ps(_mm256_and_ps(m0, b.w[s0]), _mm256_and_ps(m1, b.w[s0 + 1]));
    }
    return out;
  }
};

// Where a chunk of rows gets block b of the current group from.
template <typename Block>
struct DirectBlocks {
  const uint8_t* packed;
  int64_t bytes;
  __m256 scale;
  Block operator()(int64_t b) const { return Block::Decode(packed + b * bytes, scale); }
};

template <typename Block>
struct PanelBlocks {
  const Block* panel;
  const Block& operator()(int64_t b) const { return panel[b]; }
};

// ---- row kernels: R rows (1..4) against nb blocks --------------------------------------------------

template <int R, typename Blocks>
void RowsF32(const Blocks& blocks, int64_t nb, const float* a, int64_t lda, float* acc) {
  __m256 even[R], odd[R];
  for (int r = 0; r < R; ++r) even[r] = _mm256_loadu_ps(acc + r * kTileN), odd[r] = _mm256_setzero_ps();
  for (int64_t b = 0; b < nb; ++b) {
    const auto& blk = blocks(b);  // a reference: copying a panel entry goes through the stack
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) blk.Fma(a + r * lda + b * kBlockK, even[r], odd[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc + r * kTileN, _mm256_add_ps(even[r], odd[r]));
}

// int16 partial sums hold at most 8 pmaddubsw results (|each| <= 2 * 255 * 8 = 4080) before they
// are widened to int32.
constexpr int kMaddsPerWiden = 8;

template <typename Block, int R, typename Blocks>
void RowsI8(const Blocks& blocks, int64_t nb, const uint8_t* a, int64_t lda, __m256i* dots) {
  constexpr int kBlocksPerWiden = kMaddsPerWiden / Block::kMaddsPerBlock;
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc32[R], acc16[R];
  for (int r = 0; r < R; ++r) acc32[r] = acc16[r] = _mm256_setzero_si256();
  for (int64_t b = 0; b < nb; ++b) {
    const auto& blk = blocks(b);  // a reference: copying a panel entry goes through the stack
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc16[r] = _mm256_add_epi16(acc16[r], blk.Dot(a + r * lda + b * kBlockK));
    if ((b + 1) % kBlocksPerWiden == 0)
      for (int r = 0; r < R; ++r) {
        acc32[r] = _mm256_add_epi32(acc32[r], _mm256_madd_epi16(acc16[r], ones));
        acc16[r] = _mm256_setzero_si256();
      }
  }
  for (int r = 0; r < R; ++r) dots[r] = _mm256_add_epi32(acc32[r], _mm256_madd_epi16(acc16[r], ones));
}

// Calls fn.template operator()<R>(m0) for each chunk of up to 4 rows.
template <typename Fn>
void ForRowChunks(int64_t M, Fn&& fn) {
  int64_t m0 = 0;
  for (; m0 + 4 <= M; m0 += 4) fn.template operator()<4>(m0);
  switch (M - m0) {
    case 3: fn.template operator()<3>(m0); break;
    case 2: fn.template operator()<2>(m0); break;
    case 1: fn.template operator()<1>(m0); break;
    default: break;
  }
}

// Per-thread scratch: decoded panels and the [M][8] accumulators of the current tile.
struct alignas(32) Vec256 {
  uint8_t bytes[32];
};
thread_local std::vector<Vec256> tl_panel;
thread_local std::vector<float> tl_acc;

// Thread-local scratch sized for one call; fetched once per call because each thread_local access
// from a shared library costs a __tls_get_addr call.
template <typename Block>
typename PanelEntry<Block>::type* PanelScratch(const Matrix4& w, int64_t M) {
  using Entry = typename PanelEntry<Block>::type;
  if (M <= 4) return nullptr;
  tl_panel.resize(w.blocks_per_group * sizeof(Entry) / sizeof(Vec256));
  return reinterpret_cast<Entry*>(tl_panel.data());
}

float* AccScratch(int64_t M) {
  tl_acc.resize(M * kTileN);
  return tl_acc.data();
}

// Runs `rows(blocks)` for the group's blocks [b0, b0 + nb) of tile t: decoded on the fly when
// there is no panel (M <= 4), else decoded once into the panel.
template <typename Block, typename Rows>
void ForGroupBlocks(const Matrix4& w, int64_t t, int64_t b0, int64_t nb, __m256 scale,
                    typename PanelEntry<Block>::type* panel, Rows&& rows) {
  const DirectBlocks<Block> direct{w.tile(t) + b0 * w.block_bytes(), w.block_bytes(), scale};
  if (panel == nullptr) {
    rows(direct);
    return;
  }
  for (int64_t b = 0; b < nb; ++b) panel[b] = PanelEntry<Block>::From(direct(b));
  rows(PanelBlocks<typename PanelEntry<Block>::type>{panel});
}

// M > 4 rows on the float path: two column tiles at a time share every broadcast activation, which
// gives 8 independent FMA chains per k for 4 rows and makes the loop FMA-bound, not load-bound.
template <int R>
void RowsF32TilePair(const DenseF32Block* pairs, int64_t nb, const float* a, int64_t lda, float* acc0, float* acc1) {
  __m256 s0[R], s1[R];
  for (int r = 0; r < R; ++r) s0[r] = _mm256_loadu_ps(acc0 + r * kTileN), s1[r] = _mm256_loadu_ps(acc1 + r * kTileN);
  for (int64_t b = 0; b < nb; ++b) {
    const DenseF32Block& p0 = pairs[2 * b];
    const DenseF32Block& p1 = pairs[2 * b + 1];
#pragma GCC unroll 8
    for (int k = 0; k < 8; ++k)
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) {
        const __m256 av = _mm256_broadcast_ss(a + r * lda + b * kBlockK + k);
        s0[r] = _mm256_fmadd_ps(av, p0.w[k], s0[r]);
        s1[r] = _mm256_fmadd_ps(av, p1.w[k], s1[r]);
      }
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(acc0 + r * kTileN, s0[r]), _mm256_storeu_ps(acc1 + r * kTileN, s1[r]);
}

template <typename Block>
void GemmF32Impl(const Matrix4& w, const float* a, int64_t M, int64_t lda, float* y, int64_t ldy, int64_t t0,
                 int64_t t1, bool accumulate) {
  float* acc = AccScratch(2 * M);
  float* acc1 = acc + M * kTileN;
  if (M <= 4) {
    for (int64_t t = t0; t < t1; ++t) {
      std::fill(acc, acc + M * kTileN, 0.f);
      for (int64_t g = 0; g < w.groups; ++g) {
        const int64_t b0 = g * w.blocks_per_group, nb = std::min(w.Kb - b0, w.blocks_per_group);
        const __m256 scale = _mm256_loadu_ps(w.scales + (t * w.groups + g) * kTileN);
        const DirectBlocks<Block> blocks{w.tile(t) + b0 * w.block_bytes(), w.block_bytes(), scale};
        ForRowChunks(M, [&]<int R>(int64_t m0) {
          RowsF32<R>(blocks, nb, a + m0 * lda + b0 * kBlockK, lda, acc + m0 * kTileN);
        });
      }
      StoreTile(acc, M, t, w.N, y, ldy, accumulate);
    }
    return;
  }
  tl_panel.resize(2 * w.blocks_per_group * sizeof(DenseF32Block) / sizeof(Vec256));
  DenseF32Block* pairs = reinterpret_cast<DenseF32Block*>(tl_panel.data());
  for (int64_t t = t0; t < t1; t += 2) {
    const int64_t u = std::min(t + 1, t1 - 1);  // an odd last tile is paired with itself
    std::fill(acc, acc + 2 * M * kTileN, 0.f);
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t b0 = g * w.blocks_per_group, nb = std::min(w.Kb - b0, w.blocks_per_group);
      for (int64_t i = 0; i < 2; ++i) {
        const int64_t tile = i == 0 ? t : u;
        const __m256 scale = _mm256_loadu_ps(w.scales + (tile * w.groups + g) * kTileN);
        const DirectBlocks<Block> blocks{w.tile(tile) + b0 * w.block_bytes(), w.block_bytes(), scale};
        for (int64_t b = 0; b < nb; ++b) pairs[2 * b + i] = PanelEntry<Block>::From(blocks(b));
      }
      ForRowChunks(M, [&]<int R>(int64_t m0) {
        RowsF32TilePair<R>(pairs, nb, a + m0 * lda + b0 * kBlockK, lda, acc + m0 * kTileN, acc1 + m0 * kTileN);
      });
    }
    StoreTile(acc, M, t, w.N, y, ldy, accumulate);
    if (u != t) StoreTile(acc1, M, u, w.N, y, ldy, accumulate);
  }
}

template <typename Block>
void GemmI8Impl(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda, float* y,
                int64_t ldy, int64_t t0, int64_t t1, bool accumulate) {
  float* acc = AccScratch(M);
  auto* panel = PanelScratch<Block>(w, M);
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc, acc + M * kTileN, 0.f);
    for (int64_t g = 0; g < w.groups; ++g) {
      const int64_t b0 = g * w.blocks_per_group, nb = std::min(w.Kb - b0, w.blocks_per_group);
      const __m256 wscale = _mm256_loadu_ps(w.scales + (t * w.groups + g) * kTileN);
      const __m256i corr = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w.corr + (t * w.groups + g) * kTileN));
      ForGroupBlocks<Block>(w, t, b0, nb, wscale, panel, [&](const auto& blocks) {
        ForRowChunks(M, [&]<int R>(int64_t m0) {
          __m256i dots[R];
          RowsI8<Block, R>(blocks, nb, aq + m0 * lda + b0 * kBlockK, lda, dots);
          for (int r = 0; r < R; ++r) {
            float* row = acc + (m0 + r) * kTileN;
            const __m256 s = _mm256_mul_ps(wscale, _mm256_set1_ps(ascale[(m0 + r) * w.groups + g]));
            const __m256 d = _mm256_cvtepi32_ps(_mm256_sub_epi32(dots[r], corr));
            _mm256_storeu_ps(row, _mm256_fmadd_ps(d, s, _mm256_loadu_ps(row)));
          }
        });
      });
    }
    StoreTile(acc, M, t, w.N, y, ldy, accumulate);
  }
}

void GemmF32(const Matrix4& w, const float* a, int64_t M, int64_t lda, float* y, int64_t ldy, int64_t t0, int64_t t1,
             bool accumulate) {
  (w.sparse ? GemmF32Impl<SparseF32Block> : GemmF32Impl<DenseF32Block>)(w, a, M, lda, y, ldy, t0, t1, accumulate);
}

void GemmI8(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda, float* y, int64_t ldy,
            int64_t t0, int64_t t1, bool accumulate) {
  (w.sparse ? GemmI8Impl<SparseI8Block> : GemmI8Impl<DenseI8Block>)(w, aq, ascale, M, lda, y, ldy, t0, t1, accumulate);
}

// ---- activation quantization (accuracy_level 4) --------------------------------------------------

void QuantizeRows(const float* a, int64_t M, int64_t lda, int64_t K, int64_t group_size, int64_t groups, uint8_t* aq,
                  float* scale) {
  const __m256 abs_mask = _mm256_castsi256_ps(_mm256_set1_epi32(0x7FFFFFFF));
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size, n = std::min(K, k0 + group_size) - k0;
      const float* row = a + m * lda + k0;
      uint8_t* out = aq + m * lda + k0;
      __m256 vmax = _mm256_setzero_ps();
      int64_t k = 0;
      for (; k + 8 <= n; k += 8) vmax = _mm256_max_ps(vmax, _mm256_and_ps(_mm256_loadu_ps(row + k), abs_mask));
      alignas(32) float lanes[8];
      _mm256_store_ps(lanes, vmax);
      float amax = 0.f;
      for (float v : lanes) amax = std::max(amax, v);
      for (int64_t j = k; j < n; ++j) amax = std::max(amax, std::fabs(row[j]));
      scale[m * groups + g] = amax / 127.f;
      const float inv = amax == 0.f ? 0.f : 127.f / amax;
      const __m256 vinv = _mm256_set1_ps(inv);
      const __m256i offset = _mm256_set1_epi32(128);
      for (k = 0; k + 8 <= n; k += 8) {
        // cvtps rounds to nearest even, as rint does; packing keeps 4 bytes per 128-bit lane.
        const __m256i q = _mm256_add_epi32(_mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(row + k), vinv)), offset);
        const __m256i packed = _mm256_packus_epi16(_mm256_packus_epi32(q, q), _mm256_setzero_si256());
        const int32_t lo = _mm256_extract_epi32(packed, 0), hi = _mm256_extract_epi32(packed, 4);
        std::memcpy(out + k, &lo, 4);
        std::memcpy(out + k + 4, &hi, 4);
      }
      QuantizeGroupScalar(row + k, n - k, inv, out + k);
    }
}

// ---- row-major float B (float16 adapters after prepack) -----------------------------------------

void GemmRowMajorF32(const float* a, int64_t M, int64_t lda, const float* b, int64_t K, int64_t N, float* y,
                     int64_t ldy, int64_t n0, int64_t n1, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    float* out = y + m * ldy;
    if (!accumulate) std::fill(out + n0, out + n1, 0.f);
    for (int64_t k = 0; k < K; ++k) {
      const __m256 av = _mm256_set1_ps(a[m * lda + k]);
      const float* br = b + k * N;
      int64_t n = n0;
      for (; n + 8 <= n1; n += 8)
        _mm256_storeu_ps(out + n, _mm256_fmadd_ps(av, _mm256_loadu_ps(br + n), _mm256_loadu_ps(out + n)));
      for (; n < n1; ++n) out[n] += a[m * lda + k] * br[n];
    }
  }
}

// ---- attention rows --------------------------------------------------------------------------------

float HorizontalSum(__m256 v) {
  const __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  const __m128 h = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(h, _mm_shuffle_ps(h, h, 1)));
}

// e^x for x <= 0 (softmax arguments): x = n ln2 + r with |r| <= ln2/2 (ln2 split in two for exact
// n ln2), e^r by its degree-6 Taylor polynomial (relative error < 2e-7), times 2^n built in the
// exponent bits; below -87 (where 2^n would leave the normal range) the result is 0.
__m256 ExpNonPositive(__m256 x) {
  const __m256 tiny = _mm256_cmp_ps(x, _mm256_set1_ps(-87.f), _CMP_LT_OQ);
  x = _mm256_max_ps(x, _mm256_set1_ps(-87.f));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504f)), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m256 r = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693145751953125f), x);
  r = _mm256_fnmadd_ps(n, _mm256_set1_ps(1.428606765330187e-06f), r);
  __m256 p = _mm256_set1_ps(1.f / 720);
  for (const float c : {1.f / 120, 1.f / 24, 1.f / 6, 0.5f, 1.f, 1.f}) p = _mm256_fmadd_ps(p, r, _mm256_set1_ps(c));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_andnot_ps(tiny, _mm256_mul_ps(p, _mm256_castsi256_ps(pow2)));
}

// Sums of each of four vectors: {sum a, sum b, sum c, sum d}.
__m128 HorizontalSums4(__m256 a, __m256 b, __m256 c, __m256 d) {
  const __m256 s = _mm256_hadd_ps(_mm256_hadd_ps(a, b), _mm256_hadd_ps(c, d));
  return _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
}

// out[0 .. 8R) = inv * sum_t w[t] * values[t * ld + (0 .. 8R)], the sums held in R registers.
template <int R>
void WeightedSum(const float* w, const float* values, int64_t n, int64_t ld, float inv, float* out) {
  __m256 acc[R];
  for (int r = 0; r < R; ++r) acc[r] = _mm256_setzero_ps();
  for (int64_t t = 0; t < n; ++t) {
    const __m256 p = _mm256_set1_ps(w[t]);
    for (int r = 0; r < R; ++r) acc[r] = _mm256_fmadd_ps(p, _mm256_loadu_ps(values + t * ld + 8 * r), acc[r]);
  }
  for (int r = 0; r < R; ++r) _mm256_storeu_ps(out + 8 * r, _mm256_mul_ps(acc[r], _mm256_set1_ps(inv)));
}

void AttendRow(const float* q, const float* keys, const float* values, int64_t n, int64_t d, float scale,
               const float* bias, float* scores, float* out) {
  const int64_t dv = d / 8 * 8;
  // q . k_t for four keys at a time: four independent FMA chains share each load of q.
  int64_t t = 0;
  for (; t + 4 <= n; t += 4) {
    const float* k = keys + t * d;
    __m256 acc[4] = {_mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps(), _mm256_setzero_ps()};
    for (int64_t i = 0; i < dv; i += 8) {
      const __m256 qv = _mm256_loadu_ps(q + i);
      for (int j = 0; j < 4; ++j) acc[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * d + i), acc[j]);
    }
    _mm_storeu_ps(scores + t, HorizontalSums4(acc[0], acc[1], acc[2], acc[3]));
    for (int64_t i = dv; i < d; ++i)
      for (int j = 0; j < 4; ++j) scores[t + j] += q[i] * k[j * d + i];
  }
  for (; t < n; ++t) {
    __m256 acc = _mm256_setzero_ps();
    for (int64_t i = 0; i < dv; i += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_loadu_ps(keys + t * d + i), acc);
    scores[t] = HorizontalSum(acc);
    for (int64_t i = dv; i < d; ++i) scores[t] += q[i] * keys[t * d + i];
  }
  float top = -INFINITY;
  bool nan = false;
  for (t = 0; t < n; ++t) {
    scores[t] = scores[t] * scale + (bias ? bias[t] : 0.f);
    top = std::max(top, scores[t]);
    nan |= std::isnan(scores[t]);
  }
  if (nan || top == INFINITY) {  // softmax is NaN everywhere, as exp(inf - inf) is
    std::fill(out, out + d, NAN);
    return;
  }
  if (top == -INFINITY) {  // every position masked: no weights (the export turns softmax's NaN into 0)
    std::fill(out, out + d, 0.f);
    return;
  }
  const __m256 vtop = _mm256_set1_ps(top);
  __m256 vsum = _mm256_setzero_ps();
  for (t = 0; t + 8 <= n; t += 8) {
    const __m256 e = ExpNonPositive(_mm256_sub_ps(_mm256_loadu_ps(scores + t), vtop));
    _mm256_storeu_ps(scores + t, e);
    vsum = _mm256_add_ps(vsum, e);
  }
  float sum = HorizontalSum(vsum);
  for (; t < n; ++t) sum += scores[t] = std::exp(scores[t] - top);
  const float inv = 1.f / sum;
  // out = sum_t p_t v_t, 64 values of d at a time in eight registers.
  for (int64_t i0 = 0; i0 < dv; i0 += 64) {
    switch (std::min<int64_t>(8, (dv - i0) / 8)) {
      case 8: WeightedSum<8>(scores, values + i0, n, d, inv, out + i0); break;
      case 7: WeightedSum<7>(scores, values + i0, n, d, inv, out + i0); break;
      case 6: WeightedSum<6>(scores, values + i0, n, d, inv, out + i0); break;
      case 5: WeightedSum<5>(scores, values + i0, n, d, inv, out + i0); break;
      case 4: WeightedSum<4>(scores, values + i0, n, d, inv, out + i0); break;
      case 3: WeightedSum<3>(scores, values + i0, n, d, inv, out + i0); break;
      case 2: WeightedSum<2>(scores, values + i0, n, d, inv, out + i0); break;
      default: WeightedSum<1>(scores, values + i0, n, d, inv, out + i0); break;
    }
  }
  for (int64_t i = dv; i < d; ++i) {
    float s = 0.f;
    for (t = 0; t < n; ++t) s += scores[t] * values[t * d + i];
    out[i] = s * inv;
  }
}

// As the scalar SiluMul: sigmoid(g) = (g >= 0 ? 1 : e) / (1 + e) with e = e^-|g|.
void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  const __m256 one = _mm256_set1_ps(1.f), sign = _mm256_set1_ps(-0.f);
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    const __m256 g = _mm256_loadu_ps(gate + i);
    const __m256 e = ExpNonPositive(_mm256_or_ps(g, sign));  // -|g|
    const __m256 num = _mm256_blendv_ps(one, e, g);           // sign bit of g set: e
    const __m256 sig = _mm256_div_ps(num, _mm256_add_ps(one, e));
    _mm256_storeu_ps(out + i, _mm256_mul_ps(_mm256_mul_ps(g, sig), _mm256_loadu_ps(up + i)));
  }
  if (i < n) ScalarKernels().silu_mul(gate + i, up + i, n - i, out + i);
}

}  // namespace

const KernelTable* Avx2Kernels() {
  static const KernelTable table{"avx2", GemmF32, GemmI8, QuantizeRows, GemmRowMajorF32, AttendRow, SiluMul, nullptr};
  return &table;
}

}  // namespace slim
