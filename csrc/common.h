// Shared helpers of the icakd_fast._C extension (host side only: no CUDA headers here).
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace icakd {

// Accumulation dtype: float64 when any floating input is float64, float32 otherwise.
inline at::ScalarType acc_type_of(at::ScalarType a, at::ScalarType b) {
  return (a == at::kDouble || b == at::kDouble) ? at::kDouble : at::kFloat;
}

inline void check_float(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be defined");
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dt, const char* name) {
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
}

inline void check_same_device(const at::Tensor& ref, const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device() == ref.device(), name, " must be on ", ref.device(), ", got ", t.device());
}

// Vectorised reductions (the simd pragma lets the compiler reorder the sum into lanes; the order
// is still fixed, so results are deterministic). Kept out of macros: a pragma cannot sit inside
// an AT_DISPATCH lambda.
template <typename acc_t, typename a_t, typename b_t>
inline acc_t dot_acc(const a_t* a, const b_t* b, int64_t n) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += static_cast<acc_t>(a[i]) * static_cast<acc_t>(b[i]);
  return t;
}

template <typename acc_t, typename a_t>
inline acc_t sum_acc(const a_t* a, int64_t n) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += static_cast<acc_t>(a[i]);
  return t;
}

template <typename acc_t, typename a_t>
inline acc_t sumsq_acc(const a_t* a, int64_t n) {
  acc_t t = 0;
#pragma omp simd reduction(+ : t)
  for (int64_t i = 0; i < n; ++i) t += static_cast<acc_t>(a[i]) * static_cast<acc_t>(a[i]);
  return t;
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
