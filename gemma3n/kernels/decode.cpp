// Weight-streaming matrix kernels for decode: y[M, N] = x[M, K] · W[N, K]ᵀ with M ≤ a few rows.
//
// Decoding one token reads every weight once and does two FLOPs per weight, so its speed is the
// rate at which weights stream from memory. These kernels read each weight row exactly once for
// all M activation rows (x stays in L1/L2) and keep the arithmetic per weight byte small enough
// that a core's share of the memory bandwidth, not its ALUs, sets the pace:
// - bf16 weights: with AVX512-BF16, x is rounded to bf16 once per call and each 64-byte line is
//   one `vdpbf16ps` per activation row (as PyTorch's and llama.cpp's bf16 paths round it);
//   elsewhere the weights are widened to fp32 in registers and x stays fp32.
// - int8 / int4 weights: x is quantized per row to int16 (x ≈ s·xq, s = max|x| / 32767: 15-bit
//   resolution, far finer than the weights), and codes multiply in the integer domain
//   (`vpmaddwd`): 32 products per instruction, summed in int32 (flushed
//   to fp32 well before they could overflow), scaled once per row (int8) or group (int4).
// Every output's arithmetic depends on its own activation row and on K alone (not on M, N, the
// row range a thread gets or the thread count), so a sequence's result does not depend on what it
// is batched with. The portable body computes in plain fp32 and serves as the tests' reference.
//
// Weights may be strided views: a row stride (`ld`) lets a MatFormer width run on a column prefix
// of the full matrix and an index list (`rows`) on some of its rows, with no copy. Weights come
// memory-mapped from safetensors files, so no alignment is assumed.
//
// ISA levels (chosen at run time; `isa` 0 = the best this CPU has): 1 portable C++, 2 AVX2+FMA,
// 3 AVX-512 (F/BW/VL/DQ), 4 AVX-512 with BF16 (bf16 weights by dot products; the rest as 3).
// Layouts (gemma3n/quantize.py): int8 [N, K] codes with one bf16 scale per row; int4 [N, K/2]
// bytes, low nibble = even column, with a bf16 (scale, zero) pair per group of g columns:
// W = (q - 8) * scale + zero, so Σ_k W x = Σ_groups scale·Σ_k q x + (zero - 8·scale)·Σ_k x.

#include "decode.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace gemma3n {
namespace detail {
namespace {

// ---------------------------------------------------------------------------------------------
// Portable bodies (any CPU; plain fp32: the reference the SIMD bodies are tested against).
// ---------------------------------------------------------------------------------------------
void bf16_generic(const Job& j, int64_t i0, int64_t i1) {
  const float* xs = static_cast<const float*>(j.x);
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* w = static_cast<const uint16_t*>(j.w) + row_of(j, i) * j.ld;
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = xs + m * j.xld;
      float acc = 0.f;
      for (int64_t k = 0; k < j.K; ++k) acc += bf16_to_float(w[k]) * x[k];
      j.y[m * j.N + i] = acc;
    }
  }
}

void f32_generic(const Job& j, int64_t i0, int64_t i1) {
  const float* xs = static_cast<const float*>(j.x);
  for (int64_t i = i0; i < i1; ++i) {
    const float* w = static_cast<const float*>(j.w) + row_of(j, i) * j.ld;
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = xs + m * j.xld;
      float acc = 0.f;
      for (int64_t k = 0; k < j.K; ++k) acc += w[k] * x[k];
      j.y[m * j.N + i] = acc;
    }
  }
}



#ifdef GEMMA3N_X86
// --- bf16 and fp32 weights -------------------------------------------------------------------
// AVX512-BF16: x rounded to bf16 (zero-padded to xld); one vdpbf16ps per 32 weights and row.
template <int R, int M>
struct Bf16Dp {
  TARGET_AVX512_BF16 static void block(const Job& j, int64_t i) {
    const uint16_t* xb = static_cast<const uint16_t*>(j.x);
    const uint8_t* w[R];
    row_pointers<R>(j, i, 2, w);
    __m512 acc[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
    const int64_t K = j.K;
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (K - k)) - 1);
      __m512bh xv[M];
      for (int m = 0; m < M; ++m) xv[m] = (__m512bh)_mm512_loadu_si512(xb + m * j.xld + k);
      for (int r = 0; r < R; ++r) {
        const __m512bh wv = (__m512bh)_mm512_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(w[r]) + k);
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_dpbf16_ps(acc[r][m], wv, xv[m]);
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) j.y[m * j.N + i + r] = _mm512_reduce_add_ps(acc[r][m]);
  }
};

// fp32 activations against bf16 weights (widened to fp32 in registers: AVX-512 without BF16
// units, AVX2) or fp32 weights (small models stored in fp32, such as the embedded one). One body
// per vector width; `W` says how a weight row's elements load as fp32 lanes.
struct Bf16Weights {
  static constexpr int64_t bytes = 2;
  TARGET_AVX512 static __m512 load16(const uint8_t* row, int64_t k, __mmask16 mask) {
    return widen_bf16_512(_mm256_maskz_loadu_epi16(mask, reinterpret_cast<const uint16_t*>(row) + k));
  }
  TARGET_AVX2 static __m256 load8(const uint8_t* row, int64_t k) {
    return widen_bf16_256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(row + 2 * k)));
  }
  static float at(const uint8_t* row, int64_t k) { return bf16_to_float(reinterpret_cast<const uint16_t*>(row)[k]); }
};

