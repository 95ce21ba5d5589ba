// slim_onnx::GroupQueryAttention on the CPU: the cached decoder attention that
// slim_onnx/passes/attention.py fuses, computed as com.microsoft::GroupQueryAttention does (its
// fallback function in the model is that op), with the cache copied once per key/value head.
//
// Why: onnxruntime's CPU kernel zeroes each present buffer, then copies the past into it once per
// *query* head (H/Hkv times for grouped-query attention), and runs a one-row GEMM per head; at one new
// token and a few hundred cached positions that copying is most of a decoder layer's attention time.
//
// Inputs: query [B, S, H*D], key and value [B, S, Hkv*D], past_key and past_value [B, Hkv, P, D],
// seqlens_k int32 [B], total_sequence_length int32 [1], attention_bias [B|1, H|1, S, >= L] (optional),
// cos_cache and sin_cache [B*S, D/2] (optional). Without key and value, query is packed:
// [B, S, (H + 2 Hkv) * D] = the q/k/v projections side by side (one merged SlimMatMul's output).
// With the caches, q and k are first rotated (rotate_half, as com.microsoft::RotaryEmbedding with
// interleaved=0 at position id b*S + s): x[i], x[i + D/2] -> x[i] c - x[i + D/2] s, x[i + D/2] c + x[i] s
// with c, s = cos_cache, sin_cache[b*S + s, i]; the rotated new keys are what present holds.
// Outputs: output [B, S, H*D], present_key and present_value [B, Hkv, L, D] with L = max(T, P).
// Attributes: num_heads H, kv_num_heads Hkv, scale (0: 1/sqrt(D)). float32 only.
//
// Row b holds total_b = seqlens_k[b] + 1 positions, past_b = total_b - S of them from the past:
//   present[b, g, t] = past[b, g, t] (t < past_b), new[b, t - past_b, g] (t < total_b), 0 after;
//   query s of head h attends to t < past_b + s + 1 (causal) with
//   s_t = scale * q . k_t + bias[b, h, s, t], output = softmax(s) @ v,  g = h / (H / Hkv).
// Loop structure: one parallel pass copies the caches (a task per row and kv head, keys and values
// apart), a second runs the rows of attention (a task per row, head and chunk of queries) through
// KernelTable::attend_row, reading the present buffers just written.
#include <algorithm>
#include <cmath>
#include <cstring>
#include <string>
#include <vector>

#include "op_common.h"
#include "slim_kernels.h"

namespace slim {
namespace {

enum AttentionInput {
  kQuery = 0, kKey, kValue, kPastKey, kPastValue, kSeqlensK, kTotalLength, kBias, kCos, kSin, kNumAttentionInputs
};
const char* const kAttentionInputNames[kNumAttentionInputs] = {
    "query", "key", "value", "past_key", "past_value", "seqlens_k", "total_sequence_length", "attention_bias",
    "cos_cache", "sin_cache"};

// rotate_half of one head row in place (see the file comment).
void RotateHalf(float* x, const float* cos, const float* sin, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float a = x[i], b = x[i + half];
    x[i] = a * cos[i] - b * sin[i];
    x[i + half] = b * cos[i] + a * sin[i];
  }
}

// Head counts above this are refused: far beyond any model (they have at most a few hundred), and
// it bounds the per-head task loops.
constexpr int64_t kMaxHeads = int64_t(1) << 16;

struct AttentionKernel {
  static constexpr const char* kOpName = "GroupQueryAttention";
  std::string node;
  int64_t heads = 0, kv_heads = 0;
  float scale = 0.f;
  const KernelTable* kernels = nullptr;

