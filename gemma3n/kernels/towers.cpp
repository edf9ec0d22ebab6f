// Fused row epilogues for the audio and vision towers (gemma3n/fused.py is the Python side).
//
// Between their GEMMs and convolutions both towers normalise each position's features and apply
// an activation, a scale and a residual add. As separate PyTorch ops that is 6-10 passes over the
// activations (norm statistics, multiply by the inverse, by the weight, four for the tanh GELU,
// the residual add, the dtype casts), which on a CPU with bf16 matrix units took more time than
// the matrix products themselves. Here it is one read of x (and of
// the residual) and one write of the result per row:
//
//   out[r, :] = act(c · rsqrt(mean(c²) + eps) · w) · scale + residual[r, :],   c = clamp(x[r, :], ±clip)
//
// with the statistics and all arithmetic in fp32 whatever the storage dtype (fp32 or bf16 for x,
// residual and out; rounding to bf16 once, to nearest even). act: 0 none, 1 GELU (tanh
// approximation, as x·sigmoid(2·√(2/π)(x + 0.044715x³)), the same function), 2 SiLU, 3 ReLU.
//
// The loops are written once and compiled three times (portable, AVX2+FMA, AVX-512), picked at
// run time with the decode kernels' ISA level (decode.cpp). exp is a Cephes-style polynomial
// (relative error ~2e-7) so that the loops vectorise. Registered as torch.ops.gemma3n_towers.*.

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace gemma3n {
namespace {

enum Act : int64_t { NONE = 0, GELU_TANH = 1, SILU = 2, RELU = 3 };

inline float load(const float* p, int64_t i) { return p[i]; }
inline float load(const uint16_t* p, int64_t i) {
  const uint32_t u = static_cast<uint32_t>(p[i]) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline void store(float* p, int64_t i, float v) { p[i] = v; }
inline void store(uint16_t* p, int64_t i, float v) {
  uint32_t u;
  std::memcpy(&u, &v, 4);
  u = (v != v) ? 0x7FC00000u : u + 0x7FFFu + ((u >> 16) & 1u);  // nearest even; NaN stays NaN
  p[i] = static_cast<uint16_t>(u >> 16);
}

// e^x for x in [-87.3, 88.7] (clamped): 2^n · P(r), r = x - n·ln2 (Cephes expf's coefficients).
// n is rounded by adding and subtracting 1.5·2^23 (floor() would keep GCC from vectorising).
inline float exp_poly(float x) {
  x = std::min(std::max(x, -87.3f), 88.7f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = x - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, 4);
  return p * scale;
}

template <int64_t ACT>
inline float activate(float v) {
  if constexpr (ACT == GELU_TANH) {
    const float t = 1.5957691216057308f * (v + 0.044715f * v * v * v);  // 2·√(2/π)(v + 0.044715v³)
    return v / (1.0f + exp_poly(-t));
  } else if constexpr (ACT == SILU) {
    return v / (1.0f + exp_poly(-v));
  } else if constexpr (ACT == RELU) {
    return std::max(v, 0.0f);
  } else {
    return v;
  }
}

struct Args {
  const void* x;
  const float* w;  // C weights (ones when the norm has none)
  const void* res;  // nullptr: no residual
  void* out;
  int64_t C;
  float eps, clip, scale;
};

// Rows [r0, r1). x is read twice per row (statistics, then the result): a row is at most a few
// KiB, so the second read comes from L1.
template <class TX, class TO, bool RES, int64_t ACT>
inline void rows_body(const Args& a, int64_t r0, int64_t r1) {
  const int64_t C = a.C;
  for (int64_t r = r0; r < r1; ++r) {
    const TX* x = static_cast<const TX*>(a.x) + r * C;
    TO* out = static_cast<TO*>(a.out) + r * C;
    float ss = 0.f;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < C; ++i) {
      const float v = std::min(std::max(load(x, i), -a.clip), a.clip);
      ss += v * v;
    }
    const float inv = 1.0f / std::sqrt(ss / static_cast<float>(C) + a.eps);
    if constexpr (RES) {
      const TO* res = static_cast<const TO*>(a.res) + r * C;
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) {
        const float v = std::min(std::max(load(x, i), -a.clip), a.clip) * inv * a.w[i];
        store(out, i, activate<ACT>(v) * a.scale + load(res, i));
      }
    } else {
#pragma omp simd
      for (int64_t i = 0; i < C; ++i) {
        const float v = std::min(std::max(load(x, i), -a.clip), a.clip) * inv * a.w[i];
        store(out, i, activate<ACT>(v) * a.scale);
      }
    }
  }
}

using RowsFn = void (*)(const Args&, int64_t, int64_t);

#if defined(__x86_64__) || defined(_M_X64)
#define TOWERS_X86 1
template <class TX, class TO, bool RES, int64_t ACT>
__attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma"), flatten)) void rows_avx512(const Args& a, int64_t r0,
                                                                                             int64_t r1) {
  rows_body<TX, TO, RES, ACT>(a, r0, r1);
}
template <class TX, class TO, bool RES, int64_t ACT>
__attribute__((target("avx2,fma"), flatten)) void rows_avx2(const Args& a, int64_t r0, int64_t r1) {
  rows_body<TX, TO, RES, ACT>(a, r0, r1);
}
#endif
template <class TX, class TO, bool RES, int64_t ACT>
void rows_generic(const Args& a, int64_t r0, int64_t r1) {
  rows_body<TX, TO, RES, ACT>(a, r0, r1);
}

