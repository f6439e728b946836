// LoRA adapters inside the fused decode forward (decode_forward.cpp).
//
// A row whose request uses an adapter adds (x @ A^T) @ B^T to each adapted projection's output,
// in two halves: "shrink" (x @ A^T, `rank` values per row) once the projection's input is ready,
// and "expand" (those values times B^T, added to the output columns) once its base product is
// written; gate-up's expand runs inside its panel loop, before SiLU-and-multiply. So one step
// mixes adapters and the base model, each adapter's rows through its own A and B, without leaving
// the fused path. The updates are 2 * rank * (k + n) flops per row and projection, a few percent
// of the projections' at rank 16; both halves are small GEMMs over the rows of one adapter, up to
// kLoraRows rows sharing each weight load (a dot product per (row, rank), the first version, cost
// several times more).
#pragma once

#include "simd.h"

#include <algorithm>
#include <array>
#include <cstdint>
#include <utility>
#include <vector>

namespace lw {

// One projection of one adapter, as ops/cpu/decode.py hands it over. `at` [k, rank]: A transposed
// (null: the adapter leaves this projection alone); `bt` [rank, n]: B transposed, the adapter's
// scaling folded in. A fused projection (q/k/v, gate/up) stacks its parts' ranks, and its B is
// block-diagonal: part b's update reaches only output columns [col0, col1) from ranks [r0, r1),
// so only the blocks are read.
struct LoraProj {
  const float* at;
  const float* bt;
  int32_t rank;
  int32_t num_blocks;
  int32_t blocks[3][4];  // (col0, col1, r0, r1)
};

// Each layer's projections in an adapter's table, in this order (ops/lora.py's PROJECTIONS).
enum LoraSlot { kLoraQkv, kLoraO, kLoraGateUp, kLoraDown, kNumLoraSlots };

// Rows sharing each load of A or B (their accumulators and the loaded vectors fit the registers).
constexpr int kLoraRows = simd::kChunkRows >= 12 ? 4 : 2;
constexpr int kLoraVecs = 4;  // vectors of ranks (shrink) or columns (expand) per pass

// Up to kLoraRows token rows of one adapter.
struct LoraChunk {
  int adapter;
  int rows[kLoraRows];
  int count;
};

// A step's adapters: `tables[g]` holds adapter g's [num_layers * kNumLoraSlots] projections;
// `chunks` its rows, a few at a time. No chunks: no adapter in the step.
struct LoraStep {
  const LoraProj* const* tables;
  std::vector<LoraChunk> chunks;
  int num_rows, max_rank;
  // With fewer chunks than threads (batch-1 decode: one), each chunk's shrink is split along k
  // into `splits` parts summed afterwards, so every thread streams its share of A.
  int splits = 1;
  // [splits][num_rows][max_rank]: x @ A^T between the two halves (part 0: the sum of the parts)
  mutable std::vector<float> shrunk;

  // `rows` [offsets[G]]: the adapted token rows of the step's `num_rows`, adapter g's at
  // offsets[g] .. offsets[g + 1]; `max_rank`: the largest (stacked) rank among the adapters.
  LoraStep(const LoraProj* const* tables_, const int32_t* rows, const int32_t* offsets, int num_adapters,
           int num_rows_, int max_rank_, int num_threads)
      : tables(tables_), num_rows(num_rows_), max_rank(max_rank_) {
    for (int g = 0; g < num_adapters; ++g)
      for (int i = offsets[g]; i < offsets[g + 1]; i += kLoraRows) {
        LoraChunk c{g, {}, std::min(kLoraRows, offsets[g + 1] - i)};
        for (int r = 0; r < c.count; ++r) c.rows[r] = rows[i + r];
        chunks.push_back(c);
      }
    if (chunks.empty()) return;
    splits = std::max(1, num_threads / int(chunks.size()));
    shrunk.resize(int64_t(splits) * num_rows * max_rank);
  }

