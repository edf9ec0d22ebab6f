// What decode.cpp (bf16 and fp32 weights, the activations' preparation, the dispatch) and
// decode_quant.cpp (int8 and int4 weights) share: the job a row body works on, the ISA targets,
// register helpers, and the templates that run a body over a range of rows.
#pragma once

#include "kernels.h"

#include <cstdint>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GEMMA3N_X86 1
#endif

namespace gemma3n {
namespace detail {

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

using RowFn = void (*)(const Job&, int64_t, int64_t);

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
#endif  // GEMMA3N_X86

// decode_quant.cpp: the row body for int8 / int4 weights at an ISA level and activation rows.
RowFn pick_quant(Kind kind, int64_t isa, int64_t M);

}  // namespace detail
}  // namespace gemma3n
