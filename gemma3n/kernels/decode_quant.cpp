// Row bodies for int8 and int4 weights against int16 activations (see decode.cpp for the scheme):
// a portable body and AVX2 / AVX-512 ones, and the choice among them.

#include "decode.h"

#include <algorithm>
#include <cstring>

namespace gemma3n {
namespace detail {
namespace {

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

}  // namespace

RowFn pick_quant(Kind kind, int64_t isa, int64_t M) {
#ifdef GEMMA3N_X86
  if (isa >= AVX512) return kind == INT8 ? pick_512<Int8Avx512>(M) : pick_512<Int4Avx512>(M);
  if (isa == AVX2) return kind == INT8 ? pick_256<Int8Avx2>(M) : pick_256<Int4Avx2>(M);
#endif
  (void)M;
  return kind == INT8 ? int8_generic : int4_generic;
}

}  // namespace detail
}  // namespace gemma3n
