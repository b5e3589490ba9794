// Element kernels of the merge engine: out[i] = round(c0*x0[i] (+) c1*x1[i] (+) ...), where
// the sum is a chain of fused multiply-adds in input order, in fp32, and round() is
// round-to-nearest-even to the output dtype. Every path (scalar, AVX2, AVX-512) computes exactly
// this, so all give identical bytes. NaN results are written as the canonical quiet NaN
// (fp32 0x7FC00000, bf16 0x7FC0, fp16 0x7E00), whatever their payload or sign.
//
// The helpers below are `static inline` on purpose: each translation unit (compiled with its own
// ISA flags) gets its own copy, so the linker can never hand an AVX-512-compiled copy to the
// scalar path.
#pragma once

#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstring>
#include <vector>

namespace r7b {

enum DType : int { kF32 = 0, kF16 = 1, kBF16 = 2 };
enum Sparsify : int { kKeepAll = 0, kMagnitude = 1, kRandom = 2 };

static inline int dtype_size(int dt) { return dt == kF32 ? 4 : 2; }

// One block of work: `n` elements from `n_in` sources (all of dtype `in_dt`), coefficients
// `coef[n_in]`, written to `out` in `out_dt`.
struct Block {
  const void* const* src;
  const float* coef;
  int n_in;
  int in_dt;
  int out_dt;
  size_t n;
  void* out;
};

using KernelFn = void (*)(const Block&);

// One block of a TIES / DARE merge (Method kGta): `n` elements starting at element `first` of
// the tensor; src[0] is the base, src[1..n_in) the experts with weights w[j]; per-expert
// magnitude threshold thr[j] and tie cut index cut[j] (kMagnitude), DARE keep bound dbound[j] and
// hash key key[j] (kRandom), L1 rescale factor scale[j] (when rescale).
struct GtaBlock {
  const void* const* src;
  const float* w;
  int n_in;
  int in_dt;
  int out_dt;
  size_t n;
  int64_t first;
  void* out;
  int sparsify;
  bool consensus, rescale, normalize;
  float divisor;
  const float* thr;
  const int64_t* cut;
  const float* scale;
  const uint32_t* dbound;
  const uint64_t* key;
};

using KernelFn = void (*)(const Block&);
using GtaFn = void (*)(const GtaBlock&);

void kernel_scalar(const Block& b);
void gta_scalar(const GtaBlock& b);
#ifdef R7B_HAVE_AVX2
void kernel_avx2(const Block& b);
void gta_avx2(const GtaBlock& b);
#endif
#ifdef R7B_HAVE_AVX512
void kernel_avx512(const Block& b);
void gta_avx512(const GtaBlock& b);
#endif

static inline float bits_f32(uint32_t u) {
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
static inline uint32_t f32_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return u;
}

static inline float bf16_to_f32(uint16_t h) { return bits_f32(uint32_t(h) << 16); }

static inline float f16_to_f32(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t exp = (h >> 10) & 0x1fu;
  const uint32_t mant = h & 0x3ffu;
  if (exp == 0x1f) return bits_f32(sign | 0x7f800000u | (mant << 13));  // Inf / NaN
  if (exp == 0) {  // zero or subnormal: mant * 2^-24, exact in fp32
    const float v = float(mant) * 5.9604644775390625e-8f;
    return sign ? -v : v;
  }
  return bits_f32(sign | ((exp + 112u) << 23) | (mant << 13));
}

// Round-to-nearest-even fp32 -> bf16 (input NaN already canonical, so it stays a quiet NaN).
static inline uint16_t f32_to_bf16(float f) {
  const uint32_t u = f32_bits(f);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

// Round-to-nearest-even fp32 -> fp16 with subnormals, overflow to Inf, NaN -> 0x7E00
// (the same results as the F16C instruction vcvtps2ph with round-to-nearest).
static inline uint16_t f32_to_f16(float f) {
  uint32_t u = f32_bits(f);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t o;
  if (u >= (143u << 23)) {  // >= 2^16: Inf, or NaN
    o = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {  // below 2^-14: subnormal; let the fp32 adder round
    const float magic = bits_f32(((127u - 15u) + (23u - 10u) + 1u) << 23);
    const float g = bits_f32(u) + magic;
    o = f32_bits(g) - f32_bits(magic);
  } else {
    const uint32_t odd = (u >> 13) & 1u;
    u += (uint32_t(15 - 127) << 23) + 0xfffu + odd;
    o = u >> 13;
  }
  return uint16_t(o | (sign >> 16));
}

static inline float load_one(const void* p, int dt, size_t i) {
  if (dt == kBF16) return bf16_to_f32(static_cast<const uint16_t*>(p)[i]);
  if (dt == kF16) return f16_to_f32(static_cast<const uint16_t*>(p)[i]);
  return static_cast<const float*>(p)[i];
}

static inline void store_one(void* p, int dt, size_t i, float v) {
  if (v != v) v = bits_f32(0x7fc00000u);
  if (dt == kBF16)
    static_cast<uint16_t*>(p)[i] = f32_to_bf16(v);
  else if (dt == kF16)
    static_cast<uint16_t*>(p)[i] = f32_to_f16(v);
  else
    static_cast<float*>(p)[i] = v;
}

// Elements [begin, b.n) one at a time: the reference order that every path follows.
static inline void kernel_scalar_range(const Block& b, size_t begin) {
  for (size_t i = begin; i < b.n; ++i) {
    float acc = b.coef[0] * load_one(b.src[0], b.in_dt, i);
    for (int j = 1; j < b.n_in; ++j) acc = std::fma(b.coef[j], load_one(b.src[j], b.in_dt, i), acc);
    store_one(b.out, b.out_dt, i, acc);
  }
}

// ---------------------------------------------------------------- TIES / DARE (Method kGta)

// splitmix64's finaliser: a bijective 64-bit mix (the DARE drop mask's hash).
static inline uint64_t mix64(uint64_t z) {
  z ^= z >> 30;
  z *= 0xbf58476d1ce4e5b9ull;
  z ^= z >> 27;
  z *= 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

// DARE's uniform draw for element `i` of a tensor: the top 24 bits of mix64(key + (i + 1) *
// golden), an integer in [0, 2^24). The element is kept iff draw < density * 2^24. `key` comes
// from Python (seed, tensor name, expert index): r7b_fast/merge_plan.py dare_key.
static inline uint32_t dare_draw(uint64_t key, int64_t i) {
  return uint32_t(mix64(key + uint64_t(i + 1) * 0x9e3779b97f4a7c15ull) >> 40);
}

// |tau| for the magnitude trim; NaN ranks above every number (as in torch's sort).
static inline float trim_magnitude(float tau) { return tau != tau ? INFINITY : std::fabs(tau); }

// Elements [begin, b.n): out = base + mixed, every step an fp32 operation in this order:
//   tau_j = x_j - base; kept_j = keep(j, i) ? tau_j : 0; if rescale: kept_j *= scale[j];
//   wt_j = w[j] * kept_j;
//   consensus: S = sum_j wt_j (left to right from +0); elected sign + iff S >= 0;
//              mixed = sum of wt_j whose sign is the elected one (zeros never count),
//              div = sum of their w[j]; normalize: mixed /= (div == 0 ? 1 : div);
//   otherwise: mixed = sum_j wt_j; normalize: mixed /= divisor.
// DARE's keep(j, i) is dare_draw(key[j], i) < dbound[j] = ceil(density * 2^24) (the same as
// draw < density * 2^24 for an integer draw). Work goes in blocks of kGtaBlock elements, one
// source at a time, so that every inner loop is branch-free and the compiler can vectorise it
// with the translation unit's ISA; each element still sees exactly the operations above.
constexpr size_t kGtaBlock = 256;

static inline void load_block(const void* p, int dt, size_t i0, size_t m, float* out) {
  if (dt == kBF16) {
    const uint16_t* q = static_cast<const uint16_t*>(p) + i0;
    for (size_t k = 0; k < m; ++k) out[k] = bits_f32(uint32_t(q[k]) << 16);
  } else if (dt == kF16) {
    const uint16_t* q = static_cast<const uint16_t*>(p) + i0;
    for (size_t k = 0; k < m; ++k) out[k] = f16_to_f32(q[k]);
  } else {
    std::memcpy(out, static_cast<const float*>(p) + i0, m * 4);
  }
}

static inline void gta_expert(const GtaBlock& b, int j, int64_t g0, size_t m, const float* base,
                              const float* x, float* wt) {
  const float w = b.w[j], sc = b.scale[j];
  if (b.sparsify == kMagnitude) {
    const float thr = b.thr[j];
    const int64_t cut = b.cut[j];
    for (size_t k = 0; k < m; ++k) {
      const float tau = x[k] - base[k];
      const float mag = trim_magnitude(tau);
      const bool keep = mag > thr || (mag == thr && g0 + int64_t(k) < cut);
      wt[k] = keep ? tau : 0.0f;
    }
  } else if (b.sparsify == kRandom) {
    const uint64_t key = b.key[j];
    const uint32_t bound = b.dbound[j];
    for (size_t k = 0; k < m; ++k) {
      const float tau = x[k] - base[k];
      wt[k] = dare_draw(key, g0 + int64_t(k)) < bound ? tau : 0.0f;
    }
  } else {
    for (size_t k = 0; k < m; ++k) wt[k] = x[k] - base[k];
  }
  if (b.rescale)
    for (size_t k = 0; k < m; ++k) wt[k] = wt[k] * sc;
  for (size_t k = 0; k < m; ++k) wt[k] = w * wt[k];
}

static inline void gta_range(const GtaBlock& b, size_t begin) {
  constexpr size_t B = kGtaBlock;
  thread_local std::vector<float> wts;  // (n_in - 1) x B weighted, kept task-vector values
  wts.resize(size_t(b.n_in) * B);
  float base[B], x[B], mixed[B], s[B], div[B];
  for (size_t i0 = begin; i0 < b.n; i0 += B) {
    const size_t m = b.n - i0 < B ? b.n - i0 : B;
    const int64_t g0 = b.first + int64_t(i0);
    load_block(b.src[0], b.in_dt, i0, m, base);
    for (int j = 1; j < b.n_in; ++j) {
      load_block(b.src[j], b.in_dt, i0, m, x);
      gta_expert(b, j, g0, m, base, x, &wts[size_t(j) * B]);
    }
    for (size_t k = 0; k < m; ++k) mixed[k] = 0.0f;
    if (b.consensus) {
      for (size_t k = 0; k < m; ++k) s[k] = div[k] = 0.0f;
      for (int j = 1; j < b.n_in; ++j)
        for (size_t k = 0; k < m; ++k) s[k] = s[k] + wts[size_t(j) * B + k];
      for (int j = 1; j < b.n_in; ++j) {
        const float* wt = &wts[size_t(j) * B];
        const float w = b.w[j];
        for (size_t k = 0; k < m; ++k) {
          const bool agree = s[k] >= 0.0f ? wt[k] > 0.0f : wt[k] < 0.0f;
          mixed[k] = agree ? mixed[k] + wt[k] : mixed[k];
          div[k] = agree ? div[k] + w : div[k];
        }
      }
      if (b.normalize)
        for (size_t k = 0; k < m; ++k) mixed[k] = mixed[k] / (div[k] == 0.0f ? 1.0f : div[k]);
    } else {
      for (int j = 1; j < b.n_in; ++j)
        for (size_t k = 0; k < m; ++k) mixed[k] = mixed[k] + wts[size_t(j) * B + k];
      if (b.normalize)
        for (size_t k = 0; k < m; ++k) mixed[k] = mixed[k] / b.divisor;
    }
    for (size_t k = 0; k < m; ++k) store_one(b.out, b.out_dt, i0 + k, base[k] + mixed[k]);
  }
}

}  // namespace r7b
