// Weight-streaming matrix kernels for decode: y[M, N] = x[M, K] · W[N, K]ᵀ with M ≤ a few rows.
//
// Decoding one token reads every weight once and does two FLOPs per weight, so its speed is the
// rate at which weights stream from memory. These kernels read each weight row exactly once
// for all M activation rows (x stays in L1/L2), widen the stored bf16 / int8 / int4 codes to
// fp32 in registers and accumulate with FMA in fp32. Activations are never rounded, and each
// output's accumulation order is fixed by K alone (not by M, N, the row range a thread gets or
// the thread count), so a sequence's result does not depend on what it is batched with.
//
// Weights may be strided views: a row stride (`ld`) lets a MatFormer width run on a column
// prefix of the full matrix and a row range or an index list (`rows`) on some of its rows, with
// no copy. Weights come memory-mapped from safetensors files, so no alignment is assumed.
//
// ISA: AVX-512F and AVX2+FMA bodies are compiled with target attributes and chosen at run time
// (`isa` 0 = best the CPU has); a portable C++ body serves every other CPU and the tests.
// Layouts (gemma3n/quantize.py): int8 [N, K] codes with one scale per row; int4 [N, K/2] bytes,
// low nibble = even column, with a bf16 (scale, zero) pair per group of g columns:
// W = (q - 8) * scale + zero. For int4 the zero-point term is factored out of the dot product:
// Σ_k W x = Σ_groups scale·Σ_k q x + (zero - 8·scale)·Σ_k x.

#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define GEMMA3N_X86 1
#endif

namespace {

constexpr int MAX_M = 8;  // activation rows per pass (more rows: several passes)

enum Isa : int64_t { AUTO = 0, GENERIC = 1, AVX2 = 2, AVX512 = 3 };

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// What one output row needs: where its weights start and, for the quantized kinds, its scales.
struct Job {
  const void* w;       // element [0, 0] of the weight view
  int64_t ld;          // row stride of the weight, in elements (int4: bytes)
  const void* scale;   // int8: bf16 [N] per row (stride 1); int4: bf16 (scale, zero) pairs
  int64_t sld;         // int4: row stride of the (scale, zero) pairs, in pairs
  const int64_t* rows; // output i reads weight row rows[i] (nullptr: row i)
  const float* x;      // [M, K] (int4: even/odd-permuted within each 32 columns)
  const float* xsum;   // int4: [M, K / group] sums of x per group
  int64_t M, K, group;
  float* y;            // [M, N]
  int64_t N;
};

inline int64_t row_of(const Job& j, int64_t i) { return j.rows ? j.rows[i] : i; }

// ---------------------------------------------------------------------------------------------
// Portable bodies (any CPU; also the reference the SIMD bodies are tested against).
// ---------------------------------------------------------------------------------------------
void bf16_generic(const Job& j, int64_t i0, int64_t i1) {
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* w = static_cast<const uint16_t*>(j.w) + row_of(j, i) * j.ld;
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = j.x + m * j.K;
      float acc = 0.f;
      for (int64_t k = 0; k < j.K; ++k) acc += bf16_to_float(w[k]) * x[k];
      j.y[m * j.N + i] = acc;
    }
  }
}

void int8_generic(const Job& j, int64_t i0, int64_t i1) {
  const uint16_t* scale = static_cast<const uint16_t*>(j.scale);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const int8_t* w = static_cast<const int8_t*>(j.w) + r * j.ld;
    const float s = bf16_to_float(scale[r]);
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = j.x + m * j.K;
      float acc = 0.f;
      for (int64_t k = 0; k < j.K; ++k) acc += static_cast<float>(w[k]) * x[k];
      j.y[m * j.N + i] = acc * s;
    }
  }
}

