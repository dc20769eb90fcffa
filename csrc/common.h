// Shared helpers of the icakd_fast._C extension (host side only: no CUDA headers here).
// Argument checks and output allocation live in checks.h.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace icakd {

// Accumulation dtype: float64 when any floating input is float64, float32 otherwise.
inline at::ScalarType acc_type_of(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

// Vector-friendly reductions in a fixed order: kLanes partial sums (lane j takes the elements
// j, j + kLanes, ...), then a pairwise tree over the lanes. The order is written out in the
// source (no reassociation is needed to vectorise it), so the results are deterministic and do
// not depend on the thread count. (An `omp simd reduction` would add its lanes one after the
// other: a serial chain of 16 additions per call, which dominated short rows.)
constexpr int kLanes = 16;

template <typename acc_t>
inline acc_t lanes_tree_sum(const acc_t* s) {
  acc_t h8[8], h4[4];
  for (int j = 0; j < 8; ++j) h8[j] = s[j] + s[j + 8];
  for (int j = 0; j < 4; ++j) h4[j] = h8[j] + h8[j + 4];
  return (h4[0] + h4[2]) + (h4[1] + h4[3]);
}

template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot_acc(const a_t* a, const b_t* b, int64_t n) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) s[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
  for (int j = 0; i + j < n; ++j) s[j] += static_cast<acc_t>(a[i + j]) * static_cast<acc_t>(b[i + j]);
  return lanes_tree_sum<acc_t>(s);
}

template <typename acc_t, typename a_t>
inline acc_t sum_acc(const a_t* a, int64_t n) {
  acc_t s[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes)
    for (int j = 0; j < kLanes; ++j) s[j] += static_cast<acc_t>(a[i + j]);
  for (int j = 0; i + j < n; ++j) s[j] += static_cast<acc_t>(a[i + j]);
  return lanes_tree_sum<acc_t>(s);
}

template <typename acc_t, typename a_t>
inline acc_t sumsq_acc(const a_t* a, int64_t n) {
  return dot_acc<acc_t>(a, a, n);
}

// One row normalised as F.normalize does: out = x / max(|x|, eps) in acc_t; returns |x|.
template <typename acc_t, typename in_t>
inline acc_t unit_row(const in_t* x, int64_t n, double eps, acc_t* out) {
  const acc_t norm = std::sqrt(sumsq_acc<acc_t>(x, n));
  const acc_t den = std::max<acc_t>(norm, static_cast<acc_t>(eps));
  for (int64_t i = 0; i < n; ++i) out[i] = static_cast<acc_t>(x[i]) / den;
  return norm;
}

// Stable counting sort of row indices by label (CPU only). Rows whose label is outside
// [0, num_classes) or whose mask is false are dropped. Returns offsets [C+1] and rows.
struct ClassCSR {
  std::vector<int64_t> offsets;
  std::vector<int64_t> rows;
};

inline ClassCSR class_csr(const int64_t* labels, int64_t label_stride, const bool* mask, int64_t mask_stride,
                          int64_t n, int64_t num_classes) {
  ClassCSR out;
  out.offsets.assign(num_classes + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = labels[i * label_stride];
    const bool keep = (mask == nullptr || mask[i * mask_stride]) && c >= 0 && c < num_classes;
    if (keep) out.offsets[c + 1] += 1;
  }
  for (int64_t c = 0; c < num_classes; ++c) out.offsets[c + 1] += out.offsets[c];
  out.rows.resize(out.offsets[num_classes]);
  std::vector<int64_t> fill(out.offsets.begin(), out.offsets.end() - 1);
  for (int64_t i = 0; i < n; ++i) {
    const int64_t c = labels[i * label_stride];
    const bool keep = (mask == nullptr || mask[i * mask_stride]) && c >= 0 && c < num_classes;
    if (keep) out.rows[fill[c]++] = i;
  }
  return out;
}

}  // namespace icakd
