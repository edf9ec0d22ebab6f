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

#include "kernels.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GEMMA3N_X86 1
#endif

namespace gemma3n {
namespace {

constexpr int MAX_M = 8;  // activation rows per pass (more rows: several passes)
// int16 x int8 products summed in an int32 lane: 2 per instruction, each below 2^7 * 2^15, so
// 128 steps stay below 2^30 (int4 codes are smaller still).
constexpr int64_t FLUSH_STEPS = 128;

// round to nearest even (as torch.round), clamped to ±32767: adding and subtracting 1.5·2^23
// rounds any |v| < 2^22 in plain float arithmetic (no libm call, vectorizable)
inline int16_t quantize_int16(float v) {
  v = v < -32767.f ? -32767.f : v > 32767.f ? 32767.f : v;
  return static_cast<int16_t>((v + 12582912.f) - 12582912.f);
}

// What the row bodies need. `x` is prepared per call in the form the body multiplies (see
// prepare_x): fp32 [M, K], bf16 [M, xld] or int16 [M, xld] with per-row scales.
struct Job {
  const void* w;        // element [0, 0] of the weight view
  int64_t ld;           // row stride of the weight, in elements (int4: bytes)
  const void* scale;    // int8: bf16 [N] per row; int4: bf16 (scale, zero) pairs
  int64_t sld;          // int4: row stride of the (scale, zero) pairs, in pairs
  const int64_t* rows;  // output i reads weight row rows[i] (nullptr: row i)
  const void* x;
  int64_t xld;          // row stride of x, in elements (>= K, zero-padded to a multiple of 32)
  const float* xscale;  // int16 x: [M] scales
  const float* xsum;    // int4: [M, 2·K/group] zero-point coefficients (see prepare_x)
  int64_t M, K, group;
  float* y;  // [M, N]
  int64_t N;
  int64_t kwide;  // int4: columns handled in whole chunks (int4_wide_columns), the rest 32 at a time
};

inline int64_t row_of(const Job& j, int64_t i) { return j.rows ? j.rows[i] : i; }

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

void int8_generic(const Job& j, int64_t i0, int64_t i1) {
  const float* xs = static_cast<const float*>(j.x);
  const uint16_t* scale = static_cast<const uint16_t*>(j.scale);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const int8_t* w = static_cast<const int8_t*>(j.w) + r * j.ld;
    const float s = bf16_to_float(scale[r]);
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = xs + m * j.xld;
      float acc = 0.f;
      for (int64_t k = 0; k < j.K; ++k) acc += static_cast<float>(w[k]) * x[k];
      j.y[m * j.N + i] = acc * s;
    }
  }
}

void int4_generic(const Job& j, int64_t i0, int64_t i1) {
  const float* xs = static_cast<const float*>(j.x);
  const int64_t groups = j.K / j.group;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const uint8_t* w = static_cast<const uint8_t*>(j.w) + r * j.ld;
    const uint16_t* sz = static_cast<const uint16_t*>(j.scale) + 2 * r * j.sld;
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = xs + m * j.xld;
      float acc = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        const float s = bf16_to_float(sz[2 * g]), z = bf16_to_float(sz[2 * g + 1]);
        float gacc = 0.f;
        for (int64_t k = g * j.group; k < (g + 1) * j.group; k += 2) {
          gacc += (static_cast<float>(w[k / 2] & 15) - 8.f) * x[k];
          gacc += (static_cast<float>(w[k / 2] >> 4) - 8.f) * x[k + 1];
        }
        float xg = 0.f;
        for (int64_t k = g * j.group; k < (g + 1) * j.group; ++k) xg += x[k];
        acc += s * gacc + z * xg;
      }
      j.y[m * j.N + i] = acc;
    }
  }
}

#ifdef GEMMA3N_X86
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))
#define TARGET_AVX512_BF16 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma,avx512bf16")))
#define TARGET_AVX2 __attribute__((target("avx2,fma")))

