// SlimMatMul CPU kernels: shared types and the portable tile-block decoder.
//
// Data layout (docs/op-spec.md): a 4-bit matrix [K, N] is stored as tiles of 8 output columns, each
// a linear run of blocks of 8 k. A sparse block is 24 bytes (32 kept values as nibbles + their
// 2-bit positions), a dense block 32 bytes (64 nibbles). Every kernel walks one tile at a time over
// its whole K range, so the packed weights are read in one linear sweep, and threads split tiles.
//
// Two arithmetic paths share that walk:
//   - float32: activations stay float; weights are decoded to float (scale folded in) per group.
//   - int8 (accuracy_level 4): activations are quantized per row and weight group to int8, stored
//     offset by +128 as uint8 so that pmaddubsw(u8 activation, s8 weight) applies; the offset adds
//     128 * sum(q) per group and column, which is precomputed at prepack (`corr`) and subtracted.
#pragma once

#include <cstddef>
#include <cstdint>
#include <new>
#include <vector>

namespace slim {

constexpr int64_t kTileN = 8;
constexpr int64_t kBlockK = 8;
constexpr int64_t kSparseBlockBytes = 24;
constexpr int64_t kDenseBlockBytes = 32;

inline int64_t CeilDiv(int64_t a, int64_t b) { return (a + b - 1) / b; }

struct KernelLayout;

// A packed 4-bit matrix, ready for the kernels.
struct Matrix4 {
  int64_t K = 0, N = 0;
  int64_t Kb = 0, Nt = 0;           // blocks along K, tiles along N
  int64_t groups = 0;               // scale groups along K
  int64_t blocks_per_group = 0;     // the last group may hold fewer
  bool sparse = true;
  const uint8_t* packed = nullptr;  // [Nt][Kb][block_bytes()]
  const float* scales = nullptr;    // [Nt][groups][8], padding columns 0
  const int32_t* corr = nullptr;    // [Nt][groups][8]: 128 * sum of q over the group
  const KernelLayout* layout = nullptr;  // the kernel table's own copy, when it makes one (relayout)
  int64_t block_bytes() const { return sparse ? kSparseBlockBytes : kDenseBlockBytes; }
  const uint8_t* tile(int64_t t) const { return packed + t * Kb * block_bytes(); }
};

// A kernel table's own arrangement of a Matrix4's weights, scales and corrections, made once at
// prepack; its meaning is the table's (kernels_avx512.cc).
// Allocates on 64-byte boundaries: the AVX-512 kernel reads whole cache lines, and malloc's 16-byte
// alignment would split every such load across two lines.
template <typename T>
struct CacheLineAllocator {
  using value_type = T;
  CacheLineAllocator() = default;
  template <typename U>
  CacheLineAllocator(const CacheLineAllocator<U>&) {}
  T* allocate(std::size_t n) {
    void* p = ::operator new(n * sizeof(T), std::align_val_t(64));
    return static_cast<T*>(p);
  }
  void deallocate(T* p, std::size_t) { ::operator delete(p, std::align_val_t(64)); }
  template <typename U>
  bool operator==(const CacheLineAllocator<U>&) const { return true; }
  template <typename U>
  bool operator!=(const CacheLineAllocator<U>&) const { return false; }
};

struct KernelLayout {
  std::vector<uint8_t, CacheLineAllocator<uint8_t>> bytes;
  std::vector<float, CacheLineAllocator<float>> scales, corr;
  int64_t stride = 0;  // bytes per unit of columns
};

// Decode one tile-block into q[c][k] (8 columns x 8 k, values in [-8, 7]). Scalar, used by the
// portable kernels and by prepacking.
inline void DecodeBlock(const uint8_t* blk, bool sparse, int8_t q[8][8]) {
  auto nibble = [](const uint8_t* rec, int e) -> int8_t {
    const int u = e < 16 ? (rec[e] & 0x0F) : (rec[e - 16] >> 4);
    return static_cast<int8_t>(u - 8);
  };
  for (int c = 0; c < 8; ++c)
    for (int k = 0; k < 8; ++k) q[c][k] = 0;
  if (sparse) {
    for (int e = 0; e < 32; ++e) {
      const int c = e / 4, s = e % 4;
      const int pos = (blk[16 + e % 8] >> (2 * (e / 8))) & 3;
      q[c][4 * (s >= 2) + pos] += nibble(blk, e);
    }
  } else {
    for (int h = 0; h < 2; ++h)
      for (int e = 0; e < 32; ++e) q[e / 4][4 * h + e % 4] = nibble(blk + 16 * h, e);
  }
}

// Kernel entry points. Each computes y[m][n] (+)= sum_k a[m][k] W[k][n] for the column tiles
// [t0, t1) and rows [0, M); `a` rows are zero-padded to Kb * 8 values; y has row stride ldy and only
// columns < N are written.
struct KernelTable {
  const char* name;
  void (*gemm_f32)(const Matrix4& w, const float* a, int64_t M, int64_t lda, float* y, int64_t ldy,
                   int64_t t0, int64_t t1, bool accumulate);
  // aq: uint8 (q + 128) [M][lda]; ascale: [M][w.groups] activation scales.
  void (*gemm_i8)(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda,
                  float* y, int64_t ldy, int64_t t0, int64_t t1, bool accumulate);
  // accuracy_level 4 activations: per row and K-group [g*G, min((g+1)*G, K)), inv = 127 / max|a|,
  // aq = rint(a * inv) + 128, scale = max|a| / 127 (0 and aq = 128 for an all-zero group). Only
  // k < K is written; callers prefill the padding with 128. `a` must be finite (the op computes rows
  // with a NaN or an infinity on the float path).
  void (*quantize_rows)(const float* a, int64_t M, int64_t lda, int64_t K, int64_t group_size, int64_t groups,
                        uint8_t* aq, float* scale);
  // Row-major float B [K][N] (float16 adapters), columns [n0, n1).
  void (*gemm_rowmajor_f32)(const float* a, int64_t M, int64_t lda, const float* b, int64_t K,
                            int64_t N, float* y, int64_t ldy, int64_t n0, int64_t n1, bool accumulate);
  // One query row of attention over n cached positions (keys, values: [n][d] rows): s_t = scale *
  // q.k_t (+ bias[t] when bias is not null), p = softmax(s), out[d] = sum_t p_t v_t; out = 0 when
  // every s_t is -inf, NaN when any s_t is NaN or +inf (as float softmax). `scores` is scratch of n floats.
  void (*attend_row)(const float* q, const float* keys, const float* values, int64_t n, int64_t d, float scale,
                     const float* bias, float* scores, float* out);
  // SwiGLU: out[i] = gate[i] * sigmoid(gate[i]) * up[i] for i < n.
  void (*silu_mul)(const float* gate, const float* up, int64_t n, float* out);
  // Arranges w for this table's gemm_i8 (which then reads w.layout); nullptr when gemm_i8 reads the
  // packed form. The copy costs as much memory as the packed weights.
  void (*relayout)(const Matrix4& w, KernelLayout& out);
};

// Write (or add) the [M][8] accumulator of tile t into y, skipping padding columns.
inline void StoreTile(const float* acc, int64_t M, int64_t t, int64_t N, float* y, int64_t ldy, bool accumulate) {
  const int64_t n0 = t * kTileN, nc = (N - n0) < kTileN ? (N - n0) : kTileN;
  for (int64_t m = 0; m < M; ++m) {
    float* out = y + m * ldy + n0;
    const float* in = acc + m * kTileN;
    for (int64_t c = 0; c < nc; ++c) out[c] = accumulate ? out[c] + in[c] : in[c];
  }
}

// aq[k] = rint(a[k] * inv) + 128 for k < n (the scalar tail of every quantize_rows).
void QuantizeGroupScalar(const float* a, int64_t n, float inv, uint8_t* aq);

const KernelTable& ScalarKernels();
const KernelTable* Avx2Kernels();  // nullptr when not compiled in
// The AVX2 table with AVX-512 VNNI int8 products for M <= 4 rows; nullptr when not compiled in.
const KernelTable* Avx512Kernels(const KernelTable& avx2);
// The best table the CPU runs: avx512 (AVX-512 F+BW+VNNI), else avx2 (AVX2+FMA+F16C), else scalar.
// SLIM_ONNX_KERNEL=avx2 or =scalar caps the choice.
const KernelTable& SelectKernels();

}  // namespace slim
