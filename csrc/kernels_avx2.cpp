// AVX2 + FMA + F16C path of the element kernel (8 lanes); compiled with -mavx2 -mfma -mf16c and
// only called after cpuid says the CPU has them. Same operation order as kernel_scalar_range.
#include <immintrin.h>

#include "kernels.h"

namespace r7b {
namespace {

template <int IN>
inline __m256 load8(const void* p, size_t i) {
  if (IN == kBF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
  } else if (IN == kF16) {
    const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(static_cast<const uint16_t*>(p) + i));
    return _mm256_cvtph_ps(h);
  } else {
    return _mm256_loadu_ps(static_cast<const float*>(p) + i);
  }
}

template <int OUT>
inline void store8(void* p, size_t i, __m256 v) {
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  v = _mm256_blendv_ps(v, _mm256_castsi256_ps(_mm256_set1_epi32(0x7fc00000)), nan);
  if (OUT == kBF16) {
    __m256i u = _mm256_castps_si256(v);
    const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
    u = _mm256_add_epi32(u, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7fff)));
    u = _mm256_srli_epi32(u, 16);
    const __m128i h = _mm_packus_epi32(_mm256_castsi256_si128(u), _mm256_extracti128_si256(u, 1));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
  } else if (OUT == kF16) {
    const __m128i h = _mm256_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(p) + i), h);
  } else {
    _mm256_storeu_ps(static_cast<float*>(p) + i, v);
  }
}

template <int IN, int OUT>
void run(const Block& b) {
  size_t i = 0;
  for (; i + 8 <= b.n; i += 8) {
    __m256 acc = _mm256_mul_ps(_mm256_set1_ps(b.coef[0]), load8<IN>(b.src[0], i));
    for (int j = 1; j < b.n_in; ++j)
      acc = _mm256_fmadd_ps(_mm256_set1_ps(b.coef[j]), load8<IN>(b.src[j], i), acc);
    store8<OUT>(b.out, i, acc);
  }
  kernel_scalar_range(b, i);
}

template <int IN>
void run_in(const Block& b) {
  if (b.out_dt == kBF16) run<IN, kBF16>(b);
  else if (b.out_dt == kF16) run<IN, kF16>(b);
  else run<IN, kF32>(b);
}

}  // namespace

void kernel_avx2(const Block& b) {
  if (b.in_dt == kBF16) run_in<kBF16>(b);
  else if (b.in_dt == kF16) run_in<kF16>(b);
  else run_in<kF32>(b);
}

// TIES / DARE: the reference loop of kernels.h compiled with this file's ISA flags (the
// compiler vectorises what it can; the operation order, hence the bytes, is the same).
void gta_avx2(const GtaBlock& b) { gta_range(b, 0); }

}  // namespace r7b
