// SlimMatMul CUDA kernels: Y = A @ W + (A @ L) @ R + bias on tensor cores, weights kept 4-bit.
//
// Data layout (built once per node by slim_cuda_layout.cc). The tensor-core "A" operand is W^T:
// rows are output columns n, in tiles of 16; columns are k, in chunks of 32 (2:4 sparse, mma.sp
// m16n8k32) or 16 (dense 4-bit and float16, mma m16n8k16). For every (row tile, chunk) each lane
// of a warp owns eight A values, a0..a7 = rows q and q + 8 (q = lane / 4) at the lane's k positions,
// and the layout stores exactly those, per lane:
//   - 4-bit: one 32-bit word per chunk, nibbles arranged so that two masks of the word and two of
//     word >> 8, OR-ed with the float16 bits of 1024, give the four half2 registers (value + 1024
//     or 16 * value + 1024) and one subtract or fma each turns them into q in [-8, 7] exactly.
//   - sparse metadata: one 32-bit word per chunk for the lanes the sparsity selector names; chunks
//     0 and 2 of a super-chunk use selector 0, chunks 1 and 3 selector 1, so each lane holds two.
//   - float16: four 32-bit words per chunk, the registers themselves.
// Four chunks form a super-chunk, so a lane loads its 4-bit values with one 128-bit load (the warp
// reads 512 contiguous bytes) plus one 64-bit metadata load. Scales are float16 pairs
// (s[q], s[q + 8]) per row tile and group; a decoded value is multiplied by its scale in half2 (the
// product is a float16 weight, as in a float16 model) and the products accumulate in float32.
//
// Loop structure. One CTA owns one row tile (16 output columns) and 8 * MS activation rows (MS
// m-slices of 8, the mma's n). Its warps split the super-chunks along K (split-K inside the CTA),
// then the adapter product R's super-chunks the same way, and reduce their float32 accumulators
// through shared memory; warp 0 adds the bias and writes Y. Activation fragments (the mma's B
// operand, rows m of A) are read straight from global memory through the read-only cache.
// At small M (decode) the weights dominate the traffic and stream once; at large M each CTA
// re-reads its activation rows, which is what a shared-memory-tiled prefill kernel would avoid.
// The adapter input T = A @ L is a first launch of the same kernel (L as the weight, float32 out);
// the second launch computes A @ W and T @ R together, so R and W are read in one pass.
//
// Library path (more than kDecodeMaxRows rows, when cuBLAS loads): at such M a GEMM is compute
// bound and cuBLAS's tensor-core GEMMs beat a hand-written one, so the weights are decoded into
// float16 and handed to cuBLAS. W^T is decoded a slab of row tiles at a time into one scratch slab
// (at most kSlabBytes, so it stays in L2 between its decode and its GEMM, and the float16 copy of W
// never exists whole); each slab's GEMM writes its columns of Y. Adapters are two more GEMMs,
// T = A @ L (float16) and Y += T @ R. The decoding multiplies each fragment by unit blocks on the
// tensor cores (DecodeToHalfKernel), so it yields exactly the float16 weights the fused kernels use.
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstring>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>

#include "cublas_loader.h"
#include "slim_cuda.h"

namespace slim::cuda {

struct DeviceMatrix {
  Fmt fmt = Fmt::kDense4;
  int K = 0, N = 0, NT = 0, KS = 0, group_size = 1, groups = 1;
  const uint4* frag = nullptr;
  const uint2* meta = nullptr;
  const uint32_t* scales = nullptr;
};

struct DeviceWeights {
  DeviceMatrix w, l, r;
  bool adapters = false;
  bool cublas = false;  // the library path is available
  const float* bias = nullptr;
  int device = 0, sm_count = 1;
  DeviceAllocator allocator;
  std::vector<void*> blocks;
};

namespace {

constexpr int kMaxWarps = 8;

void Check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) throw std::runtime_error(std::string(what) + ": " + cudaGetErrorString(e));
}

// ---- device helpers ------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t AsU32(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }
__device__ __forceinline__ __half2 AsHalf2(uint32_t u) { return *reinterpret_cast<__half2*>(&u); }

// A lane's 8 nibbles -> 4 half2 registers of q (see the layout notes above).
__device__ __forceinline__ void DecodeInt4(uint32_t x, uint32_t (&a)[4]) {
  const uint32_t lo_mask = 0x000F000Fu, hi_mask = 0x00F000F0u, magic = 0x64006400u;
  const __half2 minus_1032 = AsHalf2(0xE408E408u);  // -(1024 + 8)
  const __half2 sixteenth = AsHalf2(0x2C002C00u);   // 1/16
  const __half2 minus_72 = AsHalf2(0xD480D480u);    // -(64 + 8)
  const uint32_t y = x >> 8;
  a[0] = AsU32(__hadd2(AsHalf2((x & lo_mask) | magic), minus_1032));
  a[1] = AsU32(__hfma2(AsHalf2((x & hi_mask) | magic), sixteenth, minus_72));
  a[2] = AsU32(__hadd2(AsHalf2((y & lo_mask) | magic), minus_1032));
  a[3] = AsU32(__hfma2(AsHalf2((y & hi_mask) | magic), sixteenth, minus_72));
}

// Activation pair (row[k], row[k + 1]) as half2 bits, zero past K.
template <typename T>
__device__ __forceinline__ uint32_t LoadPair(const T* row, int k, int K, bool vector_ok);

template <>
__device__ __forceinline__ uint32_t LoadPair<__half>(const __half* row, int k, int K, bool vector_ok) {
  if (vector_ok) return __ldg(reinterpret_cast<const unsigned int*>(row + k));
  const __half zero = __ushort_as_half(0);
  return AsU32(__halves2half2(k < K ? row[k] : zero, k + 1 < K ? row[k + 1] : zero));
}