void int4_generic(const Job& j, int64_t i0, int64_t i1) {
  const int64_t groups = j.K / j.group;
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const uint8_t* w = static_cast<const uint8_t*>(j.w) + r * j.ld;
    const uint16_t* sz = static_cast<const uint16_t*>(j.scale) + 2 * r * j.sld;
    for (int64_t m = 0; m < j.M; ++m) {
      const float* x = j.x + m * j.K;  // permuted: [32c + t] = col 32c + 2t, [32c + 16 + t] = col 32c + 2t + 1
      float acc = 0.f, zterm = 0.f;
      for (int64_t g = 0; g < groups; ++g) {
        float gacc = 0.f;
        for (int64_t c = g * j.group; c < (g + 1) * j.group; c += 32) {
          const uint8_t* b = w + c / 2;
          for (int t = 0; t < 16; ++t) {
            gacc += static_cast<float>(b[t] & 15) * x[c + t];
            gacc += static_cast<float>(b[t] >> 4) * x[c + 16 + t];
          }
        }
        const float s = bf16_to_float(sz[2 * g]), z = bf16_to_float(sz[2 * g + 1]);
        acc += s * gacc;
        zterm += (z - 8.f * s) * j.xsum[m * groups + g];
      }
      j.y[m * j.N + i] = acc + zterm;
    }
  }
}

#ifdef GEMMA3N_X86
// ---------------------------------------------------------------------------------------------
// AVX-512F: 16 lanes; two independent accumulators per activation row (32 weights a step).
// ---------------------------------------------------------------------------------------------
#define TARGET_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,fma")))

TARGET_AVX512 inline __m512 widen_bf16_512(__m256i v) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(v), 16));
}
TARGET_AVX512 inline __m512 widen_i8_512(__m128i v) { return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(v)); }

template <int M>
TARGET_AVX512 void bf16_rows_avx512(const Job& j, int64_t i0, int64_t i1) {
  const int64_t K = j.K, K32 = K & ~int64_t(31);
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* w = static_cast<const uint16_t*>(j.w) + row_of(j, i) * j.ld;
    __m512 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K32; k += 32) {
      const __m512 w0 = widen_bf16_512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k)));
      const __m512 w1 = widen_bf16_512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k + 16)));
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(j.x + m * K + k), a[m]);
        b[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(j.x + m * K + k + 16), b[m]);
      }
    }
    for (; k < K; k += 16) {  // tail: masked loads read nothing past the row
      const __mmask16 mask = static_cast<__mmask16>((K - k) >= 16 ? 0xFFFF : (1u << (K - k)) - 1);
      const __m512 w0 = widen_bf16_512(_mm256_maskz_loadu_epi16(mask, w + k));
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, j.x + m * K + k), a[m]);
    }
    for (int m = 0; m < M; ++m) j.y[m * j.N + i] = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m]));
  }
}

template <int M>
TARGET_AVX512 void int8_rows_avx512(const Job& j, int64_t i0, int64_t i1) {
  const int64_t K = j.K, K32 = K & ~int64_t(31);
  const uint16_t* scale = static_cast<const uint16_t*>(j.scale);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const int8_t* w = static_cast<const int8_t*>(j.w) + r * j.ld;
    __m512 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_ps();
    int64_t k = 0;
    for (; k < K32; k += 32) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m512 w0 = widen_i8_512(_mm256_castsi256_si128(raw));
      const __m512 w1 = widen_i8_512(_mm256_extracti128_si256(raw, 1));
      for (int m = 0; m < M; ++m) {
        a[m] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(j.x + m * K + k), a[m]);
        b[m] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(j.x + m * K + k + 16), b[m]);
      }
    }
    for (; k < K; k += 16) {
      const __mmask16 mask = static_cast<__mmask16>((K - k) >= 16 ? 0xFFFF : (1u << (K - k)) - 1);
      const __m512 w0 = widen_i8_512(_mm_maskz_loadu_epi8(mask, w + k));
      for (int m = 0; m < M; ++m) a[m] = _mm512_fmadd_ps(w0, _mm512_maskz_loadu_ps(mask, j.x + m * K + k), a[m]);
    }
    const float s = bf16_to_float(scale[r]);
    for (int m = 0; m < M; ++m) j.y[m * j.N + i] = _mm512_reduce_add_ps(_mm512_add_ps(a[m], b[m])) * s;
  }
}

