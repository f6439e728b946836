// Segment attention on the CPU: each query row reads its prompt segment and then its response
// segment straight from the paged KV cache, with one online softmax across both. Nothing is
// gathered or padded, so every key and value is read from memory exactly once per query row
// (and once per KV head for all the query heads that share it: GQA).
//
// Plain C ABI (called through ctypes), float32 queries over a float32, bfloat16 or float8 cache, no torch headers: it compiles in about a
// second. Work is split over (query row, KV head) pairs among `num_threads` std::threads, which
// exit when done (no spinning pool to fight torch's own threads).
#include "attention.h"

#include <atomic>
#include <thread>
#include <vector>

using lw::Args;
using lw::attend;
using lw::kMaxHeadDim;
using lw::kMaxHeads;

extern "C" int lw_limits(int* max_heads, int* max_head_dim) {
  *max_heads = kMaxHeads;
  *max_head_dim = kMaxHeadDim;
  return 0;
}

// Attention for the query rows of the row-groups listed in `groups` (other groups are left
// untouched, for the caller to handle). Tensors are contiguous: q/out [T, heads, D],
// k/v [slots, kv_heads, D] of `kv_kind` elements (lw::KvKind), tables [B, width] of block ids;
// `order` as lw::Args's.
extern "C" void lw_segment_attention(
    const float* q, const void* k, const void* v, float* out, const int64_t* positions,
    const int32_t* query_start, const int32_t* prompt_lens, const int32_t* response_lens,
    const int32_t* prompt_tables, int prompt_width, const int32_t* response_tables, int response_width,
    const int32_t* groups, int num_groups, int heads, int kv_heads, int head_dim, int block_size,
    int window, float scale, int kv_kind, int order, int num_threads) {
  Args a{q, k, v, out, positions, query_start, prompt_lens, response_lens, prompt_tables, response_tables,
         prompt_width, response_width, heads, kv_heads, head_dim, block_size, window, scale, kv_kind, order};
  std::vector<std::pair<int, int>> rows;  // (query row, group)
  for (int i = 0; i < num_groups; ++i) {
    const int b = groups[i];
    for (int t = query_start[b]; t < query_start[b + 1]; ++t) rows.emplace_back(t, b);
  }
  // Split the KV heads of a row only when there are too few rows to keep every thread busy.
  const int64_t want = 4 * int64_t(num_threads) / int64_t(std::max<size_t>(1, rows.size()));
  const int splits = int(std::min<int64_t>(kv_heads, std::max<int64_t>(1, want)));
  const int per_split = (kv_heads + splits - 1) / splits;
  const int64_t tasks = int64_t(rows.size()) * splits;
  // Contexts differ in length, so threads take small batches of tasks from a shared counter.
  std::atomic<int64_t> next{0};
  constexpr int64_t kBatch = 1;
  auto run = [&]() {
    for (int64_t begin; (begin = next.fetch_add(kBatch)) < tasks;) {
      for (int64_t x = begin; x < std::min(tasks, begin + kBatch); ++x) {
        const auto& [t, b] = rows[x / splits];
        const int h0 = int(x % splits) * per_split;
        if (h0 < kv_heads) attend(a, t, b, h0, std::min(kv_heads, h0 + per_split));
      }
    }
  };
  const int n = int(std::max<int64_t>(1, std::min<int64_t>(num_threads, tasks)));
  std::vector<std::thread> pool;
  for (int i = 1; i < n; ++i) pool.emplace_back(run);
  run();
  for (auto& th : pool) th.join();
}

// The kernels' own rounding of n floats into `kv_kind` elements (what lw_decode_forward writes),
// for tests to pin against torch's conversions.
extern "C" void lw_store_kv(const float* src, void* dst, int64_t n, int kv_kind) {
  for (int64_t i = 0; i < n; i += 1 << 20)
    lw::store_kv(kv_kind, dst, i, src + i, int(std::min<int64_t>(n - i, 1 << 20)));
}
