"""Probe: can a bf16-weight matvec reach memory bandwidth on this CPU? (decode-bound question, issue #3)

    python bench/probe_bf16_gemv.py [--threads 2]

Times y = W x for Gemma 3n E2B decode shapes (W bf16 [out, in], x fp32) three ways: torch ``F.linear`` in
bf16 (what ``gemma3n.text.linear`` does for <= 4 rows), torch fp32 (W held in fp32: 2x the memory), and a
40-line AVX2 kernel built with ``torch.utils.cpp_extension.load_inline`` that widens bf16 to fp32 in
registers (shift by 16) and accumulates with FMA, so it reads 2 bytes per weight and nothing else.
Needs a C++ compiler (first build ~1 min). Reports ms and GB/s of weight bytes.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.nn.functional as F
from torch.utils.cpp_extension import load_inline

SRC = r"""
#include <torch/extension.h>
#include <immintrin.h>
#include <omp.h>
// y[M] = W[M,K] (bf16) @ x[K] (fp32), fp32 accumulation; K % 32 == 0.
torch::Tensor gemv_bf16(torch::Tensor W, torch::Tensor x) {
  const int64_t M = W.size(0), K = W.size(1);
  auto y = torch::empty({M}, x.options());
  const uint16_t* w = reinterpret_cast<const uint16_t*>(W.data_ptr<at::BFloat16>());
  const float* xp = x.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  #pragma omp parallel for schedule(static)
  for (int64_t m = 0; m < M; ++m) {
    const uint16_t* row = w + m * K;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps(), a2 = _mm256_setzero_ps(), a3 = _mm256_setzero_ps();
    for (int64_t k = 0; k < K; k += 32) {
      __m256i r0 = _mm256_loadu_si256((const __m256i*)(row + k));
      __m256i r1 = _mm256_loadu_si256((const __m256i*)(row + k + 16));
      __m256 w0 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(r0)), 16));
      __m256 w1 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(r0, 1)), 16));
      __m256 w2 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(r1)), 16));
      __m256 w3 = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(r1, 1)), 16));
      a0 = _mm256_fmadd_ps(w0, _mm256_loadu_ps(xp + k), a0);
      a1 = _mm256_fmadd_ps(w1, _mm256_loadu_ps(xp + k + 8), a1);
      a2 = _mm256_fmadd_ps(w2, _mm256_loadu_ps(xp + k + 16), a2);
      a3 = _mm256_fmadd_ps(w3, _mm256_loadu_ps(xp + k + 24), a3);
    }
    __m256 s = _mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3));
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
    h = _mm_hadd_ps(h, h); h = _mm_hadd_ps(h, h);
    yp[m] = _mm_cvtss_f32(h);
  }
  return y;
}
"""


def build():
    return load_inline(
        "gemma3n_bf16_gemv_probe",
        cpp_sources=SRC,
        functions=["gemv_bf16"],
        extra_cflags=["-O3", "-mavx2", "-mfma", "-fopenmp"],
        extra_ldflags=["-fopenmp"],
        verbose=False,
    )


def best(f, reps: int) -> float:
    f()
    b = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        f()
        b = min(b, time.perf_counter() - t)
    return b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", str(args.threads))
    torch.set_num_threads(args.threads)
    t = time.time()
    mod = build()
    print(f"kernel built in {time.time() - t:.0f}s")
    # E2B decode shapes: q/o, MLP up/gate, MLP down, LM head (tied embedding).
    for m, k in ((2048, 2048), (8192, 2048), (2048, 8192), (262400, 2048)):
        w = (torch.randn(m, k) * 0.02).bfloat16()
        wf = w.float()
        x = torch.randn(k)
        err = (mod.gemv_bf16(w, x) - wf @ x).abs().max().item()
        reps = 3 if m > 100_000 else 7
        tk = best(lambda: mod.gemv_bf16(w, x), reps)  # noqa: B023
        tb = best(lambda: F.linear(x[None].bfloat16(), w), reps)  # noqa: B023
        tf = best(lambda: F.linear(x[None], wf), reps)  # noqa: B023
        nb = w.numel() * 2
        print(
            f"{m}x{k}: AVX2 bf16 kernel {tk * 1e3:.2f} ms ({nb / tk / 1e9:.1f} GB/s) | torch bf16 "
            f"{tb * 1e3:.2f} ms ({nb / tb / 1e9:.1f} GB/s) | torch fp32 {tf * 1e3:.2f} ms "
            f"({2 * nb / tf / 1e9:.1f} GB/s) | max err {err:.1e}"
        )


if __name__ == "__main__":
    main()
