// The SlimMatMul custom op: attribute and input validation, weight prepacking, and the per-call
// orchestration of the CPU kernels in kernels_*.cc; with SLIM_ONNX_HAVE_CUDA also the op for
// onnxruntime's CUDA execution provider, which runs the kernels of cuda/ (see the end of this file).
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
#include <atomic>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>
#include <mutex>
#include <optional>
#include <stdexcept>
#include <string>
#include <vector>

#include "op_common.h"
#include "slim_kernels.h"
#ifdef SLIM_ONNX_HAVE_CUDA
#include "cuda/slim_cuda.h"
#endif

namespace slim {
namespace {


// ---- float16 <-> float32 (IEEE binary16, round to nearest even) -----------------------------------

float HalfToFloat(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1F, mant = h & 0x3FF, bits;
  if (exp == 0x1F) {
    bits = sign | 0x7F800000 | (mant << 13);
  } else if (exp == 0) {
    if (mant == 0) {
      bits = sign;
    } else {  // subnormal: normalise
      exp = 113;
      while ((mant & 0x400) == 0) mant <<= 1, --exp;
      bits = sign | (exp << 23) | ((mant & 0x3FF) << 13);
    }
  } else {
    bits = sign | ((exp + 112) << 23) | (mant << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}

uint16_t FloatToHalf(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint16_t sign = (x >> 16) & 0x8000;
  const uint32_t abs = x & 0x7FFFFFFF;
  if (abs >= 0x7F800000) return sign | 0x7C00 | (abs > 0x7F800000 ? 0x200 : 0);  // inf, nan
  if (abs >= 0x477FF000) return sign | 0x7C00;                                    // overflow to inf
  if (abs < 0x38800000) {                                                         // subnormal or zero
    if (abs < 0x33000000) return sign;
    const uint32_t e = abs >> 23, m = (abs & 0x7FFFFF) | 0x800000;
    const uint32_t shift = 126 - e;  // 14..24
    uint32_t r = m >> shift;
    const uint32_t rem = m & ((1u << shift) - 1), half = 1u << (shift - 1);
    if (rem > half || (rem == half && (r & 1))) ++r;
    return sign | r;
  }
  uint32_t r = abs + 0xC8000FFF + ((abs >> 13) & 1);  // rebias exponent, round to nearest even
  return sign | uint16_t(r >> 13);
}

// ---- attributes --------------------------------------------------------------------------------

enum class AdapterFormat { kNone, kFloat16, kInt4 };
// kSwiGlu: Y = silu(P[:, :N/2]) * P[:, N/2:] (Llama/Qwen MLPs after the gate/up merge); Y has N/2 columns.
enum class Activation { kNone, kSwiGlu };

struct Attributes {
  int64_t K = 0, N = 0, bits = 4, group_size = 0, sparse = 1, rank = 0, adapter_group_size = 128, accuracy_level = 0;
  AdapterFormat adapter = AdapterFormat::kNone;
  Activation activation = Activation::kNone;
  int64_t OutputColumns() const { return activation == Activation::kSwiGlu ? N / 2 : N; }
};

void CheckGroupSize(int64_t g, int64_t k, const char* what) {
  if (g < 1 || (g % kBlockK != 0 && g < k))
    throw OpError(std::string(what) + "=" + std::to_string(g) + " must be a multiple of 8, or >= " +
                  std::to_string(k) + " (one group)");
}

// The largest K, N, rank and group size taken: far above any model's, small enough that every size
// the op derives from them fits in 64 bits, and int32 for the CUDA kernels' arguments.
constexpr int64_t kMaxDimension = (int64_t(1) << 31) - 1;

void CheckDimension(int64_t v, const char* name, int64_t low) {
  if (v < low || v > kMaxDimension)
    throw OpError(std::string(name) + "=" + std::to_string(v) + " is out of range: expected " + std::to_string(low) +
                  " to 2^31 - 1");
}

void ValidateAttributes(const Attributes& a) {
  CheckDimension(a.K, "K", 1);
  CheckDimension(a.N, "N", 1);
  CheckDimension(a.rank, "rank", 0);
  CheckDimension(a.group_size, "group_size", 1);
  CheckDimension(a.adapter_group_size, "adapter_group_size", 1);
  if (a.bits != 4) throw OpError("bits=" + std::to_string(a.bits) + " is not supported; the kernels implement bits=4");
  if (a.sparse != 0 && a.sparse != 1) throw OpError("sparse=" + std::to_string(a.sparse) + " must be 0 or 1");
  CheckGroupSize(a.group_size, a.K, "group_size");
  if ((a.adapter == AdapterFormat::kNone) != (a.rank == 0))
    throw OpError("rank=" + std::to_string(a.rank) + " disagrees with adapter_format (rank must be 0 exactly when it is 'none')");
  if (a.adapter == AdapterFormat::kInt4) {
    CheckGroupSize(a.adapter_group_size, a.K, "adapter_group_size");
    CheckGroupSize(a.adapter_group_size, a.rank, "adapter_group_size");
  }
  // Each task pairs gate tile t with up tile t + N/16, so the halves must be whole tiles.
  if (a.activation == Activation::kSwiGlu && a.N % (2 * kTileN) != 0)
    throw OpError("activation='swiglu' needs N divisible by " + std::to_string(2 * kTileN) + ", got N=" + std::to_string(a.N));
}

Attributes ReadAttributes(const OrtKernelInfo* info) {
  Attributes a;
  a.K = IntAttribute(info, "K");
  a.N = IntAttribute(info, "N");
  a.bits = IntAttribute(info, "bits", 4);
  a.group_size = IntAttribute(info, "group_size");
  a.sparse = IntAttribute(info, "sparse", 1);
  a.rank = IntAttribute(info, "rank", 0);
  a.adapter_group_size = IntAttribute(info, "adapter_group_size", 128);
  a.accuracy_level = IntAttribute(info, "accuracy_level", 0);
  const std::string fmt = StringAttribute(info, "adapter_format",
                                           a.rank > 0 ? std::nullopt : std::optional<std::string>("none"));
  if (fmt == "none") a.adapter = AdapterFormat::kNone;
  else if (fmt == "float16") a.adapter = AdapterFormat::kFloat16;
  else if (fmt == "int4") a.adapter = AdapterFormat::kInt4;
  else throw OpError("adapter_format must be 'none', 'float16' or 'int4', got '" + fmt + "'");
  const std::string act = StringAttribute(info, "activation", "none");
  if (act == "none") a.activation = Activation::kNone;
  else if (act == "swiglu") a.activation = Activation::kSwiGlu;
  else throw OpError("activation must be 'none' or 'swiglu', got '" + act + "'");
  ValidateAttributes(a);
  return a;
}

// ---- input views and prepacking --------------------------------------------------------------------

enum Input { kA = 0, kW, kWScales, kBias, kL, kLScales, kR, kRScales, kNumInputs };
const char* const kInputNames[kNumInputs] = {"A", "W", "W_scales", "bias", "L", "L_scales", "R", "R_scales"};





void Expect(const TensorView& v, Input which, ONNXTensorElementDataType type, const std::vector<int64_t>& shape) {
  if (!v.present)
    throw OpError(std::string("input '") + kInputNames[which] + "' is required by the attributes but absent");
  if (v.type != type || v.shape != shape)
    throw OpError(std::string("input '") + kInputNames[which] + "' must be " + TypeName(type) + " " + ShapeString(shape) +
                  ", got " + TypeName(v.type) + " " + ShapeString(v.shape));
}

void ExpectAbsent(const TensorView& v, Input which, const char* why) {
  if (v.present) throw OpError(std::string("input '") + kInputNames[which] + "' is given but " + why);
}

// A 4-bit matrix plus its converted scales and int8-path corrections.
struct PreparedMatrix {
  Matrix4 m;
  std::vector<float> scales;
  std::vector<int32_t> corr;
};

void PrepareMatrix(PreparedMatrix& out, const TensorView& packed, Input packed_id, const TensorView& scales,
                   Input scales_id, int64_t K, int64_t N, int64_t group_size, bool sparse) {
  Matrix4& m = out.m;
  m.K = K, m.N = N, m.sparse = sparse;
  m.Kb = CeilDiv(K, kBlockK), m.Nt = CeilDiv(N, kTileN);
  m.groups = CeilDiv(K, group_size);
  m.blocks_per_group = m.groups == 1 ? m.Kb : group_size / kBlockK;
  Expect(packed, packed_id, ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, {m.Nt, m.Kb, m.block_bytes()});
  Expect(scales, scales_id, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {m.groups, N});
  m.packed = static_cast<const uint8_t*>(packed.data);
  const uint16_t* s16 = static_cast<const uint16_t*>(scales.data);
  out.scales.assign(m.Nt * m.groups * kTileN, 0.f);
  out.corr.assign(m.Nt * m.groups * kTileN, 0);
  int8_t q[8][8];
  for (int64_t t = 0; t < m.Nt; ++t) {
    for (int64_t c = 0; c < kTileN && t * kTileN + c < N; ++c)
      for (int64_t g = 0; g < m.groups; ++g) {
        const float s = HalfToFloat(s16[g * N + t * kTileN + c]);
        if (!std::isfinite(s))
          throw OpError(std::string("input '") + kInputNames[scales_id] + "' holds a non-finite scale at group " +
                        std::to_string(g) + ", column " + std::to_string(t * kTileN + c));
        out.scales[(t * m.groups + g) * kTileN + c] = s;
      }
    for (int64_t b = 0; b < m.Kb; ++b) {
      DecodeBlock(m.tile(t) + b * m.block_bytes(), sparse, q);
      int32_t* corr = &out.corr[(t * m.groups + b / m.blocks_per_group) * kTileN];
      for (int c = 0; c < 8; ++c)
        for (int k = 0; k < 8; ++k) corr[c] += 128 * q[c][k];
    }
  }
  m.scales = out.scales.data();
  m.corr = out.corr.data();
}

struct Prepared {
  PreparedMatrix w, l, r;  // l, r: int4 adapters
  std::vector<float> l_f32, r_f32;  // float16 adapters, row-major
  std::vector<float> bias;
};

std::vector<float> HalfMatrix(const TensorView& v) {
  std::vector<float> out(v.numel());
  const uint16_t* src = static_cast<const uint16_t*>(v.data);
  for (size_t i = 0; i < out.size(); ++i) out[i] = HalfToFloat(src[i]);
  return out;
}

std::unique_ptr<Prepared> Prepare(const Attributes& a, const TensorView* in) {
  auto p = std::make_unique<Prepared>();
  PrepareMatrix(p->w, in[kW], kW, in[kWScales], kWScales, a.K, a.N, a.group_size, a.sparse != 0);
  if (in[kBias].present) {
    Expect(in[kBias], kBias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {a.N});
    const float* b = static_cast<const float*>(in[kBias].data);
    p->bias.assign(b, b + a.N);
  }
  switch (a.adapter) {
    case AdapterFormat::kNone:
      for (Input i : {kL, kLScales, kR, kRScales}) ExpectAbsent(in[i], i, "adapter_format is 'none'");
      break;
    case AdapterFormat::kFloat16:
      Expect(in[kL], kL, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {a.K, a.rank});
      Expect(in[kR], kR, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16, {a.rank, a.N});
      for (Input i : {kLScales, kRScales}) ExpectAbsent(in[i], i, "float16 adapters take no scales");
      p->l_f32 = HalfMatrix(in[kL]);
      p->r_f32 = HalfMatrix(in[kR]);
      break;
    case AdapterFormat::kInt4:
      PrepareMatrix(p->l, in[kL], kL, in[kLScales], kLScales, a.K, a.rank, a.adapter_group_size, false);
      PrepareMatrix(p->r, in[kR], kR, in[kRScales], kRScales, a.rank, a.N, a.adapter_group_size, false);
      break;
  }
  return p;
}

// ---- per-call helpers ----------------------------------------------------------------------------

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
  if (tasks <= 1) {
    fn(0, tiles);
    return;
  }
  struct Job {
    Fn* fn;
    int64_t tiles, tasks;
  } job{&fn, tiles, tasks};
  auto run = [](void* data, size_t i) {
    Job* j = static_cast<Job*>(data);
    const int64_t t0 = j->tiles * int64_t(i) / j->tasks, t1 = j->tiles * int64_t(i + 1) / j->tasks;
    (*j->fn)(t0, t1);
  };
  ThrowOnError(g_api->KernelContext_ParallelFor(ctx, run, size_t(tasks), 0, &job));
}

// Rows of a [M, lda] buffer that hold a NaN or an infinity among their first K values (exponent bits
// all ones; an integer test, so the loop vectorizes).
std::vector<int64_t> NonFiniteRows(const float* a, int64_t M, int64_t lda, int64_t K) {
  std::vector<int64_t> rows;
  for (int64_t m = 0; m < M; ++m) {
    const float* row = a + m * lda;
    bool bad = false;
    for (int64_t k = 0; k < K; ++k) {
      uint32_t bits;
      std::memcpy(&bits, row + k, 4);
      bad |= (bits & 0x7F800000u) == 0x7F800000u;
    }
    if (bad) rows.push_back(m);
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

// ---- the kernel ----------------------------------------------------------------------------------

// What every run starts with, on either device: the inputs, A's checks, and Y allocated.
struct Call {
  bool half = false;
  int64_t M = 0;
  OrtValue* y_value = nullptr;
  void* y = nullptr;
};

// Only A is read when the weights were prepacked at kernel creation (`read_weights` false): a
// view costs a shape query per input, and decode steps run ~120 of these nodes.
Call BeginCall(OrtKernelContext* ctx, const Attributes& attr, TensorView (&in)[kNumInputs], bool read_weights) {
  ReadInputs(ctx, in, read_weights ? kNumInputs : 1);
  const TensorView& A = in[kA];
  if (!A.present) throw OpError("input 'A' is missing");
  Call call;
  call.half = A.type == ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  if (!call.half && A.type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
    throw OpError(std::string("input 'A' must be float32 or float16, got ") + TypeName(A.type));
  if (A.shape.empty() || A.shape.back() != attr.K)
    throw OpError("input 'A' must have last dimension K=" + std::to_string(attr.K) + ", got shape " + ShapeString(A.shape));
  std::vector<int64_t> out_shape = A.shape;
  out_shape.back() = attr.OutputColumns();
  CheckedNumel(out_shape, "Y's element count");
  ThrowOnError(g_api->KernelContext_GetOutput(ctx, 0, out_shape.data(), out_shape.size(), &call.y_value));
  ThrowOnError(g_api->GetTensorMutableData(call.y_value, &call.y));
  call.M = A.numel() / attr.K;
  return call;
}

struct SlimMatMulCpuKernel {
  static constexpr const char* kOpName = "SlimMatMul";
  static constexpr const char* kProvider = "CPUExecutionProvider";
  static OrtMemType InputMemoryType(size_t) { return OrtMemTypeDefault; }

  std::string node;
  Attributes attr;
  const KernelTable* kernels = nullptr;
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
      local = Prepare(attr, in);
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
      const Operand a_l(kt, p->l.m, int8, a32.data(), M, lda);
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


// Reads the weight inputs when all are constant initializers, for one-time prepacking.
bool ConstantWeights(const OrtKernelInfo* info, TensorView* in) {
  size_t count = 0;
  ThrowOnError(g_api->KernelInfo_GetInputCount(info, &count));
  for (size_t i = kW; i < std::min<size_t>(count, kNumInputs); ++i) {
    int is_constant = 0;
    const OrtValue* v = nullptr;
    OrtStatus* st = g_api->KernelInfoGetConstantInput_tensor(info, i, &is_constant, &v);
    if (st != nullptr) {
      g_api->ReleaseStatus(st);
      return false;
    }
    if (is_constant) {
      in[i] = View(v);
      continue;
    }
    // Not constant: either an absent optional input (empty name) or a runtime tensor.
    size_t name_size = 0;
    st = g_api->KernelInfo_GetInputName(info, i, nullptr, &name_size);
    if (st != nullptr) {
      g_api->ReleaseStatus(st);
      return false;
    }
    const bool absent = name_size <= 1;  // the size counts the terminating NUL
    if (!absent) return false;
  }
  return true;
}


// A string attribute in shape inference; "" when absent.
std::string ReadStringAttribute(OrtShapeInferContext* ctx, const char* name) {
  const OrtOpAttr* attr = nullptr;
  if (OrtStatus* st = g_api->ShapeInferContext_GetAttribute(ctx, name, &attr)) {
    g_api->ReleaseStatus(st);
    return "";
  }
  size_t size = 0;
  if (attr == nullptr) return "";
  if (OrtStatus* st = g_api->ReadOpAttr(attr, ORT_OP_ATTR_STRING, nullptr, 0, &size)) g_api->ReleaseStatus(st);  // asks the size
  std::string value(size, '\0');
  if (size == 0) return value;
  ThrowOnError(g_api->ReadOpAttr(attr, ORT_OP_ATTR_STRING, &value[0], size, &size));
  while (!value.empty() && value.back() == '\0') value.pop_back();
  return value;
}

// Output type and shape for onnxruntime's graph resolution: Y = A's type, A's shape with the last
// dimension replaced by N, or N/2 with activation="swiglu" (symbolic dimensions kept).
OrtStatus* InferOutputShape(OrtShapeInferContext* ctx) {
  OrtTensorTypeAndShapeInfo* in = nullptr;  // owned by the context
  OrtTensorTypeAndShapeInfo* out = nullptr;
  OrtStatus* st = g_api->ShapeInferContext_GetInputTypeShape(ctx, 0, &in);
  auto finish = [&](OrtStatus* status) {
    if (out) g_api->ReleaseTensorTypeAndShapeInfo(out);
    return status;
  };
  if (st) return finish(st);
  ONNXTensorElementDataType type;
  size_t rank = 0;
  if ((st = g_api->GetTensorElementType(in, &type)) || (st = g_api->GetDimensionsCount(in, &rank))) return finish(st);
  std::vector<int64_t> dims(rank);
  std::vector<const char*> symbols(rank, "");
  if ((st = g_api->GetDimensions(in, dims.data(), rank)) ||
      (st = g_api->GetSymbolicDimensions(in, symbols.data(), rank)))
    return finish(st);
  const OrtOpAttr* attr = nullptr;
  int64_t n = 0;
  size_t size = 0;
  if ((st = g_api->ShapeInferContext_GetAttribute(ctx, "N", &attr))) return finish(st);
  if (attr == nullptr) throw OpError("missing required attribute 'N' (an int)");
  if ((st = g_api->ReadOpAttr(attr, ORT_OP_ATTR_INT, &n, sizeof(n), &size))) return finish(st);
  if (ReadStringAttribute(ctx, "activation") == "swiglu") n /= 2;
  // onnxruntime writes a dimension without a name as a value, so an unknown unnamed dimension (-1)
  // gets a fresh name here; otherwise it would become a literal -1 for the nodes downstream.
  static std::atomic<uint64_t> counter{0};
  std::vector<std::string> fresh(rank);
  for (size_t i = 0; i < rank; ++i)
    if (dims[i] < 0 && (symbols[i] == nullptr || symbols[i][0] == '\0')) {
      fresh[i] = "slim_onnx_dim_" + std::to_string(counter++);
      symbols[i] = fresh[i].c_str();
    }
  if (rank > 0) {
    dims.back() = n;
    symbols.back() = "";
  }
  if ((st = g_api->CreateTensorTypeAndShapeInfo(&out)) || (st = g_api->SetTensorElementType(out, type)) ||
      (st = g_api->SetDimensions(out, dims.data(), rank)) ||
      (st = g_api->SetSymbolicDimensions(out, symbols.data(), rank)))
    return finish(st);
  return finish(g_api->ShapeInferContext_SetOutputTypeShape(ctx, 0, out));
}

// ---- the CUDA kernel -------------------------------------------------------------------------------

#ifdef SLIM_ONNX_HAVE_CUDA
// Builds the device copy of a node's weights from validated host inputs: the same Prepare as the
// CPU op (so both refuse the same bad input), then the fragment layout of cuda/slim_cuda_layout.cc.
cuda::DeviceWeights* UploadCudaWeights(const Attributes& a, const TensorView* in, const cuda::DeviceAllocator& alloc,
                                       int device) {
  const std::unique_ptr<Prepared> p = Prepare(a, in);
  const auto scales = [&](Input i) { return static_cast<const uint16_t*>(in[i].data); };
  const cuda::FragMatrix w = cuda::FragFromPacked(p->w.m, scales(kWScales), a.group_size);
  cuda::FragMatrix l, r;
  if (a.adapter == AdapterFormat::kInt4) {
    l = cuda::FragFromPacked(p->l.m, scales(kLScales), a.adapter_group_size);
    r = cuda::FragFromPacked(p->r.m, scales(kRScales), a.adapter_group_size);
  } else if (a.adapter == AdapterFormat::kFloat16) {
    l = cuda::FragFromFloat16(static_cast<const uint16_t*>(in[kL].data), a.K, a.rank);
    r = cuda::FragFromFloat16(static_cast<const uint16_t*>(in[kR].data), a.rank, a.N);
  }
  const bool adapters = a.adapter != AdapterFormat::kNone;
  return cuda::UploadWeights(w, adapters ? &l : nullptr, adapters ? &r : nullptr,
                             p->bias.empty() ? nullptr : p->bias.data(), alloc, device);
}

// On CUDAExecutionProvider the weight inputs stay in host memory (OrtMemTypeCPUInput) and must be
// constant initializers: they are re-laid and copied to the device once, at session creation, into
// memory from the provider's allocator. A and Y live on the device; a run launches on onnxruntime's
// stream and takes its scratch from the provider's allocator.
struct SlimMatMulCudaKernel {
  static constexpr const char* kOpName = "SlimMatMul";
  static constexpr const char* kProvider = "CUDAExecutionProvider";
  static OrtMemType InputMemoryType(size_t i) { return i == kA ? OrtMemTypeDefault : OrtMemTypeCPUInput; }

  std::string node;
  Attributes attr;
  OrtAllocator* allocator = nullptr;  // the provider's device allocator, owns the weights' memory
  cuda::DeviceWeights* weights = nullptr;

  SlimMatMulCudaKernel(const OrtKernelInfo* info, const std::string& name) : node(name), attr(ReadAttributes(info)) {
    TensorView in[kNumInputs];
    if (!ConstantWeights(info, in))
      throw OpError("on CUDAExecutionProvider the weight inputs (W, scales, bias, adapters) must be constant "
                    "initializers; run this model on the CPU provider, or keep its weights as initializers");
    ThrowOnError(g_api->KernelInfoGetAllocator(info, OrtMemTypeDefault, &allocator));
    try {
      const OrtMemoryInfo* mem = nullptr;
      int device = 0;
      ThrowOnError(g_api->AllocatorGetInfo(allocator, &mem));
      ThrowOnError(g_api->MemoryInfoGetId(mem, &device));
      cuda::DeviceAllocator alloc;
      alloc.alloc = [](void* state, size_t bytes) { return static_cast<OrtAllocator*>(state)->Alloc(static_cast<OrtAllocator*>(state), bytes); };
      alloc.free_fn = [](void* state, void* ptr) { static_cast<OrtAllocator*>(state)->Free(static_cast<OrtAllocator*>(state), ptr); };
      alloc.state = allocator;
      weights = UploadCudaWeights(attr, in, alloc, device);
    } catch (...) {
      g_api->ReleaseAllocator(allocator);
      throw;
    }
  }
  ~SlimMatMulCudaKernel() {
    cuda::FreeWeights(weights);
    g_api->ReleaseAllocator(allocator);
  }

  void Compute(OrtKernelContext* ctx) const {
    TensorView in[kNumInputs];
    const Call call = BeginCall(ctx, attr, in, false);  // weights: on the device since kernel creation
    if (call.M == 0) return;
    void* stream = nullptr;
    ThrowOnError(g_api->KernelContext_GetGPUComputeStream(ctx, &stream));
    // With the gated activation the product P goes to scratch first (after the adapter scratch).
    const bool gated = attr.activation == Activation::kSwiGlu;
    const char* what = "the scratch buffer's size";
    CheckedMul(CheckedMul(call.M, attr.rank, what), 8, what);  // ScratchBytes' product (4 bytes each), rounded up
    const size_t adapter_bytes = (cuda::ScratchBytes(weights, call.M) + 255) / 256 * 256;
    const int64_t product_bytes = gated ? CheckedMul(CheckedMul(call.M, attr.N, what), call.half ? 2 : 4, what) : 0;
    const size_t scratch_bytes = size_t(CheckedAdd(int64_t(adapter_bytes), product_bytes, what));
    void* scratch = nullptr;
    OrtAllocator* scratch_alloc = nullptr;
    if (scratch_bytes > 0) {
      const OrtMemoryInfo* mem = nullptr;
      ThrowOnError(g_api->GetTensorMemoryInfo(call.y_value, &mem));
      ThrowOnError(g_api->KernelContext_GetAllocator(ctx, mem, &scratch_alloc));
      scratch = scratch_alloc->Alloc(scratch_alloc, scratch_bytes);
    }
    // Work on the stream is ordered, so the scratch may go back to the allocator right after launch.
    auto release = [&] {
      if (scratch_alloc == nullptr) return;
      if (scratch) scratch_alloc->Free(scratch_alloc, scratch);
      g_api->ReleaseAllocator(scratch_alloc);
    };
    try {
      if (scratch_bytes > 0 && scratch == nullptr) throw OpError("could not allocate the scratch buffer");
      if (gated) {
        void* product = static_cast<char*>(scratch) + adapter_bytes;
        cuda::RunSlimMatMul(weights, in[kA].data, call.half, call.M, product, scratch, stream);
        cuda::RunSwiGlu(product, call.half, call.M, attr.N, call.y, stream);
      } else {
        cuda::RunSlimMatMul(weights, in[kA].data, call.half, call.M, call.y, scratch, stream);
      }
    } catch (...) {
      release();
      throw;
    }
    release();
  }
};
#endif

SlimMatMulCpuKernel::SlimMatMulCpuKernel(const OrtKernelInfo* info, const std::string& name)
    : node(name), attr(ReadAttributes(info)), kernels(&SelectKernels()) {
  TensorView in[kNumInputs];
  if (ConstantWeights(info, in)) constant = Prepare(attr, in);
}

// ---- the OrtCustomOp ---------------------------------------------------------------------------------

// Registered twice per execution provider under one name, once per adapter element type (uint8 for
// int4-packed adapters, float16 for float16 ones): onnxruntime merges the two into one schema whose L
// and R accept either type, and picks the kernel whose types match the node.
template <typename Kernel>
struct SlimMatMulOp : OrtCustomOp {
  ONNXTensorElementDataType adapter_type;

  explicit SlimMatMulOp(ONNXTensorElementDataType adapter_elem_type) {
    std::memset(static_cast<OrtCustomOp*>(this), 0, sizeof(OrtCustomOp));
    adapter_type = adapter_elem_type;
    version = kOrtApiVersion;
    GetName = [](const OrtCustomOp*) { return Kernel::kOpName; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return Kernel::kProvider; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kNumInputs; };
    GetInputType = [](const OrtCustomOp* self, size_t i) {
      switch (i) {
        case kA: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED;  // float32 or float16; Y follows it
        case kW: return ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8;
        case kBias: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
        case kL:
        case kR: return static_cast<const SlimMatMulOp*>(self)->adapter_type;
        default: return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;  // scales
      }
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      return i <= kWScales ? INPUT_OUTPUT_REQUIRED : INPUT_OUTPUT_OPTIONAL;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 1; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_UNDEFINED; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t i) { return Kernel::InputMemoryType(i); };
    SetKernelLifecycle<Kernel>(*this);
  }
};

}  // namespace
}  // namespace slim

extern "C" SLIM_EXPORT OrtStatus* ORT_API_CALL RegisterCustomOps(OrtSessionOptions* options, const OrtApiBase* base) {
  using namespace slim;
  const OrtApi* api = base->GetApi(kOrtApiVersion);
  if (api == nullptr) {
    // Older than 1.20: report through the oldest API table, which every runtime has.
    const OrtApi* v1 = base->GetApi(1);
    return v1->CreateStatus(ORT_FAIL, (std::string("slim_onnx needs onnxruntime >= 1.20, this is ") +
                                       base->GetVersionString()).c_str());
  }
  g_api = api;
  // onnxruntime before 1.24 dereferences absent optional inputs (an empty name between present ones)
  // when it builds the shape-inference context of a custom op, and crashes: infer shapes only on 1.24+.
  int major = 0, minor = 0;
  const bool shape_inference = std::sscanf(base->GetVersionString(), "%d.%d", &major, &minor) == 2 &&
                               (major > 1 || (major == 1 && minor >= 24));
  static SlimMatMulOp<SlimMatMulCpuKernel> cpu_int4(ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  static SlimMatMulOp<SlimMatMulCpuKernel> cpu_f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
#ifdef SLIM_ONNX_HAVE_CUDA
  static SlimMatMulOp<SlimMatMulCudaKernel> cuda_int4(ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  static SlimMatMulOp<SlimMatMulCudaKernel> cuda_f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  OrtCustomOp* const ops[] = {&cpu_int4, &cpu_f16, &cuda_int4, &cuda_f16};
#else
  OrtCustomOp* const ops[] = {&cpu_int4, &cpu_f16};
#endif
  static OrtCustomOpDomain* domain = nullptr;  // lives as long as the process: sessions keep pointers to it
  static std::mutex mutex;
  std::lock_guard<std::mutex> lock(mutex);
  if (domain == nullptr) {
    const auto infer = [](const OrtCustomOp*, OrtShapeInferContext* ctx) -> OrtStatus* {
      try {  // an exception must not cross onnxruntime's C boundary
        return InferOutputShape(ctx);
      } catch (const std::exception& e) {
        return g_api->CreateStatus(ORT_INVALID_ARGUMENT, (std::string("SlimMatMul shape inference: ") + e.what()).c_str());
      }
    };
    for (OrtCustomOp* op : ops) op->InferOutputShapeFn = shape_inference ? +infer : nullptr;
    OrtCustomOpDomain* d = nullptr;
    if (OrtStatus* st = api->CreateCustomOpDomain("slim_onnx", &d)) return st;
    for (OrtCustomOp* op : ops)
      if (OrtStatus* st = api->CustomOpDomain_Add(d, op)) return st;
    if (OrtStatus* st = api->CustomOpDomain_Add(d, AttentionCpuOp())) return st;
    domain = d;
  }
  return api->AddCustomOpDomain(options, domain);
}

// For tests and diagnostics: which kernel table the CPU op runs ("avx2" or "scalar").
extern "C" SLIM_EXPORT const char* SlimOnnxKernelName() { return slim::SelectKernels().name; }

#ifdef SLIM_ONNX_HAVE_CUDA
// Entry points for tests and benchmarks that drive the CUDA kernels without onnxruntime-gpu (from
// torch, through ctypes). Inputs are host pointers in the op's input order (W, W_scales, bias, L,
// L_scales, R, R_scales; null = absent) with the shapes docs/op-spec.md gives for the attributes
// {K, N, group_size, sparse, rank, adapter_format (0 none, 1 float16, 2 int4), adapter_group_size}.
// Errors return null / nonzero and write a message to `error`.
namespace {
void CopyError(const std::exception& e, char* error, size_t size) {
  if (error != nullptr && size > 0) std::snprintf(error, size, "%s", e.what());
}
}  // namespace

namespace slim {
namespace {
// The attributes and weight-input views the entry points' arrays describe (see above); the shapes
// follow from the attributes, and Prepare validates the rest as for a model's node.
Attributes HostInputs(const int64_t* attrs, const void* const* inputs, TensorView (&in)[kNumInputs]) {
  Attributes a;
  a.K = attrs[0], a.N = attrs[1], a.group_size = attrs[2], a.sparse = attrs[3], a.rank = attrs[4];
  a.adapter = attrs[5] == 2 ? AdapterFormat::kInt4 : attrs[5] == 1 ? AdapterFormat::kFloat16 : AdapterFormat::kNone;
  a.adapter_group_size = attrs[6];
  ValidateAttributes(a);
  const int64_t Kb = CeilDiv(a.K, kBlockK), rb = CeilDiv(a.rank, kBlockK);
  const auto u8 = ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8, f16 = ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16;
  auto view = [&](Input i, ONNXTensorElementDataType type, std::vector<int64_t> shape) {
    TensorView v;
    v.present = inputs[i - 1] != nullptr;
    v.type = type;
    v.shape = std::move(shape);
    v.data = inputs[i - 1];
    return v;
  };
  in[kW] = view(kW, u8, {CeilDiv(a.N, kTileN), Kb, a.sparse ? kSparseBlockBytes : kDenseBlockBytes});
  in[kWScales] = view(kWScales, f16, {CeilDiv(a.K, a.group_size), a.N});
  in[kBias] = view(kBias, ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT, {a.N});
  if (a.adapter == AdapterFormat::kInt4) {
    in[kL] = view(kL, u8, {CeilDiv(a.rank, kTileN), Kb, kDenseBlockBytes});
    in[kLScales] = view(kLScales, f16, {CeilDiv(a.K, a.adapter_group_size), a.rank});
    in[kR] = view(kR, u8, {CeilDiv(a.N, kTileN), rb, kDenseBlockBytes});
    in[kRScales] = view(kRScales, f16, {CeilDiv(a.rank, a.adapter_group_size), a.N});
  } else if (a.adapter == AdapterFormat::kFloat16) {
    in[kL] = view(kL, f16, {a.K, a.rank});
    in[kR] = view(kR, f16, {a.rank, a.N});
  }
  return a;
}
}  // namespace
}  // namespace slim

extern "C" SLIM_EXPORT void* SlimOnnxCudaCreate(const int64_t* attrs, const void* const* inputs, int device,
                                                char* error, size_t error_size) {
  using namespace slim;
  try {
    TensorView in[kNumInputs];
    const Attributes a = HostInputs(attrs, inputs, in);
    return UploadCudaWeights(a, in, cuda::CudaMallocAllocator(), device);
  } catch (const std::exception& e) {
    CopyError(e, error, error_size);
    return nullptr;
  }
}

extern "C" SLIM_EXPORT size_t SlimOnnxCudaScratchBytes(void* weights, int64_t M) {
  return slim::cuda::ScratchBytes(static_cast<slim::cuda::DeviceWeights*>(weights), M);
}

extern "C" SLIM_EXPORT int SlimOnnxCudaRun(void* weights, const void* A, int half, int64_t M, void* Y, void* scratch,
                                          void* stream, char* error, size_t error_size) {
  try {
    slim::cuda::RunSlimMatMul(static_cast<slim::cuda::DeviceWeights*>(weights), A, half != 0, M, Y, scratch, stream);
    return 0;
  } catch (const std::exception& e) {
    CopyError(e, error, error_size);
    return 1;
  }
}

// The fragment-order re-layout of the main weight W (same attrs and inputs as SlimOnnxCudaCreate),
// for CPU-side tests of the layout. Called with null outputs it only writes the word counts
// {frag, meta, scales}. Returns 0, or 1 with a message in `error`.
extern "C" SLIM_EXPORT int SlimOnnxCudaFragments(const int64_t* attrs, const void* const* inputs, int64_t* counts,
                                                uint32_t* frag, uint32_t* meta, uint32_t* scales,
                                                char* error, size_t error_size) {
  using namespace slim;
  try {
    TensorView in[kNumInputs];
    const Attributes a = HostInputs(attrs, inputs, in);
    const std::unique_ptr<Prepared> p = Prepare(a, in);
    const cuda::FragMatrix f = cuda::FragFromPacked(p->w.m, static_cast<const uint16_t*>(in[kWScales].data), a.group_size);
    counts[0] = int64_t(f.frag.size()), counts[1] = int64_t(f.meta.size()), counts[2] = int64_t(f.scales.size());
    if (frag != nullptr) std::copy(f.frag.begin(), f.frag.end(), frag);
    if (meta != nullptr) std::copy(f.meta.begin(), f.meta.end(), meta);
    if (scales != nullptr) std::copy(f.scales.begin(), f.scales.end(), scales);
    return 0;
  } catch (const std::exception& e) {
    CopyError(e, error, error_size);
    return 1;
  }
}

extern "C" SLIM_EXPORT void SlimOnnxCudaDestroy(void* weights) {
  slim::cuda::FreeWeights(static_cast<slim::cuda::DeviceWeights*>(weights));
}
#endif
