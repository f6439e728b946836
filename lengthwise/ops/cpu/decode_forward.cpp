// The fused decode forward on the CPU: every decoder layer of a decode step in one call.
//
// Why: at batch 1 the weights are read once per token, so a step's floor is weight bytes /
// memory bandwidth (about 21 ms for llama-100m here). The torch path reaches the matmuls' share
// of that (the projections stream at ~18 GB/s), but its ~50 small ops per layer each pay a
// dispatch and an OpenMP fork/join, which doubled the step. Here a layer is norm -> QKV ->
// (q/k norm) -> RoPE + KV write -> segment attention -> O -> residual + norm -> gate-up with
// SiLU-and-mul in its epilogue -> down, all inside one OpenMP parallel region whose threads
// only meet at barriers. A mixture-of-experts layer replaces the last two by the router, top-k
// routing (route_rows), and each chosen expert's gate-up and down over the rows that chose it
// (experts_omp).
//
// OpenMP is the one torch already loaded (libgomp.so.1 by soname), so these threads are torch's
// own intra-op pool: nothing here competes with torch for the cores. float32 activations; the KV
// cache may be bfloat16.
#include "attention.h"
#include "lora.h"
#include "simd.h"

#include <omp.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <memory>
#include <utility>
#include <vector>

namespace {

namespace sv = lw::simd;
using sv::V;

// Per-layer pointers, in this order (absent optional tensors are null). The projections' entries
// point to `PackedWeight`s (`lw_pack_panels`); the gate and up halves of the gate-up projection
// are packed separately. A sparse layer has a router (`kRouter`, packed [E, hidden]) and
// `kExperts`, an array of 3E `PackedWeight` pointers (expert e's gate, up, down at 3e, 3e+1,
// 3e+2); its dense MLP entries are then a shared expert (Qwen2-MoE, scaled by the sigmoid of
// `kSharedGate` . x) or null.
enum LayerPtr {
  kInputNorm, kQkvP, kQkvB, kQNorm, kKNorm, kOP, kOB, kPostNorm, kGateP, kUpP, kGateUpB, kDownP, kDownB,
  kKCache, kVCache, kRouter, kExperts, kSharedGate, kNumLayerPtrs
};

// Packed weights: W [n, k] as panels of kPanel rows (output columns), each panel k-major:
// panel p holds W[p * kPanel + j][kk] at [kk][j], rows past n zero. A panel's column of the
// product is then two vector loads per kk, broadcast-multiplied by one scalar of each x row.
constexpr int kPanel = 32;
constexpr int kBlockK = 256;   // a panel's k-block stays in L1 across x's row chunks
// x rows per micro-kernel call: 2 accumulator vectors per row + 2 weight vectors in registers
// (AVX-512: 12 rows, 24 zmm accumulators; AVX2: 3 rows; see simd.h).
constexpr int kChunk = sv::kChunkRows;
constexpr int kInt4Rows = 4;   // rows micro_int4 takes: 16 accumulators + 2 weight vectors

// How a panel's 32 weights of one kk are stored. Batch-1 decode streams every weight once per
// token, so the bytes per weight set the step's floor; the arithmetic stays float32 throughout.
//   kF32:  32 floats.
//   kBF16: 16 32-bit words, word i = bf16(column i) | bf16(column 16 + i) << 16, so one shift and
//          one mask give the two float vectors. Exact for weights that are bfloat16 values (a
//          bfloat16 checkpoint served in float32): half the bytes, the same products.
//   kInt8: 32 int8, column j's float weight = q * scale[j] (weight-only quantization); the
//          per-column scale is applied once per k-block to the accumulators.
//   kInt4: 16 bytes, byte i = q(column i) | q(column 16 + i) << 4, q in [0, 15]; in group
//          g = kk / group_size, column j's float weight = q * s[g][j] + m[g][j] (m = -zero * s:
//          GPTQ's and AWQ's asymmetric 4-bit groups). Half of int8's bytes, an eighth of
//          float32's; each weight is dequantized once per row chunk with one FMA.
enum WeightFormat : int32_t { kF32 = 0, kBF16 = 1, kInt8 = 2, kInt4 = 3 };

// A packed weight as Python hands it over: its panels, its scales (kInt8: one per column, padded
// to whole panels; kInt4: per panel p and group g, s[32] then m[32] at (p * groups + g) * 64;
// else null), its format, (kInt4) the group size along k, and (kInt4, else null) the order of
// its inputs: an act-ordered GPTQ weight's groups sorted into runs, so it multiplies x[:, perm].
struct PackedWeight {
  const void* data;
  const float* scales;
  int32_t format;
  int32_t group_size;
  const int32_t* perm;
};

// x [m, k], or where `perm` is set its columns in that order (x[:, perm]) gathered into
// `ordered` [m, k] by the threads of the parallel region together (the rows shared among them;
// the `omp for`'s barrier: every row is in place before any thread reads it). Called by every thread.
inline const float* inputs_in_order(const float* x, int m, int k, const int32_t* perm, float* ordered) {
  if (!perm) return x;
#pragma omp for schedule(static)
  for (int r = 0; r < m; ++r)
    for (int i = 0; i < k; ++i) ordered[int64_t(r) * k + i] = x[int64_t(r) * k + perm[i]];
  return ordered;
}

// The panel formats: `load` gives one kk's 32 weights as two float vectors.
struct F32Panel {
  using T = float;
  static constexpr int kRow = kPanel;  // elements of T per kk
  static inline void load(const T* pw, V& w0, V& w1) {
    w0 = sv::load(pw);
    w1 = sv::load(pw + 16);
  }
};

struct BF16Panel {
  using T = uint32_t;
  static constexpr int kRow = kPanel / 2;
  static inline void load(const T* pw, V& w0, V& w1) { sv::load_bf16_pair(pw, w0, w1); }
};

struct Int8Panel {
  using T = int8_t;
  static constexpr int kRow = kPanel;
  static inline void load(const T* pw, V& w0, V& w1) {
    // Two 16-byte loads (with AVX-512 they fold into the sign extensions: no lane extract).
    w0 = sv::load_i8(pw);
    w1 = sv::load_i8(pw + 16);
  }
};

// kInt4 is not a `micro` format: see micro_int4 and dequantize_block.
struct Int4Panel {
  using T = uint8_t;
  static constexpr int kRow = kPanel / 2;
  // One kk's 32 values q as floats (low nibbles: columns 0-15; high: 16-31).
  static inline void load_q(const T* pw, V& q0, V& q1) { sv::load_u4_pair(pw, q0, q1); }
};

// y[r][0:nv] = (or +=, unless `first`) acc[r] (times the column scales, if any) for MR rows.
template <int MR>
inline void store_rows(V (&acc)[MR][2], const float* scale, float* y, int64_t ldy, bool first, int nv) {
  const sv::Mask m0 = sv::tail_mask(nv), m1 = sv::tail_mask(nv - 16);
  for (int r = 0; r < MR; ++r) {
    float* yr = y + r * ldy;
    if (scale) {
      acc[r][0] = sv::mul(acc[r][0], sv::load(scale));
      acc[r][1] = sv::mul(acc[r][1], sv::load(scale + 16));
    }
    if (!first) {
      acc[r][0] = sv::add(acc[r][0], sv::maskz_load(m0, yr));
      acc[r][1] = sv::add(acc[r][1], sv::maskz_load(m1, yr + 16));
    }
    sv::mask_store(yr, m0, acc[r][0]);
    sv::mask_store(yr + 16, m1, acc[r][1]);
  }
}

// y[r][0:nv] (+)= x[r][k0:k1] . panel[k0:k1][0:nv] (times kInt8's column scales) for MR rows;
// `first` stores, else accumulates.
template <int MR, class W>
inline void micro(const float* x, int64_t ldx, const typename W::T* panel, const float* scale, int k0, int k1,
                  float* y, int64_t ldy, bool first, int nv) {
  V acc[MR][2];
  for (int r = 0; r < MR; ++r) acc[r][0] = acc[r][1] = sv::zero();
  const typename W::T* pw = panel + int64_t(k0) * W::kRow;
  for (int kk = k0; kk < k1; ++kk, pw += W::kRow) {
    V w0, w1;
    W::load(pw, w0, w1);
    for (int r = 0; r < MR; ++r) {
      const V xb = sv::set1(x[r * ldx + kk]);
      acc[r][0] = sv::fmadd(xb, w0, acc[r][0]);
      acc[r][1] = sv::fmadd(xb, w1, acc[r][1]);
    }
  }
  store_rows<MR>(acc, scale, y, ldy, first, nv);
}

// kInt4 for a few rows (batch-1 decode): per group, acc = sum x * q and sx = sum x, then
// y += acc * s + sx * m. Two FMAs per kk and row; the weights are never dequantized. With one or
// two rows, U sets of accumulators take alternate kk: one set's FMA chain (4 cycles a link) would
// otherwise bound the loop, not the bytes. (More rows: dequantize_block.)
template <int MR>
inline void micro_int4(const float* x, int64_t ldx, const uint8_t* panel, const float* params, int group_size,
                       int k0, int k1, float* y, int64_t ldy, bool first, int nv) {
  // (AVX2 holds half the accumulators: a V is two registers there.)
  constexpr int U = sv::kChunkRows < 12 ? (MR == 1 ? 2 : 1) : MR == 1 ? 4 : MR == 2 ? 2 : 1;
  V tot[MR][2];
  for (int r = 0; r < MR; ++r) tot[r][0] = tot[r][1] = sv::zero();
  const uint8_t* pw = panel + int64_t(k0) * Int4Panel::kRow;
  for (int g0 = k0; g0 < k1;) {
    const int gi = g0 / group_size, g1 = std::min(k1, (gi + 1) * group_size);
    V acc[U][MR][2];
    for (int u = 0; u < U; ++u)
      for (int r = 0; r < MR; ++r) acc[u][r][0] = acc[u][r][1] = sv::zero();
    int kk = g0;
    for (; kk + U <= g1; kk += U, pw += U * Int4Panel::kRow)
      for (int u = 0; u < U; ++u) {
        V q0, q1;
        Int4Panel::load_q(pw + u * Int4Panel::kRow, q0, q1);
        for (int r = 0; r < MR; ++r) {
          const V xb = sv::set1(x[r * ldx + kk + u]);
          acc[u][r][0] = sv::fmadd(xb, q0, acc[u][r][0]);
          acc[u][r][1] = sv::fmadd(xb, q1, acc[u][r][1]);
        }
      }
    for (; kk < g1; ++kk, pw += Int4Panel::kRow) {
      V q0, q1;
      Int4Panel::load_q(pw, q0, q1);
      for (int r = 0; r < MR; ++r) {
        const V xb = sv::set1(x[r * ldx + kk]);
        acc[0][r][0] = sv::fmadd(xb, q0, acc[0][r][0]);
        acc[0][r][1] = sv::fmadd(xb, q1, acc[0][r][1]);
      }
    }
    const float* sm = params + int64_t(gi) * 2 * kPanel;
    const V s0 = sv::load(sm), s1 = sv::load(sm + 16);
    const V m0 = sv::load(sm + kPanel), m1 = sv::load(sm + kPanel + 16);
    for (int r = 0; r < MR; ++r) {
      for (int u = 1; u < U; ++u) {
        acc[0][r][0] = sv::add(acc[0][r][0], acc[u][r][0]);
        acc[0][r][1] = sv::add(acc[0][r][1], acc[u][r][1]);
      }
      const float* xr = x + r * ldx;
      float sx = 0.f;
#pragma omp simd reduction(+ : sx)
      for (int i = g0; i < g1; ++i) sx += xr[i];
      const V sxb = sv::set1(sx);
      tot[r][0] = sv::fmadd(sxb, m0, sv::fmadd(acc[0][r][0], s0, tot[r][0]));
      tot[r][1] = sv::fmadd(sxb, m1, sv::fmadd(acc[0][r][1], s1, tot[r][1]));
    }
    g0 = g1;
  }
  store_rows<MR>(tot, nullptr, y, ldy, first, nv);
}

// out[kk - k0][0:32] = the float weights of panel rows kk in [k0, k1): q * s + m of kk's group.
inline void dequantize_block(const uint8_t* panel, const float* params, int group_size, int k0, int k1,
                             float* out) {
  const uint8_t* pw = panel + int64_t(k0) * Int4Panel::kRow;
  for (int g0 = k0; g0 < k1;) {
    const int gi = g0 / group_size, g1 = std::min(k1, (gi + 1) * group_size);
    const float* sm = params + int64_t(gi) * 2 * kPanel;
    const V s0 = sv::load(sm), s1 = sv::load(sm + 16);
    const V m0 = sv::load(sm + kPanel), m1 = sv::load(sm + kPanel + 16);
    for (int kk = g0; kk < g1; ++kk, pw += Int4Panel::kRow) {
      V q0, q1;
      Int4Panel::load_q(pw, q0, q1);
      float* o = out + int64_t(kk - k0) * kPanel;
      sv::store(o, sv::fmadd(q0, s0, m0));
      sv::store(o + 16, sv::fmadd(q1, s1, m1));
    }
    g0 = g1;
  }
}

inline int num_panels(int n) { return (n + kPanel - 1) / kPanel; }

// Panel p of a packed weight with k inputs, and its scales (see PackedWeight; null if none).
template <class W>
inline const typename W::T* panel_of(const PackedWeight& w, int p, int k) {
  return static_cast<const typename W::T*>(w.data) + int64_t(p) * k * W::kRow;
}
inline const float* scales_of(const PackedWeight& w, int p, int k) {
  if (!w.scales) return nullptr;
  if (w.format != kInt4) return w.scales + p * kPanel;
  const int groups = (k + w.group_size - 1) / w.group_size;
  return w.scales + int64_t(p) * groups * 2 * kPanel;
}

// The micro-kernels of a format for 1 to kChunk rows.
template <class W, class Fn, int... MR>
constexpr std::array<Fn, kChunk + 1> kernel_table(std::integer_sequence<int, MR...>) {
  return {nullptr, &micro<MR + 1, W>...};
}
template <int... MR>
constexpr auto int4_kernel_table(std::integer_sequence<int, MR...>) {
  using Fn = void (*)(const float*, int64_t, const uint8_t*, const float*, int, int, int, float*, int64_t, bool, int);
  return std::array<Fn, kInt4Rows + 1>{nullptr, &micro_int4<MR + 1>...};
}

// y[0:m][0:nv] = x[0:m] @ panel p of w (all of k), written with row stride ldy.
template <class W>
inline void panel_product(const float* x, int m, int k, const PackedWeight& w, int p, int nv, float* y,
                          int64_t ldy) {
  using Fn = void (*)(const float*, int64_t, const typename W::T*, const float*, int, int, float*, int64_t, bool,
                      int);
  static constexpr auto kernels = kernel_table<W, Fn>(std::make_integer_sequence<int, kChunk>{});
  const typename W::T* panel = panel_of<W>(w, p, k);
  const float* scale = scales_of(w, p, k);
  for (int k0 = 0; k0 < k; k0 += kBlockK) {
    const int k1 = std::min(k, k0 + kBlockK);
    for (int r = 0; r < m; r += kChunk)
      kernels[std::min(kChunk, m - r)](x + int64_t(r) * k, k, panel, scale, k0, k1, y + r * ldy, ldy, k0 == 0, nv);
  }
}

// kInt4: up to kInt4Rows rows never dequantize (micro_int4); more dequantize each k-block of the
// panel once into L1 and run the float32 micro-kernel over it for every chunk of rows.
template <>
inline void panel_product<Int4Panel>(const float* x, int m, int k, const PackedWeight& w, int p, int nv, float* y,
                                     int64_t ldy) {
  static constexpr auto small = int4_kernel_table(std::make_integer_sequence<int, kInt4Rows>{});
  using Fn = void (*)(const float*, int64_t, const float*, const float*, int, int, float*, int64_t, bool, int);
  static constexpr auto kernels = kernel_table<F32Panel, Fn>(std::make_integer_sequence<int, kChunk>{});
  if (m <= 0) return;
  const uint8_t* panel = panel_of<Int4Panel>(w, p, k);
  const float* params = scales_of(w, p, k);
  alignas(64) float block[kBlockK * kPanel];
  for (int k0 = 0; k0 < k; k0 += kBlockK) {
    const int k1 = std::min(k, k0 + kBlockK);
    if (m <= kInt4Rows) {
      small[m](x, k, panel, params, w.group_size, k0, k1, y, ldy, k0 == 0, nv);
      continue;
    }
    dequantize_block(panel, params, w.group_size, k0, k1, block);
    for (int r = 0; r < m; r += kChunk)
      kernels[std::min(kChunk, m - r)](x + int64_t(r) * k + k0, k, block, nullptr, 0, k1 - k0, y + r * ldy, ldy,
                                       k0 == 0, nv);
  }
}

// y[m, n] = x[m, k] @ W^T + bias for packed W; called by every thread of a parallel region.
// Threads take contiguous runs of panels, so each streams its share of the weights once.
// `ordered`: room for x[m, k] in its panels' input order (used only where w.perm is set).
template <class W>
void linear_omp_as(const float* x, int m, int k, const PackedWeight& w, const float* bias, int n, float* y,
                   float* ordered) {
  x = inputs_in_order(x, m, k, w.perm, ordered);
#pragma omp for schedule(static)
  for (int p = 0; p < num_panels(n); ++p) {
    const int j0 = p * kPanel, nv = std::min(kPanel, n - j0);
    panel_product<W>(x, m, k, w, p, nv, y + j0, n);
    if (bias)
      for (int r = 0; r < m; ++r)
        for (int j = 0; j < nv; ++j) y[int64_t(r) * n + j0 + j] += bias[j0 + j];
  }
}

void linear_omp(const float* x, int m, int k, const PackedWeight* w, const float* bias, int n, float* y,
                float* ordered) {
  switch (w->format) {
    case kBF16: return linear_omp_as<BF16Panel>(x, m, k, *w, bias, n, y, ordered);
    case kInt8: return linear_omp_as<Int8Panel>(x, m, k, *w, bias, n, y, ordered);
    case kInt4: return linear_omp_as<Int4Panel>(x, m, k, *w, bias, n, y, ordered);
    default: return linear_omp_as<F32Panel>(x, m, k, *w, bias, n, y, ordered);
  }
}

// act[r][0:nv] = silu(g[r] + bg) * (u[r] + bu) for one panel's gate and up columns (g, u with row
// stride kPanel; biases may be null); 16 columns at a time (a scalar exp per element cost ~5% of
// a batch-64 step).
inline void silu_mul_panel(const float* g, const float* u, int m, int nv, const float* bias_g, const float* bias_u,
                           float* act, int64_t ld_act) {
  for (int j = 0; j < nv; j += 16) {
    const sv::Mask mk = sv::tail_mask(nv - j);
    const V bg = bias_g ? sv::maskz_load(mk, bias_g + j) : sv::zero();
    const V bu = bias_u ? sv::maskz_load(mk, bias_u + j) : sv::zero();
    for (int r = 0; r < m; ++r) {
      const V gv = sv::add(sv::load(g + r * kPanel + j), bg);
      const V uv = sv::add(sv::load(u + r * kPanel + j), bu);
      const V sig = sv::div(sv::set1(1.f),
                                       sv::add(sv::set1(1.f), sv::exp(sv::sub(sv::zero(), gv))));
      sv::mask_store(act + int64_t(r) * ld_act + j, mk, sv::mul(sv::mul(gv, sig), uv));
    }
  }
}

// act[m, inter] = silu(x @ gate^T + bg) * (x @ up^T + bu): the gate and up panels of the same
// columns are computed back to back into per-thread scratch `gu` [2][m][kPanel], then combined.
// LoRA (`lora`, layer `layer`): each adapted row's gate and up updates join the panel's columns
// before the activation (their shrink already done).
template <class W>
void gate_up_silu_omp_as(const float* x, int m, int k, const PackedWeight& gate, const PackedWeight& up,
                         const float* bias, int inter, float* act, float* gu, float* ordered,
                         const lw::LoraStep& lora, int layer) {
  x = inputs_in_order(x, m, k, gate.perm, ordered);  // (Python checks that up has gate's order)
#pragma omp for schedule(static)
  for (int p = 0; p < num_panels(inter); ++p) {
    const int j0 = p * kPanel, nv = std::min(kPanel, inter - j0);
    float* g = gu;
    float* u = gu + int64_t(m) * kPanel;
    panel_product<W>(x, m, k, gate, p, nv, g, kPanel);
    panel_product<W>(x, m, k, up, p, nv, u, kPanel);
    for (const lw::LoraChunk& c : lora.chunks)
      if (const lw::LoraProj* a = lora.at(c, layer, lw::kLoraGateUp)) {
        lw::lora_expand_chunk(lora, c, *a, 2 * inter, j0, j0 + nv, g, kPanel, j0);
        lw::lora_expand_chunk(lora, c, *a, 2 * inter, inter + j0, inter + j0 + nv, u, kPanel, inter + j0);
      }
    silu_mul_panel(g, u, m, nv, bias ? bias + j0 : nullptr, bias ? bias + inter + j0 : nullptr, act + j0, inter);
  }
}

// (Python packs the gate and up halves of one checkpoint in the same format.)
void gate_up_silu_omp(const float* x, int m, int k, const PackedWeight* gate, const PackedWeight* up,
                      const float* bias, int inter, float* act, float* gu, float* ordered, const lw::LoraStep& lora,
                      int layer) {
  switch (gate->format) {
    case kBF16: return gate_up_silu_omp_as<BF16Panel>(x, m, k, *gate, *up, bias, inter, act, gu, ordered, lora, layer);
    case kInt8: return gate_up_silu_omp_as<Int8Panel>(x, m, k, *gate, *up, bias, inter, act, gu, ordered, lora, layer);
    case kInt4: return gate_up_silu_omp_as<Int4Panel>(x, m, k, *gate, *up, bias, inter, act, gu, ordered, lora, layer);
    default: return gate_up_silu_omp_as<F32Panel>(x, m, k, *gate, *up, bias, inter, act, gu, ordered, lora, layer);
  }
}

// A layer's projection entry (see LayerPtr) is a PackedWeight, not a float array.
inline const PackedWeight* weight(const float* entry) { return reinterpret_cast<const PackedWeight*>(entry); }

// A sparse layer's routing of the step's T tokens: the rows (token, expert) grouped by expert, the
// rows of expert e at offset[e] .. offset[e] + count[e], and the input rows gathered to match.
struct MoeScratch {
  std::vector<float> logits;       // [T, E]
  std::vector<int> count, offset;  // [E]
  std::vector<int> hit;            // the experts with rows, ascending
  std::vector<int> row_token;      // [T * k]
  std::vector<float> row_weight;   // [T * k]
  std::vector<float> xg, act, yg;  // [T * k, hidden], [T * k, inter], [T * k, hidden]
};

// transformers' routing of each token: softmax over all experts' logits (float32), the top k,
// renormalised over the k if `renormalize`; then the rows grouped. An exact tie goes to the lower
// expert id (torch.topk leaves the order of ties unspecified; a trained router's float32
// probabilities practically never tie). Each of the k picks is an expert not yet taken whatever
// the values are (NaN logits give NaN outputs, as on the torch path, never a pick out of range).
void route_rows(const float* h, int T, int hidden, int E, int k, bool renormalize, MoeScratch& s) {
  std::vector<int> chosen(int64_t(T) * k);      // [T, k]: each token's experts, by slot
  std::vector<float> chosen_w(int64_t(T) * k);  // and their weights
  std::vector<float> probs(E);
  std::vector<char> taken(E);
  std::fill(s.count.begin(), s.count.end(), 0);
  for (int t = 0; t < T; ++t) {
    const float* lg = s.logits.data() + int64_t(t) * E;
    const float mx = *std::max_element(lg, lg + E);
    float sum = 0.f;
    for (int e = 0; e < E; ++e) sum += probs[e] = std::exp(lg[e] - mx);
    int* ids = chosen.data() + int64_t(t) * k;
    float* w = chosen_w.data() + int64_t(t) * k;
    float total = 0.f;
    std::fill(taken.begin(), taken.end(), 0);
    for (int j = 0; j < k; ++j) {  // k passes of a max: k and E are small
      int best = -1;
      for (int e = 0; e < E; ++e)
        if (!taken[e] && (best < 0 || probs[e] > probs[best])) best = e;
      ids[j] = best;
      total += w[j] = probs[best] / sum;
      taken[best] = 1;
      ++s.count[best];
    }
    if (renormalize)
      for (int j = 0; j < k; ++j) w[j] /= total;
  }
  s.hit.clear();
  for (int e = 0, off = 0; e < E; off += s.count[e], ++e) {
    s.offset[e] = off;
    if (s.count[e]) s.hit.push_back(e);
  }
  std::vector<int> fill(s.offset);
  for (int t = 0; t < T; ++t)
    for (int j = 0; j < k; ++j) {
      const int r = fill[chosen[int64_t(t) * k + j]]++;
      s.row_token[r] = t;
      s.row_weight[r] = chosen_w[int64_t(t) * k + j];
      std::copy(h + int64_t(t) * hidden, h + int64_t(t + 1) * hidden, s.xg.data() + int64_t(r) * hidden);
    }
}

// Every chosen expert's SwiGLU over its rows, s.xg -> s.yg: the (expert, panel) pairs of the
// gate-up products shared among the threads, then those of the down products. Called by every
// thread of the parallel region; `gu` is this thread's [2][T][kPanel] scratch.
template <class W>
void experts_omp_as(const PackedWeight* const* experts, int hidden, int inter, MoeScratch& s, float* gu) {
  const int n_hit = int(s.hit.size()), up_panels = num_panels(inter), down_panels = num_panels(hidden);
#pragma omp for schedule(static)
  for (int task = 0; task < n_hit * up_panels; ++task) {
    const int e = s.hit[task / up_panels], p = task % up_panels;
    const int m = s.count[e], j0 = p * kPanel, nv = std::min(kPanel, inter - j0);
    const float* x = s.xg.data() + int64_t(s.offset[e]) * hidden;
    const PackedWeight& gate = *experts[3 * e];
    const PackedWeight& up = *experts[3 * e + 1];
    float* g = gu;
    float* u = gu + int64_t(m) * kPanel;
    panel_product<W>(x, m, hidden, gate, p, nv, g, kPanel);
    panel_product<W>(x, m, hidden, up, p, nv, u, kPanel);
    silu_mul_panel(g, u, m, nv, nullptr, nullptr, s.act.data() + int64_t(s.offset[e]) * inter + j0, inter);
  }
#pragma omp for schedule(static)
  for (int task = 0; task < n_hit * down_panels; ++task) {
    const int e = s.hit[task / down_panels], p = task % down_panels;
    const int j0 = p * kPanel, nv = std::min(kPanel, hidden - j0);
    const PackedWeight& down = *experts[3 * e + 2];
    panel_product<W>(s.act.data() + int64_t(s.offset[e]) * inter, s.count[e], inter, down, p, nv,
                     s.yg.data() + int64_t(s.offset[e]) * hidden + j0, hidden);
  }
}

// (Python packs every expert of a checkpoint in the same format.)
void experts_omp(const PackedWeight* const* experts, int hidden, int inter, MoeScratch& s, float* gu) {
  switch (experts[0]->format) {
    case kBF16: return experts_omp_as<BF16Panel>(experts, hidden, inter, s, gu);
    case kInt8: return experts_omp_as<Int8Panel>(experts, hidden, inter, s, gu);
    case kInt4: return experts_omp_as<Int4Panel>(experts, hidden, inter, s, gu);
    default: return experts_omp_as<F32Panel>(experts, hidden, inter, s, gu);
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

// Bytes `lw_pack_panels` writes for a [n, k] weight in `format`.
extern "C" const char* lw_simd_isa() { return lw::simd::kIsa; }

extern "C" int64_t lw_packed_bytes(int n, int k, int format) {
  const int64_t per_kk = format == kF32 ? 4 * kPanel : format == kBF16 ? 2 * kPanel : format == kInt8 ? kPanel
                                                                                          : kPanel / 2;
  return int64_t(num_panels(n)) * k * per_kk;
}

// Packs w [n, k] (row stride ldw, in elements) into `out` (lw_packed_bytes): `w` holds floats for
// kF32, bfloat16 bit patterns (uint16) for kBF16, int8 for kInt8, uint8 values in [0, 15] for kInt4.
// Threads split the panels.
extern "C" void lw_pack_panels(const void* w, int n, int k, int64_t ldw, int format, void* out, int num_threads) {
#pragma omp parallel for schedule(static) num_threads(num_threads)
  for (int p = 0; p < num_panels(n); ++p)
    for (int kk = 0; kk < k; ++kk)
      for (int j = 0; j < kPanel; ++j) {
        const int row = p * kPanel + j;
        const int64_t src = int64_t(row) * ldw + kk, dst = (int64_t(p) * k + kk) * kPanel + j;
        if (format == kInt4) {  // byte j % 16 of the kk's 16: column j in its low or high nibble
          const uint8_t q = row < n ? static_cast<const uint8_t*>(w)[src] & 15 : 0;
          uint8_t& byte = static_cast<uint8_t*>(out)[(int64_t(p) * k + kk) * (kPanel / 2) + j % 16];
          byte = j < 16 ? q : uint8_t(byte | q << 4);
        } else if (format == kF32) {
          static_cast<float*>(out)[dst] = row < n ? static_cast<const float*>(w)[src] : 0.f;
        } else if (format == kInt8) {
          static_cast<int8_t*>(out)[dst] = row < n ? static_cast<const int8_t*>(w)[src] : int8_t(0);
        } else {  // column j of 16-column half h lands in the half-word h of 32-bit word j % 16
          const int64_t word = (int64_t(p) * k + kk) * (kPanel / 2) + j % 16;
          static_cast<uint16_t*>(out)[2 * word + j / 16] = row < n ? static_cast<const uint16_t*>(w)[src] : 0;
        }
      }
}

// y[m, n] = x[m, k] @ W^T + bias (bias may be null) for a packed W.
extern "C" void lw_packed_linear(const float* x, int m, int k, const PackedWeight* w, const float* bias, int n,
                                 float* y, int num_threads) {
  // (uninitialised: no cost unless the weight's inputs are reordered)
  const std::unique_ptr<float[]> ordered(w->perm ? new float[int64_t(m) * k] : nullptr);
#pragma omp parallel num_threads(num_threads)
  linear_omp(x, m, k, w, bias, n, y, ordered.get());
}

// One forward pass over all layers for T new tokens.
//   x [T, hidden]: the embedded tokens; out [T, hidden]: the final-normed hidden states.
//   layers [L * kNumLayerPtrs]: see LayerPtr; windows [L]: sliding window per layer, 0 for none;
//   inters [L]: the width of each layer's dense MLP (a sparse layer's shared expert), 0 for none.
//   Sparse layers: `num_experts` experts of width `expert_inter`, `top_k` per token, the top-k
//   weights renormalised if `renormalize`.
//   cos/sin [T, head_dim]; slots [T]: where each token's key and value go; the rest is the
//   segment attention metadata (see segment_attention.cpp) for the B row-groups. The KV cache
//   holds `kv_kind` elements (lw::KvKind: keys and values rounded as they are written);
//   `attention_order` as lw::Args's `order`.
//   LoRA (see lora.h): `lora_tables` [G] the step's adapters' projection tables, `lora_rows` the
//   token rows using one, adapter g's at lora_offsets[g] .. lora_offsets[g + 1] (G = 0: none);
//   `lora_max_rank` the largest (stacked) rank among them.
extern "C" void lw_decode_forward(
    const void* const* layers, const int32_t* windows, const int32_t* inters, int num_layers, int hidden,
    int heads, int kv_heads, int head_dim, int num_experts, int top_k, int expert_inter, int renormalize,
    float eps, float scale, const float* final_norm,
    const float* x, float* out, int T, const float* cos, const float* sin, const int64_t* slots,
    const int64_t* positions, const int32_t* query_start, int B, const int32_t* prompt_lens,
    const int32_t* response_lens, const int32_t* prompt_tables, int prompt_width, const int32_t* response_tables,
    int response_width, int block_size, int kv_kind, int attention_order, const lw::LoraProj* const* lora_tables,
    const int32_t* lora_rows, const int32_t* lora_offsets, int num_adapters, int lora_max_rank, int num_threads) {
  const int D = head_dim, q_size = heads * D, kv_size = kv_heads * D, qkv_size = q_size + 2 * kv_size;
  std::vector<float> residual(int64_t(T) * hidden), h(int64_t(T) * hidden), y(int64_t(T) * hidden);
  std::vector<float> qkv(int64_t(T) * qkv_size), q(int64_t(T) * q_size), attn(int64_t(T) * q_size);
  const int inter = *std::max_element(inters, inters + num_layers);
  std::vector<float> act(int64_t(T) * inter);
  MoeScratch moe;
  if (num_experts > 0) {
    const int64_t rows = int64_t(T) * top_k;
    moe.logits.resize(int64_t(T) * num_experts);
    moe.count.resize(num_experts);
    moe.offset.resize(num_experts);
    moe.row_token.resize(rows);
    moe.row_weight.resize(rows);
    moe.xg.resize(rows * hidden);
    moe.act.resize(rows * expert_inter);
    moe.yg.resize(rows * hidden);
  }
  std::vector<float> gu(int64_t(num_threads) * 2 * T * kPanel);  // gate_up_silu_omp's per-thread scratch
  const lw::LoraStep lora(lora_tables, lora_rows, lora_offsets, num_adapters, T, lora_max_rank, num_threads);
  // Inputs gathered in an act-ordered 4-bit weight's order (uninitialised: untouched unless used).
  const std::unique_ptr<float[]> ordered(new float[int64_t(T) * std::max({hidden, q_size, inter})]);
  std::vector<std::pair<int, int>> rows;  // (token, row-group)
  for (int b = 0; b < B; ++b)
    for (int t = query_start[b]; t < query_start[b + 1]; ++t) rows.emplace_back(t, b);
  // Attention tasks: a row's KV heads are split among tasks only when rows are too few to keep
  // every thread busy; a whole row reads each key's heads as one contiguous run of memory.
  const int splits = std::max(1, std::min(kv_heads, 4 * num_threads / std::max(1, int(rows.size()))));
  const int per_split = (kv_heads + splits - 1) / splits;
  const int tasks = int(rows.size()) * splits;
  const int64_t row_stride = int64_t(kv_heads) * D;

#pragma omp parallel num_threads(num_threads)
  for (int l = 0; l < num_layers; ++l) {
    const float* const* p = reinterpret_cast<const float* const*>(layers) + int64_t(l) * kNumLayerPtrs;
    void* k_cache = const_cast<float*>(p[kKCache]);  // `kv_kind` elements
    void* v_cache = const_cast<float*>(p[kVCache]);
#pragma omp single
    for (int t = 0; t < T; ++t) {
      float* res = residual.data() + int64_t(t) * hidden;
      const float* src = (l == 0 ? x : y.data()) + int64_t(t) * hidden;
      for (int i = 0; i < hidden; ++i) res[i] = l == 0 ? src[i] : res[i] + src[i];
      rms_norm_row(res, p[kInputNorm], hidden, eps, h.data() + int64_t(t) * hidden);
    }
    linear_omp(h.data(), T, hidden, weight(p[kQkvP]), p[kQkvB], qkv_size, qkv.data(), ordered.get());
    lw::lora_shrink_omp(lora, l, lw::kLoraQkv, h.data(), hidden);
    lw::lora_expand_omp(lora, l, lw::kLoraQkv, qkv_size, qkv.data());
    // q/k norm, RoPE, and the new keys and values into the cache (small next to the matmuls: one thread).
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
      const int64_t dst = slots[t] * row_stride;
      alignas(64) float kr[lw::kMaxHeadDim];
      for (int hh = 0; hh < kv_heads; ++hh) {
        const float* kh = row + q_size + hh * D;
        if (p[kKNorm]) rms_norm_row(kh, p[kKNorm], D, eps, kr);
        else std::copy(kh, kh + D, kr);
        rope(kr, c, s, D);
        lw::store_kv(kv_kind, k_cache, dst + hh * D, kr, D);
      }
      lw::store_kv(kv_kind, v_cache, dst, row + q_size + kv_size, kv_size);
    }
    const lw::Args a{q.data(), k_cache, v_cache, attn.data(), positions, query_start, prompt_lens, response_lens,
                     prompt_tables, response_tables, prompt_width, response_width, heads, kv_heads, D,
                     block_size, windows[l], scale, kv_kind, attention_order};
#pragma omp for schedule(dynamic, 1)
    for (int i = 0; i < tasks; ++i) {
      const auto& [t, b] = rows[i / splits];
      const int h0 = (i % splits) * per_split;
      if (h0 < kv_heads) lw::attend(a, t, b, h0, std::min(kv_heads, h0 + per_split));
    }
    linear_omp(attn.data(), T, q_size, weight(p[kOP]), p[kOB], hidden, y.data(), ordered.get());
    lw::lora_shrink_omp(lora, l, lw::kLoraO, attn.data(), q_size);
    lw::lora_expand_omp(lora, l, lw::kLoraO, hidden, y.data());
#pragma omp single
    for (int t = 0; t < T; ++t) {
      float* res = residual.data() + int64_t(t) * hidden;
      const float* src = y.data() + int64_t(t) * hidden;
      for (int i = 0; i < hidden; ++i) res[i] += src[i];
      rms_norm_row(res, p[kPostNorm], hidden, eps, h.data() + int64_t(t) * hidden);
    }
    float* my_gu = gu.data() + int64_t(omp_get_thread_num()) * 2 * T * kPanel;
    if (inters[l] > 0) {
      lw::lora_shrink_omp(lora, l, lw::kLoraGateUp, h.data(), hidden);
      gate_up_silu_omp(h.data(), T, hidden, weight(p[kGateP]), weight(p[kUpP]), p[kGateUpB], inters[l], act.data(),
                       my_gu, ordered.get(), lora, l);
      linear_omp(act.data(), T, inters[l], weight(p[kDownP]), p[kDownB], hidden, y.data(), ordered.get());
      lw::lora_shrink_omp(lora, l, lw::kLoraDown, act.data(), inters[l]);
      lw::lora_expand_omp(lora, l, lw::kLoraDown, hidden, y.data());
    }
    if (p[kRouter]) {
      linear_omp(h.data(), T, hidden, weight(p[kRouter]), nullptr, num_experts, moe.logits.data(), ordered.get());
#pragma omp single
      route_rows(h.data(), T, hidden, num_experts, top_k, renormalize != 0, moe);
      experts_omp(reinterpret_cast<const PackedWeight* const*>(p[kExperts]), hidden, expert_inter, moe, my_gu);
#pragma omp single
      {
        for (int t = 0; t < T; ++t) {  // the shared expert's output under its gate, or nothing
          float* yt = y.data() + int64_t(t) * hidden;
          if (inters[l] == 0) {
            std::fill(yt, yt + hidden, 0.f);
            continue;
          }
          if (!p[kSharedGate]) continue;
          const float* ht = h.data() + int64_t(t) * hidden;
          float dot = 0.f;
          for (int i = 0; i < hidden; ++i) dot += ht[i] * p[kSharedGate][i];
          const float gate = 1.f / (1.f + std::exp(-dot));
          for (int i = 0; i < hidden; ++i) yt[i] *= gate;
        }
        for (int r = 0; r < T * top_k; ++r) {
          float* yt = y.data() + int64_t(moe.row_token[r]) * hidden;
          const float* yr = moe.yg.data() + int64_t(r) * hidden;
          const float w = moe.row_weight[r];
          for (int i = 0; i < hidden; ++i) yt[i] += w * yr[i];
        }
      }
    }
  }
  for (int t = 0; t < T; ++t) {
    float* res = residual.data() + int64_t(t) * hidden;
    const float* src = y.data() + int64_t(t) * hidden;
    for (int i = 0; i < hidden; ++i) res[i] += src[i];
    rms_norm_row(res, final_norm, hidden, eps, out + int64_t(t) * hidden);
  }
}
