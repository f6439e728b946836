// The per-row core of segment attention, shared by `segment_attention.cpp` (attention alone, for
// the torch path) and `decode_forward.cpp` (the fused decode forward). See segment_attention.cpp.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>
#include "simd.h"
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__) && defined(__F16C__))
#include <immintrin.h>
// The vector path (attend_vector): simd.h's 16 lanes, and float16 conversions for float8 caches.
#define LW_ATTENTION_VECTOR 1
#else
#define LW_ATTENTION_VECTOR 0
#endif

namespace lw {

constexpr int kMaxHeads = 128;   // query heads
constexpr int kMaxHeadDim = 256;
constexpr int kMaxTile = 32;     // keys per softmax update (at most one block)

// A KV cache element: float32; bfloat16 held as its 16 raw bits; or one byte of float8 (torch's
// float8_e4m3fn: 3 mantissa bits, bias 7, at most 448, no infinities; float8_e5m2: 2 mantissa
// bits, bias 15, at most 57344). Narrower caches hold more tokens and give attention fewer bytes
// to read; the arithmetic stays float32.
using bf16 = uint16_t;
struct fp8e4m3 { uint8_t bits; };
struct fp8e5m2 { uint8_t bits; };

// The cache's element type as the Python side passes it (`lengthwise.ops.cpu.kv_kind`).
enum KvKind : int { kKvF32 = 0, kKvBF16 = 1, kKvE4M3 = 2, kKvE5M2 = 3 };

template <class T> struct Fp8Format;
template <> struct Fp8Format<fp8e4m3> { static constexpr int kMan = 3, kBias = 7; static constexpr float kMax = 448.f; };
template <> struct Fp8Format<fp8e5m2> { static constexpr int kMan = 2, kBias = 15; static constexpr float kMax = 57344.f; };

// Every byte's value, for scalar reads (the vector path converts through float16 instead).
template <class T>
struct Fp8Table {
  float v[256];
  constexpr Fp8Table() : v() {
    using F = Fp8Format<T>;
    for (int b = 0; b < 256; ++b) {
      const int e = (b & 0x7F) >> F::kMan, m = b & ((1 << F::kMan) - 1);
      float mag = float(e ? (1 << F::kMan) + m : m);  // the significand in units of the last bit
      for (int x = (e ? e : 1) - F::kBias - F::kMan; x != 0; x += x > 0 ? -1 : 1) mag *= x > 0 ? 2.f : 0.5f;
      const bool e4m3 = F::kMan == 3;
      if (e4m3 ? (b & 0x7F) == 0x7F : e == 31) mag = e4m3 || m ? __builtin_nanf("") : __builtin_inff();
      v[b] = b & 0x80 ? -mag : mag;
    }
  }
};
inline constexpr Fp8Table<fp8e4m3> kE4M3{};
inline constexpr Fp8Table<fp8e5m2> kE5M2{};

inline float widen(float x) { return x; }
inline float widen(bf16 x) {
  const uint32_t u = uint32_t(x) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
inline float widen(fp8e4m3 x) { return kE4M3.v[x.bits]; }
inline float widen(fp8e5m2 x) { return kE5M2.v[x.bits]; }

// float32 -> bfloat16, rounding to nearest even as torch's `.to(torch.bfloat16)` does (NaN kept NaN).
inline bf16 narrow_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7FFFFFFFu) > 0x7F800000u) return bf16((u >> 16) | 0x40);
  return bf16((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}
// float32 -> float8, rounding to nearest even and saturating at the largest finite value (as
// vLLM's fp8 KV cache does; torch's `.to()` after a clamp gives the same bytes). NaN stays NaN.
// Branch-free integer arithmetic, which the compiler vectorizes: the store runs for every new
// token's keys and values.
template <class T>
inline T narrow_fp8(float f) {
  using F = Fp8Format<T>;
  constexpr int kShift = 23 - F::kMan;
  constexpr int kMinExp = 1 - F::kBias;  // the smallest normal's exponent
  uint32_t u, max_bits, min_normal;
  std::memcpy(&u, &f, 4);
  const float max = F::kMax, smallest = 1.f / float(1u << -kMinExp);
  std::memcpy(&max_bits, &max, 4);
  std::memcpy(&min_normal, &smallest, 4);
  const uint8_t sign = uint8_t((u >> 24) & 0x80);
  const uint32_t mag = u & 0x7FFFFFFFu;
  const bool nan = mag > 0x7F800000u;
  const uint32_t a = std::min(mag, max_bits);
  // Normal results: round the float32 significand to kMan bits (a carry moves the exponent up),
  // then rebias the exponent.
  const uint32_t rounded = a + ((1u << (kShift - 1)) - 1) + ((a >> kShift) & 1u);
  const uint32_t normal = (rounded - (uint32_t(127 - F::kBias) << 23)) >> kShift;
  // Below the smallest normal: adding 2^(kMinExp - kMan + 23), whose last bit is the subnormal
  // step, rounds to a multiple of the step; the sum's low bits count the steps (the smallest
  // normal's code where it rounds up to it).
  float af, magic = float(1u << 23) * smallest / float(1u << F::kMan), sum;
  std::memcpy(&af, &a, 4);
  sum = af + magic;
  uint32_t sum_bits, magic_bits;
  std::memcpy(&sum_bits, &sum, 4);
  std::memcpy(&magic_bits, &magic, 4);
  const uint32_t code = a < min_normal ? sum_bits - magic_bits : normal;
  return T{uint8_t(nan ? sign | 0x7F : sign | code)};
}

// Store n floats as KV elements.
inline void store_kv(float* dst, const float* src, int n) { std::copy(src, src + n, dst); }
inline void store_kv(bf16* dst, const float* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = narrow_bf16(src[i]);
}
template <class T, class = typename std::enable_if_t<std::is_same_v<T, fp8e4m3> || std::is_same_v<T, fp8e5m2>>>
inline void store_kv(T* dst, const float* src, int n) {
  for (int i = 0; i < n; ++i) dst[i] = narrow_fp8<T>(src[i]);
}
// Store n floats at element `at` of a pool of `kind` elements.
inline void store_kv(int kind, void* pool, int64_t at, const float* src, int n) {
  switch (kind) {
    case kKvBF16: return store_kv(static_cast<bf16*>(pool) + at, src, n);
    case kKvE4M3: return store_kv(static_cast<fp8e4m3*>(pool) + at, src, n);
    case kKvE5M2: return store_kv(static_cast<fp8e5m2*>(pool) + at, src, n);
    default: return store_kv(static_cast<float*>(pool) + at, src, n);
  }
}

// `k`/`v` point to pools of `kv_kind` elements (KvKind). `order`: how the vector path walks a
// tile: 0 the faster for the cache's dtype, 1 a head at a time, 2 in memory order (the A/B).
struct Args {
  const float* q; const void* k; const void* v; float* out;
  const int64_t* positions; const int32_t* query_start;
  const int32_t* prompt_lens; const int32_t* response_lens;
  const int32_t* prompt_tables; const int32_t* response_tables;
  int prompt_width, response_width;
  int heads, kv_heads, head_dim, block_size, window;
  float scale;
  int kv_kind;
  int order;
};

template <class KV>
inline float dot(const float* a, const KV* b, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * widen(b[i]);
  return s;
}

// One query row's working state for KV heads [h0, h1) and their nh query heads: the scaled
// queries, the output accumulators and the online-softmax statistics, and the key positions
// [lo, hi] the row attends to (its causal limit and sliding window).
struct Row {
  alignas(64) float q[kMaxHeads][kMaxHeadDim];
  alignas(64) float acc[kMaxHeads][kMaxHeadDim];
  float m[kMaxHeads], l[kMaxHeads];
  int t, b, h0, nh, lo, hi, plen;

  Row(const Args& a, int t_, int b_, int h0_, int h1) : t(t_), b(b_), h0(h0_) {
    const int D = a.head_dim, G = a.heads / a.kv_heads;
    nh = (h1 - h0) * G;
    plen = a.prompt_lens[b];
    const int64_t pos = a.positions[t];
    hi = int(std::min<int64_t>(pos, plen + a.response_lens[b] - 1));
    lo = a.window > 0 ? int(std::max<int64_t>(0, pos - a.window + 1)) : 0;
    for (int h = 0; h < nh; ++h) {
      const float* src = a.q + (int64_t(t) * a.heads + h0 * G + h) * D;
      for (int d = 0; d < D; ++d) { q[h][d] = src[d] * a.scale; acc[h][d] = 0.f; }
      m[h] = -1e30f;
      l[h] = 0.f;
    }
  }

  // The tile from key position p: consecutive keys inside one block of one segment, at most
  // `max_keys` and none at or past `end`. Returns the key count; `*slot` is the first key's slot.
  int tile(const Args& a, int p, int end, int max_keys, int64_t* slot) const {
    const bool in_prompt = p < plen;
    const int off = in_prompt ? p : p - plen;
    const int seg_end = in_prompt ? std::min(plen, end) : end - plen;
    const int32_t* table = in_prompt ? a.prompt_tables + int64_t(b) * a.prompt_width
                                     : a.response_tables + int64_t(b) * a.response_width;
    const int bs = a.block_size, within = off % bs;
    *slot = int64_t(table[off / bs]) * bs + within;
    return std::min({bs - within, seg_end - off, max_keys});
  }

  // The normalized outputs into a.out.
  void write(const Args& a) const {
    const int D = a.head_dim, G = a.heads / a.kv_heads;
    for (int h = 0; h < nh; ++h) {
      float* dst = a.out + (int64_t(t) * a.heads + h0 * G + h) * D;
      const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
      for (int d = 0; d < D; ++d) dst[d] = acc[h][d] * inv;
    }
  }
};

// Scores s[h][i] of a tile's n keys for the row's nh query heads (kt: the tile's first key at the
// row's first KV head), a dot product per key and head: the compiler vectorizes each across the
// head, which serves head sizes that are multiples of 16 (where the vector path is not built).
template <class KV>
inline void scores_by_key(const Row& r, const KV* kt, int n, int64_t row_stride, int D, int G,
                          float (*s)[kMaxTile]) {
  for (int i = 0; i < n; ++i) {
    const KV* ki = kt + i * row_stride;
    for (int h = 0; h < r.nh; ++h) s[h][i] = dot(r.q[h], ki + (h / G) * D, D);
  }
}

// The same scores for small heads (8 or 24, say), whose per-key dot products would each end in a
// horizontal sum that costs more than the products: each KV head's keys are transposed to
// [D][tile] and a query head's scores are D vector FMAs across the tile's keys.
template <class KV>
inline void scores_transposed(const Row& r, const KV* kt, int n, int64_t row_stride, int D, int G,
                              float (*s)[kMaxTile]) {
  thread_local std::vector<float> buf;  // [D][kMaxTile]: one KV head's keys of the tile
  if (buf.size() < size_t(D) * kMaxTile) buf.resize(size_t(D) * kMaxTile);
  float* kd0 = buf.data();
  for (int g = 0; g < r.nh / G; ++g) {
    for (int i = 0; i < n; ++i) {
      const KV* ki = kt + i * row_stride + g * D;
      for (int d = 0; d < D; ++d) kd0[d * kMaxTile + i] = widen(ki[d]);
    }
    for (int h = g * G; h < (g + 1) * G; ++h) {
      float* sh = s[h];
#pragma omp simd
      for (int i = 0; i < n; ++i) sh[i] = 0.f;
      for (int d = 0; d < D; ++d) {
        const float qd = r.q[h][d];
        const float* kd = kd0 + d * kMaxTile;
#pragma omp simd
        for (int i = 0; i < n; ++i) sh[i] += qd * kd[i];
      }
    }
  }
}

// The portable path (any head size). Keys are visited a block-tile at a time; a tile of all heads
// is one contiguous run of memory, which the hardware prefetcher streams. Scores transposed only
// for heads under 32 that are not a multiple of 16: the others are faster by key (measured with
// the AVX-512 path switched off: docs/benchmarks.md, "CPU attention kernel").
template <class KV>
inline void attend_generic(Row& r, const Args& a) {
  const int D = a.head_dim, G = a.heads / a.kv_heads, nh = r.nh;
  const int64_t row_stride = int64_t(a.kv_heads) * D;
  const bool transposed = D < 32 && D % 16 != 0;
  alignas(64) float s[kMaxHeads][kMaxTile];
  int64_t slot;
  for (int p = r.lo, n; p <= r.hi; p += n) {
    n = r.tile(a, p, r.hi + 1, kMaxTile, &slot);
    const KV* kt = static_cast<const KV*>(a.k) + slot * row_stride + int64_t(r.h0) * D;
    const KV* vt = static_cast<const KV*>(a.v) + slot * row_stride + int64_t(r.h0) * D;
    if (transposed)
      scores_transposed(r, kt, n, row_stride, D, G, s);
    else
      scores_by_key(r, kt, n, row_stride, D, G, s);
    for (int h = 0; h < nh; ++h) {
      float tile_max = -1e30f;
      for (int i = 0; i < n; ++i) tile_max = std::max(tile_max, s[h][i]);
      const float new_m = std::max(r.m[h], tile_max);
      const float correction = std::exp(r.m[h] - new_m);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < n; ++i) { s[h][i] = std::exp(s[h][i] - new_m); sum += s[h][i]; }
      r.l[h] = r.l[h] * correction + sum;
      r.m[h] = new_m;
      float* acch = r.acc[h];
#pragma omp simd
      for (int d = 0; d < D; ++d) acch[d] *= correction;
    }
    // Values, key by key again, in memory order.
    for (int i = 0; i < n; ++i) {
      const KV* vi = vt + i * row_stride;
      for (int h = 0; h < nh; ++h) {
        const float w = s[h][i];
        const KV* vh = vi + (h / G) * D;
        float* acch = r.acc[h];
#pragma omp simd
        for (int d = 0; d < D; ++d) acch[d] += w * widen(vh[d]);
      }
    }
  }
}