struct F32Weights {
  static constexpr int64_t bytes = 4;
  TARGET_AVX512 static __m512 load16(const uint8_t* row, int64_t k, __mmask16 mask) {
    return _mm512_maskz_loadu_ps(mask, reinterpret_cast<const float*>(row) + k);
  }
  TARGET_AVX2 static __m256 load8(const uint8_t* row, int64_t k) {
    return _mm256_loadu_ps(reinterpret_cast<const float*>(row) + k);
  }
  static float at(const uint8_t* row, int64_t k) { return reinterpret_cast<const float*>(row)[k]; }
};

template <class W>
struct Fp32x512 {
  template <int R, int M>
  struct Body {
    TARGET_AVX512 static void block(const Job& j, int64_t i) {
      const float* xs = static_cast<const float*>(j.x);
      const uint8_t* w[R];
      row_pointers<R>(j, i, W::bytes, w);
      __m512 acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_ps();
      const int64_t K = j.K;
      for (int64_t k = 0; k < K; k += 16) {
        const __mmask16 mask = K - k >= 16 ? __mmask16(0xFFFF) : static_cast<__mmask16>((1u << (K - k)) - 1);
        __m512 xv[M];
        for (int m = 0; m < M; ++m) xv[m] = _mm512_maskz_loadu_ps(mask, xs + m * j.xld + k);
        for (int r = 0; r < R; ++r) {
          const __m512 wv = W::load16(w[r], k, mask);
          for (int m = 0; m < M; ++m) acc[r][m] = _mm512_fmadd_ps(wv, xv[m], acc[r][m]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) j.y[m * j.N + i + r] = _mm512_reduce_add_ps(acc[r][m]);
    }
  };
};

template <class W>
struct Fp32x256 {
  template <int R, int M>
  struct Body {
    TARGET_AVX2 static void block(const Job& j, int64_t i) {
      const float* xs = static_cast<const float*>(j.x);
      const uint8_t* w[R];
      row_pointers<R>(j, i, W::bytes, w);
      __m256 acc[R][M];
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_ps();
      const int64_t K = j.K, K8 = K & ~int64_t(7);
      int64_t k = 0;
      for (; k < K8; k += 8) {
        __m256 xv[M];
        for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_ps(xs + m * j.xld + k);
        for (int r = 0; r < R; ++r) {
          const __m256 wv = W::load8(w[r], k);
          for (int m = 0; m < M; ++m) acc[r][m] = _mm256_fmadd_ps(wv, xv[m], acc[r][m]);
        }
      }
      for (int r = 0; r < R; ++r)
        for (int m = 0; m < M; ++m) {
          float tail = 0.f;
          for (int64_t t = k; t < K; ++t) tail += W::at(w[r], t) * xs[m * j.xld + t];
          j.y[m * j.N + i + r] = hsum256(acc[r][m]) + tail;
        }
    }
  };
};
#endif  // GEMMA3N_X86

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------

int64_t best_isa() {
#ifdef GEMMA3N_X86
  __builtin_cpu_init();
  const bool avx512 = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  if (avx512 && __builtin_cpu_supports("avx512bf16")) return AVX512_BF16;
  if (avx512) return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return GENERIC;
}

// Columns an int4 body handles in whole chunks (the rest 32 at a time): a chunk's lanes must
// each fall in one group, so the group size must divide the chunk or be a multiple of it.
int64_t int4_wide_columns(int64_t K, int64_t group, int64_t isa) {
  const int64_t chunk = isa >= AVX512 ? 128 : isa == AVX2 ? 64 : 0;
  if (chunk == 0 || (chunk % group != 0 && group % chunk != 0)) return 0;
  return K / chunk * chunk;
}

RowFn pick(Kind kind, int64_t isa, int64_t M) {
  if (kind == INT8 || kind == INT4) return pick_quant(kind, isa, M);
#ifdef GEMMA3N_X86
  if (isa >= AVX512) {
    if (kind == F32) return pick_512<Fp32x512<F32Weights>::Body>(M);
    return isa == AVX512_BF16 ? pick_512<Bf16Dp>(M) : pick_512<Fp32x512<Bf16Weights>::Body>(M);
  }
  if (isa == AVX2) {
    return kind == F32 ? pick_256<Fp32x256<F32Weights>::Body>(M) : pick_256<Fp32x256<Bf16Weights>::Body>(M);
  }
#endif
  (void)M;
  return kind == F32 ? f32_generic : bf16_generic;
}

// ---------------------------------------------------------------------------------------------
// Activations in the form a body multiplies (per product; the same for every row of the weight),
// in per-thread scratch that grows once and is reused.
// ---------------------------------------------------------------------------------------------
struct Prepared {
  const void* x;
  int64_t xld;
  const float* xscale;
  const float* xsum;
};

Prepared prepare_x(const float* src, int64_t M, int64_t K, Kind kind, int64_t isa, int64_t group) {
  if (isa == GENERIC || kind == F32 || (kind == BF16 && isa != AVX512_BF16)) return {src, K, nullptr, nullptr};
  const int64_t xld = (K + 31) / 32 * 32;  // zero-padded: a tail step may read a whole vector
  if (kind == BF16) {  // AVX512-BF16: rounded to bf16
    thread_local std::vector<uint16_t> xb;
    xb.assign(M * xld, 0);
    for (int64_t m = 0; m < M; ++m)
      for (int64_t k = 0; k < K; ++k) xb[m * xld + k] = float_to_bf16(src[m * K + k]);
    return {xb.data(), xld, nullptr, nullptr};
  }
  // int16 per row (int4: laid out as its body reads the codes, see Int4Avx512) and, for int4, the
  // zero-point coefficients [-8·Σx_g, Σx_g] per group from the quantized x, so that the result is
  // exactly dequant(W)·x_q up to summation order. Plain loops the compiler vectorizes: this runs
  // once per product, and a libm rounding call per element cost more than a small product itself.
  thread_local std::vector<int16_t> xi, q;
  thread_local std::vector<float> scale, coef;
  xi.assign(M * xld, 0);
  scale.resize(M);
  const int64_t chunk = isa >= AVX512 ? 128 : 64, kwide = kind == INT4 ? int4_wide_columns(K, group, isa) : 0;
  const int64_t groups = kind == INT4 ? K / group : 0;
  coef.resize(M * 2 * groups);
  q.resize(kind == INT4 ? K : 0);
  for (int64_t m = 0; m < M; ++m) {
    const float* row = src + m * K;
    float amax = 0.f;
    for (int64_t k = 0; k < K; ++k) {
      const float a = row[k] < 0.f ? -row[k] : row[k];
      amax = a > amax ? a : amax;
    }
    scale[m] = amax > 0.f && std::isfinite(amax) ? amax / 32767.f : 1.f;
    const float inv = 1.f / scale[m];
    int16_t* out = kind == INT8 ? xi.data() + m * xld : q.data();
    for (int64_t k = 0; k < K; ++k) out[k] = quantize_int16(row[k] * inv);
    if (kind == INT8) continue;
    int16_t* laid = xi.data() + m * xld;
    for (int64_t c = 0; c < kwide; c += chunk)  // column c + 4t + j goes to c + j·(chunk/4) + t
      for (int64_t t = 0; t < chunk / 4; ++t)
        for (int64_t j = 0; j < 4; ++j) laid[c + j * (chunk / 4) + t] = q[c + 4 * t + j];
    for (int64_t c = kwide; c < K; c += 32)  // 32 at a time: even columns, then odd ones
      for (int64_t t = 0; t < 16; ++t) {
        laid[c + t] = q[c + 2 * t];
        laid[c + 16 + t] = q[c + 2 * t + 1];
      }
    for (int64_t g = 0; g < groups; ++g) {
      int32_t sum = 0;  // |q| < 2^15, a group < 2^16 columns
      for (int64_t k = g * group; k < (g + 1) * group; ++k) sum += q[k];
      coef[m * 2 * groups + 2 * g] = -8.f * static_cast<float>(sum) * scale[m];
      coef[m * 2 * groups + 2 * g + 1] = static_cast<float>(sum) * scale[m];
    }
  }
  return {xi.data(), xld, scale.data(), kind == INT4 ? coef.data() : nullptr};
}

int64_t row_bytes(Kind kind, int64_t K) {
  switch (kind) {
    case F32: return 4 * K;
    case BF16: return 2 * K;
    case INT8: return K;
    default: return K / 2;
  }
}

}  // namespace
}  // namespace detail