  AttentionKernel(const OrtKernelInfo* info, const std::string& name) : node(name), kernels(&SelectKernels()) {
    heads = IntAttribute(info, "num_heads");
    kv_heads = IntAttribute(info, "kv_num_heads");
    scale = FloatAttribute(info, "scale", 0.f);
    if (heads < 1 || kv_heads < 1 || heads > kMaxHeads || kv_heads > kMaxHeads)
      throw OpError("num_heads=" + std::to_string(heads) + " and kv_num_heads=" + std::to_string(kv_heads) +
                    " must both be from 1 to 65536");
    if (heads % kv_heads != 0)
      throw OpError("num_heads=" + std::to_string(heads) + " must be a multiple of kv_num_heads=" +
                    std::to_string(kv_heads));
    if (!std::isfinite(scale)) throw OpError("scale must be finite (0 means 1/sqrt(head size))");
  }

  // Throws unless input `i` has shape `expected`; `formula` is that shape in words.
  void ExpectShape(const TensorView* in, AttentionInput i, const std::vector<int64_t>& expected, const char* formula,
                   int64_t D) const {
    if (in[i].shape == expected) return;
    throw OpError(std::string("input '") + kAttentionInputNames[i] + "' must be " + formula + " = " +
                  ShapeString(expected) + " (num_heads=" + std::to_string(heads) + ", kv_num_heads=" +
                  std::to_string(kv_heads) + ", head size D=" + std::to_string(D) +
                  " from past_key, B and S from query), got " + ShapeString(in[i].shape));
  }