// A body handles a block of R weight rows at once (`block(job, i)`: outputs i .. i+R-1), so that
// a core has R streams of weights in flight and reuses each activation load R times: one row at
// a time reaches ~75 % of a core's share of the bandwidth, four rows ~95 % (measured). R shrinks
// as M grows so that the R·M accumulators stay in registers (32 zmm / 16 ymm).

TARGET_AVX512 inline __m512 widen_bf16_512(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
TARGET_AVX2 inline __m256 widen_bf16_256(__m128i v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}

// Weights are requested this far ahead of use: the integer bodies do enough work per byte that
// the core's own out-of-order window no longer keeps enough loads in flight (measured).
#ifndef PREFETCH_BYTES
#define PREFETCH_BYTES 1024
#endif

template <int R>
inline void row_pointers(const Job& j, int64_t i, int64_t elem_bytes, const uint8_t* (&w)[R]) {
  for (int r = 0; r < R; ++r) w[r] = static_cast<const uint8_t*>(j.w) + row_of(j, i + r) * j.ld * elem_bytes;
}

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

// --- int8 weights x int16 activations --------------------------------------------------------
template <int R, int M>
struct Int8Avx512 {
  TARGET_AVX512 static void block(const Job& j, int64_t i) {
    const int16_t* xq = static_cast<const int16_t*>(j.x);
    const uint16_t* scale = static_cast<const uint16_t*>(j.scale);
    const uint8_t* w[R];
    row_pointers<R>(j, i, 1, w);
    __m512i acc[R][M];
    float part[R][M] = {};
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm512_setzero_si512();
    const int64_t K = j.K;
    int64_t steps = 0;
    for (int64_t k = 0; k < K; k += 32) {
      const __mmask32 mask = K - k >= 32 ? ~__mmask32(0) : static_cast<__mmask32>((1u << (K - k)) - 1);
      __m512i xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm512_loadu_si512(xq + m * j.xld + k);
      for (int r = 0; r < R; ++r) {
        if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512i wv = _mm512_cvtepi8_epi16(_mm256_maskz_loadu_epi8(mask, w[r] + k));
        for (int m = 0; m < M; ++m) acc[r][m] = _mm512_add_epi32(acc[r][m], _mm512_madd_epi16(wv, xv[m]));
      }
      if (++steps == FLUSH_STEPS) {  // int32 lanes before they could overflow
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < M; ++m) {
            part[r][m] += _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[r][m]));
            acc[r][m] = _mm512_setzero_si512();
          }
        steps = 0;
      }
    }
    for (int r = 0; r < R; ++r) {
      const float s = bf16_to_float(scale[row_of(j, i + r)]);
      for (int m = 0; m < M; ++m) {
        const float total = part[r][m] + _mm512_reduce_add_ps(_mm512_cvtepi32_ps(acc[r][m]));
        j.y[m * j.N + i + r] = total * j.xscale[m] * s;
      }
    }
  }
};

template <int R, int M>
struct Int8Avx2 {
  TARGET_AVX2 static void block(const Job& j, int64_t i) {
    const int16_t* xq = static_cast<const int16_t*>(j.x);
    const uint16_t* scale = static_cast<const uint16_t*>(j.scale);
    const uint8_t* w[R];
    row_pointers<R>(j, i, 1, w);
    __m256i acc[R][M];
    float part[R][M] = {};
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) acc[r][m] = _mm256_setzero_si256();
    const int64_t K = j.K, K16 = K & ~int64_t(15);
    int64_t k = 0, steps = 0;
    for (; k < K16; k += 16) {
      __m256i xv[M];
      for (int m = 0; m < M; ++m) xv[m] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xq + m * j.xld + k));
      for (int r = 0; r < R; ++r) {
        if (k % 64 == 0) _mm_prefetch(reinterpret_cast<const char*>(w[r] + k + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i wv = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k)));
        for (int m = 0; m < M; ++m) acc[r][m] = _mm256_add_epi32(acc[r][m], _mm256_madd_epi16(wv, xv[m]));
      }
      if (++steps == FLUSH_STEPS) {
        for (int r = 0; r < R; ++r)
          for (int m = 0; m < M; ++m) {
            part[r][m] += hsum256(_mm256_cvtepi32_ps(acc[r][m]));
            acc[r][m] = _mm256_setzero_si256();
          }
        steps = 0;
      }
    }
    for (int r = 0; r < R; ++r) {
      const int8_t* wr = reinterpret_cast<const int8_t*>(w[r]);
      const float s = bf16_to_float(scale[row_of(j, i + r)]);
      for (int m = 0; m < M; ++m) {
        int32_t tail = 0;
        for (int64_t t = k; t < K; ++t) tail += static_cast<int32_t>(wr[t]) * xq[m * j.xld + t];
        const float total = part[r][m] + hsum256(_mm256_cvtepi32_ps(acc[r][m])) + static_cast<float>(tail);
        j.y[m * j.N + i + r] = total * j.xscale[m] * s;
      }
    }
  }
};