template <>
__device__ __forceinline__ uint32_t LoadPair<float>(const float* row, int k, int K, bool vector_ok) {
  float2 v;
  if (vector_ok) {
    v = __ldg(reinterpret_cast<const float2*>(row + k));
  } else {
    v.x = k < K ? row[k] : 0.f;
    v.y = k + 1 < K ? row[k + 1] : 0.f;
  }
  return AsU32(__float22half2_rn(v));
}

template <int kSelector>
__device__ __forceinline__ void MmaSparse(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[4], uint32_t e) {
  asm volatile(
      "mma.sp::ordered_metadata.sync.aligned.m16n8k32.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9,%10,%11}, {%0,%1,%2,%3}, %12, %13;\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]), "r"(b[2]), "r"(b[3]), "r"(e),
        "n"(kSelector));
}

__device__ __forceinline__ void MmaDense(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 "
      "{%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
}

// One lane's share of a super-chunk of a row tile: its A-operand words for the 4 chunks.
template <Fmt F>
struct Fragment {
  uint4 v[Uint4PerLane(F)];
  uint2 e;  // sparse metadata
};

template <Fmt F>
__device__ __forceinline__ Fragment<F> LoadFragment(const DeviceMatrix& w, int tile, int s, int lane) {
  constexpr int kU4 = Uint4PerLane(F);
  const size_t at = (size_t(tile) * w.KS + s) * 32 + lane;
  Fragment<F> f;
#pragma unroll
  for (int u = 0; u < kU4; ++u) f.v[u] = __ldg(w.frag + at * kU4 + u);
  f.e = F == Fmt::kSparse4 ? __ldg(w.meta + at) : make_uint2(0, 0);
  return f;
}

// The scaled A-operand registers of chunk c: decoded values times their group's scales (sA for
// a[0..1], sB for a[2..3]); float16 fragments are used as stored.
template <Fmt F>
__device__ __forceinline__ void ChunkOperand(const Fragment<F>& f, int c, __half2 sA, __half2 sB, uint32_t (&a)[4]) {
  const uint32_t* words = reinterpret_cast<const uint32_t*>(f.v);
  if constexpr (F == Fmt::kFloat16) {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = words[4 * c + i];
  } else {
    DecodeInt4(words[c], a);
    a[0] = AsU32(__hmul2(AsHalf2(a[0]), __low2half2(sA)));
    a[1] = AsU32(__hmul2(AsHalf2(a[1]), __high2half2(sA)));
    a[2] = AsU32(__hmul2(AsHalf2(a[2]), __low2half2(sB)));
    a[3] = AsU32(__hmul2(AsHalf2(a[3]), __high2half2(sB)));
  }
}

// Scale pair (rows q, q + 8) of the row tile for k, or 1 for float16 fragments.
template <Fmt F>
__device__ __forceinline__ __half2 ScaleAt(const DeviceMatrix& w, int tile, int k, int q) {
  if constexpr (F == Fmt::kFloat16) return AsHalf2(0x3C003C00u);
  const int g = min(k / w.group_size, w.groups - 1);
  return AsHalf2(__ldg(w.scales + (size_t(tile) * w.groups + g) * 8 + q));
}

template <Fmt F, int MS>
__device__ __forceinline__ void ChunkMma(float (&acc)[MS][4], const uint32_t (&a)[4], const uint32_t (&b)[MS][4], int c,
                                         uint2 e) {
#pragma unroll
  for (int ms = 0; ms < MS; ++ms) {
    if constexpr (F == Fmt::kSparse4) {
      if (c % 2 == 0) MmaSparse<0>(acc[ms], a, b[ms], c < 2 ? e.x : e.y);
      else MmaSparse<1>(acc[ms], a, b[ms], c < 2 ? e.x : e.y);
    } else {
      const uint32_t b2[2] = {b[ms][0], b[ms][1]};
      MmaDense(acc[ms], a, b2);
    }
  }
}

// acc[ms] += W^T[16 rows of tile][super-chunk s] @ act[rows m0 + 8 ms + 0..7]^T.
// Fast path (the super-chunk lies inside K, rows are 4-byte aligned, one scale group covers it):
// straight-line code whose activation and scale loads the compiler issues before the first mma.
// Otherwise every pair and scale is fetched with bounds checks, chunk by chunk.
template <Fmt F, int MS, typename TAct>
__device__ __forceinline__ void MultiplyFragment(const DeviceMatrix& w, const Fragment<F>& f, int tile, int s,
                                                 const TAct* act, int M, int m0, int lane, float (&acc)[MS][4]) {
  constexpr int kChunk = ChunkK(F), kSuper = kChunk * kChunksPerSuper, kPairs = kChunk / 8;
  const int q = lane >> 2, j = lane & 3, k_super = s * kSuper;
  const TAct* rows[MS];
#pragma unroll
  for (int ms = 0; ms < MS; ++ms) rows[ms] = act + size_t(min(m0 + 8 * ms + q, M - 1)) * w.K;

  const bool fast = k_super + kSuper <= w.K && w.K % 2 == 0 && (w.group_size % kSuper == 0 || w.groups == 1);
  if (fast) {
    const __half2 scale = ScaleAt<F>(w, tile, k_super, q);
    uint32_t b[kChunksPerSuper][MS][4];
#pragma unroll
    for (int c = 0; c < kChunksPerSuper; ++c)
#pragma unroll
      for (int ms = 0; ms < MS; ++ms)
#pragma unroll
        for (int i = 0; i < kPairs; ++i) b[c][ms][i] = LoadPair(rows[ms], k_super + c * kChunk + 2 * j + 8 * i, w.K, true);
#pragma unroll
    for (int c = 0; c < kChunksPerSuper; ++c) {
      uint32_t a[4];
      ChunkOperand<F>(f, c, scale, scale, a);
      ChunkMma<F, MS>(acc, a, b[c], c, f.e);
    }
    return;
  }
#pragma unroll
  for (int c = 0; c < kChunksPerSuper; ++c) {
    const int k0 = k_super + c * kChunk;
    if (k0 >= w.K) break;
    // a[0], a[1] sit at k0 + colA (rows q, q + 8), a[2], a[3] at k0 + colA + kChunk / 2.
    const int colA = F == Fmt::kSparse4 ? 4 * j : 2 * j;
    uint32_t a[4];
    ChunkOperand<F>(f, c, ScaleAt<F>(w, tile, k0 + colA, q), ScaleAt<F>(w, tile, k0 + colA + kChunk / 2, q), a);
    uint32_t b[MS][4];
#pragma unroll
    for (int ms = 0; ms < MS; ++ms)
#pragma unroll
      for (int i = 0; i < kPairs; ++i) b[ms][i] = LoadPair(rows[ms], k0 + 2 * j + 8 * i, w.K, false);
    ChunkMma<F, MS>(acc, a, b, c, f.e);
  }
}

