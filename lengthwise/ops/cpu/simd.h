// 16 float lanes for the fused decode forward (decode_forward.cpp), on whatever the CPU has.
//
// Why: the panel GEMM and its epilogues were written against AVX-512 (one __m512 = one V). Many
// CPUs people serve on have no AVX-512 (AMD before Zen 4, Intel client cores since Alder Lake,
// Arm), and without these kernels the engine falls back to the much slower op-by-op torch path.
// So the kernels speak V, and V is one __m512 with AVX-512, two __m256 with AVX2 + FMA, and
// sixteen floats elsewhere (plain loops the compiler vectorizes for the target it has). The
// operations are the few the kernels use; each has the meaning of its AVX-512 namesake.
// `kChunkRows` is how many x rows a micro-kernel holds accumulators for: 2 vectors per row, all
// in registers (32 zmm: 12 rows; 16 ymm, each V two of them: 3 rows).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif

namespace lw::simd {

#if defined(__AVX512F__)

constexpr const char* kIsa = "avx512";
constexpr int kChunkRows = 12;
using V = __m512;
using Mask = __mmask16;

inline V zero() { return _mm512_setzero_ps(); }
inline V set1(float x) { return _mm512_set1_ps(x); }
inline V load(const float* p) { return _mm512_loadu_ps(p); }
inline void store(float* p, V v) { _mm512_storeu_ps(p, v); }
inline Mask tail_mask(int n) { return n >= 16 ? Mask(0xFFFF) : n <= 0 ? Mask(0) : Mask((1u << n) - 1); }
inline V maskz_load(Mask m, const float* p) { return _mm512_maskz_loadu_ps(m, p); }
inline void mask_store(float* p, Mask m, V v) { _mm512_mask_storeu_ps(p, m, v); }
inline V add(V a, V b) { return _mm512_add_ps(a, b); }
inline V sub(V a, V b) { return _mm512_sub_ps(a, b); }
inline V mul(V a, V b) { return _mm512_mul_ps(a, b); }
inline V div(V a, V b) { return _mm512_div_ps(a, b); }
inline V fmadd(V a, V b, V c) { return _mm512_fmadd_ps(a, b, c); }

// 16 words w: (w << 16) and (w & 0xFFFF0000) as floats: two bfloat16 values per word.
inline void load_bf16_pair(const uint32_t* p, V& lo, V& hi) {
  const __m512i v = _mm512_loadu_si512(p);
  lo = _mm512_castsi512_ps(_mm512_slli_epi32(v, 16));
  hi = _mm512_castsi512_ps(_mm512_and_si512(v, _mm512_set1_epi32(int(0xFFFF0000u))));
}
// 16 int8 as floats.
inline V load_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
// 16 bytes: their low nibbles and their high nibbles as floats.
inline void load_u4_pair(const uint8_t* p, V& lo, V& hi) {
  const __m512i v = _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  lo = _mm512_cvtepi32_ps(_mm512_and_si512(v, _mm512_set1_epi32(15)));
  hi = _mm512_cvtepi32_ps(_mm512_srli_epi32(v, 4));
}
// 2^i for whole-number floats i (AVX-512 scales exactly, saturating to 0 and inf).
inline V pow2(V p, V i) { return _mm512_scalef_ps(p, i); }
inline V round_nearest(V x) { return _mm512_roundscale_ps(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline V max(V a, V b) { return _mm512_max_ps(a, b); }
inline V min(V a, V b) { return _mm512_min_ps(a, b); }
// a's lanes where m is set, b's elsewhere.
inline V select(Mask m, V a, V b) { return _mm512_mask_blend_ps(m, b, a); }
inline float reduce_add(V v) { return _mm512_reduce_add_ps(v); }
inline float reduce_max(V v) { return _mm512_reduce_max_ps(v); }
// Lane i of the result is the sum of the 16 lanes of p[i] (p is clobbered): a 16x16 transpose-add
// in four levels (two permutes and an add per pair), instead of a horizontal reduction per vector.
inline V sum16(V* p) {
  const __m512i even = _mm512_setr_epi32(0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 22, 24, 26, 28, 30);
  const __m512i odd = _mm512_setr_epi32(1, 3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25, 27, 29, 31);
  for (int w = 8; w >= 1; w /= 2)
    for (int j = 0; j < w; ++j)
      p[j] = _mm512_add_ps(_mm512_permutex2var_ps(p[2 * j], even, p[2 * j + 1]),
                           _mm512_permutex2var_ps(p[2 * j], odd, p[2 * j + 1]));
  return p[0];
}

#elif defined(__AVX2__) && defined(__FMA__)

constexpr const char* kIsa = "avx2";
constexpr int kChunkRows = 3;
struct V { __m256 lo, hi; };
struct Mask { __m256i lo, hi; };

inline V zero() { return {_mm256_setzero_ps(), _mm256_setzero_ps()}; }
inline V set1(float x) { const __m256 b = _mm256_set1_ps(x); return {b, b}; }
inline V load(const float* p) { return {_mm256_loadu_ps(p), _mm256_loadu_ps(p + 8)}; }
inline void store(float* p, V v) { _mm256_storeu_ps(p, v.lo); _mm256_storeu_ps(p + 8, v.hi); }
inline Mask tail_mask(int n) {
  const __m256i c = _mm256_set1_epi32(n);
  return {_mm256_cmpgt_epi32(c, _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7)),
          _mm256_cmpgt_epi32(c, _mm256_setr_epi32(8, 9, 10, 11, 12, 13, 14, 15))};
}
// (vmaskmov reads and writes only the lanes in the mask: no fault past the end of an array.)
inline V maskz_load(Mask m, const float* p) { return {_mm256_maskload_ps(p, m.lo), _mm256_maskload_ps(p + 8, m.hi)}; }
inline void mask_store(float* p, Mask m, V v) { _mm256_maskstore_ps(p, m.lo, v.lo); _mm256_maskstore_ps(p + 8, m.hi, v.hi); }
inline V add(V a, V b) { return {_mm256_add_ps(a.lo, b.lo), _mm256_add_ps(a.hi, b.hi)}; }
inline V sub(V a, V b) { return {_mm256_sub_ps(a.lo, b.lo), _mm256_sub_ps(a.hi, b.hi)}; }
inline V mul(V a, V b) { return {_mm256_mul_ps(a.lo, b.lo), _mm256_mul_ps(a.hi, b.hi)}; }
inline V div(V a, V b) { return {_mm256_div_ps(a.lo, b.lo), _mm256_div_ps(a.hi, b.hi)}; }
inline V fmadd(V a, V b, V c) { return {_mm256_fmadd_ps(a.lo, b.lo, c.lo), _mm256_fmadd_ps(a.hi, b.hi, c.hi)}; }

inline void load_bf16_pair(const uint32_t* p, V& lo, V& hi) {
  const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + 8));
  const __m256i top = _mm256_set1_epi32(int(0xFFFF0000u));
  lo = {_mm256_castsi256_ps(_mm256_slli_epi32(a, 16)), _mm256_castsi256_ps(_mm256_slli_epi32(b, 16))};
  hi = {_mm256_castsi256_ps(_mm256_and_si256(a, top)), _mm256_castsi256_ps(_mm256_and_si256(b, top))};
}
inline V load_i8(const int8_t* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return {_mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(v)), _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_srli_si128(v, 8)))};
}
inline void load_u4_pair(const uint8_t* p, V& lo, V& hi) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  const __m256i a = _mm256_cvtepu8_epi32(v), b = _mm256_cvtepu8_epi32(_mm_srli_si128(v, 8));
  const __m256i low = _mm256_set1_epi32(15);
  lo = {_mm256_cvtepi32_ps(_mm256_and_si256(a, low)), _mm256_cvtepi32_ps(_mm256_and_si256(b, low))};
  hi = {_mm256_cvtepi32_ps(_mm256_srli_epi32(a, 4)), _mm256_cvtepi32_ps(_mm256_srli_epi32(b, 4))};
}
// p * 2^i for whole-number floats i in [-126, 127] (exp clamps its input so they are).
inline V pow2(V p, V i) {
  const auto scale = [](__m256 x) {
    return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(x), _mm256_set1_epi32(127)), 23));
  };
  return {_mm256_mul_ps(p.lo, scale(i.lo)), _mm256_mul_ps(p.hi, scale(i.hi))};
}
inline V round_nearest(V x) {
  constexpr int kMode = _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC;
  return {_mm256_round_ps(x.lo, kMode), _mm256_round_ps(x.hi, kMode)};
}
inline V max(V a, V b) { return {_mm256_max_ps(a.lo, b.lo), _mm256_max_ps(a.hi, b.hi)}; }
inline V min(V a, V b) { return {_mm256_min_ps(a.lo, b.lo), _mm256_min_ps(a.hi, b.hi)}; }
inline V select(Mask m, V a, V b) {
  return {_mm256_blendv_ps(b.lo, a.lo, _mm256_castsi256_ps(m.lo)), _mm256_blendv_ps(b.hi, a.hi, _mm256_castsi256_ps(m.hi))};
}
inline float reduce_add(V v) {
  const __m256 s = _mm256_add_ps(v.lo, v.hi);
  __m128 x = _mm_add_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_add_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_add_ss(x, _mm_shuffle_ps(x, x, 1)));
}
inline float reduce_max(V v) {
  const __m256 s = _mm256_max_ps(v.lo, v.hi);
  __m128 x = _mm_max_ps(_mm256_castps256_ps128(s), _mm256_extractf128_ps(s, 1));
  x = _mm_max_ps(x, _mm_movehl_ps(x, x));
  return _mm_cvtss_f32(_mm_max_ss(x, _mm_shuffle_ps(x, x, 1)));
}
// Lane i of the result is the sum of the 8 lanes of q[i], i < 8: horizontal adds pair the lanes up
// within each 128-bit half, then the halves are added across.
inline __m256 sum8(const __m256* q) {
  const __m256 a = _mm256_hadd_ps(_mm256_hadd_ps(q[0], q[1]), _mm256_hadd_ps(q[2], q[3]));
  const __m256 b = _mm256_hadd_ps(_mm256_hadd_ps(q[4], q[5]), _mm256_hadd_ps(q[6], q[7]));
  return _mm256_add_ps(_mm256_permute2f128_ps(a, b, 0x20), _mm256_permute2f128_ps(a, b, 0x31));
}
// Lane i of the result is the sum of the 16 lanes of p[i].
inline V sum16(V* p) {
  __m256 q[16];
  for (int i = 0; i < 16; ++i) q[i] = _mm256_add_ps(p[i].lo, p[i].hi);
  return {sum8(q), sum8(q + 8)};
}