#if LW_ATTENTION_VECTOR
using simd::V;

// 16 KV elements as floats (bfloat16: widen by a shift into the high half of each lane; float8:
// move its bits to where a float16's are and convert that, F16C's conversion on AVX2).
inline V load16(const float* p) { return simd::load(p); }
#if defined(__AVX512F__)
inline V load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(raw), 16));
}
// float16 bit patterns (16 of them) as floats.
inline V halves_to_float(__m256i h) { return _mm512_cvtph_ps(h); }
#else
inline V load16(const bf16* p) {
  const __m256i raw = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return {_mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_castsi256_si128(raw)), 16)),
          _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm256_extracti128_si256(raw, 1)), 16))};
}
inline V halves_to_float(__m256i h) {
  return {_mm256_cvtph_ps(_mm256_castsi256_si128(h)), _mm256_cvtph_ps(_mm256_extracti128_si256(h, 1))};
}
#endif
// e5m2 is a float16 cut to its high byte.
inline V load16(const fp8e5m2* p) {
  const __m256i x = _mm256_cvtepu8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return halves_to_float(_mm256_slli_epi16(x, 8));
}
// e4m3's exponent and mantissa placed in a float16's (sign to bit 15, the rest to bits 7-13) make
// a float16 kLoadUnit = 2^8 times smaller, subnormals included, and the conversion is exact: the
// bytes sign-extended to 16 bits and shifted left by 7 put the sign in bits 14 and 15; bit 14 is
// cleared. attend_vector scales the queries and the outputs by the unit instead of every load.
// (A NaN byte, written for a NaN key or value, reads as 480 units here where the portable path and
// torch read NaN: a model producing NaN is broken either way, and masking it costs every load.)
template <class KV> constexpr float kLoadUnit = 1.f;
template <> constexpr float kLoadUnit<fp8e4m3> = 256.f;
inline V load16(const fp8e4m3* p) {
  const __m256i x = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  return halves_to_float(_mm256_and_si256(_mm256_slli_epi16(x, 7), _mm256_set1_epi16(short(0xBF80))));
}

