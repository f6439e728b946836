// The per-row core of segment attention, shared by `segment_attention.cpp` (attention alone, for
// the torch path) and `decode_forward.cpp` (the fused decode forward). See segment_attention.cpp.
#pragma once
#include <algorithm>
#include <cmath>
#include <cstdint>

namespace lw {

constexpr int kMaxHeads = 128;   // query heads
constexpr int kMaxHeadDim = 256;
constexpr int kMaxTile = 32;     // keys per softmax update (at most one block)

struct Args {
  const float* q; const float* k; const float* v; float* out;
  const int64_t* positions; const int32_t* query_start;
  const int32_t* prompt_lens; const int32_t* response_lens;
  const int32_t* prompt_tables; const int32_t* response_tables;
  int prompt_width, response_width;
  int heads, kv_heads, head_dim, block_size, window;
  float scale;
};

inline float dot(const float* a, const float* b, int n) {
  float s = 0.f;
#pragma omp simd reduction(+ : s)
  for (int i = 0; i < n; ++i) s += a[i] * b[i];
  return s;
}

// Query row `t` of row-group `b`, KV heads [h0, h1) and their query heads. Keys are visited a
// block-tile at a time; a tile of all heads is one contiguous run of memory, which the hardware
// prefetcher streams.
inline void attend(const Args& a, int t, int b, int h0, int h1) {
  const int D = a.head_dim, G = a.heads / a.kv_heads, bs = a.block_size, nh = (h1 - h0) * G;
  const int64_t row_stride = int64_t(a.kv_heads) * D;
  const int plen = a.prompt_lens[b], rlen = a.response_lens[b];
  const int64_t pos = a.positions[t];
  const int hi = int(std::min<int64_t>(pos, plen + rlen - 1));
  const int lo = a.window > 0 ? int(std::max<int64_t>(0, pos - a.window + 1)) : 0;

  alignas(64) float q[kMaxHeads][kMaxHeadDim];
  alignas(64) float acc[kMaxHeads][kMaxHeadDim];
  alignas(64) float s[kMaxHeads][kMaxTile];
  float m[kMaxHeads], l[kMaxHeads];
  for (int h = 0; h < nh; ++h) {
    const float* src = a.q + (int64_t(t) * a.heads + h0 * G + h) * D;
    for (int d = 0; d < D; ++d) { q[h][d] = src[d] * a.scale; acc[h][d] = 0.f; }
    m[h] = -1e30f;
    l[h] = 0.f;
  }
  for (int p = lo; p <= hi;) {
    // The tile: consecutive keys inside one block of one segment.
    const bool in_prompt = p < plen;
    const int off = in_prompt ? p : p - plen;
    const int seg_end = in_prompt ? std::min(plen, hi + 1) : hi + 1 - plen;
    const int32_t* table = in_prompt ? a.prompt_tables + int64_t(b) * a.prompt_width
                                     : a.response_tables + int64_t(b) * a.response_width;
    const int within = off % bs;
    const int n = std::min({bs - within, seg_end - off, kMaxTile});
    const int64_t slot = int64_t(table[off / bs]) * bs + within;
    // Scores for the whole tile, key by key: each key's heads are one contiguous row of the cache.
    const float* kt = a.k + slot * row_stride + int64_t(h0) * D;
    const float* vt = a.v + slot * row_stride + int64_t(h0) * D;
    for (int i = 0; i < n; ++i) {
      const float* ki = kt + i * row_stride;
      for (int h = 0; h < nh; ++h) s[h][i] = dot(q[h], ki + (h / G) * D, D);
    }
    for (int h = 0; h < nh; ++h) {
      float tile_max = -1e30f;
      for (int i = 0; i < n; ++i) tile_max = std::max(tile_max, s[h][i]);
      const float new_m = std::max(m[h], tile_max);
      const float correction = std::exp(m[h] - new_m);
      float sum = 0.f;
#pragma omp simd reduction(+ : sum)
      for (int i = 0; i < n; ++i) { s[h][i] = std::exp(s[h][i] - new_m); sum += s[h][i]; }
      l[h] = l[h] * correction + sum;
      m[h] = new_m;
      float* acch = acc[h];
#pragma omp simd
      for (int d = 0; d < D; ++d) acch[d] *= correction;
    }
    // Values, key by key again, in memory order.
    for (int i = 0; i < n; ++i) {
      const float* vi = vt + i * row_stride;
      for (int h = 0; h < nh; ++h) {
        const float w = s[h][i];
        const float* vh = vi + (h / G) * D;
        float* acch = acc[h];
#pragma omp simd
        for (int d = 0; d < D; ++d) acch[d] += w * vh[d];
      }
    }
    p += n;
  }
  for (int h = 0; h < nh; ++h) {
    float* dst = a.out + (int64_t(t) * a.heads + h0 * G + h) * D;
    const float inv = l[h] > 0.f ? 1.f / l[h] : 0.f;
    for (int d = 0; d < D; ++d) dst[d] = acc[h][d] * inv;
  }
}
}  // namespace lw
