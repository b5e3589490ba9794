// AVX-512 (F, BW, VL) + F16C path of the element kernel (16 lanes); compiled with AVX-512 flags
// and only called after cpuid says the CPU has them. Same operation order as kernel_scalar_range.
#include <immintrin.h>

#include "kernels.h"

namespace r7b {
namespace {

template <int IN>
inline __m512 load16(const void* p, size_t i) {
  if (IN == kBF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
  } else if (IN == kF16) {
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(static_cast<const uint16_t*>(p) + i));
    return _mm512_cvtph_ps(h);
  } else {
    return _mm512_loadu_ps(static_cast<const float*>(p) + i);
  }
}

template <int OUT>
inline void store16(void* p, size_t i, __m512 v) {
  const __mmask16 nan = _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q);
  v = _mm512_mask_blend_ps(nan, v, _mm512_castsi512_ps(_mm512_set1_epi32(0x7fc00000)));
  if (OUT == kBF16) {
    __m512i u = _mm512_castps_si512(v);
    const __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    u = _mm512_add_epi32(u, _mm512_add_epi32(lsb, _mm512_set1_epi32(0x7fff)));
    u = _mm512_srli_epi32(u, 16);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), _mm512_cvtepi32_epi16(u));
  } else if (OUT == kF16) {
    const __m256i h = _mm512_cvtps_ph(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(p) + i), h);
  } else {
    _mm512_storeu_ps(static_cast<float*>(p) + i, v);
  }
}

template <int IN, int OUT>
void run(const Block& b) {
  size_t i = 0;
  for (; i + 16 <= b.n; i += 16) {
    __m512 acc = _mm512_mul_ps(_mm512_set1_ps(b.coef[0]), load16<IN>(b.src[0], i));
    for (int j = 1; j < b.n_in; ++j)
      acc = _mm512_fmadd_ps(_mm512_set1_ps(b.coef[j]), load16<IN>(b.src[j], i), acc);
    store16<OUT>(b.out, i, acc);
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

void kernel_avx512(const Block& b) {
  if (b.in_dt == kBF16) run_in<kBF16>(b);
  else if (b.in_dt == kF16) run_in<kF16>(b);
  else run_in<kF32>(b);
}

// TIES / DARE: the reference loop of kernels.h compiled with this file's ISA flags (the
// compiler vectorises what it can; the operation order, hence the bytes, is the same).
void gta_avx512(const GtaBlock& b) { gta_range(b, 0); }

}  // namespace r7b