constexpr int kChunkKeys = 512;  // keys per softmax update of the vector path

// The scores pass of a tile of n keys in memory order: every KV head of key i (its slice loaded
// once for the G query heads that share it), then key i + 1, each (head, key) partial dot product
// into part[16 * h + i]. A tile is one contiguous run of a block; read front to back, the
// hardware prefetcher streams it, where a head at a time (n strided reads per head) left it idle
// between heads: 1.1-1.5x faster over a bfloat16 cache that streams from memory, but for a
// float32 one no faster from memory and 10% slower from cache (`benchmarks/cpu_attention.py`).
template <class KV>
inline void scores_in_memory_order(const Row& r, const KV* kt, int n, int64_t row_stride, int D, int G, V* part) {
  const int nc = D / 16;
  for (int i = 0; i < 16; ++i) {
    if (i >= n) {
      for (int h = 0; h < r.nh; ++h) part[16 * h + i] = simd::zero();
      continue;
    }
    const KV* ki = kt + i * row_stride;
    for (int g = 0; g < r.nh / G; ++g) {
      const KV* kg = ki + g * D;
      if (nc == 4) {  // head size 64: the slice in four vectors
        const V k0 = load16(kg), k1 = load16(kg + 16), k2 = load16(kg + 32), k3 = load16(kg + 48);
        for (int h = g * G; h < (g + 1) * G; ++h) {
          V s = simd::mul(simd::load(r.q[h]), k0);
          s = simd::fmadd(simd::load(r.q[h] + 16), k1, s);
          s = simd::fmadd(simd::load(r.q[h] + 32), k2, s);
          part[16 * h + i] = simd::fmadd(simd::load(r.q[h] + 48), k3, s);
        }
        continue;
      }
      for (int h = g * G; h < (g + 1) * G; ++h) {
        V s = simd::mul(simd::load(r.q[h]), load16(kg));
        for (int c = 1; c < nc; ++c) s = simd::fmadd(simd::load(r.q[h] + 16 * c), load16(kg + 16 * c), s);
        part[16 * h + i] = s;
      }
    }
  }
}