template <int M>
TARGET_AVX512 void int4_rows_avx512(const Job& j, int64_t i0, int64_t i1) {
  const int64_t K = j.K, groups = K / j.group;
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const uint8_t* w = static_cast<const uint8_t*>(j.w) + r * j.ld;
    const uint16_t* sz = static_cast<const uint16_t*>(j.scale) + 2 * r * j.sld;
    __m512 acc[M];
    float zterm[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm512_setzero_ps(), zterm[m] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      __m512 a[M], b[M];
      for (int m = 0; m < M; ++m) a[m] = b[m] = _mm512_setzero_ps();
      for (int64_t c = g * j.group; c < (g + 1) * j.group; c += 32) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2));
        const __m512 lo = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(raw, low)));
        const __m512 hi = _mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_and_si128(_mm_srli_epi16(raw, 4), low)));
        for (int m = 0; m < M; ++m) {
          a[m] = _mm512_fmadd_ps(lo, _mm512_loadu_ps(j.x + m * K + c), a[m]);
          b[m] = _mm512_fmadd_ps(hi, _mm512_loadu_ps(j.x + m * K + c + 16), b[m]);
        }
      }
      const float s = bf16_to_float(sz[2 * g]), z = bf16_to_float(sz[2 * g + 1]);
      const __m512 vs = _mm512_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm512_fmadd_ps(vs, _mm512_add_ps(a[m], b[m]), acc[m]);
        zterm[m] += (z - 8.f * s) * j.xsum[m * groups + g];
      }
    }
    for (int m = 0; m < M; ++m) j.y[m * j.N + i] = _mm512_reduce_add_ps(acc[m]) + zterm[m];
  }
}

// ---------------------------------------------------------------------------------------------
// AVX2 + FMA: 8 lanes, the same structure.
// ---------------------------------------------------------------------------------------------
#define TARGET_AVX2 __attribute__((target("avx2,fma")))

TARGET_AVX2 inline float hsum256(__m256 v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  s = _mm_add_ss(s, _mm_movehdup_ps(s));
  return _mm_cvtss_f32(s);
}
TARGET_AVX2 inline __m256 widen_bf16_256(__m128i v) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}
TARGET_AVX2 inline __m256 widen_i8_256(__m128i v) { return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)); }

template <int M>
TARGET_AVX2 void bf16_rows_avx2(const Job& j, int64_t i0, int64_t i1) {
  const int64_t K = j.K, K16 = K & ~int64_t(15);
  for (int64_t i = i0; i < i1; ++i) {
    const uint16_t* w = static_cast<const uint16_t*>(j.w) + row_of(j, i) * j.ld;
    __m256 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + k));
      const __m256 w0 = widen_bf16_256(_mm256_castsi256_si128(raw));
      const __m256 w1 = widen_bf16_256(_mm256_extracti128_si256(raw, 1));
      for (int m = 0; m < M; ++m) {
        a[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(j.x + m * K + k), a[m]);
        b[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(j.x + m * K + k + 8), b[m]);
      }
    }
    float tail[M] = {};
    for (; k < K; ++k)
      for (int m = 0; m < M; ++m) tail[m] += bf16_to_float(w[k]) * j.x[m * K + k];
    for (int m = 0; m < M; ++m) j.y[m * j.N + i] = hsum256(_mm256_add_ps(a[m], b[m])) + tail[m];
  }
}

