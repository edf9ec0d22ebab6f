// What decode.cpp (the weight-streaming products) offers the other native files: step.cpp (the
// fused decode step), ops.cpp (the Python entry points) and towers.cpp.
#pragma once

#include <torch/extension.h>

#include <cstdint>
#include <cstring>

namespace gemma3n {

enum Kind : int { BF16 = 0, INT8 = 1, INT4 = 2, F32 = 3 };

// ISA levels of the bodies (0: the best this CPU has).
enum Isa : int64_t { AUTO = 0, GENERIC = 1, AVX2 = 2, AVX512 = 3, AVX512_BF16 = 4 };

inline float bf16_to_float(uint16_t v) {
  uint32_t bits = static_cast<uint32_t>(v) << 16;
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

inline uint16_t float_to_bf16(float f) {  // round to nearest even, NaN stays NaN
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return static_cast<uint16_t>((u >> 16) | 0x40);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}

// A [N, K] weight as the kernels read it, in place: `data` is element [0, 0] of a view whose rows
// are `ld` elements apart (int4: bytes); int8 has a bf16 scale per row (`scale`), int4 bf16
// (scale, zero) pairs per group of `group` columns, rows `sld` pairs apart.
struct Weight {
  Kind kind = F32;
  const void* data = nullptr;
  int64_t ld = 0;
  const void* scale = nullptr;
  int64_t sld = 0;
  int64_t group = 0;
};

// y[M, N] = x[M, K] · W[rows or 0..N-1, :K]ᵀ (fp32 x and y, contiguous). `isa` 0 = the best body.
// No allocation: activations are prepared in per-thread scratch.
void product(const Weight& w, const float* x, int64_t M, int64_t K, float* y, const int64_t* rows, int64_t N,
             int64_t isa = 0);

// The ISA level a request resolves to on this CPU (0 = the best), and its name.
int64_t resolve_isa(int64_t isa);

// Registers step.cpp's classes on the extension module.
void register_step(pybind11::module& m);

}  // namespace gemma3n
