// SlimMatMul on onnxruntime's CPU execution provider: the per-call orchestration of the kernels in
// kernels_*.cc (validation and prepacking are slim_matmul.cc's, shared with the CUDA op).
//
// P = A @ W + (A @ L) @ R + bias, and Y = P, or with activation="swiglu" Y = silu(P[:, :N/2]) *
// P[:, N/2:] (docs/op-spec.md). Per call:
//   1. A (float32 or float16, [..., K]) is copied into a float32 [M, Kb*8] buffer padded with zeros,
//      and for accuracy_level 4 quantized to uint8 (q + 128) with a scale per row and weight group.
//   2. The main product is written straight into Y (float32 A) or a float32 buffer.
//   3. The adapter product T = A @ L ([M, r]) goes to a buffer, then Y += T @ R.
//   4. bias is added (and the gated activation applied), per column range inside the same task;
//      a float16 A gets its Y converted back.
// Weights that are constant initializers are validated and prepacked once, at kernel creation;
// otherwise every call prepacks its own copy, so Compute never mutates shared state (reentrant).
#include <algorithm>
#include <cmath>
#include <cstring>
#include <optional>

#include "float16.h"
#include "slim_matmul.h"

namespace slim {
namespace {

// Splits `tiles` column tiles over onnxruntime's intra-op threads, in tasks of at least
// kMinWorkPerTask multiply-adds: each task is one dispatch, and at one token per step SmolLM2's
// layers ran 8% faster per decode step with 2^17 than with 2^15 (2 threads; 2^18 the same, 2^19 and
// 2^16 slower).
template <typename Fn>
void ParallelTiles(OrtKernelContext* ctx, int64_t tiles, int64_t work_per_tile, Fn fn) {
  const int64_t kMinWorkPerTask = 1 << 17;
  // in double: the product of two in-range sizes may not fit in int64
  const double by_work = std::floor(double(tiles) * double(work_per_tile) / kMinWorkPerTask);
  const int64_t tasks = std::min<int64_t>({tiles, 64, std::max<int64_t>(1, int64_t(std::min(by_work, 64.0)))});
  ParallelFor(ctx, tasks, [&](int64_t i) { fn(tiles * i / tasks, tiles * (i + 1) / tasks); });
}

// Rows of a [M, lda] buffer that hold a NaN or an infinity among their first K values: exponent bits
// all ones, which the +2^23 carries into bit 31. An OR of integers, so the loop vectorizes (a
// comparison per value did not, and took 2 us per 4096 values).
std::vector<int64_t> NonFiniteRows(const float* a, int64_t M, int64_t lda, int64_t K) {
  std::vector<int64_t> rows;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = a + m * lda;
    uint32_t any = 0;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, row + k, 4);
      any |= (bits & 0x7F800000u) + 0x00800000u;
    }
    if (any >> 31) rows.push_back(m);
  }
  return rows;
}

// The activations of one product, as the chosen path reads them: float32 rows, and for the int8
// path (accuracy_level 4) their quantization for the weight's K-groups.
// Rows holding a NaN or an infinity are computed apart by the portable float kernel, which
// multiplies every k of every block (the zeros of the 2:4 pattern included) as the fallback's dense
// MatMul does, so NaN and Inf propagate as float math has them; the fast paths see those rows as
// zeros (the int8 quantizer has no code for NaN, and the AVX2 float path reads only kept weights).
struct Operand {
  const float* a;     // the rows as given
  const float* fast;  // what the fast paths read: `a`, or `cleaned`
  int64_t M, lda;
  bool int8;
  std::vector<int64_t> nonfinite;
  std::vector<float> cleaned;
  std::vector<uint8_t> q;
  std::vector<float> scale;

  Operand(const KernelTable& kt, const Matrix4& w, bool use_int8, const float* rows, int64_t m, int64_t stride)
      : a(rows), fast(rows), M(m), lda(stride), int8(use_int8), nonfinite(NonFiniteRows(rows, m, stride, w.K)) {
    if (!nonfinite.empty()) {
      cleaned.assign(a, a + M * lda);
      for (int64_t r : nonfinite) std::fill(cleaned.begin() + r * lda, cleaned.begin() + (r + 1) * lda, 0.f);
      fast = cleaned.data();
    }
    if (!int8) return;
    q.assign(M * lda, 128);
    scale.resize(M * w.groups);
    const int64_t gsize = w.groups == 1 ? w.K : w.blocks_per_group * kBlockK;
    kt.quantize_rows(fast, M, lda, w.K, gsize, w.groups, q.data(), scale.data());
  }

