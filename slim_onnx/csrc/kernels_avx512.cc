// AVX-512 (F, BW, VNNI) kernel for SlimMatMul's int8 path (accuracy_level 4), compiled with
// -mavx512f -mavx512bw -mavx512vnni and chosen at run time. The float path and everything else run the
// AVX2 kernels (kernels_avx2.cc).
//
// Layout. At prepack (Relayout) each pair of column tiles p = (2p, 2p+1) gets its own copy of its
// weights, arranged so that one 512-bit register holds a block of the pair's 16 columns: dword lane L
// is column L of the pair (tile 2p's 8 columns, then 2p+1's), byte s of the lane is slot s of that
// column. Per pair, K is walked in block order:
//   sparse, per quad of 4 blocks (192 bytes; Kb padded to whole quads with zero weights):
//     64 bytes: byte 4L+s holds slot s's value nibble (q + 8) of block 0 (low nibble) and block 1 (high);
//     64 bytes: the same for blocks 2 and 3;
//     64 bytes: byte 4L+s holds slot s's 2-bit position in blocks 0..3, block j at bits 2j.
//   dense, per block (64 bytes): byte 4L+s holds k = s in the low nibble and k = 4 + s in the high one.
// These are the packed form's bytes, permuted; per pair and scale group there are 16 scales (divided
// by 16) and 16 corrections (x 16, as float).
//
// Why this layout: the packed form interleaves each tile's values and positions, so decoding a block
// of two tiles took two inserts, two variable shifts and several masks: 5 shuffle-port operations per
// 64 multiply-adds, which bound the loop (7.2 cycles per block on a 2-core AMD EPYC). Here decoding is
// bitwise and shared: (x & 0xF0) ^ 0x80 is 16 q as a signed byte (one vpternlog, the low nibble first
// shifted up by 4, one shift per two blocks), and ((x >> 2j) & 3) | C is a block's pshufb index into 16
// activation bytes (two blocks) broadcast to every 128-bit lane, C = 4 for slots 2 and 3 (the block's
// second group of 4 k) plus 8 for an odd block.
//
// Loop structure, per pair and chunk of up to 4 rows:
//   for each scale group g, in chunks of at most kFlushBlocks blocks:
//     for each quad: acc[r] += vpdpbusd(pshufb(a_u8[16 k] in every lane, index_j), 16 q_j), j = 0..3
//     y[r] += (acc[r] - 16 corr_g) * (scale_g / 16) * a_scale[r, g]
// (blocks before the first whole quad of a group, and after its last, are taken one at a time with
// 8 broadcast activation bytes). vpdpbusd adds four u8 x s8 products into an int32 lane: no int16
// stage to widen, and two accumulators per row hide its latency.
#include <immintrin.h>

// GCC 12 reports the intentionally undefined pass-through operands inside its own AVX-512 intrinsics.
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

#include <algorithm>
#include <cstring>

#include "slim_kernels.h"