  void Compute(OrtKernelContext* ctx) const {
    TensorView in[kNumAttentionInputs];
    ReadInputs(ctx, in, kNumAttentionInputs);
    for (int i = 0; i < kBias; ++i)
      if (!in[i].present && i != kKey && i != kValue)
        throw OpError(std::string("input '") + kAttentionInputNames[i] + "' is missing");
    const bool packed = !in[kKey].present;
    if (in[kKey].present != in[kValue].present)
      throw OpError("key and value must both be given, or both be absent (query then holds q, k and v side by side)");
    const bool rotary = in[kCos].present;
    if (in[kCos].present != in[kSin].present) throw OpError("cos_cache and sin_cache must both be given or both be absent");
    for (int i : {kQuery, kKey, kValue, kPastKey, kPastValue, kBias, kCos, kSin})
      if (in[i].present && in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT)
        throw OpError(std::string("input '") + kAttentionInputNames[i] + "' must be float32, got " + TypeName(in[i].type));
    const TensorView &q = in[kQuery], &past_k = in[kPastKey];
    if (q.shape.size() != 3) throw OpError("input 'query' must be 3-D [B, S, width], got " + ShapeString(q.shape));
    if (past_k.shape.size() != 4) throw OpError("input 'past_key' must be 4-D [B, Hkv, P, D], got " + ShapeString(past_k.shape));
    const int64_t B = q.shape[0], S = q.shape[1], P = past_k.shape[2], D = past_k.shape[3];
    if (D < 1) throw OpError("input 'past_key' " + ShapeString(past_k.shape) + " gives head size D=0 (its last dimension)");
    // Row strides of q, k and v in their buffers; in a packed query k and v follow q in each row.
    const char* width = "the query width";
    const int64_t q_stride = packed ? CheckedMul(heads + 2 * kv_heads, D, width) : CheckedMul(heads, D, width);
    const int64_t kv_stride = packed ? q_stride : kv_heads * D;
    const std::vector<int64_t> past_shape{B, kv_heads, P, D};
    ExpectShape(in, kQuery, {B, S, q_stride}, packed ? "[B, S, (H + 2 Hkv) * D] (packed q/k/v)" : "[B, S, H * D]", D);
    if (!packed) {
      ExpectShape(in, kKey, {B, S, kv_stride}, "[B, S, Hkv * D]", D);
      ExpectShape(in, kValue, {B, S, kv_stride}, "[B, S, Hkv * D]", D);
    }
    ExpectShape(in, kPastKey, past_shape, "[B, Hkv, P, D]", D);
    ExpectShape(in, kPastValue, past_shape, "[B, Hkv, P, D] (as past_key)", D);
    for (int i : {kSeqlensK, kTotalLength}) {
      const int64_t n = i == kSeqlensK ? B : 1;
      if (in[i].type != ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 || in[i].shape.size() != 1 || in[i].shape[0] != n)
        throw OpError(std::string("input '") + kAttentionInputNames[i] + "' must be int32 [" + std::to_string(n) +
                      "], got " + TypeName(in[i].type) + " " + ShapeString(in[i].shape));
    }
    const int32_t* seqlens = static_cast<const int32_t*>(in[kSeqlensK].data);
    const int32_t total = *static_cast<const int32_t*>(in[kTotalLength].data);
    const int64_t L = std::max<int64_t>(total, P);  // the present caches' length
    std::vector<int64_t> past_len(B);
    int64_t longest = 0;  // the most positions a row attends to
    for (int64_t b = 0; b < B; ++b) {
      past_len[b] = int64_t(seqlens[b]) + 1 - S;
      if (past_len[b] < 0 || past_len[b] > P || past_len[b] + S > L)
        throw OpError("seqlens_k[" + std::to_string(b) + "]=" + std::to_string(seqlens[b]) + " does not fit S=" +
                      std::to_string(S) + ", P=" + std::to_string(P) + ", total_sequence_length=" +
                      std::to_string(total) + ": it must be from S-1 to P+S-1 and below max(total_sequence_length, P)");
      longest = std::max(longest, past_len[b] + S);
    }
    const TensorView& bias = in[kBias];
    if (bias.present && (bias.shape.size() != 4 || (bias.shape[0] != 1 && bias.shape[0] != B) ||
                         (bias.shape[1] != 1 && bias.shape[1] != heads) || bias.shape[2] != S || bias.shape[3] < longest))
      throw OpError("input 'attention_bias' must be [B or 1, H or 1, S, >= past + S] = [" + std::to_string(B) + " or 1, " +
                    std::to_string(heads) + " or 1, " + std::to_string(S) + ", >= " + std::to_string(longest) +
                    "], got " + ShapeString(bias.shape));
    const int64_t half = D / 2;
    if (rotary && D % 2 != 0) throw OpError("rotary (cos_cache, sin_cache) needs an even head size, got D=" + std::to_string(D));
    if (rotary) {
      const std::vector<int64_t> cache_shape{CheckedMul(B, S, "B * S"), half};
      ExpectShape(in, kCos, cache_shape, "[B * S, D / 2]", D);
      ExpectShape(in, kSin, cache_shape, "[B * S, D / 2]", D);
    }
    const float* cos = static_cast<const float*>(in[kCos].data);
    const float* sin = static_cast<const float*>(in[kSin].data);

    const std::vector<int64_t> out_shape{B, S, heads * D}, present_shape{B, kv_heads, L, D};
    CheckedNumel(present_shape, "present_key's element count");
    float* out[3];
    for (int i = 0; i < 3; ++i) {
      const std::vector<int64_t>& shape = i == 0 ? out_shape : present_shape;
      OrtValue* value = nullptr;
      ThrowOnError(g_api->KernelContext_GetOutput(ctx, i, shape.data(), shape.size(), &value));
      void* data = nullptr;
      ThrowOnError(g_api->GetTensorMutableData(value, &data));
      out[i] = static_cast<float*>(data);
    }
    if (B == 0) return;  // with S == 0 the caches are still copied into present

    // 1. present = past rows, then the new rows, then zeros; a task per (row, kv head, key|value).
    const float* query = static_cast<const float*>(q.data);
    const float* news[2] = {packed ? query + heads * D : static_cast<const float*>(in[kKey].data),
                            packed ? query + (heads + kv_heads) * D : static_cast<const float*>(in[kValue].data)};
    const float* pasts[2] = {static_cast<const float*>(past_k.data), static_cast<const float*>(in[kPastValue].data)};
    ParallelFor(ctx, B * kv_heads * 2, [&](int64_t task) {
      const int64_t which = task % 2, bg = task / 2, b = bg / kv_heads, g = bg % kv_heads;
      float* dst = out[1 + which] + bg * L * D;
      std::copy_n(pasts[which] + bg * P * D, past_len[b] * D, dst);  // not memcpy: an empty past may be null
      for (int64_t s = 0; s < S; ++s) {
        float* row = dst + (past_len[b] + s) * D;
        std::copy_n(news[which] + (b * S + s) * kv_stride + g * D, D, row);
        if (rotary && which == 0) RotateHalf(row, cos + (b * S + s) * half, sin + (b * S + s) * half, half);
      }
      std::fill(dst + (past_len[b] + S) * D, dst + L * D, 0.f);
    });

    // 2. attention rows; queries in chunks so that prompts spread over the threads.
    const int64_t chunk = std::max<int64_t>(1, std::min<int64_t>(S, 16)), chunks = (S + chunk - 1) / chunk;
    const float alpha = scale != 0.f ? scale : 1.f / std::sqrt(float(D));
    const float* bias_data = static_cast<const float*>(bias.data);
    const int64_t group = heads / kv_heads;
    ParallelFor(ctx, B * heads * chunks, [&](int64_t task) {
      const int64_t bh = task / chunks, b = bh / heads, h = bh % heads, s0 = (task % chunks) * chunk;
      const int64_t bg = b * kv_heads + h / group;
      std::vector<float> scores(past_len[b] + S), rotated(rotary ? D : 0);
      for (int64_t s = s0; s < std::min(S, s0 + chunk); ++s) {
        const int64_t row = (b * S + s) * heads + h;
        const float* q_row = query + (b * S + s) * q_stride + h * D;
        if (rotary) {
          std::copy(q_row, q_row + D, rotated.begin());
          RotateHalf(rotated.data(), cos + (b * S + s) * half, sin + (b * S + s) * half, half);
          q_row = rotated.data();
        }
        const float* row_bias = nullptr;
        if (bias.present) {
          const int64_t bb = bias.shape[0] == 1 ? 0 : b, hh = bias.shape[1] == 1 ? 0 : h;
          row_bias = bias_data + ((bb * bias.shape[1] + hh) * S + s) * bias.shape[3];
        }
        kernels->attend_row(q_row, out[1] + bg * L * D, out[2] + bg * L * D, past_len[b] + s + 1, D, alpha,
                            row_bias, scores.data(), out[0] + row * D);
      }
    });
  }
};

struct AttentionOp : OrtCustomOp {
  AttentionOp() {
    std::memset(static_cast<OrtCustomOp*>(this), 0, sizeof(OrtCustomOp));
    version = kOrtApiVersion;
    GetName = [](const OrtCustomOp*) { return AttentionKernel::kOpName; };
    GetExecutionProviderType = [](const OrtCustomOp*) { return "CPUExecutionProvider"; };
    GetInputTypeCount = [](const OrtCustomOp*) -> size_t { return kNumAttentionInputs; };
    GetInputType = [](const OrtCustomOp*, size_t i) {
      return i == kSeqlensK || i == kTotalLength ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
    };
    GetInputCharacteristic = [](const OrtCustomOp*, size_t i) {
      const bool optional = i == kKey || i == kValue || i == kBias || i == kCos || i == kSin;
      return optional ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
    };
    GetOutputTypeCount = [](const OrtCustomOp*) -> size_t { return 3; };
    GetOutputType = [](const OrtCustomOp*, size_t) { return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT; };
    GetOutputCharacteristic = [](const OrtCustomOp*, size_t) { return INPUT_OUTPUT_REQUIRED; };
    GetInputMemoryType = [](const OrtCustomOp*, size_t) { return OrtMemTypeDefault; };
    SetKernelLifecycle<AttentionKernel>(*this);
  }
};

}  // namespace

OrtCustomOp* AttentionCpuOp() {
  static AttentionOp op;
  return &op;
}

}  // namespace slim