using namespace detail;

int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa == AUTO) return best;
  TORCH_CHECK(isa >= GENERIC && isa <= best, "gemma3n kernels: ISA level ", isa, " is not supported by this CPU");
  return isa;
}

// MAX_M activation rows per pass, the N outputs split into tasks of about 256 KiB of weights.
void product(const Weight& w, const float* x, int64_t M, int64_t K, float* y, const int64_t* rows, int64_t N,
             int64_t isa) {
  if (N == 0 || M == 0) return;
  if (K == 0) {
    std::fill(y, y + M * N, 0.f);
    return;
  }
  isa = resolve_isa(isa);
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, row_bytes(w.kind, K)));
  for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
    const int64_t part_m = std::min<int64_t>(MAX_M, M - m0);
    const Prepared p = prepare_x(x + m0 * K, part_m, K, w.kind, isa, w.group);
    Job part{w.data, w.ld, w.scale, w.sld, rows, p.x, p.xld, p.xscale, p.xsum, part_m, K, w.group, y + m0 * N, N,
             w.kind == INT4 ? int4_wide_columns(K, w.group, isa) : 0};
    const RowFn fn = pick(w.kind, isa, part_m);
    at::parallel_for(0, N, grain, [&](int64_t a, int64_t b) { fn(part, a, b); });
  }
}

}  // namespace gemma3n
