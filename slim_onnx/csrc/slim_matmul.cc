// Definitions of slim_matmul.h: attributes, input validation and prepacking, the start of every call,
// and shape inference, shared by the CPU and the CUDA op.
#include "slim_matmul.h"

#include <atomic>
#include <cmath>
#include <optional>

#include "float16.h"

namespace slim {
namespace {

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

}  // namespace

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

namespace {

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

std::vector<float> HalfMatrix(const TensorView& v) {
  std::vector<float> out(v.numel());
  const uint16_t* src = static_cast<const uint16_t*>(v.data);
  for (size_t i = 0; i < out.size(); ++i) out[i] = HalfToFloat(src[i]);
  return out;
}

}  // namespace

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

namespace {

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

}  // namespace

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

}  // namespace slim