// acc += the super-chunks [first, end) step `stride` of one row tile. The loads of a batch of
// super-chunks are all issued before any is used, so a warp keeps several KB of weights in flight.
template <Fmt F, int MS, typename TAct>
__device__ __forceinline__ void MultiplyRange(const DeviceMatrix& w, int tile, int first, int end, int stride,
                                              const TAct* act, int M, int m0, int lane, float (&acc)[MS][4]) {
  constexpr int kBatch = F == Fmt::kFloat16 ? 2 : 4;
  for (int s = first; s < end; s += kBatch * stride) {
    Fragment<F> f[kBatch];
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (s + u * stride < end) f[u] = LoadFragment<F>(w, tile, s + u * stride, lane);
#pragma unroll
    for (int u = 0; u < kBatch; ++u)
      if (s + u * stride < end) MultiplyFragment<F, MS>(w, f[u], tile, s + u * stride, act, M, m0, lane, acc);
  }
}

template <typename T>
__device__ __forceinline__ T FromFloat(float x);
template <>
__device__ __forceinline__ __half FromFloat<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ float FromFloat<float>(float x) { return x; }

struct KernelArgs {
  DeviceMatrix w, r;        // r.frag == nullptr: no second product
  const void* act;          // [M, w.K], TAct
  const float* t;           // [M, r.K] float32, the adapter input
  const float* bias;        // [N] or nullptr
  void* y;                  // [M, w.N], TOut
  int M;
  int splits;               // > 1: CTAs split K too (gridDim.z) and add into a zeroed float32 y
};

// See "Loop structure" above. blockDim.x = 32 * warps (warps <= kMaxWarps).
template <Fmt FW, Fmt FR, int MS, typename TAct, typename TOut>
__global__ void __launch_bounds__(32 * kMaxWarps) SlimMatMulKernel(KernelArgs p) {
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, warps = blockDim.x >> 5;
  const int tile = blockIdx.x, m0 = blockIdx.y * 8 * MS;
  float acc[MS][4];
#pragma unroll
  for (int ms = 0; ms < MS; ++ms)
#pragma unroll
    for (int i = 0; i < 4; ++i) acc[ms][i] = 0.f;

  const TAct* act = static_cast<const TAct*>(p.act);
  const int z = blockIdx.z, first = int(long(p.w.KS) * z / p.splits), end = int(long(p.w.KS) * (z + 1) / p.splits);
  MultiplyRange<FW, MS>(p.w, tile, first + warp, end, warps, act, p.M, m0, lane, acc);
  if (p.r.frag != nullptr) MultiplyRange<FR, MS>(p.r, tile, warp, p.r.KS, warps, p.t, p.M, m0, lane, acc);

  __shared__ float partial[kMaxWarps - 1][MS][4][32];
  if (warps > 1) {
    if (warp > 0)
#pragma unroll
      for (int ms = 0; ms < MS; ++ms)
#pragma unroll
        for (int i = 0; i < 4; ++i) partial[warp - 1][ms][i][lane] = acc[ms][i];
    __syncthreads();
    if (warp > 0) return;
    for (int w = 0; w < warps - 1; ++w)
#pragma unroll
      for (int ms = 0; ms < MS; ++ms)
#pragma unroll
        for (int i = 0; i < 4; ++i) acc[ms][i] += partial[w][ms][i][lane];
  }
  // D fragment: acc[ms][i] is (output column n = 16 tile + q + 8 (i >= 2), row m = m0 + 8 ms + 2j + i % 2).
  const int q = lane >> 2, j = lane & 3, N = p.w.N;
  TOut* y = static_cast<TOut*>(p.y);
#pragma unroll
  for (int ms = 0; ms < MS; ++ms)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int n = 16 * tile + q + 8 * (i >> 1), m = m0 + 8 * ms + 2 * j + (i & 1);
      if (n >= N || m >= p.M) continue;
      const float v = acc[ms][i] + (p.bias ? p.bias[n] : 0.f);
      if constexpr (std::is_same_v<TOut, float>) {
        if (p.splits > 1) {
          atomicAdd(&y[size_t(m) * N + n], v);
          continue;
        }
      }
      y[size_t(m) * N + n] = FromFloat<TOut>(v);
    }
}

// ---- the prefill kernel -------------------------------------------------------------------------

// Large M, float16 activations. A CTA computes a 128 (m) x 128 (n) tile of Y with 8 warps in a
// 2 (m) x 4 (n) grid; a warp owns 64 rows (8 m-slices) x 2 row tiles, so every activation fragment
// it loads feeds two mma. Per super-chunk the CTA stages A[128 rows][super-chunk k] in shared memory
// (cp.async, double-buffered, rows padded by 16 bytes so ldmatrix is conflict-free); each warp loads
// its weight fragments straight from global memory one super-chunk ahead, decodes them in registers,
// and reads the activation fragments with ldmatrix.
constexpr int kGemmM = 128, kGemmTiles = 8, kGemmThreads = 256;