  // The chunk's adapter's projection `slot` of `layer`, null if it has none.
  const LoraProj* at(const LoraChunk& c, int layer, int slot) const {
    const LoraProj* p = tables[c.adapter] + layer * kNumLoraSlots + slot;
    return p->at ? p : nullptr;
  }
  float* shrunk_row(int t, int part = 0) const {
    return shrunk.data() + (int64_t(part) * num_rows + t) * max_rank;
  }
};

// out[r][r0 : r0 + 16 * NV] = x[r][k0:k1] @ at[k0:k1, r0 : ...] for MR rows (ranks past `rank`
// masked off).
template <int MR, int NV>
inline void shrink_pass(const LoraProj& p, const float* const* x, float* const* out, int k0, int k1, int r0) {
  simd::Mask m[NV];
  simd::V acc[MR][NV];
  for (int v = 0; v < NV; ++v) {
    m[v] = simd::tail_mask(p.rank - r0 - 16 * v);
    for (int r = 0; r < MR; ++r) acc[r][v] = simd::zero();
  }
  const float* w = p.at + int64_t(k0) * p.rank + r0;
  for (int kk = k0; kk < k1; ++kk, w += p.rank) {
    simd::V wv[NV];
    for (int v = 0; v < NV; ++v) wv[v] = simd::maskz_load(m[v], w + 16 * v);
    for (int r = 0; r < MR; ++r) {
      const simd::V xb = simd::set1(x[r][kk]);
      for (int v = 0; v < NV; ++v) acc[r][v] = simd::fmadd(xb, wv[v], acc[r][v]);
    }
  }
  for (int r = 0; r < MR; ++r)
    for (int v = 0; v < NV; ++v) simd::mask_store(out[r] + r0 + 16 * v, m[v], acc[r][v]);
}

template <int MR>
inline void shrink_rows(const LoraProj& p, const float* const* x, float* const* out, int k0, int k1) {
  for (int r0 = 0; r0 < p.rank; r0 += 16 * kLoraVecs) {
    switch (std::min(kLoraVecs, (p.rank - r0 + 15) / 16)) {
      case 1: shrink_pass<MR, 1>(p, x, out, k0, k1, r0); break;
      case 2: shrink_pass<MR, 2>(p, x, out, k0, k1, r0); break;
      case 3: shrink_pass<MR, 3>(p, x, out, k0, k1, r0); break;
      default: shrink_pass<MR, 4>(p, x, out, k0, k1, r0); break;
    }
  }
}

// y[r][c0 - base : c1 - base] += lt[r] @ bt[:, c0:c1] for MR rows, block by block: the update of
// the projection's columns [c0, c1) (`n`: its width, bt's row stride), written to `y[r]`, which
// holds the projection's columns from `base` on.
template <int MR>
inline void expand_rows(const LoraProj& p, const float* const* lt, float* const* y, int n, int c0, int c1, int base) {
  constexpr int kCols = 16 * kLoraVecs;
  for (int b = 0; b < p.num_blocks; ++b) {
    const int32_t* blk = p.blocks[b];
    const int lo = std::max(c0, blk[0]), hi = std::min(c1, blk[1]);
    for (int j = lo; j < hi; j += kCols) {
      simd::Mask m[kLoraVecs];
      simd::V acc[MR][kLoraVecs];
      for (int v = 0; v < kLoraVecs; ++v) {
        m[v] = simd::tail_mask(hi - j - 16 * v);
        for (int r = 0; r < MR; ++r) acc[r][v] = simd::maskz_load(m[v], y[r] + (j - base) + 16 * v);
      }
      for (int rk = blk[2]; rk < blk[3]; ++rk) {
        const float* w = p.bt + int64_t(rk) * n + j;
        simd::V wv[kLoraVecs];
        for (int v = 0; v < kLoraVecs; ++v) wv[v] = simd::maskz_load(m[v], w + 16 * v);
        for (int r = 0; r < MR; ++r) {
          const simd::V lb = simd::set1(lt[r][rk]);
          for (int v = 0; v < kLoraVecs; ++v) acc[r][v] = simd::fmadd(lb, wv[v], acc[r][v]);
        }
      }
      for (int r = 0; r < MR; ++r)
        for (int v = 0; v < kLoraVecs; ++v) simd::mask_store(y[r] + (j - base) + 16 * v, m[v], acc[r][v]);
    }
  }
}

// The kernels for 1 to kLoraRows rows.
template <int... MR>
constexpr auto shrink_table(std::integer_sequence<int, MR...>) {
  using Fn = void (*)(const LoraProj&, const float* const*, float* const*, int, int);
  return std::array<Fn, kLoraRows + 1>{nullptr, &shrink_rows<MR + 1>...};
}
template <int... MR>
constexpr auto expand_table(std::integer_sequence<int, MR...>) {
  using Fn = void (*)(const LoraProj&, const float* const*, float* const*, int, int, int, int);
  return std::array<Fn, kLoraRows + 1>{nullptr, &expand_rows<MR + 1>...};
}

// The chunk's update of the projection's columns [c0, c1) into y (row t at y + t * ldy, holding
// the projection's columns from `base` on).
inline void lora_expand_chunk(const LoraStep& s, const LoraChunk& c, const LoraProj& p, int n, int c0, int c1,
                              float* y, int64_t ldy, int base) {
  static constexpr auto kernels = expand_table(std::make_integer_sequence<int, kLoraRows>{});
  const float* ls[kLoraRows];
  float* ys[kLoraRows];
  for (int r = 0; r < c.count; ++r) {
    ls[r] = s.shrunk_row(c.rows[r]);
    ys[r] = y + c.rows[r] * ldy;
  }
  kernels[c.count](p, ls, ys, n, c0, c1, base);
}

// shrunk = x @ A^T for every adapted row of (layer, slot), x [T, k]. Called by every thread of
// the parallel region: the (chunk, part of k) tasks are shared, and the `omp for`s' barriers have
// every row's values summed in place before any thread expands them.
inline void lora_shrink_omp(const LoraStep& s, int layer, int slot, const float* x, int k) {
  static constexpr auto kernels = shrink_table(std::make_integer_sequence<int, kLoraRows>{});
  if (s.chunks.empty()) return;
  const int tasks = int(s.chunks.size()) * s.splits;
#pragma omp for schedule(static)
  for (int i = 0; i < tasks; ++i) {
    const LoraChunk& c = s.chunks[i / s.splits];
    const int part = i % s.splits;
    const LoraProj* p = s.at(c, layer, slot);
    if (!p) continue;
    const float* xs[kLoraRows];
    float* ls[kLoraRows];
    for (int r = 0; r < c.count; ++r) {
      xs[r] = x + int64_t(c.rows[r]) * k;
      ls[r] = s.shrunk_row(c.rows[r], part);
    }
    kernels[c.count](*p, xs, ls, int(int64_t(k) * part / s.splits), int(int64_t(k) * (part + 1) / s.splits));
  }
  if (s.splits == 1) return;
#pragma omp for schedule(static)
  for (int i = 0; i < int(s.chunks.size()); ++i) {
    const LoraChunk& c = s.chunks[i];
    const LoraProj* p = s.at(c, layer, slot);
    if (!p) continue;
    for (int r = 0; r < c.count; ++r)
      for (int part = 1; part < s.splits; ++part) {
        float* sum = s.shrunk_row(c.rows[r]);
        const float* add = s.shrunk_row(c.rows[r], part);
        for (int j = 0; j < p->rank; ++j) sum[j] += add[j];
      }
  }
}

// y [T, n] += every adapted row's update of projection `slot`: the threads share the columns in
// runs of 64, each run taking every chunk.
inline void lora_expand_omp(const LoraStep& s, int layer, int slot, int n, float* y) {
  if (s.chunks.empty()) return;
  constexpr int kRun = 64;
#pragma omp for schedule(static)
  for (int run = 0; run < (n + kRun - 1) / kRun; ++run) {
    const int c0 = run * kRun, c1 = std::min(n, c0 + kRun);
    for (const LoraChunk& c : s.chunks)
      if (const LoraProj* p = s.at(c, layer, slot)) lora_expand_chunk(s, c, *p, n, c0, c1, y, n, 0);
  }
}

}  // namespace lw
