// Exact selection over float arrays for the fused decode step (rescore_decode.cpp): the k-th largest value and
// the indices above a threshold, without sorting and without data-dependent branches. AVX-512 paths where the
// compiler targets it, portable loops otherwise (both checked against a sort by the tests).
#pragma once

#include <cstdint>
#include <cstring>
#include <vector>

#if defined(__AVX512F__)
#include <immintrin.h>
#endif

namespace selection {

// Keeps in keys[0, live) those whose bits under `mask` equal `prefix` (in place, order kept); adds to `higher` the
// number above that range. Returns the new `live`.
inline int64_t narrow_keys(uint32_t* keys, int64_t live, uint32_t mask, uint32_t prefix, int64_t& higher) {
  int64_t kept = 0, i = 0;
#if defined(__AVX512F__)
  const __m512i bits = _mm512_set1_epi32(static_cast<int>(mask)), target = _mm512_set1_epi32(static_cast<int>(prefix));
  for (; i + 16 <= live; i += 16) {
    const __m512i top = _mm512_and_si512(_mm512_loadu_si512(keys + i), bits);
    higher += __builtin_popcount(_mm512_cmpgt_epu32_mask(top, target));
    const __mmask16 equal = _mm512_cmpeq_epi32_mask(top, target);
    _mm512_mask_compressstoreu_epi32(keys + kept, equal, _mm512_loadu_si512(keys + i));  // kept <= i: safe
    kept += __builtin_popcount(equal);
  }
#endif
  for (; i < live; ++i) {
    const uint32_t key = keys[i];
    higher += (key & mask) > prefix;
    keys[kept] = key;
    kept += (key & mask) == prefix;
  }
  return kept;
}

// The k-th largest of values[0, n) (1 <= k <= n, no NaN), exactly, without sorting: each float is mapped to an
// unsigned integer of the same order (sign bit flipped, negatives' other bits inverted) and the k-th largest key
// is built bit by bit, from the top: keep a bit set when at least k keys are >= the prefix with it set. Counting
// passes are vectorised with no data-dependent branches (nth_element mispredicts on every other element); after
// the top 8 and 16 bits only the keys sharing them are kept, so most of the 32 passes run on a small remainder.
inline float kth_largest(const float* values, int64_t n, int64_t k, std::vector<uint32_t>& scratch) {
  scratch.resize(n);
  uint32_t* keys = scratch.data();
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    uint32_t bits;
    std::memcpy(&bits, values + i, sizeof(bits));
    keys[i] = bits ^ (static_cast<uint32_t>(static_cast<int32_t>(bits) >> 31) | 0x80000000u);
  }
  uint32_t prefix = 0;
  int64_t live = n, higher = 0;  // keys[0, live) share prefix's decided bits; `higher` keys are above them all
  for (int bit = 31; bit >= 0; --bit) {
    const uint32_t trial = prefix | (1u << bit);
    int32_t at_least = 0;  // 32-bit: 16 lanes per vector (n < 2^31)
#pragma omp simd reduction(+ : at_least)
    for (int64_t i = 0; i < live; ++i) at_least += keys[i] >= trial;
    if (higher + at_least >= k) prefix = trial;
    if (bit == 24 || bit == 16) live = narrow_keys(keys, live, ~((1u << bit) - 1), prefix, higher);
  }
  const uint32_t bits = prefix ^ ((prefix >> 31) ? 0x80000000u : 0xFFFFFFFFu);
  float out;
  std::memcpy(&out, &bits, sizeof(out));
  return out;
}

// Indices of the weights above `threshold` into `kept` (ascending) and of those equal to it into `ties`; returns
// how many are above. AVX-512 compresses 16 at a time where the compiler targets it.
inline int64_t above_threshold(const float* weight, int64_t n, float threshold, int32_t* kept,
                               std::vector<int32_t>& ties) {
  int64_t taken = 0, c = 0;
  ties.clear();
#if defined(__AVX512F__)
  const __m512 limit = _mm512_set1_ps(threshold);
  __m512i index = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  for (; c + 16 <= n; c += 16) {
    const __m512 values = _mm512_loadu_ps(weight + c);
    const __mmask16 above = _mm512_cmp_ps_mask(values, limit, _CMP_GT_OQ);
    _mm512_mask_compressstoreu_epi32(kept + taken, above, index);
    taken += __builtin_popcount(above);
    for (unsigned equal = _mm512_cmp_ps_mask(values, limit, _CMP_EQ_OQ); equal; equal &= equal - 1) {
      ties.push_back(static_cast<int32_t>(c + __builtin_ctz(equal)));
    }
    index = _mm512_add_epi32(index, _mm512_set1_epi32(16));
  }
#endif
  for (; c < n; ++c) {
    kept[taken] = static_cast<int32_t>(c);
    taken += weight[c] > threshold;
    if (weight[c] == threshold) ties.push_back(static_cast<int32_t>(c));
  }
  return taken;
}

}  // namespace selection