template <Fmt F>
__host__ __device__ constexpr int SuperK() { return ChunkK(F) * kChunksPerSuper; }
template <Fmt F>
__host__ __device__ constexpr int GemmRowHalves() { return SuperK<F>() + 8; }
template <Fmt F>
__host__ __device__ constexpr int GemmSmemBytes() { return 2 * kGemmM * GemmRowHalves<F>() * 2; }

__device__ __forceinline__ void CpAsync16(void* smem, const void* gmem, bool valid) {
  const unsigned dst = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(gmem), "r"(valid ? 16 : 0));
}

struct GemmArgs {
  DeviceMatrix w;
  const __half* act;    // [M, w.K]
  const float* bias;    // [N] or nullptr
  __half* y;            // [M, w.N]
  int M;
};

template <Fmt F, bool kAccumulate>
__global__ void __launch_bounds__(kGemmThreads) SlimGemmKernel(GemmArgs p) {
  constexpr int kSuperK = SuperK<F>(), kRow = GemmRowHalves<F>(), kChunk = kSuperK / kChunksPerSuper;
  extern __shared__ __align__(16) __half smem[];
  const int tid = threadIdx.x, warp = tid >> 5, lane = tid & 31, q = lane >> 2, j = lane & 3;
  const int m_block = blockIdx.y * kGemmM, warp_m = m_block + (warp >> 2) * 64;
  const int tile0 = blockIdx.x * kGemmTiles + (warp & 3) * 2;
  const DeviceMatrix& w = p.w;

  auto stage_a = [&](int stage, int s) {
    __half* dst = smem + stage * kGemmM * kRow;
    constexpr int kPieces = kGemmM * kSuperK / 8;
#pragma unroll
    for (int i = 0; i < kPieces / kGemmThreads; ++i) {
      const int piece = tid + i * kGemmThreads, row = piece / (kSuperK / 8), col = (piece % (kSuperK / 8)) * 8;
      const int m = m_block + row, k = s * kSuperK + col;
      const bool valid = m < p.M && k < w.K;
      CpAsync16(dst + row * kRow + col, valid ? p.act + size_t(m) * w.K + k : p.act, valid);
    }
    asm volatile("cp.async.commit_group;\n" ::);
  };
  auto load_w = [&](Fragment<F> (&f)[2], int s) {
#pragma unroll
    for (int t = 0; t < 2; ++t)
      if (tile0 + t < w.NT && s < w.KS) f[t] = LoadFragment<F>(w, tile0 + t, s, lane);
  };

  float acc[2][8][4];
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int ms = 0; ms < 8; ++ms)
#pragma unroll
      for (int i = 0; i < 4; ++i) acc[t][ms][i] = 0.f;

  Fragment<F> cur[2] = {}, next[2] = {};
  stage_a(0, 0);
  load_w(cur, 0);
  for (int s = 0; s < w.KS; ++s) {
    if (s + 1 < w.KS) {
      stage_a((s + 1) & 1, s + 1);
      load_w(next, s + 1);
      asm volatile("cp.async.wait_group 1;\n" ::);
    } else {
      asm volatile("cp.async.wait_group 0;\n" ::);
    }
    __syncthreads();
    const __half* a_stage = smem + (s & 1) * kGemmM * kRow + ((warp >> 2) * 64) * kRow;
#pragma unroll
    for (int c = 0; c < kChunksPerSuper; ++c) {
      const int k0 = (s * kChunksPerSuper + c) * kChunk;
      if (k0 >= w.K) break;
      uint32_t a[2][4];
      const int colA = F == Fmt::kSparse4 ? 4 * j : 2 * j;
#pragma unroll
      for (int t = 0; t < 2; ++t) {
        const int tile = min(tile0 + t, w.NT - 1);
        ChunkOperand<F>(cur[t], c, ScaleAt<F>(w, tile, k0 + colA, q), ScaleAt<F>(w, tile, k0 + colA + kChunk / 2, q), a[t]);
      }
#pragma unroll
      for (int ms = 0; ms < 8; ++ms) {
        // ldmatrix: lane l addresses row (l % 8) of 8x8 matrix (l / 8), i.e. k block c * kChunk + 8 (l / 8).
        const __half* row = a_stage + (ms * 8 + (lane & 7)) * kRow + c * kChunk;
        if constexpr (F == Fmt::kSparse4) {
          uint32_t b[4];
          const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row + 8 * (lane >> 3)));
          asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
                       : "=r"(b[0]), "=r"(b[1]), "=r"(b[2]), "=r"(b[3]) : "r"(addr));
#pragma unroll
          for (int t = 0; t < 2; ++t) {
            if (c % 2 == 0) MmaSparse<0>(acc[t][ms], a[t], b, c < 2 ? cur[t].e.x : cur[t].e.y);
            else MmaSparse<1>(acc[t][ms], a[t], b, c < 2 ? cur[t].e.x : cur[t].e.y);
          }
        } else {
          uint32_t b[2];
          const unsigned addr = static_cast<unsigned>(__cvta_generic_to_shared(row + 8 * ((lane >> 3) & 1)));
          asm volatile("ldmatrix.sync.aligned.m8n8.x2.shared.b16 {%0,%1}, [%2];\n" : "=r"(b[0]), "=r"(b[1]) : "r"(addr));
#pragma unroll
          for (int t = 0; t < 2; ++t) MmaDense(acc[t][ms], a[t], b);
        }
      }
    }
    __syncthreads();  // the stage read here is refilled in the next iteration
#pragma unroll
    for (int t = 0; t < 2; ++t) cur[t] = next[t];
  }

  const int N = w.N;
#pragma unroll
  for (int t = 0; t < 2; ++t)
