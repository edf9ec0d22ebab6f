// The Python entry points of the weight products (decode.cpp): argument checks, the products
// on a given weight view, the dequantization a prefill's GEMM runs on, and the extension module.
// A kernel reads raw memory, so every shape, stride and index is checked here (the fused step
// checks its weights once, when it is built).

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <string>
#include <vector>

namespace gemma3n {
namespace {

torch::Tensor checked_x(const torch::Tensor& x, int64_t K) {
  TORCH_CHECK(x.dim() == 2 && x.size(1) == K, "gemma3n kernels: x must be [M, ", K, "], got ", x.sizes());
  TORCH_CHECK(x.device().is_cpu(), "gemma3n kernels: x must be on the CPU");
  return x.to(torch::kFloat32).contiguous();
}

void check_weight(const torch::Tensor& w, torch::ScalarType dtype, const char* what) {
  TORCH_CHECK(w.device().is_cpu() && w.scalar_type() == dtype && w.dim() == 2, "gemma3n kernels: ", what,
              " must be a 2-D CPU tensor of ", c10::toString(dtype), ", got ", w.scalar_type(), " ", w.sizes());
  TORCH_CHECK(w.size(1) == 0 || w.stride(1) == 1, "gemma3n kernels: ", what, " rows must be contiguous");
  TORCH_CHECK(w.size(0) <= 1 || w.stride(0) >= w.size(1), "gemma3n kernels: ", what, " rows overlap");
}

// (pointer to the row list or nullptr, number of outputs)
std::pair<const int64_t*, int64_t> checked_rows(const c10::optional<torch::Tensor>& rows, int64_t n_rows,
                                                torch::Tensor& keep) {
  if (!rows.has_value()) return {nullptr, n_rows};
  keep = rows->to(torch::kInt64).contiguous();
  TORCH_CHECK(keep.dim() == 1, "gemma3n kernels: rows must be 1-D");
  const int64_t* idx = keep.data_ptr<int64_t>();
  bool inside = true;
  for (int64_t i = 0; i < keep.numel(); ++i) inside &= idx[i] >= 0 && idx[i] < n_rows;
  TORCH_CHECK(inside, "gemma3n kernels: row index out of range [0, ", n_rows, ")");
  return {idx, keep.numel()};
}

torch::Tensor call(const Weight& w, int64_t n_rows, int64_t K, const torch::Tensor& x,
                   const c10::optional<torch::Tensor>& rows, int64_t isa) {
  auto xf = checked_x(x, K);
  torch::Tensor keep;
  auto [row_ptr, N] = checked_rows(rows, n_rows, keep);
  auto y = torch::empty({xf.size(0), N}, xf.options());
  product(w, xf.data_ptr<float>(), xf.size(0), K, y.data_ptr<float>(), row_ptr, N, resolve_isa(isa));
  return y;
}

torch::Tensor linear_f32(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> rows, int64_t isa) {
  check_weight(w, torch::kFloat32, "fp32 weight");
  return call({F32, w.data_ptr(), w.stride(0)}, w.size(0), w.size(1), x, rows, isa);
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> rows, int64_t isa) {
  check_weight(w, torch::kBFloat16, "bf16 weight");
  return call({BF16, w.data_ptr(), w.stride(0)}, w.size(0), w.size(1), x, rows, isa);
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> rows,
                          int64_t isa) {
  check_weight(q, torch::kInt8, "int8 weight");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && scale.dim() == 1 && scale.size(0) == q.size(0) &&
                  scale.stride(0) == 1,
              "gemma3n kernels: int8 scales must be bf16 [", q.size(0), "]");
  return call({INT8, q.data_ptr(), q.stride(0), scale.data_ptr()}, q.size(0), q.size(1), x, rows, isa);
}

torch::Tensor linear_int4(torch::Tensor x, torch::Tensor q, torch::Tensor sz, int64_t group,
                          c10::optional<torch::Tensor> rows, int64_t isa) {
  check_weight(q, torch::kUInt8, "int4 weight");
  TORCH_CHECK(group > 0 && group % 32 == 0, "gemma3n kernels: int4 group must be a multiple of 32, got ", group);
  const int64_t K = q.size(1) * 2;
  TORCH_CHECK(K % group == 0, "gemma3n kernels: int4 width ", K, " is not a multiple of the group ", group);
  TORCH_CHECK(sz.scalar_type() == torch::kBFloat16 && sz.dim() == 3 && sz.size(0) == q.size(0) &&
                  sz.size(1) == K / group && sz.size(2) == 2 && sz.stride(2) == 1 && sz.stride(1) == 2,
              "gemma3n kernels: int4 scales must be bf16 [", q.size(0), ", ", K / group, ", 2], got ", sz.sizes());
  return call({INT4, q.data_ptr(), q.stride(0), sz.data_ptr(), sz.stride(0) / 2, group}, q.size(0), K, x, rows,
              isa);
}

// The weights of a prefill, dequantized into a caller's buffer [N, K] (fp32 or bf16): a prefill
// multiplies many activation rows, so it runs a GEMM over dequantized blocks. int8 codes are
// written as they are (the caller scales the GEMM's output per row); int4 as (q - 8)·scale + zero.
void check_out(const torch::Tensor& out, int64_t N, int64_t K) {
  TORCH_CHECK(out.device().is_cpu() && out.is_contiguous() && out.dim() == 2 && out.size(0) == N && out.size(1) == K &&
                  (out.scalar_type() == torch::kFloat32 || out.scalar_type() == torch::kBFloat16),
              "gemma3n kernels: out must be a contiguous fp32 or bf16 [", N, ", ", K, "] tensor");
}

template <typename Store>
void codes_to(const torch::Tensor& q, bool nibbles, const uint16_t* sz, int64_t sld, int64_t group, int64_t N,
              int64_t K, Store store) {
  const int64_t ld = q.stride(0);
  const uint8_t* base = static_cast<const uint8_t*>(q.data_ptr());
  at::parallel_for(0, N, std::max<int64_t>(1, (1 << 16) / std::max<int64_t>(1, K)), [&](int64_t a, int64_t b) {
    std::vector<float> row(K);
    for (int64_t n = a; n < b; ++n) {
      const uint8_t* src = base + n * ld;
      if (!nibbles) {
        for (int64_t k = 0; k < K; ++k) row[k] = static_cast<float>(static_cast<int8_t>(src[k]));
      } else {
        const uint16_t* pairs = sz + 2 * n * sld;
        for (int64_t g = 0; g < K / group; ++g) {
          const float s = bf16_to_float(pairs[2 * g]), z = bf16_to_float(pairs[2 * g + 1]);
          for (int64_t k = g * group; k < (g + 1) * group; k += 2) {
            const uint8_t byte = src[k / 2];
            row[k] = (static_cast<float>(byte & 15) - 8.f) * s + z;
            row[k + 1] = (static_cast<float>(byte >> 4) - 8.f) * s + z;
          }
        }
      }
      store(n, row.data());
    }
  });
}

void dequantize_into(const torch::Tensor& q, bool nibbles, const uint16_t* sz, int64_t sld, int64_t group,
                     torch::Tensor out) {
  const int64_t N = out.size(0), K = out.size(1);
  if (out.scalar_type() == torch::kFloat32) {
    float* dst = out.data_ptr<float>();
    codes_to(q, nibbles, sz, sld, group, N, K, [&](int64_t n, const float* row) { std::copy(row, row + K, dst + n * K); });
  } else {
    uint16_t* dst = reinterpret_cast<uint16_t*>(out.data_ptr());
    codes_to(q, nibbles, sz, sld, group, N, K, [&](int64_t n, const float* row) {
      for (int64_t k = 0; k < K; ++k) dst[n * K + k] = float_to_bf16(row[k]);
    });
  }
}

void dequantize_int8(torch::Tensor q, torch::Tensor out) {
  check_weight(q, torch::kInt8, "int8 weight");
  check_out(out, q.size(0), q.size(1));
  dequantize_into(q, false, nullptr, 0, 0, out);
}

void dequantize_int4(torch::Tensor q, torch::Tensor sz, int64_t group, torch::Tensor out) {
  check_weight(q, torch::kUInt8, "int4 weight");
  const int64_t K = 2 * q.size(1);
  TORCH_CHECK(group > 0 && K % group == 0 && sz.scalar_type() == torch::kBFloat16 && sz.dim() == 3 &&
                  sz.size(0) == q.size(0) && sz.size(1) == K / group && sz.stride(2) == 1 && sz.stride(1) == 2,
              "gemma3n kernels: bad int4 scales");
  check_out(out, q.size(0), K);
  dequantize_into(q, true, reinterpret_cast<const uint16_t*>(sz.data_ptr()), sz.stride(0) / 2, group, out);
}

std::string isa_name(int64_t isa) {
  switch (resolve_isa(isa)) {
    case AVX512_BF16: return "avx512bf16";
    case AVX512: return "avx512";
    case AVX2: return "avx2";
    default: return "generic";
  }
}

}  // namespace
}  // namespace gemma3n

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using namespace gemma3n;
  m.doc() = "gemma3n decode kernels: weight-streaming y = x W^T for bf16, int8 and int4 weights";
  m.def("linear_f32", &linear_f32, "y [M, N] = x [M, K] @ W[rows]^T, W fp32 (strided view)");
  m.def("linear_bf16", &linear_bf16, "y [M, N] fp32 = x [M, K] @ W[rows]^T, W bf16 (strided view)");
  m.def("linear_int8", &linear_int8, "y = x @ (q * scale[:, None])[rows]^T, q int8, one bf16 scale per row");
  m.def("linear_int4", &linear_int4, "y = x @ dequant_int4(q, sz)[rows]^T, groups of `group` input columns");
  m.def("dequantize_int8", &dequantize_int8, "out[N, K] (fp32 or bf16) = q as numbers (scales not applied)");
  m.def("dequantize_int4", &dequantize_int4, "out[N, K] (fp32 or bf16) = (q - 8) * scale + zero by groups");
  m.def("isa_name", &isa_name, "the body a given ISA level (0 = the best) runs on this CPU");
  m.def(
      "activation_form",
      [](const std::string& kind, int64_t isa) -> std::string {
        const int64_t level = resolve_isa(isa);
        if (level == GENERIC || kind == "f32") return "fp32";
        if (kind == "bf16") return level == AVX512_BF16 ? "bf16" : "fp32";
        return "int16";
      },
      "how a body at this level sees x: fp32 as given, rounded to bf16, or int16 with a per-row scale");
  register_step(m);
}
