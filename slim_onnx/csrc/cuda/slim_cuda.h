// SlimMatMul on CUDA: the host-side interface between the onnxruntime op (slim_matmul_cuda_op.cc, plain
// C++) and the kernels (slim_cuda_kernels.cu, nvcc). No CUDA header is needed to include this file.
//
// The op-spec layout (tiles of 8 columns, blocks of 8 k) suits AVX2. On the GPU the weights are
// re-laid at session creation into "fragment order" (slim_cuda_layout.cc): the exact per-lane
// register contents of the tensor-core instruction's A operand, so that a warp loads them with one
// coalesced 128-bit load per lane and decodes them with a few bit operations, no shuffles.
#pragma once

#include <cstddef>
#include <cstdint>
#include <vector>

#include "../slim_kernels.h"

namespace slim::cuda {

// How a prepared matrix feeds the tensor cores. The mma "A" operand is W^T (rows = output columns n,
// columns = reduction k); a warp covers 16 rows and one chunk of k per instruction.
//   kSparse4:  mma.sp m16n8k32, 2:4 along k, 4-bit values + 2-bit metadata (chunk k = 32)
//   kDense4:   mma m16n8k16, 4-bit values (chunk k = 16)
//   kFloat16:  mma m16n8k16, float16 values (chunk k = 16), no scales
enum class Fmt : int { kSparse4 = 0, kDense4 = 1, kFloat16 = 2 };

#ifdef __CUDACC__
#define SLIM_HOST_DEVICE __host__ __device__
#else
#define SLIM_HOST_DEVICE
#endif

constexpr int kChunksPerSuper = 4;  // one 128-bit load per lane covers 4 chunks of 4-bit values

// k per mma instruction, and 128-bit words per lane per super-chunk (host layout and kernels alike).
SLIM_HOST_DEVICE constexpr int ChunkK(Fmt f) { return f == Fmt::kSparse4 ? 32 : 16; }
SLIM_HOST_DEVICE constexpr int Uint4PerLane(Fmt f) { return f == Fmt::kFloat16 ? 4 : 1; }

// A matrix [K, N] in fragment order, on the host. Sizes are in 32-bit words.
//   frag:   [NT][KS][32 lanes][4 * Uint4PerLane] (NT = ceil(N/16) row tiles, KS = super-chunks of
//           4 chunks along K)
//   meta:   kSparse4 only, [NT][KS][32 lanes][2]
//   scales: 4-bit only, [NT][groups][8] pairs of float16 (s[16t + q], s[16t + q + 8]) as uint32
struct FragMatrix {
  Fmt fmt = Fmt::kDense4;
  int64_t K = 0, N = 0, NT = 0, KS = 0, group_size = 0, groups = 0;
  std::vector<uint32_t> frag, meta, scales;
};

// From the op-spec 4-bit layout (`m.packed`) and its float16 scales [groups, N].
FragMatrix FragFromPacked(const Matrix4& m, const uint16_t* scales_f16, int64_t group_size);
// From a row-major float16 matrix [K, N] (float16 adapters).
FragMatrix FragFromFloat16(const uint16_t* w, int64_t K, int64_t N);

// The weights of one node on the device, and how to run it. Device memory comes from `alloc`
// (onnxruntime's allocator for the node's device), released through `free_fn`.
struct DeviceAllocator {
  void* (*alloc)(void* state, size_t bytes);
  void (*free_fn)(void* state, void* ptr);
  void* state;
};

struct DeviceWeights;

// cudaMalloc / cudaFree, for callers outside onnxruntime (the test entry points).
DeviceAllocator CudaMallocAllocator();

// Copies W (+ optional L, R adapters and float32 bias [N]) to CUDA device `device`. Throws
// std::runtime_error.
DeviceWeights* UploadWeights(const FragMatrix& w, const FragMatrix* l, const FragMatrix* r, const float* bias,
                             const DeviceAllocator& allocator, int device);
void FreeWeights(DeviceWeights* weights);

// The most rows one run takes (the kernels index rows with int; with it ScratchBytes cannot overflow).
constexpr int64_t kMaxRows = int64_t(1) << 30;

// Which code runs a product. kAuto: the library path (weights decoded to float16 slabs, cuBLAS GEMMs)
// above kDecodeMaxRows rows when cuBLAS loaded, else the fused kernels. The others force one (tests
// and the benchmark's sweep); kLibrary throws when cuBLAS is not available.
enum class Path : int { kAuto = 0, kKernels = 1, kLibrary = 2 };

// Device scratch a run of M <= kMaxRows rows needs on `path`: the adapter product T = A @ L on the
// fused kernels; cuBLAS's workspace, the decoded slab, T and the decoded adapters on the library path.
size_t ScratchBytes(const DeviceWeights* weights, int64_t M, bool half, Path path = Path::kAuto);

// Y[M, N] = A[M, K] @ W + (A @ L) @ R + bias on `stream` (a cudaStream_t). A and Y are float16 when
// `half` is true, else float32. Asynchronous; never synchronises. Throws std::runtime_error on a
// launch error.
void RunSlimMatMul(const DeviceWeights* weights, const void* A, bool half, int64_t M, void* Y, void* scratch,
                   void* stream, Path path = Path::kAuto);

// Y[M, N/2] = silu(P[:, :N/2]) * P[:, N/2:] (activation="swiglu") on `stream`; P and Y float16 when
// `half`, else float32; the arithmetic is float32. Asynchronous.
void RunSwiGlu(const void* P, bool half, int64_t M, int64_t N, void* Y, void* stream);

}  // namespace slim::cuda