#pragma unroll
    for (int ms = 0; ms < 8; ++ms)
#pragma unroll
      for (int i = 0; i < 4; ++i) {
        const int n = 16 * (tile0 + t) + q + 8 * (i >> 1), m = warp_m + 8 * ms + 2 * j + (i & 1);
        if (n >= N || m >= p.M) continue;
        __half* out = p.y + size_t(m) * N + n;
        float v = acc[t][ms][i] + (p.bias ? p.bias[n] : 0.f);
        if constexpr (kAccumulate) v += __half2float(*out);
        *out = __float2half_rn(v);
      }
}

// ---- host side -------------------------------------------------------------------------------------

DeviceMatrix Upload(const FragMatrix& f, DeviceWeights& dw) {
  auto copy = [&](const std::vector<uint32_t>& v) -> const void* {
    if (v.empty()) return nullptr;
    void* p = dw.allocator.alloc(dw.allocator.state, v.size() * 4);
    if (p == nullptr) throw std::runtime_error("device allocation of " + std::to_string(v.size() * 4) + " bytes failed");
    dw.blocks.push_back(p);
    Check(cudaMemcpy(p, v.data(), v.size() * 4, cudaMemcpyHostToDevice), "copying weights to the device");
    return p;
  };
  DeviceMatrix m;
  m.fmt = f.fmt;
  m.K = int(f.K), m.N = int(f.N), m.NT = int(f.NT), m.KS = int(f.KS);
  m.group_size = int(f.group_size), m.groups = int(f.groups);
  m.frag = static_cast<const uint4*>(copy(f.frag));
  m.meta = static_cast<const uint2*>(copy(f.meta));
  m.scales = static_cast<const uint32_t*>(copy(f.scales));
  return m;
}

// Makes `device` current for a scope and restores the caller's device afterwards.
struct DeviceGuard {
  int previous = -1, device;
  explicit DeviceGuard(int d) : device(d) {
    Check(cudaGetDevice(&previous), "cudaGetDevice");
    if (previous != device) Check(cudaSetDevice(device), "selecting the CUDA device");
  }
  ~DeviceGuard() {
    if (previous >= 0 && previous != device) cudaSetDevice(previous);
  }
};

struct Shape {
  dim3 grid, block;
  int splits;
};

// Row tiles x m-blocks CTAs, with warps per CTA splitting K so that the GPU holds ~16 warps per SM;
// when `may_split` (float32 output that can be accumulated atomically) and the CTAs are still too
// few, CTAs split K as well (the narrow adapter product T = A @ L).
Shape PickShape(const DeviceMatrix& w, int M, int MS, int sm_count, bool may_split) {
  const int mblocks = (M + 8 * MS - 1) / (8 * MS);
  const long ctas = long(w.NT) * mblocks, want = 16L * sm_count;
  int warps = int(std::min<long>(kMaxWarps, std::max<long>(1, (want + ctas - 1) / ctas)));
  warps = std::max(1, std::min(warps, w.KS));
  int splits = 1;
  if (may_split && ctas * warps < want)
    splits = int(std::min<long>(std::max(1, w.KS / (4 * warps)), (want + ctas * warps - 1) / (ctas * warps)));
  splits = std::max(1, splits);
  return {dim3(w.NT, mblocks, splits), dim3(32 * warps), splits};
}

template <int MS, typename TAct>
void LaunchMain(const DeviceWeights& dw, const KernelArgs& args, const Shape& shape, cudaStream_t stream) {
  const Fmt fr = dw.adapters ? dw.r.fmt : Fmt::kDense4;
  auto go = [&](auto kernel) { kernel<<<shape.grid, shape.block, 0, stream>>>(args); };
  if (dw.w.fmt == Fmt::kSparse4) {
    if (fr == Fmt::kFloat16) go(SlimMatMulKernel<Fmt::kSparse4, Fmt::kFloat16, MS, TAct, TAct>);
    else go(SlimMatMulKernel<Fmt::kSparse4, Fmt::kDense4, MS, TAct, TAct>);
  } else {
    if (fr == Fmt::kFloat16) go(SlimMatMulKernel<Fmt::kDense4, Fmt::kFloat16, MS, TAct, TAct>);
    else go(SlimMatMulKernel<Fmt::kDense4, Fmt::kDense4, MS, TAct, TAct>);
  }
}

template <int MS, typename TAct>
void LaunchAdapterInput(const DeviceWeights& dw, const KernelArgs& args, const Shape& shape, cudaStream_t stream) {
  auto go = [&](auto kernel) { kernel<<<shape.grid, shape.block, 0, stream>>>(args); };
  if (dw.l.fmt == Fmt::kFloat16) go(SlimMatMulKernel<Fmt::kFloat16, Fmt::kDense4, MS, TAct, float>);
  else go(SlimMatMulKernel<Fmt::kDense4, Fmt::kDense4, MS, TAct, float>);
}

template <Fmt F, bool kAccumulate>
void LaunchGemmAs(const GemmArgs& args, cudaStream_t stream) {
  const dim3 grid((args.w.NT + kGemmTiles - 1) / kGemmTiles, (args.M + kGemmM - 1) / kGemmM);
  SlimGemmKernel<F, kAccumulate><<<grid, kGemmThreads, GemmSmemBytes<F>(), stream>>>(args);
}

void LaunchGemm(const DeviceMatrix& w, const __half* act, const float* bias, __half* y, int M, bool accumulate,
                cudaStream_t stream) {
  const GemmArgs args{w, act, bias, y, M};
  switch (w.fmt) {
    case Fmt::kSparse4: return accumulate ? LaunchGemmAs<Fmt::kSparse4, true>(args, stream) : LaunchGemmAs<Fmt::kSparse4, false>(args, stream);
    case Fmt::kDense4: return accumulate ? LaunchGemmAs<Fmt::kDense4, true>(args, stream) : LaunchGemmAs<Fmt::kDense4, false>(args, stream);
    case Fmt::kFloat16: return accumulate ? LaunchGemmAs<Fmt::kFloat16, true>(args, stream) : LaunchGemmAs<Fmt::kFloat16, false>(args, stream);
  }
}