#else  // portable: plain loops over 16 floats, vectorized by the compiler where it can

constexpr const char* kIsa = "portable";
constexpr int kChunkRows = 4;
struct V { float f[16]; };
struct Mask { int n; };

#define LW_LANES(expr) V r; for (int i = 0; i < 16; ++i) r.f[i] = (expr); return r
inline V zero() { LW_LANES(0.f); }
inline V set1(float x) { LW_LANES(x); }
inline V load(const float* p) { V r; std::memcpy(r.f, p, sizeof r.f); return r; }
inline void store(float* p, V v) { std::memcpy(p, v.f, sizeof v.f); }
inline Mask tail_mask(int n) { return {n < 0 ? 0 : n > 16 ? 16 : n}; }
inline V maskz_load(Mask m, const float* p) { LW_LANES(i < m.n ? p[i] : 0.f); }
inline void mask_store(float* p, Mask m, V v) { for (int i = 0; i < m.n; ++i) p[i] = v.f[i]; }
inline V add(V a, V b) { LW_LANES(a.f[i] + b.f[i]); }
inline V sub(V a, V b) { LW_LANES(a.f[i] - b.f[i]); }
inline V mul(V a, V b) { LW_LANES(a.f[i] * b.f[i]); }
inline V div(V a, V b) { LW_LANES(a.f[i] / b.f[i]); }
inline V fmadd(V a, V b, V c) { LW_LANES(a.f[i] * b.f[i] + c.f[i]); }
inline V max(V a, V b) { LW_LANES(a.f[i] > b.f[i] ? a.f[i] : b.f[i]); }
inline V min(V a, V b) { LW_LANES(a.f[i] < b.f[i] ? a.f[i] : b.f[i]); }
inline V round_nearest(V x) { LW_LANES(std::nearbyint(x.f[i])); }
inline V pow2(V p, V e) { LW_LANES(std::ldexp(p.f[i], int(e.f[i]))); }
inline V load_i8(const int8_t* p) { LW_LANES(float(p[i])); }
inline V select(Mask m, V a, V b) { LW_LANES(i < m.n ? a.f[i] : b.f[i]); }
inline V sum16(V* p) {
  V r;
  for (int i = 0; i < 16; ++i) {
    float s = 0.f;
    for (int j = 0; j < 16; ++j) s += p[i].f[j];
    r.f[i] = s;
  }
  return r;
}
#undef LW_LANES
inline float reduce_add(V v) {
  float s = 0.f;
  for (int i = 0; i < 16; ++i) s += v.f[i];
  return s;
}
inline float reduce_max(V v) {
  float m = v.f[0];
  for (int i = 1; i < 16; ++i) m = m > v.f[i] ? m : v.f[i];
  return m;
}