template <int M>
TARGET_AVX2 void int8_rows_avx2(const Job& j, int64_t i0, int64_t i1) {
  const int64_t K = j.K, K16 = K & ~int64_t(15);
  const uint16_t* scale = static_cast<const uint16_t*>(j.scale);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const int8_t* w = static_cast<const int8_t*>(j.w) + r * j.ld;
    __m256 a[M], b[M];
    for (int m = 0; m < M; ++m) a[m] = b[m] = _mm256_setzero_ps();
    int64_t k = 0;
    for (; k < K16; k += 16) {
      const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + k));
      const __m256 w0 = widen_i8_256(raw);
      const __m256 w1 = widen_i8_256(_mm_srli_si128(raw, 8));
      for (int m = 0; m < M; ++m) {
        a[m] = _mm256_fmadd_ps(w0, _mm256_loadu_ps(j.x + m * K + k), a[m]);
        b[m] = _mm256_fmadd_ps(w1, _mm256_loadu_ps(j.x + m * K + k + 8), b[m]);
      }
    }
    float tail[M] = {};
    for (; k < K; ++k)
      for (int m = 0; m < M; ++m) tail[m] += static_cast<float>(w[k]) * j.x[m * K + k];
    const float s = bf16_to_float(scale[r]);
    for (int m = 0; m < M; ++m) j.y[m * j.N + i] = (hsum256(_mm256_add_ps(a[m], b[m])) + tail[m]) * s;
  }
}

template <int M>
TARGET_AVX2 void int4_rows_avx2(const Job& j, int64_t i0, int64_t i1) {
  const int64_t K = j.K, groups = K / j.group;
  const __m128i low = _mm_set1_epi8(15);
  for (int64_t i = i0; i < i1; ++i) {
    const int64_t r = row_of(j, i);
    const uint8_t* w = static_cast<const uint8_t*>(j.w) + r * j.ld;
    const uint16_t* sz = static_cast<const uint16_t*>(j.scale) + 2 * r * j.sld;
    __m256 acc[M];
    float zterm[M];
    for (int m = 0; m < M; ++m) acc[m] = _mm256_setzero_ps(), zterm[m] = 0.f;
    for (int64_t g = 0; g < groups; ++g) {
      __m256 a[M], b[M];
      for (int m = 0; m < M; ++m) a[m] = b[m] = _mm256_setzero_ps();
      for (int64_t c = g * j.group; c < (g + 1) * j.group; c += 32) {
        const __m128i raw = _mm_loadu_si128(reinterpret_cast<const __m128i*>(w + c / 2));
        const __m128i lo = _mm_and_si128(raw, low), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low);
        const __m256 lo0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(lo));
        const __m256 lo1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(lo, 8)));
        const __m256 hi0 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(hi));
        const __m256 hi1 = _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_srli_si128(hi, 8)));
        for (int m = 0; m < M; ++m) {
          const float* x = j.x + m * K + c;
          a[m] = _mm256_fmadd_ps(lo0, _mm256_loadu_ps(x), a[m]);
          b[m] = _mm256_fmadd_ps(lo1, _mm256_loadu_ps(x + 8), b[m]);
          a[m] = _mm256_fmadd_ps(hi0, _mm256_loadu_ps(x + 16), a[m]);
          b[m] = _mm256_fmadd_ps(hi1, _mm256_loadu_ps(x + 24), b[m]);
        }
      }
      const float s = bf16_to_float(sz[2 * g]), z = bf16_to_float(sz[2 * g + 1]);
      const __m256 vs = _mm256_set1_ps(s);
      for (int m = 0; m < M; ++m) {
        acc[m] = _mm256_fmadd_ps(vs, _mm256_add_ps(a[m], b[m]), acc[m]);
        zterm[m] += (z - 8.f * s) * j.xsum[m * groups + g];
      }
    }
    for (int m = 0; m < M; ++m) j.y[m * j.N + i] = hsum256(acc[m]) + zterm[m];
  }
}
#endif  // GEMMA3N_X86