  // y (+)= rows @ w for the column tiles [t0, t1).
  void MultiplyTiles(const KernelTable& kt, const Matrix4& w, float* y, int64_t ldy, int64_t t0, int64_t t1,
                     bool accumulate) const {
    if (int8) kt.gemm_i8(w, q.data(), scale.data(), M, lda, y, ldy, t0, t1, accumulate);
    else kt.gemm_f32(w, fast, M, lda, y, ldy, t0, t1, accumulate);
    for (int64_t r : nonfinite)  // the fast path added 0 for these rows
      ScalarKernels().gemm_f32(w, a + r * lda, 1, lda, y + r * ldy, ldy, t0, t1, accumulate);
  }
};

// Prepack for the chosen kernels: the int8 path's own weight arrangement, where the table has one and
// the session allows its memory (`copy`).
std::unique_ptr<Prepared> PrepareCpu(const Attributes& attr, const TensorView* in, const KernelTable& kt, bool copy) {
  std::unique_ptr<Prepared> p = Prepare(attr, in);
  if (!copy || kt.relayout == nullptr || attr.accuracy_level != 4) return p;
  for (PreparedMatrix* m : {&p->w, &p->l, &p->r}) {
    if (m->m.packed == nullptr) continue;  // no int4 adapters
    kt.relayout(m->m, m->layout);
    m->m.layout = &m->layout;
  }
  return p;
}

struct SlimMatMulCpuKernel {
  static constexpr const char* kOpName = "SlimMatMul";
  static constexpr const char* kProvider = "CPUExecutionProvider";
  static OrtMemType InputMemoryType(size_t) { return OrtMemTypeDefault; }

  std::string node;
  Attributes attr;
  const KernelTable* kernels = nullptr;
  bool weight_copy = true;  // false: session config slim_onnx.low_memory = 1
  std::unique_ptr<Prepared> constant;  // set when every weight input is a constant initializer

  SlimMatMulCpuKernel(const OrtKernelInfo* info, const std::string& name);