template <class TX, class TO, bool RES, int64_t ACT>
RowsFn pick_isa(int64_t isa) {
#ifdef TOWERS_X86
  if (isa >= 3) return &rows_avx512<TX, TO, RES, ACT>;
  if (isa == 2) return &rows_avx2<TX, TO, RES, ACT>;
#endif
  return &rows_generic<TX, TO, RES, ACT>;
}

template <class TX, class TO, bool RES>
RowsFn pick_act(int64_t act, int64_t isa) {
  switch (act) {
    case GELU_TANH: return pick_isa<TX, TO, RES, GELU_TANH>(isa);
    case SILU: return pick_isa<TX, TO, RES, SILU>(isa);
    case RELU: return pick_isa<TX, TO, RES, RELU>(isa);
    default: return pick_isa<TX, TO, RES, NONE>(isa);
  }
}

template <class TX>
RowsFn pick_out(bool bf16_out, bool res, int64_t act, int64_t isa) {
  if (bf16_out) return res ? pick_act<TX, uint16_t, true>(act, isa) : pick_act<TX, uint16_t, false>(act, isa);
  return res ? pick_act<TX, float, true>(act, isa) : pick_act<TX, float, false>(act, isa);
}

bool is_bf16(const at::Tensor& t, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), "gemma3n towers: ", what, " must be on the CPU");
  TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kBFloat16, "gemma3n towers: ", what,
              " must be float32 or bfloat16, not ", t.scalar_type());
  return t.scalar_type() == at::kBFloat16;
}

at::Tensor norm_act(const at::Tensor& x_in, const std::optional<at::Tensor>& weight, double eps, int64_t act,
                    double clip, const std::optional<at::Tensor>& residual, double scale, bool bf16_out, int64_t isa) {
  TORCH_CHECK(x_in.dim() >= 1 && x_in.size(-1) > 0, "gemma3n towers: x needs a last dimension");
  TORCH_CHECK(act >= NONE && act <= RELU, "gemma3n towers: unknown activation ", act);
  const bool bf16_in = is_bf16(x_in, "x");
  const at::Tensor x = x_in.contiguous();
  const int64_t C = x.size(-1);
  const int64_t R = x.numel() / C;
  at::Tensor w = weight.has_value() ? weight->to(at::kFloat).contiguous() : at::ones({C}, x.options().dtype(at::kFloat));
  TORCH_CHECK(w.numel() == C, "gemma3n towers: weight has ", w.numel(), " values for rows of ", C);
  at::Tensor out = at::empty(x.sizes(), x.options().dtype(bf16_out ? at::kBFloat16 : at::kFloat));
  at::Tensor res;
  if (residual.has_value()) {
    TORCH_CHECK(residual->sizes() == x.sizes(), "gemma3n towers: residual shape ", residual->sizes(), " != x ",
                x.sizes());
    TORCH_CHECK(is_bf16(*residual, "residual") == bf16_out, "gemma3n towers: residual and out must share a dtype");
    res = residual->contiguous();
  }
  const Args a{x.data_ptr(), w.data_ptr<float>(), res.defined() ? res.data_ptr() : nullptr, out.data_ptr(), C,
               static_cast<float>(eps), static_cast<float>(clip), static_cast<float>(scale)};
  const int64_t level = resolve_isa(isa);
  const RowsFn fn = bf16_in ? pick_out<uint16_t>(bf16_out, res.defined(), act, level)
                            : pick_out<float>(bf16_out, res.defined(), act, level);
  // tasks of >= ~16k values: smaller ones cost more to hand out than to compute
  at::parallel_for(0, R, std::max<int64_t>(1, 16384 / C), [&](int64_t r0, int64_t r1) { fn(a, r0, r1); });
  return out;
}

}  // namespace
}  // namespace gemma3n

TORCH_LIBRARY(gemma3n_towers, m) {
  m.def(
      "norm_act(Tensor x, Tensor? weight, float eps, int act, float clip, Tensor? residual, float scale, "
      "bool bf16_out, int isa) -> Tensor",
      &gemma3n::norm_act);
}