inline void load_bf16_pair(const uint32_t* p, V& lo, V& hi) {
  for (int i = 0; i < 16; ++i) {
    const uint32_t a = p[i] << 16, b = p[i] & 0xFFFF0000u;
    std::memcpy(&lo.f[i], &a, 4);
    std::memcpy(&hi.f[i], &b, 4);
  }
}
inline void load_u4_pair(const uint8_t* p, V& lo, V& hi) {
  for (int i = 0; i < 16; ++i) {
    lo.f[i] = float(p[i] & 15);
    hi.f[i] = float(p[i] >> 4);
  }
}

#endif

// exp on 16 lanes: 2^(x log2 e) as 2^i * 2^f with f in [-0.5, 0.5] and a degree-7 Taylor polynomial
// of e^(f ln 2) (relative error about 2e-7). Inputs are clamped to [-87, 88]: e^88 is within float32.
inline V exp(V x) {
  x = min(max(x, set1(-87.f)), set1(88.f));
  const V t = mul(x, set1(1.44269504088896341f));
  const V i = round_nearest(t);
  const V f = mul(sub(t, i), set1(0.693147180559945f));
  V p = set1(1.f / 5040);
  p = fmadd(p, f, set1(1.f / 720));
  p = fmadd(p, f, set1(1.f / 120));
  p = fmadd(p, f, set1(1.f / 24));
  p = fmadd(p, f, set1(1.f / 6));
  p = fmadd(p, f, set1(0.5f));
  p = fmadd(p, f, set1(1.f));
  p = fmadd(p, f, set1(1.f));
  return pow2(p, i);
}

}  // namespace lw::simd
