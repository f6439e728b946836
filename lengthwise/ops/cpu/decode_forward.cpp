// The fused decode forward on the CPU: every decoder layer of a few-row step in one call.
//
// Why: at batch 1 the weights are read once per token, so a step's floor is weight bytes /
// memory bandwidth (about 21 ms for llama-100m here). The torch path reaches the matmuls' share
// of that (the projections stream at ~18 GB/s), but its ~50 small ops per layer each pay a
// dispatch and an OpenMP fork/join, which doubled the step. Here a layer is norm -> QKV ->
// (q/k norm) -> RoPE + KV write -> segment attention -> O -> residual + norm -> gate-up with
// SiLU-and-mul in its epilogue -> down, all inside one OpenMP parallel region whose threads
// only meet at barriers.
//
// OpenMP is the one torch already loaded (libgomp.so.1 by soname), so these threads are torch's
// own intra-op pool: nothing here competes with torch for the cores. float32 only.
#include "attention.h"

#include <immintrin.h>
#include <omp.h>

#include <vector>

namespace {

// Per-layer weight and cache pointers, in this order (absent optional tensors are null).
enum LayerPtr {
  kInputNorm, kQkvW, kQkvB, kQNorm, kKNorm, kOW, kOB, kPostNorm, kGateUpW, kGateUpB, kDownW, kDownB,
  kKCache, kVCache, kNumLayerPtrs
};

inline __mmask16 tail_mask(int n) { return n >= 16 ? __mmask16(0xFFFF) : __mmask16((1u << n) - 1); }

// c[r][c] = dot(x[r], w[c]) for MR rows of x and 4 rows of w, all of length k.
template <int MR>
inline void micro(const float* x, int64_t ldx, const float* w, int64_t ldw, int nw, int k, float c[4][4]) {
  __m512 acc[MR][4];
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_setzero_ps();
  const float* wr[4];
  for (int j = 0; j < 4; ++j) wr[j] = w + (j < nw ? j : 0) * ldw;  // short blocks repeat row 0
  int i = 0;
  for (; i + 16 <= k; i += 16) {
    __m512 wv[4];
    // The hardware prefetcher follows four streams poorly: ask for the next block's rows (the
    // same thread's next iteration, 4 rows further on) while this one is summed.
    for (int j = 0; j < 4; ++j) _mm_prefetch(reinterpret_cast<const char*>(wr[j] + i + 4 * ldw), _MM_HINT_T0);
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_loadu_ps(wr[j] + i);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_loadu_ps(x + r * ldx + i);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  if (i < k) {  // the tail of a row that is not a multiple of 16 floats
    const __mmask16 m = tail_mask(k - i);
    __m512 wv[4];
    for (int j = 0; j < 4; ++j) wv[j] = _mm512_maskz_loadu_ps(m, wr[j] + i);
    for (int r = 0; r < MR; ++r) {
      const __m512 xv = _mm512_maskz_loadu_ps(m, x + r * ldx + i);
      for (int j = 0; j < 4; ++j) acc[r][j] = _mm512_fmadd_ps(xv, wv[j], acc[r][j]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < 4; ++j) c[r][j] = _mm512_reduce_add_ps(acc[r][j]);
}

// Dot products of all m rows of x with w rows [j, j + nw), nw <= 4: c[r][jj].
inline void block_dots(const float* x, int m, int k, const float* w, int j, int nw, float (*c)[4]) {
  const float* wj = w + int64_t(j) * k;
  for (int r = 0; r < m; r += 4) {
    float tmp[4][4];
    switch (std::min(4, m - r)) {
      case 1: micro<1>(x + int64_t(r) * k, k, wj, k, nw, k, tmp); break;
      case 2: micro<2>(x + int64_t(r) * k, k, wj, k, nw, k, tmp); break;
      case 3: micro<3>(x + int64_t(r) * k, k, wj, k, nw, k, tmp); break;
      default: micro<4>(x + int64_t(r) * k, k, wj, k, nw, k, tmp); break;
    }
    for (int rr = 0; rr < std::min(4, m - r); ++rr)
      for (int jj = 0; jj < 4; ++jj) c[r + rr][jj] = tmp[rr][jj];
  }
}

constexpr int kMaxRows = 64;

// y[m, n] = x[m, k] @ w[n, k]^T + bias; must be called by every thread of a parallel region.
// Each thread takes a contiguous run of w's rows, so its reads are one sequential stream.
void linear_omp(const float* x, int m, int k, const float* w, const float* bias, int n, float* y) {
#pragma omp for schedule(static)
  for (int j = 0; j < n; j += 4) {
    const int nw = std::min(4, n - j);
    float c[kMaxRows][4];
    block_dots(x, m, k, w, j, nw, c);
    for (int r = 0; r < m; ++r)
      for (int jj = 0; jj < nw; ++jj) y[int64_t(r) * n + j + jj] = c[r][jj] + (bias ? bias[j + jj] : 0.f);
  }
}

// act[m, inter] = silu(x @ gate^T + bg) * (x @ up^T + bu), gate = w rows [0, inter), up = the rest.
void gate_up_silu_omp(const float* x, int m, int k, const float* w, const float* bias, int inter, float* act) {
#pragma omp for schedule(static)
  for (int j = 0; j < inter; j += 4) {
    const int nw = std::min(4, inter - j);
    float g[kMaxRows][4], u[kMaxRows][4];
    block_dots(x, m, k, w, j, nw, g);
    block_dots(x, m, k, w, inter + j, nw, u);
    for (int r = 0; r < m; ++r)
      for (int jj = 0; jj < nw; ++jj) {
        const float gv = g[r][jj] + (bias ? bias[j + jj] : 0.f);
        const float uv = u[r][jj] + (bias ? bias[inter + j + jj] : 0.f);
        act[int64_t(r) * inter + j + jj] = gv / (1.f + std::exp(-gv)) * uv;
      }
  }
}

// out = x * rsqrt(mean(x^2) + eps) * w over the last dimension n.
inline void rms_norm_row(const float* x, const float* w, int n, float eps, float* out) {
  float ss = 0.f;
#pragma omp simd reduction(+ : ss)
  for (int i = 0; i < n; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / float(n) + eps);
  for (int i = 0; i < n; ++i) out[i] = w[i] * (x[i] * inv);
}

// Rotate-half RoPE of one head in place.
inline void rope(float* x, const float* cos, const float* sin, int d) {
  const int half = d / 2;
  float tmp[lw::kMaxHeadDim];
  for (int i = 0; i < d; ++i) tmp[i] = x[i];
  for (int i = 0; i < d; ++i) x[i] = tmp[i] * cos[i] + (i < half ? -tmp[i + half] : tmp[i - half]) * sin[i];
}

}  // namespace

extern "C" int lw_decode_max_rows() { return kMaxRows; }

// y[m, n] = x[m, k] @ w[n, k]^T + bias (bias may be null), m <= lw_decode_max_rows().
extern "C" void lw_linear(const float* x, int m, int k, const float* w, const float* bias, int n, float* y,
                          int num_threads) {
#pragma omp parallel num_threads(num_threads)
  linear_omp(x, m, k, w, bias, n, y);
}

// One forward pass over all layers for T <= lw_decode_max_rows() new tokens.
//   x [T, hidden]: the embedded tokens; out [T, hidden]: the final-normed hidden states.
//   layers [L * kNumLayerPtrs]: see LayerPtr; windows [L]: sliding window per layer, 0 for none.
//   cos/sin [T, head_dim]; slots [T]: where each token's key and value go; the rest is the
//   segment attention metadata (see segment_attention.cpp) for the B row-groups.
extern "C" void lw_decode_forward(
    const void* const* layers, const int32_t* windows, int num_layers, int hidden, int heads, int kv_heads,
    int head_dim, int inter, float eps, float scale, const float* final_norm,
    const float* x, float* out, int T, const float* cos, const float* sin, const int64_t* slots,
    const int64_t* positions, const int32_t* query_start, int B, const int32_t* prompt_lens,
    const int32_t* response_lens, const int32_t* prompt_tables, int prompt_width, const int32_t* response_tables,
    int response_width, int block_size, int num_threads) {
  const int D = head_dim, q_size = heads * D, kv_size = kv_heads * D, qkv_size = q_size + 2 * kv_size;
  std::vector<float> residual(int64_t(T) * hidden), h(int64_t(T) * hidden), y(int64_t(T) * hidden);
  std::vector<float> qkv(int64_t(T) * qkv_size), q(int64_t(T) * q_size), attn(int64_t(T) * q_size);
  std::vector<float> act(int64_t(T) * inter);
  std::vector<std::pair<int, int>> rows;  // (token, row-group)
  for (int b = 0; b < B; ++b)
    for (int t = query_start[b]; t < query_start[b + 1]; ++t) rows.emplace_back(t, b);
  const int tasks = int(rows.size()) * kv_heads;
  const int64_t row_stride = int64_t(kv_heads) * D;

#pragma omp parallel num_threads(num_threads)
  for (int l = 0; l < num_layers; ++l) {
    const float* const* p = reinterpret_cast<const float* const*>(layers) + int64_t(l) * kNumLayerPtrs;
    float* k_cache = const_cast<float*>(p[kKCache]);
    float* v_cache = const_cast<float*>(p[kVCache]);
#pragma omp single
    for (int t = 0; t < T; ++t) {
      float* res = residual.data() + int64_t(t) * hidden;
      const float* src = (l == 0 ? x : y.data()) + int64_t(t) * hidden;
      for (int i = 0; i < hidden; ++i) res[i] = l == 0 ? src[i] : res[i] + src[i];
      rms_norm_row(res, p[kInputNorm], hidden, eps, h.data() + int64_t(t) * hidden);
    }
    linear_omp(h.data(), T, hidden, p[kQkvW], p[kQkvB], qkv_size, qkv.data());
    // q/k norm, RoPE, and the new keys and values into the cache (a few KB: one thread).
#pragma omp single
    for (int t = 0; t < T; ++t) {
      const float* row = qkv.data() + int64_t(t) * qkv_size;
      const float* c = cos + int64_t(t) * D;
      const float* s = sin + int64_t(t) * D;
      for (int hh = 0; hh < heads; ++hh) {
        float* qh = q.data() + (int64_t(t) * heads + hh) * D;
        if (p[kQNorm]) rms_norm_row(row + hh * D, p[kQNorm], D, eps, qh);
        else std::copy(row + hh * D, row + (hh + 1) * D, qh);
        rope(qh, c, s, D);
      }
      float* kdst = k_cache + slots[t] * row_stride;
      float* vdst = v_cache + slots[t] * row_stride;
      for (int hh = 0; hh < kv_heads; ++hh) {
        const float* kh = row + q_size + hh * D;
        if (p[kKNorm]) rms_norm_row(kh, p[kKNorm], D, eps, kdst + hh * D);
        else std::copy(kh, kh + D, kdst + hh * D);
        rope(kdst + hh * D, c, s, D);
      }
      std::copy(row + q_size + kv_size, row + qkv_size, vdst);
    }
    const lw::Args a{q.data(), k_cache, v_cache, attn.data(), positions, query_start, prompt_lens, response_lens,
                     prompt_tables, response_tables, prompt_width, response_width, heads, kv_heads, D,
                     block_size, windows[l], scale};
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < tasks; ++i) {
      const auto& [t, b] = rows[i / kv_heads];
      lw::attend(a, t, b, i % kv_heads, i % kv_heads + 1);
    }
    linear_omp(attn.data(), T, q_size, p[kOW], p[kOB], hidden, y.data());
#pragma omp single
    for (int t = 0; t < T; ++t) {
      float* res = residual.data() + int64_t(t) * hidden;
      const float* src = y.data() + int64_t(t) * hidden;
      for (int i = 0; i < hidden; ++i) res[i] += src[i];
      rms_norm_row(res, p[kPostNorm], hidden, eps, h.data() + int64_t(t) * hidden);
    }
    gate_up_silu_omp(h.data(), T, hidden, p[kGateUpW], p[kGateUpB], inter, act.data());
    linear_omp(act.data(), T, inter, p[kDownW], p[kDownB], hidden, y.data());
  }
  for (int t = 0; t < T; ++t) {
    float* res = residual.data() + int64_t(t) * hidden;
    const float* src = y.data() + int64_t(t) * hidden;
    for (int i = 0; i < hidden; ++i) res[i] += src[i];
    rms_norm_row(res, final_norm, hidden, eps, out + int64_t(t) * hidden);
  }
}