// The shared-memory budget of the prefill kernels (above the 48 KB default for the sparse one).
void AllowGemmSharedMemory() {
  auto allow = [](auto kernel, int bytes) {
    Check(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes), "configuring the prefill kernel");
  };
  allow(SlimGemmKernel<Fmt::kSparse4, false>, GemmSmemBytes<Fmt::kSparse4>());
  allow(SlimGemmKernel<Fmt::kSparse4, true>, GemmSmemBytes<Fmt::kSparse4>());
  allow(SlimGemmKernel<Fmt::kDense4, false>, GemmSmemBytes<Fmt::kDense4>());
  allow(SlimGemmKernel<Fmt::kDense4, true>, GemmSmemBytes<Fmt::kDense4>());
  allow(SlimGemmKernel<Fmt::kFloat16, false>, GemmSmemBytes<Fmt::kFloat16>());
  allow(SlimGemmKernel<Fmt::kFloat16, true>, GemmSmemBytes<Fmt::kFloat16>());
}

// Prefill: float16 activations, more than kDecodeMaxRows rows, and K (and the adapter rank) multiples
// of 8 so that activation rows are 16-byte aligned for cp.async. Three launches with adapters:
// T = A @ L (float16), Y = A @ W + bias, Y += T @ R.
constexpr int kDecodeMaxRows = 32;

bool UsePrefill(const DeviceWeights& dw, bool half, int M) {
  return half && M > kDecodeMaxRows && dw.w.K % 8 == 0 && (!dw.adapters || dw.l.N % 8 == 0);
}

void RunPrefill(const DeviceWeights& dw, const __half* A, int M, __half* Y, void* scratch, cudaStream_t stream) {
  __half* t = static_cast<__half*>(scratch);
  if (dw.adapters) LaunchGemm(dw.l, A, nullptr, t, M, false, stream);
  LaunchGemm(dw.w, A, dw.bias, Y, M, false, stream);
  if (dw.adapters) LaunchGemm(dw.r, t, nullptr, Y, M, true, stream);
}

template <int MS, typename TAct>
void Run(const DeviceWeights& dw, const void* A, int M, void* Y, void* scratch, cudaStream_t stream) {
  KernelArgs args{};
  args.M = M;
  args.act = A;
  if (dw.adapters) {
    KernelArgs t_args{};
    t_args.w = dw.l;
    t_args.act = A;
    t_args.y = scratch;
    t_args.M = M;
    const Shape shape = PickShape(dw.l, M, MS, dw.sm_count, true);
    t_args.splits = shape.splits;
    if (shape.splits > 1) Check(cudaMemsetAsync(scratch, 0, size_t(M) * dw.l.N * sizeof(float), stream), "clearing the adapter buffer");
    LaunchAdapterInput<MS, TAct>(dw, t_args, shape, stream);
    args.r = dw.r;
    args.t = static_cast<const float*>(scratch);
  }
  args.w = dw.w;
  args.bias = dw.bias;
  args.y = Y;
  args.splits = 1;
  LaunchMain<MS, TAct>(dw, args, PickShape(dw.w, M, MS, dw.sm_count, false), stream);
}

// ---- the library path ------------------------------------------------------------------------------

// W^T rows [16 tile0, 16 (tile0 + gridDim.x)) as a row-major float16 matrix out[row][w.K]. A fragment
// times the unit block B[k][c] = (k == kb + c) gives D[r][c] = W^T[r][kb + c] (one float16 product
// summed in float32: exact), 8 columns per mma, for dense and 2:4 fragments alike. blockIdx.y and
// the warps split the super-chunks.
template <Fmt F>
__global__ void __launch_bounds__(128) DecodeToHalfKernel(DeviceMatrix w, int tile0, __half* out) {
  constexpr int kChunk = ChunkK(F), kPairs = kChunk / 8;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, q = lane >> 2, j = lane & 3;
  const int warps = blockDim.x >> 5, tile = tile0 + blockIdx.x, colA = F == Fmt::kSparse4 ? 4 * j : 2 * j;
  const bool pairs_ok = w.K % 2 == 0;
  for (int s = blockIdx.y * warps + warp; s < w.KS; s += gridDim.y * warps) {
    const Fragment<F> f = LoadFragment<F>(w, tile, s, lane);
#pragma unroll
    for (int c = 0; c < kChunksPerSuper; ++c) {
      const int k0 = (s * kChunksPerSuper + c) * kChunk;
      if (k0 >= w.K) break;
      uint32_t a[4];
      ChunkOperand<F>(f, c, ScaleAt<F>(w, tile, k0 + colA, q), ScaleAt<F>(w, tile, k0 + colA + kChunk / 2, q), a);
#pragma unroll
      for (int kb = 0; kb < kChunk; kb += 8) {
        uint32_t b[1][4] = {{0, 0, 0, 0}};
#pragma unroll
        for (int i = 0; i < kPairs; ++i) {
          const int k = 2 * j + 8 * i;  // this register holds B rows k, k + 1 of column q
          b[0][i] = (k == kb + q ? 0x3C00u : 0u) | (k + 1 == kb + q ? 0x3C000000u : 0u);
        }
        float d[1][4] = {{0.f, 0.f, 0.f, 0.f}};
        ChunkMma<F, 1>(d, a, b, c, f.e);
        // d[0][i] is W^T[16 tile + q + 8 (i >> 1)][k0 + kb + 2j + (i & 1)].
        const int k = k0 + kb + 2 * j;
#pragma unroll
        for (int h = 0; h < 2; ++h) {
          const int n = 16 * tile + q + 8 * h;
          if (n >= w.N) continue;
          __half* row = out + size_t(n - 16 * tile0) * w.K;
          if (pairs_ok && k + 1 < w.K) {
            *reinterpret_cast<__half2*>(row + k) = __floats2half2_rn(d[0][2 * h], d[0][2 * h + 1]);
          } else {
            if (k < w.K) row[k] = __float2half_rn(d[0][2 * h]);
            if (k + 1 < w.K) row[k + 1] = __float2half_rn(d[0][2 * h + 1]);
          }
        }
      }
    }
  }
}