// --- int4 weights x int16 activations --------------------------------------------------------
// A chunk of C columns (C/2 bytes: 128 with AVX-512, 64 with AVX2) is read as 16-bit lanes: lane
// t holds the 4 codes of columns 4t..4t+3, split by shift-and-mask into 4 vectors, each
// multiplied by its part of x (prepare_x lays x out in that order). After `vpmaddwd` and the 4
// adds, int32 lane u holds columns 8u..8u+7 of the chunk, so a lane belongs to one group and is
// scaled by that group's scale (a vector built from the row's fp32 scales). Columns past the
// last whole chunk go 32 at a time: low nibbles (even columns), then high ones (odd columns).
// The row's (scale, zero) pairs are widened to fp32 first (`pf`), and its zero-point term is
// the dot product of those pairs with the per-call coefficients [-8·Σx_g, Σx_g].

TARGET_AVX512 inline float dot_512(const float* a, const float* b, int64_t n) {
  __m512 acc = _mm512_setzero_ps();
  int64_t p = 0;
  for (; p + 16 <= n; p += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(a + p), _mm512_loadu_ps(b + p), acc);
  float out = _mm512_reduce_add_ps(acc);
  for (; p < n; ++p) out += a[p] * b[p];
  return out;
}

TARGET_AVX2 inline float dot_256(const float* a, const float* b, int64_t n) {
  __m256 acc = _mm256_setzero_ps();
  int64_t p = 0;
  for (; p + 8 <= n; p += 8) acc = _mm256_fmadd_ps(_mm256_loadu_ps(a + p), _mm256_loadu_ps(b + p), acc);
  float out = hsum256(acc);
  for (; p < n; ++p) out += a[p] * b[p];
  return out;
}

// The fp32 (scale, zero) pairs of R rows, P = 2·groups each, padded by 16 floats (a chunk's scale
// vector loads 16 from its first group on).
template <int R>
inline float* int4_pairs(const Job& j, int64_t i, int64_t P) {
  thread_local std::vector<float> buf;
  const int64_t stride = P + 16;
  if (static_cast<int64_t>(buf.size()) < R * stride) buf.assign(R * stride, 0.f);
  for (int r = 0; r < R; ++r) {
    const uint16_t* sz = static_cast<const uint16_t*>(j.scale) + 2 * row_of(j, i + r) * j.sld;
    for (int64_t p = 0; p < P; ++p) buf[r * stride + p] = bf16_to_float(sz[p]);
  }
  return buf.data();
}

