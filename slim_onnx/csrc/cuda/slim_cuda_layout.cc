// Re-lays a SlimMatMul weight from the op-spec layout into the fragment order the CUDA kernels read
// (see slim_cuda.h and the layout notes at the top of slim_cuda_kernels.cu). Runs once per node at
// session creation, on the host.
#include <algorithm>
#include <stdexcept>
#include <string>

#include "slim_cuda.h"

namespace slim::cuda {
namespace {

// The dense int8 matrix Q^T [rows = 16 * NT][cols = KS * 4 * chunk k], zero-padded.
struct DenseT {
  int64_t rows, cols;
  std::vector<int8_t> q;
  int8_t at(int64_t n, int64_t k) const { return q[n * cols + k]; }
};

DenseT DecodeAll(const Matrix4& m, int64_t rows, int64_t cols) {
  DenseT d{rows, cols, std::vector<int8_t>(rows * cols, 0)};
  int8_t blk[8][8];
  for (int64_t t = 0; t < m.Nt; ++t)
    for (int64_t b = 0; b < m.Kb; ++b) {
      DecodeBlock(m.tile(t) + b * m.block_bytes(), m.sparse, blk);
      for (int c = 0; c < 8; ++c)
        for (int k = 0; k < 8; ++k) {
          const int64_t n = t * kTileN + c, kk = b * kBlockK + k;
          if (n < m.N && kk < m.K) d.q[n * cols + kk] = blk[c][k];
        }
    }
  return d;
}

// 4-bit values of one lane's A fragment (a0..a7) in the order the kernel's decoder expects: a0 at
// bits 0-3, a1 at 16-19, a2 at 4-7, a3 at 20-23, a4 at 8-11, a5 at 24-27, a6 at 12-15, a7 at 28-31
// (each stored as q + 8), so that masking 0x000F000F / 0x00F000F0 of the word and of the word >> 8
// yields the half2 registers (a0,a1), (a2,a3), (a4,a5), (a6,a7).
uint32_t PackFragment(const int (&a)[8]) {
  static constexpr int kShift[8] = {0, 16, 4, 20, 8, 24, 12, 28};
  uint32_t word = 0;
  for (int i = 0; i < 8; ++i) word |= uint32_t(a[i] + 8) << kShift[i];
  return word;
}

// The two kept positions (p0 < p1) of a group of 4 and their values; a group with fewer than two
// nonzeros is completed with the lowest free positions (value 0), as mma.sp's ordered metadata needs.
struct Pair {
  int p0, p1, v0, v1;
};

Pair KeptPair(const DenseT& d, int64_t n, int64_t k) {
  int pos[4], count = 0;
  for (int p = 0; p < 4; ++p)
    if (d.at(n, k + p) != 0) {
      if (count == 2)
        throw std::runtime_error("weight column " + std::to_string(n) + " has more than 2 nonzeros in k " +
                                 std::to_string(k) + ".." + std::to_string(k + 3) + " although sparse=1");
      pos[count++] = p;
    }
  for (int p = 0; p < 4 && count < 2; ++p)
    if (std::find(pos, pos + count, p) == pos + count) pos[count++] = p;
  std::sort(pos, pos + 2);
  return {pos[0], pos[1], d.at(n, k + pos[0]), d.at(n, k + pos[1])};
}

uint16_t HalfBits(const uint16_t* scales_f16, int64_t N, int64_t g, int64_t n) {
  return n < N ? scales_f16[g * N + n] : uint16_t(0);
}

}  // namespace

FragMatrix FragFromPacked(const Matrix4& m, const uint16_t* scales_f16, int64_t group_size) {
  FragMatrix f;
  f.fmt = m.sparse ? Fmt::kSparse4 : Fmt::kDense4;
  const int64_t ck = ChunkK(f.fmt);
  f.K = m.K, f.N = m.N, f.NT = CeilDiv(m.N, 16), f.KS = CeilDiv(m.K, kChunksPerSuper * ck);
  f.groups = m.groups, f.group_size = group_size >= m.K ? m.K : group_size;
  const DenseT d = DecodeAll(m, f.NT * 16, f.KS * kChunksPerSuper * ck);
  std::vector<Pair> pairs;  // sparse: the kept pair of every (row, group of 4 k), computed once
  if (m.sparse) {
    pairs.resize(d.rows * (d.cols / 4));
    for (int64_t n = 0; n < d.rows; ++n)
      for (int64_t g = 0; g < d.cols / 4; ++g) pairs[n * (d.cols / 4) + g] = KeptPair(d, n, 4 * g);
  }
  auto pair_at = [&](int64_t n, int64_t k) -> const Pair& { return pairs[n * (d.cols / 4) + k / 4]; };

  f.frag.assign(f.NT * f.KS * 32 * 4, 0);
  if (m.sparse) f.meta.assign(f.NT * f.KS * 32 * 2, 0);
  for (int64_t t = 0; t < f.NT; ++t)
    for (int64_t s = 0; s < f.KS; ++s)
      for (int lane = 0; lane < 32; ++lane) {
        const int q = lane / 4, j = lane % 4;
        const int64_t r0 = 16 * t + q, r1 = r0 + 8;
        const size_t at = (t * f.KS + s) * 32 + lane;
        uint32_t meta_word[kChunksPerSuper];
        for (int c = 0; c < kChunksPerSuper; ++c) {
          const int64_t k0 = (s * kChunksPerSuper + c) * ck;
          int a[8];
          if (m.sparse) {
            // Compressed columns 2j, 2j+1 hold group j (k0 + 4j..), columns 2j+8, 2j+9 group j + 4.
            const Pair p[4] = {pair_at(r0, k0 + 4 * j), pair_at(r1, k0 + 4 * j), pair_at(r0, k0 + 16 + 4 * j),
                               pair_at(r1, k0 + 16 + 4 * j)};
            for (int i = 0; i < 4; ++i) a[2 * i] = p[i].v0, a[2 * i + 1] = p[i].v1;
            // Metadata: per row, 4 bits per group of 4 (p0 | p1 << 2); half h of a row covers groups
            // 4h..4h+3. Lane 4q + h (and 4q + 2 + h) supplies rows q (low 16 bits) and q + 8.
            const int h = lane % 2;
            uint32_t rows[2] = {0, 0};
            for (int r = 0; r < 2; ++r)
              for (int g = 0; g < 4; ++g) {
                const Pair& pg = pair_at(r ? r1 : r0, k0 + 4 * (4 * h + g));
                rows[r] |= uint32_t(pg.p0 | pg.p1 << 2) << (4 * g);
              }
            meta_word[c] = rows[0] | rows[1] << 16;
          } else {
            const int64_t k = k0 + 2 * j;
            const int v[8] = {d.at(r0, k), d.at(r0, k + 1), d.at(r1, k), d.at(r1, k + 1),
                              d.at(r0, k + 8), d.at(r0, k + 9), d.at(r1, k + 8), d.at(r1, k + 9)};
            std::copy(v, v + 8, a);
          }
          f.frag[at * 4 + c] = PackFragment(a);
        }
        // Chunks 0 and 2 run with sparsity selector 0 (lanes 4q, 4q+1 supply metadata), chunks 1 and
        // 3 with selector 1 (lanes 4q+2, 4q+3), so every lane stores two words.
        if (m.sparse) {
          const bool low = lane % 4 < 2;
          f.meta[at * 2 + 0] = meta_word[low ? 0 : 1];
          f.meta[at * 2 + 1] = meta_word[low ? 2 : 3];
        }
      }

  f.scales.assign(f.NT * f.groups * 8, 0);
  for (int64_t t = 0; t < f.NT; ++t)
    for (int64_t g = 0; g < f.groups; ++g)
      for (int q = 0; q < 8; ++q)
        f.scales[(t * f.groups + g) * 8 + q] = HalfBits(scales_f16, m.N, g, 16 * t + q) |
                                               uint32_t(HalfBits(scales_f16, m.N, g, 16 * t + q + 8)) << 16;
  return f;
}

FragMatrix FragFromFloat16(const uint16_t* w, int64_t K, int64_t N) {
  FragMatrix f;
  f.fmt = Fmt::kFloat16;
  const int64_t ck = ChunkK(f.fmt);
  f.K = K, f.N = N, f.NT = CeilDiv(N, 16), f.KS = CeilDiv(K, kChunksPerSuper * ck);
  f.groups = 1, f.group_size = K;
  auto at = [&](int64_t n, int64_t k) -> uint32_t { return n < N && k < K ? w[k * N + n] : 0; };
  auto pair = [&](int64_t n, int64_t k) { return at(n, k) | at(n, k + 1) << 16; };
  f.frag.assign(f.NT * f.KS * 32 * 16, 0);
  for (int64_t t = 0; t < f.NT; ++t)
    for (int64_t s = 0; s < f.KS; ++s)
      for (int lane = 0; lane < 32; ++lane) {
        const int64_t r0 = 16 * t + lane / 4, r1 = r0 + 8;
        uint32_t* out = &f.frag[((t * f.KS + s) * 32 + lane) * 16];
        for (int c = 0; c < kChunksPerSuper; ++c) {
          const int64_t k = (s * kChunksPerSuper + c) * ck + 2 * (lane % 4);
          out[4 * c + 0] = pair(r0, k);
          out[4 * c + 1] = pair(r1, k);
          out[4 * c + 2] = pair(r0, k + 8);
          out[4 * c + 3] = pair(r1, k + 8);
        }
      }
  return f;
}

}  // namespace slim::cuda
