// `rescore` decode step on CPU, fused: rank every complete leaf block from its summaries, pick the candidate
// blocks, score their keys exactly (each key read once for its KV group), keep each query head's top keys, and sum
// the softmax terms (kept keys, dropped candidates with their block's mean value, blocks never read with their
// mean key and value, the row's own partial block) in one pass per (sequence, KV head). Nothing outside the
// candidate keys, the kept values and the block summaries is read. The same selection and terms as
// `rescore_decode.py`'s PyTorch twin and the general path `rescore_rows`; tested against both and against a
// brute-force loop (tests/test_tree_rescore_decode.py). Where the time goes (phase timers, 32K keys, cache cold
// as in a model's decode): ranking the blocks 25%, the candidate keys 26%, the kept values 20%, the mean-value
// terms 15%, the per-head thresholds 7% (docs/tree_kernel.md, "Decode speed").
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <type_traits>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <numeric>
#include <vector>

#include "selection.h"

namespace {

constexpr int64_t kFloatBytes = sizeof(float), kLineBytes = 64;  // prefetch strides: a value, a cache line

inline float dot(const float* a, const float* b, int64_t n) {
  float sum = 0.f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) sum += a[i] * b[i];
  return sum;
}

inline void add_scaled(float weight, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += weight * x[i];
}

// x[i] <- exp(x[i] - shift) for x[i] - shift <= 0 (every term is at most the maximum): 2^k exp(r) with
// k = round(y / ln 2), r = y - k ln 2 in two parts, exp(r) by its degree-6 Taylor polynomial (relative error
// below 2e-7 on |r| <= ln 2 / 2), 2^k from the exponent bits; below -87 (and -inf) exactly 0. Written so the
// compiler vectorises it (no library call).
inline void exp_shifted(float* x, int64_t n, float shift) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float y = std::max(x[i] - shift, -87.f);
    const float k = std::floor(y * 1.44269504f + 0.5f);
    const float r = (y - k * 0.693145751953125f) - k * 1.428606765330187e-06f;
    const float p = 1.f + r * (1.f + r * (0.5f + r * (1.f / 6 + r * (1.f / 24 + r * (1.f / 120 + r * (1.f / 720))))));
    const int32_t bits = (static_cast<int32_t>(k) + 127) << 23;
    float scale;
    std::memcpy(&scale, &bits, sizeof(scale));
    x[i] = x[i] - shift > -87.f ? p * scale : 0.f;
  }
}

void check_rows(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.scalar_type() == at::kFloat, name, " must be float32");
  TORCH_CHECK(t.dim() == 4 && t.stride(3) == 1, name, " must be 4-D with a contiguous last dimension");
}

}  // namespace

