// What the CPU and the CUDA SlimMatMul ops share (docs/op-spec.md): the attributes and their checks,
// the inputs and their prepacking (validated once, on either device, by the same code), the start
// of every call, shape inference, and the OrtCustomOp table both register.
//
// Files: slim_matmul.cc defines these; slim_matmul_cpu.cc is the CPU op, cuda/slim_matmul_cuda_op.cc
// the CUDA one; register.cc registers both with the attention op.
#pragma once

#include <cstring>
#include <memory>
#include <string>
#include <vector>

#include "op_common.h"
#include "slim_kernels.h"

namespace slim {

enum class AdapterFormat { kNone, kFloat16, kInt4 };
// kSwiGlu: Y = silu(P[:, :N/2]) * P[:, N/2:] (Llama/Qwen MLPs after the gate/up merge); Y has N/2 columns.
enum class Activation { kNone, kSwiGlu };

struct Attributes {
  int64_t K = 0, N = 0, bits = 4, group_size = 0, sparse = 1, rank = 0, adapter_group_size = 128, accuracy_level = 0;
  AdapterFormat adapter = AdapterFormat::kNone;
  Activation activation = Activation::kNone;
  int64_t OutputColumns() const { return activation == Activation::kSwiGlu ? N / 2 : N; }
};

Attributes ReadAttributes(const OrtKernelInfo* info);  // type-checked, then ValidateAttributes
void ValidateAttributes(const Attributes& a);           // ranges and consistency

enum Input { kA = 0, kW, kWScales, kBias, kL, kLScales, kR, kRScales, kNumInputs };
inline constexpr const char* kInputNames[kNumInputs] = {"A", "W", "W_scales", "bias", "L", "L_scales", "R", "R_scales"};

// A 4-bit matrix plus its converted scales and int8-path corrections.
struct PreparedMatrix {
  Matrix4 m;
  std::vector<float> scales;
  std::vector<int32_t> corr;
  KernelLayout layout;  // the CPU kernels' own copy, if they make one (KernelTable::relayout)
};

struct Prepared {
  PreparedMatrix w, l, r;  // l, r: int4 adapters
  std::vector<float> l_f32, r_f32;  // float16 adapters, row-major
  std::vector<float> bias;
};

// Checks every weight input (`in`, in Input order) against the attributes and prepacks them.
std::unique_ptr<Prepared> Prepare(const Attributes& a, const TensorView* in);
// Reads the weight inputs into `in` when all are constant initializers (for one-time prepacking).
bool ConstantWeights(const OrtKernelInfo* info, TensorView* in);

// What every run starts with, on either device: the inputs, A's checks, and Y allocated.
struct Call {
  bool half = false;
  int64_t M = 0;
  OrtValue* y_value = nullptr;
  void* y = nullptr;
};

// Only A is read when the weights were prepacked at kernel creation (`read_weights` false): a
// view costs a shape query per input, and decode steps run ~120 of these nodes.
Call BeginCall(OrtKernelContext* ctx, const Attributes& attr, TensorView (&in)[kNumInputs], bool read_weights);

// Output type and shape for onnxruntime's graph resolution (see slim_matmul.cc).
OrtStatus* InferOutputShape(OrtShapeInferContext* ctx);

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

// The op for one execution provider (Kernel), registered in its two adapter element types.
template <typename Kernel>
std::vector<OrtCustomOp*> SlimMatMulOps() {
  static SlimMatMulOp<Kernel> int4(ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8);
  static SlimMatMulOp<Kernel> f16(ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT16);
  return {&int4, &f16};
}
std::vector<OrtCustomOp*> SlimMatMulCpuOps();
#ifdef SLIM_ONNX_HAVE_CUDA
std::vector<OrtCustomOp*> SlimMatMulCudaOps();

namespace cuda {
struct DeviceAllocator;
struct DeviceWeights;
}  // namespace cuda
// The device copy of a node's weights, validated and prepacked as on the CPU (cuda/slim_matmul_cuda_op.cc).
cuda::DeviceWeights* UploadCudaWeights(const Attributes& a, const TensorView* in, const cuda::DeviceAllocator& alloc,
                                       int device);
#endif

}  // namespace slim