// The values pass in memory order: key i's value for every head into the accumulators (in L1),
// then key i + 1; w[h * kChunkKeys + i] is key i's weight for head h.
template <class KV>
inline void values_in_memory_order(Row& r, const KV* vt, int n, int64_t row_stride, int D, int G, const float* w) {
  const int nc = D / 16;
  for (int i = 0; i < n; ++i) {
    const KV* vi = vt + i * row_stride;
    for (int h = 0; h < r.nh; ++h) {
      const V wh = simd::set1(w[h * kChunkKeys + i]);
      const KV* vh = vi + (h / G) * D;
      float* acc = r.acc[h];
      for (int c = 0; c < nc; ++c)
        simd::store(acc + 16 * c, simd::fmadd(wh, load16(vh + 16 * c), simd::load(acc + 16 * c)));
    }
  }
}

// The same result as `attend_generic` for head sizes that are a multiple of 16, in simd.h's 16-lane
// vectors (AVX-512, or AVX2 with FMA and F16C). With AVX-512 1.6x as fast as the generic loops when
// the keys are in cache (no faster when they stream from memory: both read at the same rate), and
// on AVX2 it is what reads a float8 cache at memory speed (the generic loops widen a byte at a time
// through a table: docs/benchmarks.md, "Attention on AVX2 CPUs"). Compilers vectorize the generic
// loops with one dependent accumulator per dot product. Here, per chunk of up to kChunkKeys keys:
// every score first (a head's 16 keys of a tile reduced together by sum16), one softmax update,
// then the values a head at a time with its accumulator in registers (or both passes in memory
// order: see attend_row).
template <class KV, bool kMemoryOrder>
inline void attend_vector(Row& r, const Args& a) {
  const int D = a.head_dim, G = a.heads / a.kv_heads, nh = r.nh, nc = D / 16;
  const int64_t row_stride = int64_t(a.kv_heads) * D;
  thread_local std::vector<float> scores;  // [nh][kChunkKeys]
  if (scores.size() < size_t(nh) * kChunkKeys) scores.resize(size_t(nh) * kChunkKeys);
  thread_local std::vector<V> parts;  // memory order: [nh][16] partial dot products of a tile
  if (kMemoryOrder && parts.size() < size_t(nh) * 16) parts.resize(size_t(nh) * 16);
  V* tile_parts = parts.data();
  // Loads give values in units of kLoadUnit<KV>: scores are exact with the queries scaled by it (a
  // power of two), and the accumulated values are scaled back at the end.
  constexpr float unit = kLoadUnit<KV>;
  if constexpr (unit != 1.f)
    for (int h = 0; h < nh; ++h)
      for (int d = 0; d < D; ++d) r.q[h][d] *= unit;
  int64_t slot;
  for (int c0 = r.lo; c0 <= r.hi; c0 += kChunkKeys) {
    const int c1 = std::min(r.hi + 1, c0 + kChunkKeys), nk = c1 - c0;
    for (int p = c0, n; p < c1; p += n) {
      n = r.tile(a, p, c1, 16, &slot);
      const KV* kt = static_cast<const KV*>(a.k) + slot * row_stride + int64_t(r.h0) * D;
      const simd::Mask keys = simd::tail_mask(n);
      if constexpr (kMemoryOrder) {
        scores_in_memory_order(r, kt, n, row_stride, D, G, tile_parts);
        for (int h = 0; h < nh; ++h)
          simd::mask_store(scores.data() + h * kChunkKeys + (p - c0), keys, simd::sum16(tile_parts + 16 * h));
        continue;
      }
      for (int h = 0; h < nh; ++h) {
        const KV* kh = kt + (h / G) * D;
        V part[16];
        for (int i = 0; i < 16; ++i) {
          if (i >= n) { part[i] = simd::zero(); continue; }
          const KV* ki = kh + i * row_stride;
          V s = simd::mul(simd::load(r.q[h]), load16(ki));
          for (int c = 1; c < nc; ++c) s = simd::fmadd(simd::load(r.q[h] + 16 * c), load16(ki + 16 * c), s);
          part[i] = s;
        }
        simd::mask_store(scores.data() + h * kChunkKeys + (p - c0), keys, simd::sum16(part));
      }
    }
    for (int h = 0; h < nh; ++h) {
      float* sh = scores.data() + h * kChunkKeys;
      V mx = simd::set1(-1e30f);
      for (int j = 0; j < nk; j += 16) {
        const simd::Mask mk = simd::tail_mask(nk - j);
        mx = simd::max(mx, simd::select(mk, simd::maskz_load(mk, sh + j), mx));
      }
      const float new_m = std::max(r.m[h], simd::reduce_max(mx));
      const float correction = std::exp(r.m[h] - new_m);
      const V nm = simd::set1(new_m);
      V sum = simd::zero();
      for (int j = 0; j < nk; j += 16) {
        const simd::Mask mk = simd::tail_mask(nk - j);
        const V e = simd::select(mk, simd::exp(simd::sub(simd::maskz_load(mk, sh + j), nm)), simd::zero());
        simd::mask_store(sh + j, mk, e);
        sum = simd::add(sum, e);
      }
      r.l[h] = r.l[h] * correction + simd::reduce_add(sum);
      r.m[h] = new_m;
      const V cv = simd::set1(correction);
      for (int c = 0; c < nc; ++c) simd::store(r.acc[h] + 16 * c, simd::mul(simd::load(r.acc[h] + 16 * c), cv));
    }
    for (int p = c0, n; p < c1; p += n) {
      n = r.tile(a, p, c1, 16, &slot);
      const KV* vt = static_cast<const KV*>(a.v) + slot * row_stride + int64_t(r.h0) * D;
      if constexpr (kMemoryOrder) {
        values_in_memory_order(r, vt, n, row_stride, D, G, scores.data() + (p - c0));
        continue;
      }
      for (int h = 0; h < nh; ++h) {
        const KV* vh = vt + (h / G) * D;
        const float* w = scores.data() + h * kChunkKeys + (p - c0);
        for (int c = 0; c < nc; c += 4) {  // up to four vectors of the head's accumulator in registers
          const int nv = std::min(4, nc - c);
          V x[4];
          for (int j = 0; j < nv; ++j) x[j] = simd::load(r.acc[h] + 16 * (c + j));
          for (int i = 0; i < n; ++i) {
            const V wi = simd::set1(w[i]);
            const KV* vi = vh + i * row_stride + 16 * c;
            for (int j = 0; j < nv; ++j) x[j] = simd::fmadd(wi, load16(vi + 16 * j), x[j]);
          }
          for (int j = 0; j < nv; ++j) simd::store(r.acc[h] + 16 * (c + j), x[j]);
        }
      }
    }
  }
  if constexpr (unit != 1.f)
    for (int h = 0; h < nh; ++h)
      for (int d = 0; d < D; ++d) r.acc[h][d] *= unit;
}
#endif