// ---------------------------------------------------------------------------------------------
// Dispatch
// ---------------------------------------------------------------------------------------------
using RowFn = void (*)(const Job&, int64_t, int64_t);
enum Kind { BF16 = 0, INT8 = 1, INT4 = 2 };

int64_t best_isa() {
#ifdef GEMMA3N_X86
  __builtin_cpu_init();
  if (__builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq"))
    return AVX512;
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) return AVX2;
#endif
  return GENERIC;
}

int64_t resolve_isa(int64_t isa) {
  const int64_t best = best_isa();
  if (isa == AUTO) return best;
  TORCH_CHECK(isa == GENERIC || isa <= best, "gemma3n kernels: ISA ", isa, " is not supported by this CPU");
  return isa;
}

#ifdef GEMMA3N_X86
template <template <int> class Body>
RowFn pick_m(int64_t M) {
  switch (M) {
    case 1: return Body<1>::run;
    case 2: return Body<2>::run;
    case 3: return Body<3>::run;
    case 4: return Body<4>::run;
    case 5: return Body<5>::run;
    case 6: return Body<6>::run;
    case 7: return Body<7>::run;
    default: return Body<8>::run;
  }
}
#define BODY(name)                                                                   \
  template <int M>                                                                   \
  struct name##_t {                                                                  \
    static void run(const Job& j, int64_t a, int64_t b) { name<M>(j, a, b); }        \
  };
BODY(bf16_rows_avx512)
BODY(int8_rows_avx512)
BODY(int4_rows_avx512)
BODY(bf16_rows_avx2)
BODY(int8_rows_avx2)
BODY(int4_rows_avx2)
#endif

RowFn pick(Kind kind, int64_t isa, int64_t M) {
#ifdef GEMMA3N_X86
  if (isa == AVX512) {
    if (kind == BF16) return pick_m<bf16_rows_avx512_t>(M);
    if (kind == INT8) return pick_m<int8_rows_avx512_t>(M);
    return pick_m<int4_rows_avx512_t>(M);
  }
  if (isa == AVX2) {
    if (kind == BF16) return pick_m<bf16_rows_avx2_t>(M);
    if (kind == INT8) return pick_m<int8_rows_avx2_t>(M);
    return pick_m<int4_rows_avx2_t>(M);
  }
#endif
  (void)M;
  if (kind == BF16) return bf16_generic;
  if (kind == INT8) return int8_generic;
  return int4_generic;
}

// Runs `job` over its N outputs in chunks of about 256 KiB of weights per task.
void run(Job job, Kind kind, int64_t isa, int64_t row_bytes) {
  const int64_t grain = std::max<int64_t>(1, (256 << 10) / std::max<int64_t>(1, row_bytes));
  const int64_t M = job.M;
  for (int64_t m0 = 0; m0 < M; m0 += MAX_M) {
    Job part = job;
    part.M = std::min<int64_t>(MAX_M, M - m0);
    part.x = job.x + m0 * job.K;
    part.xsum = job.xsum ? job.xsum + m0 * (job.K / std::max<int64_t>(1, job.group)) : nullptr;
    part.y = job.y + m0 * job.N;
    const RowFn fn = pick(kind, isa, part.M);
    at::parallel_for(0, job.N, grain, [&](int64_t a, int64_t b) { fn(part, a, b); });
  }
}

// ---------------------------------------------------------------------------------------------
// Argument checks: a kernel reads raw memory, so every shape, stride and index is checked here.
// ---------------------------------------------------------------------------------------------
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
  if (keep.numel() > 0) {
    const int64_t lo = keep.min().item<int64_t>(), hi = keep.max().item<int64_t>();
    TORCH_CHECK(lo >= 0 && hi < n_rows, "gemma3n kernels: row index out of range [0, ", n_rows, ")");
  }
  return {keep.data_ptr<int64_t>(), keep.numel()};
}