namespace slim {
namespace {

constexpr int64_t kQuadBlocks = 4;
constexpr int64_t kQuadBytes = 192;       // sparse: 4 blocks of a tile pair
constexpr int64_t kDenseBlockPairBytes = 64;  // dense: 1 block of a tile pair
constexpr int64_t kPairColumns = 2 * kTileN;
// |a_u8 * 16 q| <= 255 * 128 and 4 products per lane and block: 4096 blocks stay below 2^31.
constexpr int64_t kFlushBlocks = 4096;
// Software prefetch this many bytes ahead in the pair's stream: with weights that do not fit the
// last-level cache (a model's decode step) it saved 8% per layer on the packed form's two streams.
constexpr int64_t kPrefetchAhead = 4096;

int64_t PairStride(const Matrix4& w) {
  return w.sparse ? CeilDiv(w.Kb, kQuadBlocks) * kQuadBytes : w.Kb * kDenseBlockPairBytes;
}

// Entry e of a packed tile-block: its value nibble (q + 8) and, for a sparse block, its 2-bit position.
int PackedNibble(const uint8_t* rec, int e) { return e < 16 ? (rec[e] & 0x0F) : (rec[e - 16] >> 4); }
int PackedPosition(const uint8_t* rec, int e) { return (rec[16 + e % 8] >> (2 * (e / 8))) & 3; }

void Relayout(const Matrix4& w, KernelLayout& out) {
  const int64_t pairs = CeilDiv(w.Nt, 2), stride = PairStride(w);
  out.stride = stride;
  // 0x88: both nibbles q = 0 (the padding tile of an odd Nt and the padding blocks of the last quad).
  out.bytes.assign(pairs * stride, 0);
  out.scales.assign(pairs * w.groups * kPairColumns, 0.f);
  out.corr.assign(pairs * w.groups * kPairColumns, 0.f);
  for (int64_t p = 0; p < pairs; ++p) {
    uint8_t* dst = out.bytes.data() + p * stride;
    if (w.sparse) {
      for (int64_t q = 0; q < stride / kQuadBytes; ++q) std::memset(dst + q * kQuadBytes, 0x88, 128);
    } else {
      std::memset(dst, 0x88, stride);
    }
    for (int h = 0; h < 2; ++h) {
      const int64_t t = 2 * p + h;
      if (t >= w.Nt) break;
      for (int64_t b = 0; b < w.Kb; ++b) {
        const uint8_t* rec = w.tile(t) + b * w.block_bytes();
        if (w.sparse) {
          uint8_t* quad = dst + (b / kQuadBlocks) * kQuadBytes;
          const int j = int(b % kQuadBlocks);
          for (int e = 0; e < 32; ++e) {
            const int i = 4 * (8 * h + e / 4) + e % 4;  // lane 8h + column, byte = slot
            uint8_t& v = quad[(j / 2) * 64 + i];
            v = (j % 2 == 0) ? uint8_t((v & 0xF0) | PackedNibble(rec, e)) : uint8_t((v & 0x0F) | (PackedNibble(rec, e) << 4));
            quad[128 + i] |= uint8_t(PackedPosition(rec, e) << (2 * j));
          }
        } else {
          int8_t q[8][8];
          DecodeBlock(rec, false, q);
          uint8_t* blk = dst + b * kDenseBlockPairBytes;
          for (int c = 0; c < 8; ++c)
            for (int s = 0; s < 4; ++s) blk[4 * (8 * h + c) + s] = uint8_t((q[c][s] + 8) | ((q[c][4 + s] + 8) << 4));
        }
      }
      for (int64_t g = 0; g < w.groups; ++g)
        for (int c = 0; c < kTileN; ++c) {
          const int64_t from = (t * w.groups + g) * kTileN + c, to = (p * w.groups + g) * kPairColumns + kTileN * h + c;
          out.scales[to] = w.scales[from] / 16.f;
          out.corr[to] = 16.f * float(w.corr[from]);
        }
    }
  }
}

// 16 q as signed bytes from the nibbles in bits 4..7 of each byte (q + 8 there): (x & 0xF0) ^ 0x80.
inline __m512i SixteenQ(__m512i x) {
  return _mm512_ternarylogic_epi32(x, _mm512_set1_epi8(char(0xF0)), _mm512_set1_epi8(char(0x80)), 0x6A);
}
inline __m512i LowNibbles(__m512i x) { return SixteenQ(_mm512_slli_epi16(x, 4)); }
inline __m512i HighNibbles(__m512i x) { return SixteenQ(x); }

// pshufb index: (positions & 3) | c, c per slot byte (see the layout comment).
inline __m512i Index(__m512i positions, __m512i c) {
  return _mm512_ternarylogic_epi32(positions, _mm512_set1_epi8(3), c, 0xEA);
}
inline __m512i EvenBlockOffsets() { return _mm512_set1_epi32(0x04040000); }
inline __m512i OddBlockOffsets() { return _mm512_set1_epi32(0x0C0C0808); }

inline __m512i Load(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline __m512i Broadcast16(const uint8_t* p) {
  return _mm512_broadcast_i32x4(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
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
inline __m512i Dot(__m512i acc, __m512i a, __m512i w) { return _mm512_dpbusd_epi32(acc, a, w); }

// Independent vpdpbusd chains per row: its latency (4-5 cycles on a 2-core AMD EPYC) exceeds a
// block's work, so one row needs four chains to keep the port busy; with more rows two suffice and
// keep the registers for the rows.
template <int R>
constexpr int kChains = R == 1 ? 4 : 2;

// The products of one quad (blocks b .. b+3, whole) for R rows; a: row 0's activations at block b.
template <int R, int C = kChains<R>>
inline void SparseQuad(const uint8_t* quad, const uint8_t* a, int64_t lda, __m512i (&acc)[R][C]) {
  const __m512i v01 = Load(quad), v23 = Load(quad + 64), pos = Load(quad + 128);
  const __m512i w0 = LowNibbles(v01), w1 = HighNibbles(v01), w2 = LowNibbles(v23), w3 = HighNibbles(v23);
  const __m512i i0 = Index(pos, EvenBlockOffsets()), i1 = Index(_mm512_srli_epi16(pos, 2), OddBlockOffsets());
  const __m512i i2 = Index(_mm512_srli_epi16(pos, 4), EvenBlockOffsets());
  const __m512i i3 = Index(_mm512_srli_epi16(pos, 6), OddBlockOffsets());
  for (int r = 0; r < R; ++r) {
    const __m512i a01 = Broadcast16(a + r * lda), a23 = Broadcast16(a + r * lda + 2 * kBlockK);
    acc[r][0] = Dot(acc[r][0], _mm512_shuffle_epi8(a01, i0), w0);
    acc[r][1 % C] = Dot(acc[r][1 % C], _mm512_shuffle_epi8(a01, i1), w1);
    acc[r][2 % C] = Dot(acc[r][2 % C], _mm512_shuffle_epi8(a23, i2), w2);
    acc[r][3 % C] = Dot(acc[r][3 % C], _mm512_shuffle_epi8(a23, i3), w3);
  }
}

// One sparse block b on its own (8 activation bytes, so nothing past block b is read).
template <int R, int C = kChains<R>>
inline void SparseBlock(const uint8_t* pair, int64_t b, const uint8_t* a, int64_t lda, __m512i (&acc)[R][C]) {
  const uint8_t* quad = pair + (b / kQuadBlocks) * kQuadBytes;
  const int j = int(b % kQuadBlocks);
  const __m512i v = Load(quad + (j / 2) * 64);
  const __m512i wq = j % 2 == 0 ? LowNibbles(v) : HighNibbles(v);
  const __m512i index = Index(_mm512_srl_epi16(Load(quad + 128), _mm_cvtsi32_si128(2 * j)), EvenBlockOffsets());
  for (int r = 0; r < R; ++r) acc[r][j % 2] = Dot(acc[r][j % 2], _mm512_shuffle_epi8(Broadcast8(a + r * lda), index), wq);
}

// One dense block into chains c0 (k 0..3) and c1 (k 4..7).
template <int R, int C = kChains<R>>
inline void DenseBlock(const uint8_t* blk, const uint8_t* a, int64_t lda, __m512i (&acc)[R][C], int c0, int c1) {
  const __m512i v = Load(blk), lo = LowNibbles(v), hi = HighNibbles(v);
  for (int r = 0; r < R; ++r) {
    acc[r][c0] = Dot(acc[r][c0], Broadcast4(a + r * lda), lo);
    acc[r][c1] = Dot(acc[r][c1], Broadcast4(a + r * lda + 4), hi);
  }
}

// Blocks [b, end) of pair `pair` for R rows into the int32 accumulators.
template <bool kSparse, int R, int C = kChains<R>>
inline void PairBlocks(const uint8_t* pair, int64_t b, int64_t end, const uint8_t* aq, int64_t lda,
                       __m512i (&acc)[R][C]) {
  if (!kSparse) {
    for (; b + 2 <= end; b += 2) {
      const uint8_t* blk = pair + b * kDenseBlockPairBytes;
      _mm_prefetch(reinterpret_cast<const char*>(blk + kPrefetchAhead), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(blk + kDenseBlockPairBytes + kPrefetchAhead), _MM_HINT_T0);
      DenseBlock<R>(blk, aq + b * kBlockK, lda, acc, 0, 1);
      DenseBlock<R>(blk + kDenseBlockPairBytes, aq + (b + 1) * kBlockK, lda, acc, 2 % C, 3 % C);
    }
    if (b < end) DenseBlock<R>(pair + b * kDenseBlockPairBytes, aq + b * kBlockK, lda, acc, 0, 1);
    return;
  }
  for (; b < end && b % kQuadBlocks != 0; ++b) SparseBlock<R>(pair, b, aq + b * kBlockK, lda, acc);
  for (; b + kQuadBlocks <= end; b += kQuadBlocks) {
    const uint8_t* quad = pair + (b / kQuadBlocks) * kQuadBytes;
    for (int64_t line = 0; line < kQuadBytes; line += 64)
      _mm_prefetch(reinterpret_cast<const char*>(quad + line + kPrefetchAhead), _MM_HINT_T0);
    SparseQuad<R>(quad, aq + b * kBlockK, lda, acc);
  }
  for (; b < end; ++b) SparseBlock<R>(pair, b, aq + b * kBlockK, lda, acc);
}

// y[R][16] = rows [0, R) of aq times pair p's 16 columns.
template <bool kSparse, int R>
void PairRows(const Matrix4& w, int64_t p, const uint8_t* aq, const float* ascale, int64_t lda, float* y) {
  constexpr int C = kChains<R>;
  const KernelLayout& lay = *w.layout;
  const uint8_t* pair = lay.bytes.data() + p * lay.stride;
  __m512 sum[R];
  for (int r = 0; r < R; ++r) sum[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < w.groups; ++g) {
    const int64_t b0 = g * w.blocks_per_group, end = std::min(w.Kb, b0 + w.blocks_per_group);
    const int64_t at = (p * w.groups + g) * kPairColumns;
    const __m512 wscale = _mm512_loadu_ps(lay.scales.data() + at);
    __m512 scale[R];
    for (int r = 0; r < R; ++r) scale[r] = _mm512_mul_ps(wscale, _mm512_set1_ps(ascale[r * w.groups + g]));
    for (int64_t c0 = b0; c0 < end;) {
      const int64_t c1 = std::min(end, c0 + kFlushBlocks);
      __m512i acc[R][C];
      for (int r = 0; r < R; ++r)
        for (int c = 0; c < C; ++c) acc[r][c] = _mm512_setzero_si512();
      PairBlocks<kSparse, R>(pair, c0, c1, aq, lda, acc);
      const __m512 corr = c1 == end ? _mm512_loadu_ps(lay.corr.data() + at) : _mm512_setzero_ps();
      for (int r = 0; r < R; ++r) {
        __m512i total = acc[r][0];
        for (int c = 1; c < C; ++c) total = _mm512_add_epi32(total, acc[r][c]);
        sum[r] = _mm512_fmadd_ps(_mm512_sub_ps(_mm512_cvtepi32_ps(total), corr), scale[r], sum[r]);
      }
      c0 = c1;
    }
  }
  for (int r = 0; r < R; ++r) _mm512_storeu_ps(y + r * kPairColumns, sum[r]);
}

// The AVX2 table this one extends (set once by Avx512Kernels).
const KernelTable* g_avx2 = nullptr;

template <bool kSparse>
void GemmI8Pairs(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda, float* y,
                 int64_t ldy, int64_t t0, int64_t t1, bool accumulate) {
  // The loops prefetch kPrefetchAhead bytes ahead of themselves; the first bytes of this range
  // are fetched here, since whatever the thread ran before has evicted earlier prefetches.
  const uint8_t* first = w.layout->bytes.data() + (t0 / 2) * w.layout->stride;
  const int64_t head = std::min<int64_t>(kPrefetchAhead, (CeilDiv(t1, 2) - t0 / 2) * w.layout->stride);
  for (int64_t line = 0; line < head; line += 64) _mm_prefetch(reinterpret_cast<const char*>(first + line), _MM_HINT_T0);
  alignas(64) float out[4 * kPairColumns];
  for (int64_t p = t0 / 2; 2 * p < t1; ++p) {
    for (int64_t r0 = 0; r0 < M; r0 += 4) {
      const int64_t rows = std::min<int64_t>(4, M - r0);
      const uint8_t* a = aq + r0 * lda;
      const float* s = ascale + r0 * w.groups;
      switch (rows) {
        case 4: PairRows<kSparse, 4>(w, p, a, s, lda, out); break;
        case 3: PairRows<kSparse, 3>(w, p, a, s, lda, out); break;
        case 2: PairRows<kSparse, 2>(w, p, a, s, lda, out); break;
        default: PairRows<kSparse, 1>(w, p, a, s, lda, out); break;
      }
      // A task's range may start or end inside a pair: store only its own tiles.
      for (int64_t h = 0; h < 2; ++h) {
        const int64_t t = 2 * p + h;
        if (t < t0 || t >= t1) continue;
        const int64_t n0 = t * kTileN, nc = std::min(kTileN, w.N - n0);
        for (int64_t r = 0; r < rows; ++r) {
          float* dst = y + (r0 + r) * ldy + n0;
          const float* src = out + r * kPairColumns + h * kTileN;
          for (int64_t c = 0; c < nc; ++c) dst[c] = accumulate ? dst[c] + src[c] : src[c];
        }
      }
    }
  }
}

void GemmI8(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda, float* y, int64_t ldy,
            int64_t t0, int64_t t1, bool accumulate) {
  if (w.layout == nullptr) return g_avx2->gemm_i8(w, aq, ascale, M, lda, y, ldy, t0, t1, accumulate);
  (w.sparse ? GemmI8Pairs<true> : GemmI8Pairs<false>)(w, aq, ascale, M, lda, y, ldy, t0, t1, accumulate);
}

}  // namespace

const KernelTable* Avx512Kernels(const KernelTable& avx2) {
  static const KernelTable table = [&] {
    g_avx2 = &avx2;
    KernelTable t = avx2;
    t.name = "avx512";
    t.gemm_i8 = GemmI8;
    t.relayout = Relayout;
    return t;
  }();
  return &table;
}

}  // namespace slim