template <int R, int M>
struct Int4Avx512 {
  TARGET_AVX512 static void block(const Job& j, int64_t i) {
    constexpr int64_t C = 128;
    const int16_t* xq = static_cast<const int16_t*>(j.x);
    const int64_t K = j.K, G = j.group, P = 2 * (K / G), stride = P + 16;
    const uint8_t* w[R];
    row_pointers<R>(j, i, 1, w);
    const float* pf = int4_pairs<R>(j, i, P);
    // lane u of a chunk's int32 sums covers columns 8u..8u+7: its group, relative to the chunk's first
    alignas(64) int32_t lane_pair[16];
    for (int u = 0; u < 16; ++u) lane_pair[u] = C % G == 0 ? static_cast<int32_t>(2 * ((8 * u) / G)) : 0;
    const __m512i idx = _mm512_load_si512(lane_pair);
    const __m512i nib = _mm512_set1_epi16(15);
    __m512 f[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) f[r][m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < j.kwide; k += C) {
      const int64_t first = 2 * (k / G);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w[r] + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m512i raw = _mm512_loadu_si512(w[r] + k / 2);
        const __m512i q0 = _mm512_and_si512(raw, nib), q1 = _mm512_and_si512(_mm512_srli_epi16(raw, 4), nib);
        const __m512i q2 = _mm512_and_si512(_mm512_srli_epi16(raw, 8), nib), q3 = _mm512_srli_epi16(raw, 12);
        const __m512 sv = _mm512_permutexvar_ps(idx, _mm512_loadu_ps(pf + r * stride + first));
        for (int m = 0; m < M; ++m) {
          const int16_t* x = xq + m * j.xld + k;
          __m512i s = _mm512_madd_epi16(q0, _mm512_loadu_si512(x));
          s = _mm512_add_epi32(s, _mm512_madd_epi16(q1, _mm512_loadu_si512(x + 32)));
          s = _mm512_add_epi32(s, _mm512_madd_epi16(q2, _mm512_loadu_si512(x + 64)));
          s = _mm512_add_epi32(s, _mm512_madd_epi16(q3, _mm512_loadu_si512(x + 96)));
          f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sv, f[r][m]);
        }
      }
    }
    const __m128i low = _mm_set1_epi8(15);
    for (; k < K; k += 32) {  // the rest, 32 columns (one group) at a time
      for (int r = 0; r < R; ++r) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k / 2));
        const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        const __m512i q = _mm512_cvtepu8_epi16(_mm256_set_m128i(hi, lo));
        const __m512 sv = _mm512_set1_ps(pf[r * stride + 2 * (k / G)]);
        for (int m = 0; m < M; ++m) {
          const __m512i s = _mm512_madd_epi16(q, _mm512_loadu_si512(xq + m * j.xld + k));
          f[r][m] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(s), sv, f[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        j.y[m * j.N + i + r] =
            _mm512_reduce_add_ps(f[r][m]) * j.xscale[m] + dot_512(pf + r * stride, j.xsum + m * P, P);
  }
};

template <int R, int M>
struct Int4Avx2 {
  TARGET_AVX2 static void block(const Job& j, int64_t i) {
    constexpr int64_t C = 64;
    const int16_t* xq = static_cast<const int16_t*>(j.x);
    const int64_t K = j.K, G = j.group, P = 2 * (K / G), stride = P + 16;
    const uint8_t* w[R];
    row_pointers<R>(j, i, 1, w);
    const float* pf = int4_pairs<R>(j, i, P);
    alignas(32) int32_t lane_pair[8];
    for (int u = 0; u < 8; ++u) lane_pair[u] = C % G == 0 ? static_cast<int32_t>(2 * ((8 * u) / G)) : 0;
    const __m256i idx = _mm256_load_si256(reinterpret_cast<const __m256i*>(lane_pair));
    const __m256i nib = _mm256_set1_epi16(15);
    __m256 f[R][M];
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m) f[r][m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < j.kwide; k += C) {
      const int64_t first = 2 * (k / G);
      for (int r = 0; r < R; ++r) {
        _mm_prefetch(reinterpret_cast<const char*>(w[r] + k / 2 + PREFETCH_BYTES), _MM_HINT_T0);
        const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w[r] + k / 2));
        const __m256i q0 = _mm256_and_si256(raw, nib), q1 = _mm256_and_si256(_mm256_srli_epi16(raw, 4), nib);
        const __m256i q2 = _mm256_and_si256(_mm256_srli_epi16(raw, 8), nib), q3 = _mm256_srli_epi16(raw, 12);
        const __m256 sv = _mm256_permutevar8x32_ps(_mm256_loadu_ps(pf + r * stride + first), idx);
        for (int m = 0; m < M; ++m) {
          const int16_t* x = xq + m * j.xld + k;
          __m256i s = _mm256_madd_epi16(q0, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(q1, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(q2, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 32))));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(q3, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 48))));
          f[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sv, f[r][m]);
        }
      }
    }
    const __m128i low = _mm_set1_epi8(15);
    for (; k < K; k += 32) {
      for (int r = 0; r < R; ++r) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w[r] + k / 2));
        const __m256i lo = _mm256_cvtepu8_epi16(_mm_and_si128(raw, low));
        const __m256i hi = _mm256_cvtepu8_epi16(_mm_and_si128(_mm_srli_epi16(raw, 4), low));
        const __m256 sv = _mm256_set1_ps(pf[r * stride + 2 * (k / G)]);
        for (int m = 0; m < M; ++m) {
          const int16_t* x = xq + m * j.xld + k;
          __m256i s = _mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x)));
          s = _mm256_add_epi32(s, _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x + 16))));
          f[r][m] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s), sv, f[r][m]);
        }
      }
    }
    for (int r = 0; r < R; ++r)
      for (int m = 0; m < M; ++m)
        j.y[m * j.N + i + r] = hsum256(f[r][m]) * j.xscale[m] + dot_256(pf + r * stride, j.xsum + m * P, P);
  }
};
#endif  // GEMMA3N_X86

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------
using RowFn = void (*)(const Job&, int64_t, int64_t);

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