torch::Tensor linear_bf16(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> rows, int64_t isa) {
  check_weight(w, torch::kBFloat16, "bf16 weight");
  const int64_t K = w.size(1);
  auto xf = checked_x(x, K);
  torch::Tensor keep;
  auto [row_ptr, N] = checked_rows(rows, w.size(0), keep);
  auto y = torch::empty({xf.size(0), N}, xf.options());
  if (N == 0 || xf.size(0) == 0) return y;
  if (K == 0) return y.zero_();
  Job j{w.data_ptr(), w.stride(0), nullptr, 0, row_ptr, xf.data_ptr<float>(), nullptr, xf.size(0), K, 0,
        y.data_ptr<float>(), N};
  run(j, BF16, resolve_isa(isa), K * 2);
  return y;
}

torch::Tensor linear_int8(torch::Tensor x, torch::Tensor q, torch::Tensor scale, c10::optional<torch::Tensor> rows,
                          int64_t isa) {
  check_weight(q, torch::kInt8, "int8 weight");
  TORCH_CHECK(scale.scalar_type() == torch::kBFloat16 && scale.dim() == 1 && scale.size(0) == q.size(0),
              "gemma3n kernels: int8 scales must be bf16 [", q.size(0), "]");
  auto s = scale.contiguous();
  const int64_t K = q.size(1);
  auto xf = checked_x(x, K);
  torch::Tensor keep;
  auto [row_ptr, N] = checked_rows(rows, q.size(0), keep);
  auto y = torch::empty({xf.size(0), N}, xf.options());
  if (N == 0 || xf.size(0) == 0) return y;
  if (K == 0) return y.zero_();
  Job j{q.data_ptr(), q.stride(0), s.data_ptr(), 0, row_ptr, xf.data_ptr<float>(), nullptr, xf.size(0), K, 0,
        y.data_ptr<float>(), N};
  run(j, INT8, resolve_isa(isa), K);
  return y;
}

// x permuted so that a 32-column block's even columns come first, then its odd ones: the order
// in which the low and high nibbles of 16 packed bytes widen.
torch::Tensor even_odd(const torch::Tensor& xf) {
  const int64_t M = xf.size(0), K = xf.size(1);
  return xf.view({M, K / 32, 16, 2}).transpose(2, 3).contiguous().view({M, K});
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
  auto xf = checked_x(x, K);
  torch::Tensor keep;
  auto [row_ptr, N] = checked_rows(rows, q.size(0), keep);
  auto y = torch::empty({xf.size(0), N}, xf.options());
  if (N == 0 || xf.size(0) == 0) return y;
  if (K == 0) return y.zero_();
  auto xp = even_odd(xf);
  auto xs = xf.view({xf.size(0), K / group, group}).sum(-1).contiguous();
  Job j{q.data_ptr(), q.stride(0), sz.data_ptr(), sz.stride(0) / 2, row_ptr, xp.data_ptr<float>(),
        xs.data_ptr<float>(), xf.size(0), K, group, y.data_ptr<float>(), N};
  run(j, INT4, resolve_isa(isa), K / 2);
  return y;
}

std::string isa_name(int64_t isa) {
  switch (resolve_isa(isa)) {
    case AVX512: return "avx512";
    case AVX2: return "avx2";
    default: return "generic";
  }
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gemma3n decode kernels: weight-streaming y = x W^T for bf16, int8 and int4 weights";
  m.def("linear_bf16", &linear_bf16, "y [M, N] fp32 = x [M, K] @ W[rows]^T, W bf16 (strided view)");
  m.def("linear_int8", &linear_int8, "y = x @ (q * scale[:, None])[rows]^T, q int8, one bf16 scale per row");
  m.def("linear_int4", &linear_int4, "y = x @ dequant_int4(q, sz)[rows]^T, groups of `group` input columns");
  m.def("isa_name", &isa_name, "the body a given ISA code (0 = auto) runs on this CPU");
}
