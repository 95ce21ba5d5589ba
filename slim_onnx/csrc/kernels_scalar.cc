// Portable kernels: the same tile walk as the AVX2 ones, one decoded 8x8 block at a time, so that
// any CPU runs the op and tests can check the vector code against it (SLIM_ONNX_KERNEL=scalar).
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <algorithm>
#include <string>
#include <vector>

#include "slim_kernels.h"

namespace slim {
namespace {

void GemmF32(const Matrix4& w, const float* a, int64_t M, int64_t lda, float* y, int64_t ldy, int64_t t0,
             int64_t t1, bool accumulate) {
  std::vector<float> acc(M * kTileN);
  int8_t q[8][8];
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc.begin(), acc.end(), 0.f);
    const uint8_t* blk = w.tile(t);
    for (int64_t b = 0; b < w.Kb; ++b, blk += w.block_bytes()) {
      DecodeBlock(blk, w.sparse, q);
      const float* scale = w.scales + (t * w.groups + b / w.blocks_per_group) * kTileN;
      for (int64_t m = 0; m < M; ++m) {
        const float* ar = a + m * lda + b * kBlockK;
        for (int c = 0; c < 8; ++c) {
          float s = 0.f;
          for (int k = 0; k < 8; ++k) s += ar[k] * q[c][k];
          acc[m * kTileN + c] += s * scale[c];
        }
      }
    }
    StoreTile(acc.data(), M, t, w.N, y, ldy, accumulate);
  }
}

void GemmI8(const Matrix4& w, const uint8_t* aq, const float* ascale, int64_t M, int64_t lda, float* y,
            int64_t ldy, int64_t t0, int64_t t1, bool accumulate) {
  std::vector<float> acc(M * kTileN);
  std::vector<int32_t> iacc(M * kTileN);
  int8_t q[8][8];
  for (int64_t t = t0; t < t1; ++t) {
    std::fill(acc.begin(), acc.end(), 0.f);
    for (int64_t g = 0; g < w.groups; ++g) {
      std::fill(iacc.begin(), iacc.end(), 0);
      const int64_t b0 = g * w.blocks_per_group, b1 = std::min(w.Kb, b0 + w.blocks_per_group);
      for (int64_t b = b0; b < b1; ++b) {
        DecodeBlock(w.tile(t) + b * w.block_bytes(), w.sparse, q);
        for (int64_t m = 0; m < M; ++m) {
          const uint8_t* ar = aq + m * lda + b * kBlockK;
          for (int c = 0; c < 8; ++c)
            for (int k = 0; k < 8; ++k) iacc[m * kTileN + c] += int32_t(ar[k]) * q[c][k];
        }
      }
      const float* scale = w.scales + (t * w.groups + g) * kTileN;
      const int32_t* corr = w.corr + (t * w.groups + g) * kTileN;
      for (int64_t m = 0; m < M; ++m) {
        const float as = ascale[m * w.groups + g];
        for (int c = 0; c < 8; ++c)
          acc[m * kTileN + c] = std::fma(float(iacc[m * kTileN + c] - corr[c]), as * scale[c], acc[m * kTileN + c]);
      }
    }
    StoreTile(acc.data(), M, t, w.N, y, ldy, accumulate);
  }
}

void GemmRowMajorF32(const float* a, int64_t M, int64_t lda, const float* b, int64_t K, int64_t N, float* y,
                     int64_t ldy, int64_t n0, int64_t n1, bool accumulate) {
  for (int64_t m = 0; m < M; ++m) {
    float* out = y + m * ldy;
    if (!accumulate)
      for (int64_t n = n0; n < n1; ++n) out[n] = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float av = a[m * lda + k];
      const float* br = b + k * N;
      for (int64_t n = n0; n < n1; ++n) out[n] += av * br[n];
    }
  }
}

}  // namespace

void QuantizeGroupScalar(const float* a, int64_t n, float inv, uint8_t* aq) {
  for (int64_t k = 0; k < n; ++k) aq[k] = uint8_t(int(std::nearbyint(a[k] * inv)) + 128);
}

namespace {

void QuantizeRows(const float* a, int64_t M, int64_t lda, int64_t K, int64_t group_size, int64_t groups, uint8_t* aq,
                  float* scale) {
  for (int64_t m = 0; m < M; ++m)
    for (int64_t g = 0; g < groups; ++g) {
      const int64_t k0 = g * group_size, n = std::min(K, k0 + group_size) - k0;
      const float* row = a + m * lda + k0;
      float amax = 0.f;
      for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(row[k]));
      scale[m * groups + g] = amax / 127.f;
      QuantizeGroupScalar(row, n, amax == 0.f ? 0.f : 127.f / amax, aq + m * lda + k0);
    }
}

void AttendRow(const float* q, const float* keys, const float* values, int64_t n, int64_t d, float scale,
               const float* bias, float* scores, float* out) {
  float top = -INFINITY;
  bool nan = false;
  for (int64_t t = 0; t < n; ++t) {
    float s = 0.f;
    for (int64_t i = 0; i < d; ++i) s += q[i] * keys[t * d + i];
    scores[t] = s * scale + (bias ? bias[t] : 0.f);
    top = std::max(top, scores[t]);
    nan |= std::isnan(scores[t]);
  }
  if (nan || top == INFINITY) {  // softmax is NaN everywhere, as exp(inf - inf) is
    std::fill(out, out + d, NAN);
    return;
  }
  std::fill(out, out + d, 0.f);
  if (top == -INFINITY) return;  // every position masked: no weights (the export turns softmax's NaN into 0)
  float sum = 0.f;
  for (int64_t t = 0; t < n; ++t) sum += scores[t] = std::exp(scores[t] - top);
  for (int64_t t = 0; t < n; ++t) {
    const float p = scores[t] / sum;
    for (int64_t i = 0; i < d; ++i) out[i] += p * values[t * d + i];
  }
}

// sigmoid(g) from e^-|g| <= 1, so no argument of exp overflows.
void SiluMul(const float* gate, const float* up, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    const float g = gate[i], e = std::exp(-std::fabs(g));
    out[i] = g * (g >= 0.f ? 1.f : e) / (1.f + e) * up[i];
  }
}

}  // namespace

const KernelTable& ScalarKernels() {
  static const KernelTable table{"scalar", GemmF32, GemmI8, QuantizeRows, GemmRowMajorF32, AttendRow, SiluMul, nullptr};
  return table;
}

#ifndef SLIM_ONNX_HAVE_AVX2
const KernelTable* Avx2Kernels() { return nullptr; }
#endif
#ifndef SLIM_ONNX_HAVE_AVX512
const KernelTable* Avx512Kernels(const KernelTable&) { return nullptr; }
#endif

const KernelTable& SelectKernels() {
  static const KernelTable* chosen = [] {
    const char* env = std::getenv("SLIM_ONNX_KERNEL");
    const std::string cap = env != nullptr ? env : "";
#if defined(__x86_64__) || defined(_M_X64)
    const bool avx2 = Avx2Kernels() != nullptr && cap != "scalar" && __builtin_cpu_supports("avx2") &&
                      __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
    const bool avx512 = avx2 && cap != "avx2" && __builtin_cpu_supports("avx512f") &&
                        __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
    if (avx512 && Avx512Kernels(*Avx2Kernels()) != nullptr) return Avx512Kernels(*Avx2Kernels());
    if (avx2) return Avx2Kernels();
#endif
    return &ScalarKernels();
  }();
  return *chosen;
}

}  // namespace slim