void LaunchDecode(const DeviceMatrix& w, int tile0, int tiles, __half* out, int sm_count, cudaStream_t stream) {
  constexpr int kWarps = 4;
  const int y = std::max(1, std::min((w.KS + kWarps - 1) / kWarps, (4 * sm_count + tiles - 1) / tiles));
  const dim3 grid(tiles, y), block(32 * kWarps);
  switch (w.fmt) {
    case Fmt::kSparse4: DecodeToHalfKernel<Fmt::kSparse4><<<grid, block, 0, stream>>>(w, tile0, out); break;
    case Fmt::kDense4: DecodeToHalfKernel<Fmt::kDense4><<<grid, block, 0, stream>>>(w, tile0, out); break;
    case Fmt::kFloat16: DecodeToHalfKernel<Fmt::kFloat16><<<grid, block, 0, stream>>>(w, tile0, out); break;
  }
}

__global__ void FloatToHalfKernel(const float* x, size_t count, __half* y) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    y[i] = __float2half_rn(x[i]);
}

template <typename T>
__global__ void AddBiasKernel(T* y, size_t count, int N, const float* bias) {
  for (size_t i = size_t(blockIdx.x) * blockDim.x + threadIdx.x; i < count; i += size_t(gridDim.x) * blockDim.x)
    y[i] = T(float(y[i]) + bias[i % N]);
}

unsigned GridFor(size_t count, int sm_count) {
  return unsigned(std::max<size_t>(1, std::min<size_t>((count + 255) / 256, size_t(sm_count) * 16)));
}

// The decoded slab: as many row tiles as fit in kSlabBytes (at least one).
constexpr size_t kSlabBytes = size_t(16) << 20, kCublasWorkspaceBytes = size_t(4) << 20;

int SlabTiles(const DeviceMatrix& w) {
  const size_t tile_bytes = size_t(16) * w.K * sizeof(__half);
  return int(std::max<size_t>(1, std::min<size_t>(w.NT, kSlabBytes / tile_bytes)));
}

// Scratch of the library path, in this order, each piece 256-byte aligned: cuBLAS workspace, A as
// float16 (float32 A only), T = A @ L and the decoded L^T and R^T (adapters only), the slab.
struct LibraryScratch {
  size_t offsets[6] = {};
  size_t total = 0;
};

LibraryScratch LibraryLayout(const DeviceWeights& dw, int64_t M, bool half) {
  const size_t h = sizeof(__half), rank = dw.adapters ? size_t(dw.l.N) : 0;
  const size_t sizes[6] = {kCublasWorkspaceBytes,
                           half ? 0 : size_t(M) * dw.w.K * h,
                           size_t(M) * rank * h,
                           rank * dw.w.K * h,
                           size_t(dw.w.N) * rank * h,
                           size_t(SlabTiles(dw.w)) * 16 * dw.w.K * h};
  LibraryScratch s;
  for (int i = 0; i < 6; ++i) {
    s.offsets[i] = s.total;
    s.total += (sizes[i] + 255) / 256 * 256;
  }
  return s;
}

void RunLibrary(const DeviceWeights& dw, const void* A, bool half, int M, void* Y, void* scratch, cudaStream_t stream) {
  const LibraryScratch layout = LibraryLayout(dw, M, half);
  auto piece = [&](int i) { return reinterpret_cast<__half*>(static_cast<char*>(scratch) + layout.offsets[i]); };
  const int K = dw.w.K, N = dw.w.N;
  const __half* a16 = static_cast<const __half*>(A);
  if (!half) {
    const size_t count = size_t(M) * K;
    FloatToHalfKernel<<<GridFor(count, dw.sm_count), 256, 0, stream>>>(static_cast<const float*>(A), count, piece(1));
    a16 = piece(1);
  }
  GemmCall g;
  g.device = dw.device;
  g.stream = stream;
  g.workspace = piece(0);
  g.workspace_bytes = kCublasWorkspaceBytes;
  g.n = M;
  // Y[M, cols] (row stride ldc) = X[M, k] @ (W^T [cols][k])^T: in cuBLAS's column-major terms the
  // row-major W^T slab is a k x cols matrix (lda = k) taken transposed, X is k x M (ldb = k).
  auto gemm = [&](const __half* wt, int cols, int k, const __half* x, void* y, int ldc, bool y_half, bool accumulate) {
    g.m = cols, g.k = k, g.a = wt, g.lda = k, g.b = x, g.ldb = k, g.c = y, g.ldc = ldc;
    g.c_half = y_half, g.accumulate = accumulate;
    CublasGemm(g);
  };
  const int rank = dw.adapters ? dw.l.N : 0;
  if (dw.adapters) {
    LaunchDecode(dw.l, 0, dw.l.NT, piece(3), dw.sm_count, stream);
    gemm(piece(3), rank, K, a16, piece(2), rank, true, false);
  }
  const int slab = SlabTiles(dw.w);
  for (int t0 = 0; t0 < dw.w.NT; t0 += slab) {
    const int tiles = std::min(slab, dw.w.NT - t0), n0 = 16 * t0, cols = std::min(16 * tiles, N - n0);
    LaunchDecode(dw.w, t0, tiles, piece(5), dw.sm_count, stream);
    const size_t y_offset = size_t(n0) * (half ? sizeof(__half) : sizeof(float));
    gemm(piece(5), cols, K, a16, static_cast<char*>(Y) + y_offset, N, half, false);
  }
  if (dw.adapters) {
    LaunchDecode(dw.r, 0, dw.r.NT, piece(4), dw.sm_count, stream);
    gemm(piece(4), N, rank, piece(2), Y, N, half, true);
  }
  if (dw.bias != nullptr) {
    const size_t count = size_t(M) * N;
    if (half) AddBiasKernel<<<GridFor(count, dw.sm_count), 256, 0, stream>>>(static_cast<__half*>(Y), count, N, dw.bias);
    else AddBiasKernel<<<GridFor(count, dw.sm_count), 256, 0, stream>>>(static_cast<float*>(Y), count, N, dw.bias);
  }
}