// query (B, H, R, D) unscaled; key, value (B, H, L, D / Dv); kbox (B, H, >=N, 2D) (empty for rank "mean"), ksum
// (B, H, >=N, D), vsum (B, H, >=N, Dv), count (B, >=N); forced: block ids always kept. rank_mode: 0 bound,
// 1 mean, 2 mix. Returns out (B, H, R, Dv) and the candidate blocks with a dropped key, averaged over the heads.
std::tuple<at::Tensor, double> rescore_decode(at::Tensor query, at::Tensor key, at::Tensor value, at::Tensor kbox,
                                       at::Tensor ksum, at::Tensor vsum, at::Tensor count, std::vector<int64_t> forced,
                                       int64_t n_blocks, int64_t block, int64_t width, int64_t keys,
                                       int64_t rank_mode, bool estimate, double scaling) {
  check_rows(query, "query");
  check_rows(key, "key");
  check_rows(value, "value");
  check_rows(ksum, "ksum");
  check_rows(vsum, "vsum");
  if (rank_mode != 1) check_rows(kbox, "kbox");
  TORCH_CHECK(count.scalar_type() == at::kFloat && count.stride(1) == 1, "count must be float32 (B, N)");
  query = query.contiguous();
  const int64_t batch = query.size(0), heads = query.size(1), reps = query.size(2), dim_rt = query.size(3);
  const int64_t length = key.size(2), dv_rt = value.size(3), candidates = width * block;
  const int64_t partial = length - n_blocks * block;
  TORCH_CHECK(n_blocks > 0 && width >= static_cast<int64_t>(forced.size()) && width <= n_blocks && keys <= candidates,
              "inconsistent widths");
  for (const int64_t f : forced) TORCH_CHECK(f >= 0 && f < n_blocks, "forced block ", f, " out of range");
  TORCH_CHECK(candidates < std::numeric_limits<int32_t>::max(), "too many candidates for 32-bit indices");
  auto out = at::zeros({batch, heads, reps, dv_rt}, query.options());
  auto drop_terms = at::zeros({batch, heads, reps}, query.options());
  const float* q_all = query.data_ptr<float>();
  const float scale = static_cast<float>(scaling);
  const bool need_mean = rank_mode != 0 || estimate;

  const float log_block = std::log(static_cast<float>(block));
  constexpr float kInf = std::numeric_limits<float>::infinity();

  // one (sequence, KV head) range; `Dim` > 0 fixes the head size at compile time, so dot products and value
  // sums unroll (0: any size)
  auto run = [&](auto dim_tag, int64_t begin, int64_t end) {
    constexpr int64_t Dim = decltype(dim_tag)::value;
    const int64_t dim = Dim ? Dim : dim_rt, dv = Dim ? Dim : dv_rt;
    std::vector<float> rank(n_blocks), mean(need_mean ? reps * n_blocks : 0), box(reps * 2 * dim),
        scaled(reps * dim), scores(reps * candidates), local(reps * std::max<int64_t>(partial, 1)), maxima(reps),
        rest(estimate ? reps * n_blocks : 0), log_counts(estimate ? n_blocks : 0);
    std::vector<uint32_t> scratch;
    std::vector<float> kept_mass(width), pinned;
    std::vector<int64_t> order(n_blocks), kept_count(width);
    std::vector<int32_t> ties, kept_ids(candidates), picked(n_blocks);
    std::vector<char> is_candidate(n_blocks), is_forced(n_blocks);
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads, h = bh % heads;
      const float* q = q_all + bh * reps * dim;
      const float* kb = key.data_ptr<float>() + b * key.stride(0) + h * key.stride(1);
      const float* vb = value.data_ptr<float>() + b * value.stride(0) + h * value.stride(1);
      const float* sums = ksum.data_ptr<float>() + b * ksum.stride(0) + h * ksum.stride(1);
      const float* vsums = vsum.data_ptr<float>() + b * vsum.stride(0) + h * vsum.stride(1);
      const float* counts = count.data_ptr<float>() + b * count.stride(0);
      const float* boxes = rank_mode == 1 ? nullptr : kbox.data_ptr<float>() + b * kbox.stride(0) + h * kbox.stride(1);
      const int64_t k_row = key.stride(2), v_row = value.stride(2), s_row = ksum.stride(2), vs_row = vsum.stride(2);
      const int64_t box_row = rank_mode == 1 ? 0 : kbox.stride(2);
      for (int64_t r = 0; r < reps; ++r) {
        for (int64_t d = 0; d < dim; ++d) {
          box[r * 2 * dim + d] = std::max(q[r * dim + d], 0.f);
          box[r * 2 * dim + dim + d] = -std::min(q[r * dim + d], 0.f);
          scaled[r * dim + d] = q[r * dim + d] * scale;
        }
      }
      // 1. rank every complete block, its summaries read once for the group: the best (max over the query heads)
      //    upper bound [q+, -q-] . [kmax, -kmin], mean score q . ksum / n, or their average
      //    (rows requested 16 ahead: in a model's decode they arrive cold, and this made the step 5% faster)
      constexpr int64_t kRowsAhead = 16;
      for (int64_t n = 0; n < n_blocks; ++n) {
        if (n + kRowsAhead < n_blocks) {
          if (need_mean) {
            const char* sums_ahead = reinterpret_cast<const char*>(sums + (n + kRowsAhead) * s_row);
            for (int64_t byte = 0; byte < dim * kFloatBytes; byte += kLineBytes) {
              __builtin_prefetch(sums_ahead + byte, 0, 2);
            }
          }
          if (boxes) {
            const char* boxes_ahead = reinterpret_cast<const char*>(boxes + (n + kRowsAhead) * box_row);
            for (int64_t byte = 0; byte < 2 * dim * kFloatBytes; byte += kLineBytes) {
              __builtin_prefetch(boxes_ahead + byte, 0, 2);
            }
          }
        }
        float best = -kInf;
        for (int64_t r = 0; r < reps; ++r) {
          float m = 0.f, value_rank;
          if (need_mean) m = mean[r * n_blocks + n] = dot(q + r * dim, sums + n * s_row, dim) / counts[n];
          if (rank_mode == 1) {
            value_rank = m;
          } else {
            const float bound = dot(box.data() + r * 2 * dim, boxes + n * box_row, 2 * dim);
            value_rank = rank_mode == 0 ? bound : 0.5f * (bound + m);
          }
          if (!std::isnan(value_rank)) best = std::max(best, value_rank);
        }
        rank[n] = best;
      }
      std::fill(is_forced.begin(), is_forced.end(), 0);
      for (const int64_t f : forced) {
        rank[f] = std::numeric_limits<float>::max();
        is_forced[f] = 1;
      }
      // 2. the top `width` blocks (forced ones among them), in ascending order (reads the cache in order): the
      //    width-th largest rank as threshold, the blocks above it and, in order, enough of those equal to it
      const float block_threshold = selection::kth_largest(rank.data(), n_blocks, width, scratch);
      const int64_t above = selection::above_threshold(rank.data(), n_blocks, block_threshold, picked.data(), ties);
      std::merge(picked.begin(), picked.begin() + above, ties.begin(), ties.begin() + (width - above), order.begin());
      std::fill(is_candidate.begin(), is_candidate.end(), 0);
      for (int64_t w = 0; w < width; ++w) is_candidate[order[w]] = 1;
      // 3. exact scores of the candidate keys (each key read once for the group) and of the partial block, with
      // 4. each query head's running maximum over every term it will add
      std::fill(maxima.begin(), maxima.end(), -kInf);
      // The candidate blocks are scattered pages, which the hardware prefetcher does not cross: each key's lines
      // of the block after next are requested (into L2) while this block is scored (11% faster at 32K keys).
      constexpr int64_t kBlocksAhead = 2;
      for (int64_t w = 0; w < width; ++w) {
        const char* ahead = w + kBlocksAhead < width
                                ? reinterpret_cast<const char*>(kb + order[w + kBlocksAhead] * block * k_row)
                                : nullptr;
        for (int64_t j = 0; j < block; ++j) {
          if (ahead) {
            for (int64_t byte = 0; byte < dim * kFloatBytes; byte += kLineBytes) {
              __builtin_prefetch(ahead + j * k_row * kFloatBytes + byte, 0, 2);
            }
          }
          const float* k = kb + (order[w] * block + j) * k_row;
          for (int64_t r = 0; r < reps; ++r) {
            const float score = dot(scaled.data() + r * dim, k, dim);
            scores[r * candidates + w * block + j] = score;
            maxima[r] = std::max(maxima[r], score);
          }
        }
      }
      for (int64_t p = 0; p < partial; ++p) {
        const float* k = kb + (n_blocks * block + p) * k_row;
        for (int64_t r = 0; r < reps; ++r) {
          local[r * partial + p] = dot(scaled.data() + r * dim, k, dim);
          maxima[r] = std::max(maxima[r], local[r * partial + p]);
        }
      }
      if (estimate) {  // blocks never read: logit q . mean key, n terms (head-major, so the loop vectorises)
        for (int64_t n = 0; n < n_blocks; ++n) log_counts[n] = counts[n] == block ? log_block : std::log(counts[n]);
        for (int64_t r = 0; r < reps; ++r) {
          const float* head_mean = mean.data() + r * n_blocks;
          float* logits = rest.data() + r * n_blocks;
          float best = maxima[r];
#pragma omp simd reduction(max : best)
          for (int64_t n = 0; n < n_blocks; ++n) {
            logits[n] = is_candidate[n] ? -kInf : head_mean[n] * scale;
            best = std::max(best, logits[n] + log_counts[n]);
          }
          maxima[r] = best;
        }
      }
      // 5. the softmax weights exp(term - maximum), in place
      for (int64_t r = 0; r < reps; ++r) {
        if (!std::isfinite(maxima[r])) maxima[r] = 0.f;
        exp_shifted(scores.data() + r * candidates, candidates, maxima[r]);
        exp_shifted(local.data() + r * partial, partial, maxima[r]);
        if (estimate) exp_shifted(rest.data() + r * n_blocks, n_blocks, maxima[r]);
      }
      // 6. per query head: keep the top `keys` candidates (forced blocks' keys first; exp is monotonic, so the
      //    weights rank like the scores): the k-th largest as threshold, the keys above it and, in order, enough
      //    of those equal to it; then the terms, accumulated in registers
      for (int64_t r = 0; r < reps; ++r) {
        float* weight = scores.data() + r * candidates;
        int64_t taken = 0;
        if (keys >= candidates) {
          std::iota(kept_ids.begin(), kept_ids.end(), 0);
          taken = candidates;
        } else {
          // forced blocks' keys rank first: their weights are +inf while the threshold is found (no copy)
          pinned.clear();
          for (int64_t w = 0; w < width; ++w) {
            if (!is_forced[order[w]]) continue;
            for (int64_t j = 0; j < block; ++j) {
              pinned.push_back(weight[w * block + j]);
              weight[w * block + j] = kInf;
            }
          }
          const float threshold = selection::kth_largest(weight, candidates, keys, scratch);
          taken = selection::above_threshold(weight, candidates, threshold, kept_ids.data(), ties);
          // then, in order, the weights equal to the threshold (itself, and rare ties) until `keys` are kept
          for (size_t i = 0; i < ties.size() && taken < keys; ++i) kept_ids[taken++] = ties[i];
          for (int64_t w = 0, i = 0; w < width; ++w) {
            if (!is_forced[order[w]]) continue;
            for (int64_t j = 0; j < block; ++j) weight[w * block + j] = pinned[i++];
          }
        }
        float sum[Dim ? Dim : 1];
        float* out_row = out.data_ptr<float>() + (bh * reps + r) * dv;
        float* accumulator = Dim ? sum : out_row;  // a fixed head size keeps the sums in registers
        std::fill(accumulator, accumulator + dv, 0.f);
        double denominator = 0.0;
        std::fill(kept_mass.begin(), kept_mass.end(), 0.f);
        std::fill(kept_count.begin(), kept_count.end(), 0);
        for (int64_t i = 0; i < taken; ++i) {  // kept keys: exact values
          const int64_t c = kept_ids[i], w = c / block;
          add_scaled(weight[c], vb + (order[w] * block + c % block) * v_row, accumulator, dv);
          denominator += weight[c];
          kept_mass[w] += weight[c];
          kept_count[w] += 1;
        }
        for (int64_t p = 0; p < partial; ++p) {  // the row's own partial block, exactly
          add_scaled(local[r * partial + p], vb + (n_blocks * block + p) * v_row, accumulator, dv);
          denominator += local[r * partial + p];
        }
        if (estimate) {
          float dropped_blocks = 0.f;
          for (int64_t w = 0; w < width; ++w) {  // dropped candidates: exact weight, the block's mean value
            if (kept_count[w] == block) continue;
            float mass = 0.f;
            for (int64_t j = 0; j < block; ++j) mass += weight[w * block + j];
            const float dropped = std::max(mass - kept_mass[w], 0.f);
            const int64_t n = order[w];
            dropped_blocks += 1.f;
            add_scaled(dropped / counts[n], vsums + n * vs_row, accumulator, dv);
            denominator += dropped;
          }
          drop_terms.data_ptr<float>()[bh * reps + r] = dropped_blocks;
          const float* rest_weight = rest.data() + r * n_blocks;
          for (int64_t n = 0; n < n_blocks; ++n) {  // blocks never read: n exp(q . mean key), the mean value
            if (is_candidate[n]) continue;
            add_scaled(rest_weight[n], vsums + n * vs_row, accumulator, dv);
            denominator += static_cast<double>(rest_weight[n]) * counts[n];
          }
        }
        const float inverse = static_cast<float>(1.0 / std::max(denominator, 1e-30));
        for (int64_t d = 0; d < dv; ++d) out_row[d] = accumulator[d] * inverse;
      }
    }
  };
  auto dispatch = [&](auto dim_tag) {
    at::parallel_for(0, batch * heads, 1, [&](int64_t begin, int64_t end) { run(dim_tag, begin, end); });
  };
  if (dim_rt == dv_rt && dim_rt == 64) {
    dispatch(std::integral_constant<int64_t, 64>{});
  } else if (dim_rt == dv_rt && dim_rt == 128) {
    dispatch(std::integral_constant<int64_t, 128>{});
  } else {
    dispatch(std::integral_constant<int64_t, 0>{});
  }
  return {out, drop_terms.mean().item<double>()};
}

// kth_largest on a 1-D float32 tensor, for the tests.
double kth_largest_of(at::Tensor values, int64_t k) {
  values = values.contiguous();
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.dim() == 1 && k >= 1 && k <= values.numel(),
              "kth_largest needs a 1-D float32 tensor and 1 <= k <= its size");
  std::vector<uint32_t> scratch;
  return selection::kth_largest(values.data_ptr<float>(), values.numel(), k, scratch);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("kth_largest", &kth_largest_of, "k-th largest value of a 1-D float32 tensor (test hook)");
  m.def("rescore_decode", &rescore_decode, "Fused rescore decode step (CPU, float32)");
}