#ifdef GEMMA3N_X86
template <template <int, int> class B, int R, int M>
void rows(const Job& j, int64_t i0, int64_t i1) {
  int64_t i = i0;
  for (; i + R <= i1; i += R) B<R, M>::block(j, i);
  for (; i < i1; ++i) B<1, M>::block(j, i);
}

// Rows per block by activation rows: 32 zmm hold R·M accumulators plus M activations.
template <template <int, int> class B>
RowFn pick_512(int64_t M) {
  switch (M) {
    case 1: return rows<B, 4, 1>;
    case 2: return rows<B, 4, 2>;
    case 3: return rows<B, 4, 3>;
    case 4: return rows<B, 2, 4>;
    case 5: return rows<B, 2, 5>;
    case 6: return rows<B, 2, 6>;
    case 7: return rows<B, 2, 7>;
    default: return rows<B, 2, 8>;
  }
}

// 16 ymm: fewer rows per block.
template <template <int, int> class B>
RowFn pick_256(int64_t M) {
  switch (M) {
    case 1: return rows<B, 4, 1>;
    case 2: return rows<B, 2, 2>;
    case 3: return rows<B, 2, 3>;
    case 4: return rows<B, 2, 4>;
    case 5: return rows<B, 1, 5>;
    case 6: return rows<B, 1, 6>;
    case 7: return rows<B, 1, 7>;
    default: return rows<B, 1, 8>;
  }
}
#endif

RowFn pick(Kind kind, int64_t isa, int64_t M) {
#ifdef GEMMA3N_X86
  if (kind == F32 && isa >= AVX512) return pick_512<Fp32x512<F32Weights>::Body>(M);
  if (kind == F32 && isa == AVX2) return pick_256<Fp32x256<F32Weights>::Body>(M);
  switch (isa) {
    case AVX512_BF16:
      return kind == BF16 ? pick_512<Bf16Dp>(M) : kind == INT8 ? pick_512<Int8Avx512>(M) : pick_512<Int4Avx512>(M);
    case AVX512:
      return kind == BF16   ? pick_512<Fp32x512<Bf16Weights>::Body>(M)
             : kind == INT8 ? pick_512<Int8Avx512>(M)
                            : pick_512<Int4Avx512>(M);
    case AVX2:
      return kind == BF16   ? pick_256<Fp32x256<Bf16Weights>::Body>(M)
             : kind == INT8 ? pick_256<Int8Avx2>(M)
                            : pick_256<Int4Avx2>(M);
    default:
      break;
  }
#endif
  (void)M;
  if (kind == F32) return f32_generic;
  return kind == BF16 ? bf16_generic : kind == INT8 ? int8_generic : int4_generic;
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