  void Compute(OrtKernelContext* ctx) const {
    TensorView in[kNumInputs];
    const Call call = BeginCall(ctx, attr, in, constant == nullptr);
    const TensorView& A = in[kA];
    const bool half = call.half;
    void* out_data = call.y;
    const int64_t M = call.M, K = attr.K, N = attr.N;
    if (M == 0) return;

    std::unique_ptr<Prepared> local;
    const Prepared* p = constant.get();
    if (p == nullptr) {
      local = PrepareCpu(attr, in, *kernels, weight_copy);
      p = local.get();
    }

    // 1. float32 activations, rows padded to whole blocks.
    const int64_t lda = p->w.m.Kb * kBlockK;
    std::vector<float> a32(CheckedMul(M, lda, "the activation buffer's size"), 0.f);
    for (int64_t m = 0; m < M; ++m) {
      float* row = a32.data() + m * lda;
      if (half) {
        const uint16_t* src = static_cast<const uint16_t*>(A.data) + m * K;
        for (int64_t k = 0; k < K; ++k) row[k] = HalfToFloat(src[k]);
      } else {
        std::memcpy(row, static_cast<const float*>(A.data) + m * K, K * sizeof(float));
      }
    }
    // P (float32 [M, N]) is written straight into Y unless Y is float16 or the gated activation
    // follows; Z (float32 [M, Nout]) is Y before its conversion to float16.
    const bool gated = attr.activation == Activation::kSwiGlu;
    const int64_t Nout = attr.OutputColumns();
    std::vector<float> p_buf, z_buf;
    float* z = half ? (z_buf.resize(M * Nout), z_buf.data()) : static_cast<float*>(out_data);
    float* y = z;
    if (gated) {
      p_buf.resize(CheckedMul(M, N, "the product buffer's size"));
      y = p_buf.data();
    }
    const bool int8 = attr.accuracy_level == 4;
    const auto& kt = *kernels;

    // 2. adapter input T = A @ L ([M, r]) first; then 3. per column tile, P = A @ W + T @ R + bias,
    // so each tile of P is written once and one thread dispatch covers both products.
    const Operand a_w(kt, p->w.m, int8, a32.data(), M, lda);
    const int64_t work = M * lda * kTileN;
    std::vector<float> t;
    std::optional<Operand> t_r;
    int64_t ldt = 0;
    if (attr.adapter == AdapterFormat::kInt4) {
      ldt = p->r.m.Kb * kBlockK;
      t.assign(CheckedMul(M, ldt, "the adapter buffer's size"), 0.f);
      // A's quantization for L is W's when their K-groups agree (the default, 128 and 128).
      std::optional<Operand> own;
      if (p->l.m.groups != p->w.m.groups || p->l.m.blocks_per_group != p->w.m.blocks_per_group)
        own.emplace(kt, p->l.m, int8, a32.data(), M, lda);
      const Operand& a_l = own ? *own : a_w;
      ParallelTiles(ctx, p->l.m.Nt, work, [&](int64_t t0, int64_t t1) {
        a_l.MultiplyTiles(kt, p->l.m, t.data(), ldt, t0, t1, false);
      });
      t_r.emplace(kt, p->r.m, int8, t.data(), M, ldt);
    } else if (attr.adapter == AdapterFormat::kFloat16) {
      ldt = attr.rank;
      t.assign(CheckedMul(M, ldt, "the adapter buffer's size"), 0.f);
      ParallelTiles(ctx, CeilDiv(ldt, kTileN), work, [&](int64_t t0, int64_t t1) {
        kt.gemm_rowmajor_f32(a32.data(), M, lda, p->l_f32.data(), K, ldt, t.data(), ldt, t0 * kTileN,
                             std::min(ldt, t1 * kTileN), false);
      });
    }
    const auto product_tiles = [&](int64_t t0, int64_t t1) {
      const int64_t n0 = t0 * kTileN, n1 = std::min(N, t1 * kTileN);
      a_w.MultiplyTiles(kt, p->w.m, y, N, t0, t1, false);
      if (t_r) t_r->MultiplyTiles(kt, p->r.m, y, N, t0, t1, true);
      else if (attr.adapter == AdapterFormat::kFloat16)
        kt.gemm_rowmajor_f32(t.data(), M, ldt, p->r_f32.data(), ldt, N, y, N, n0, n1, true);
      if (!p->bias.empty())
        for (int64_t m = 0; m < M; ++m)
          for (int64_t n = n0; n < n1; ++n) y[m * N + n] += p->bias[n];
    };
    // 4. with the gated activation, a task computes gate tiles [t0, t1) and the matching up tiles,
    // then their columns of Y.
    const int64_t work_per_tile = work + M * ldt * kTileN;
    if (!gated) {
      ParallelTiles(ctx, p->w.m.Nt, work_per_tile, product_tiles);
    } else {
      const int64_t half_tiles = p->w.m.Nt / 2;
      ParallelTiles(ctx, half_tiles, 2 * work_per_tile, [&](int64_t t0, int64_t t1) {
        product_tiles(t0, t1);
        product_tiles(t0 + half_tiles, t1 + half_tiles);
        const int64_t n0 = t0 * kTileN, width = (t1 - t0) * kTileN;
        for (int64_t m = 0; m < M; ++m)
          kt.silu_mul(y + m * N + n0, y + m * N + Nout + n0, width, z + m * Nout + n0);
      });
    }
    if (half) {
      uint16_t* dst = static_cast<uint16_t*>(out_data);
      for (int64_t i = 0; i < M * Nout; ++i) dst[i] = FloatToHalf(z[i]);
    }
  }
};

SlimMatMulCpuKernel::SlimMatMulCpuKernel(const OrtKernelInfo* info, const std::string& name)
    : node(name),
      attr(ReadAttributes(info)),
      kernels(&SelectKernels()),
      weight_copy(SessionConfigEntry(info, "slim_onnx.low_memory", "0") != "1") {
  TensorView in[kNumInputs];
  if (ConstantWeights(info, in)) constant = PrepareCpu(attr, in, *kernels, weight_copy);
}

}  // namespace

std::vector<OrtCustomOp*> SlimMatMulCpuOps() { return SlimMatMulOps<SlimMatMulCpuKernel>(); }

}  // namespace slim