// The vector path walks a bfloat16 or float8 cache in memory order (see scores_in_memory_order) where the
// task reads whole key rows (every KV head: a tile is then one contiguous run), and otherwise a
// head at a time: the faster of the two for each case in docs/benchmarks.md ("A bfloat16 KV
// cache"; with a row's KV heads split among tasks, at small batches, memory order was slower, and
// over a float32 cache it was no faster). `Args::order` overrides it.
//
// On AVX2 a head at a time stays with the generic loops for float32 and bfloat16 caches: its 16
// strided key reads per head, in half-width vectors, streamed a bfloat16 cache 1.5x slower than the
// generic loops (which walk a tile key by key), and a float32 one no faster. A float8 cache takes
// the vector path in both orders: the generic loops widen it a byte at a time, 3-4x slower.
template <class KV>
inline void attend_row(Row& r, const Args& a) {
#if LW_ATTENTION_VECTOR
  if (a.head_dim % 16 == 0) {
    const bool whole_rows = r.nh == a.heads;
    const bool memory_order = a.order == 0 ? sizeof(KV) < sizeof(float) && whole_rows : a.order == 2;
    if (memory_order) return attend_vector<KV, true>(r, a);
#if !defined(__AVX512F__)
    if (sizeof(KV) > 1) return attend_generic<KV>(r, a);
#endif
    return attend_vector<KV, false>(r, a);
  }
#endif
  attend_generic<KV>(r, a);
}

// Query row `t` of row-group `b`, KV heads [h0, h1) and their query heads: the vector path where
// the build has it (AVX-512, or AVX2 + FMA + F16C) and the head size is a multiple of 16, else the
// portable one.
inline void attend(const Args& a, int t, int b, int h0, int h1) {
  Row r(a, t, b, h0, h1);
  switch (a.kv_kind) {
    case kKvBF16: attend_row<bf16>(r, a); break;
    case kKvE4M3: attend_row<fp8e4m3>(r, a); break;
    case kKvE5M2: attend_row<fp8e5m2>(r, a); break;
    default: attend_row<float>(r, a);
  }
  r.write(a);
}
}  // namespace lw