bool UseLibrary(const DeviceWeights& dw, int64_t M, Path path) {
  if (path == Path::kLibrary && !dw.cublas)
    throw std::runtime_error("the library path needs cuBLAS (libcublas.so.13), which could not be loaded");
  return dw.cublas && (path == Path::kLibrary || (path == Path::kAuto && M > kDecodeMaxRows));
}

}  // namespace

DeviceWeights* UploadWeights(const FragMatrix& w, const FragMatrix* l, const FragMatrix* r, const float* bias,
                             const DeviceAllocator& allocator, int device) {
  auto dw = std::make_unique<DeviceWeights>();
  dw->allocator = allocator;
  dw->device = device;
  try {
    DeviceGuard guard(device);
    Check(cudaDeviceGetAttribute(&dw->sm_count, cudaDevAttrMultiProcessorCount, device), "querying the SM count");
    AllowGemmSharedMemory();
    dw->cublas = PrepareCublas(device);
    dw->w = Upload(w, *dw);
    if (l != nullptr && r != nullptr) {
      dw->adapters = true;
      dw->l = Upload(*l, *dw);
      dw->r = Upload(*r, *dw);
    }
    if (bias != nullptr) {
      std::vector<uint32_t> bits(w.N);
      std::memcpy(bits.data(), bias, w.N * 4);
      FragMatrix holder;
      holder.frag = std::move(bits);
      dw->bias = reinterpret_cast<const float*>(Upload(holder, *dw).frag);
    }
  } catch (...) {
    FreeWeights(dw.release());
    throw;
  }
  return dw.release();
}

DeviceAllocator CudaMallocAllocator() {
  DeviceAllocator a;
  a.alloc = [](void*, size_t bytes) -> void* {
    void* p = nullptr;
    return cudaMalloc(&p, bytes) == cudaSuccess ? p : nullptr;
  };
  a.free_fn = [](void*, void* p) { cudaFree(p); };
  a.state = nullptr;
  return a;
}

void FreeWeights(DeviceWeights* dw) {
  if (dw == nullptr) return;
  for (void* p : dw->blocks) dw->allocator.free_fn(dw->allocator.state, p);
  delete dw;
}

size_t ScratchBytes(const DeviceWeights* dw, int64_t M, bool half, Path path) {
  if (UseLibrary(*dw, M, path)) return LibraryLayout(*dw, M, half).total;
  return dw->adapters ? size_t(M) * dw->l.N * sizeof(float) : 0;
}

void RunSlimMatMul(const DeviceWeights* dw, const void* A, bool half, int64_t M, void* Y, void* scratch, void* stream,
                   Path path) {
  if (M <= 0) return;
  if (M > kMaxRows) throw std::runtime_error("too many rows for the CUDA kernel");
  auto s = static_cast<cudaStream_t>(stream);
  const int m = int(M);
  DeviceGuard guard(dw->device);
  if (UseLibrary(*dw, m, path)) {
    RunLibrary(*dw, A, half, m, Y, scratch, s);
  } else if (UsePrefill(*dw, half, m)) {
    RunPrefill(*dw, static_cast<const __half*>(A), m, static_cast<__half*>(Y), scratch, s);
  } else if (half) {
    if (m <= 8) Run<1, __half>(*dw, A, m, Y, scratch, s);
    else if (m <= 16) Run<2, __half>(*dw, A, m, Y, scratch, s);
    else Run<4, __half>(*dw, A, m, Y, scratch, s);
  } else {
    if (m <= 8) Run<1, float>(*dw, A, m, Y, scratch, s);
    else if (m <= 16) Run<2, float>(*dw, A, m, Y, scratch, s);
    else Run<4, float>(*dw, A, m, Y, scratch, s);
  }
  Check(cudaGetLastError(), "launching the SlimMatMul CUDA kernel");
}

template <typename T>
__global__ void SwiGluKernel(const T* p, int64_t rows, int64_t half_n, T* y) {
  const int64_t i = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (i >= rows * half_n) return;
  const int64_t row = i / half_n, col = i % half_n;
  const float g = float(p[row * 2 * half_n + col]), u = float(p[row * 2 * half_n + half_n + col]);
  y[i] = T(g / (1.f + __expf(-g)) * u);
}

void RunSwiGlu(const void* P, bool half, int64_t M, int64_t N, void* Y, void* stream) {
  const int64_t count = M * (N / 2);
  if (count <= 0) return;
  auto s = static_cast<cudaStream_t>(stream);
  const int threads = 256;
  const unsigned blocks = unsigned((count + threads - 1) / threads);
  if (half) SwiGluKernel<<<blocks, threads, 0, s>>>(static_cast<const __half*>(P), M, N / 2, static_cast<__half*>(Y));
  else SwiGluKernel<<<blocks, threads, 0, s>>>(static_cast<const float*>(P), M, N / 2, static_cast<float*>(Y));
  Check(cudaGetLastError(), "launching the SwiGLU CUDA kernel");
}

}  // namespace slim::cuda
