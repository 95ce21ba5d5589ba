// SlimMatMul on onnxruntime's CUDA execution provider (built with SLIM_ONNX_HAVE_CUDA): the weights
// are validated and prepacked by the same code as on the CPU (slim_matmul.cc), re-laid into fragment
// order (slim_cuda_layout.cc) and uploaded once; each run launches the kernels of
// slim_cuda_kernels.cu on onnxruntime's stream.
#include <memory>
#include <string>

#include "../slim_matmul.h"
#include "slim_cuda.h"

namespace slim {

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

namespace {

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
    // With the gated activation the product P goes to scratch first (after the run's own scratch).
    const bool gated = attr.activation == Activation::kSwiGlu;
    if (call.M > cuda::kMaxRows)
      throw OpError("input 'A' has " + std::to_string(call.M) + " rows; the CUDA kernel takes at most 2^30 per run");
    const char* what = "the scratch buffer's size";
    const size_t run_bytes = (cuda::ScratchBytes(weights, call.M, call.half) + 255) / 256 * 256;
    const int64_t product_bytes = gated ? CheckedMul(CheckedMul(call.M, attr.N, what), call.half ? 2 : 4, what) : 0;
    const size_t scratch_bytes = size_t(CheckedAdd(int64_t(run_bytes), product_bytes, what));
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
        void* product = static_cast<char*>(scratch) + run_bytes;
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

}  // namespace

std::vector<OrtCustomOp*> SlimMatMulCudaOps() { return SlimMatMulOps<SlimMatMulCudaKernel>(); }

}  // namespace slim
