// Inter-class loss in Gram form, shared by the CPU and CUDA wrappers (ATen ops only, so the same
// code runs on either device and is tested on CPU).
//
// With A = [N_s, N_t] ([C, Ds + Dt], rows v * n) and S = diag(+1 (Ds), -1 (Dt)), the difference
// of the cosine matrices is E = A S A^T. Its squared Frobenius norm and the backward only need
// the small Gram matrix K = A^T A ([Ds + Dt]^2):
//
//   sum_{k,l} E_kl^2 = tr(S K S K) = |K_ss|^2 + |K_tt|^2 - 2 |K_st|^2
//   dL/dA ~ E A S    = A (S K S)            (columns Ds.. of A S carry the minus sign)
//
// This costs O(C D^2) instead of O(C^2 D): the cheaper form once C exceeds a few D (ImageNet-21k:
// C = 21841, D = 2560). The three Frobenius norms nearly cancel when the student's relations
// match the teacher's, so K and A (S K S) are accumulated in float64 (A is converted in row
// chunks, never as a whole); the result is then more accurate than the float32 direct form.
// float64 GEMMs are fast on CPUs and on data-centre GPUs (sm_80, sm_90, sm_100: tensor-core
// DGEMM), and 32-64x slower than float32 on other GPUs: inter_use_gram() takes that into account.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>

namespace icakd {

// ICAKD_INTER_FORM=direct|gram forces a form (tests, benchmarks): 0 direct, 1 gram, -1 auto
// (unset or anything else).
inline int inter_form_override() {
  if (const char* env = std::getenv("ICAKD_INTER_FORM")) {
    if (std::strcmp(env, "direct") == 0) return 0;
    if (std::strcmp(env, "gram") == 0) return 1;
  }
  return -1;
}

// Auto picks the Gram form when its float64 GEMM work, 2 C D^2 (times the float64 slowdown of the
// device), is below the direct form's C^2 D (the symmetric forward).
inline bool inter_use_gram(int64_t C, int64_t D, bool slow_fp64) {
  const int forced = inter_form_override();
  if (forced >= 0) return forced == 1;
  const int64_t factor = slow_fp64 ? 64 : 2;
  return C >= factor * std::max<int64_t>(D, 1);
}

// Backward when the host knows the R rows to compute (CPU): direct 4 R C D float32 flops against
// Gram 2 (2 C D^2 + 2 R D ncol) float64 flops, float64 counted twice.
inline bool inter_bwd_use_gram(int64_t C, int64_t D, int64_t R, int64_t ncol) {
  const int forced = inter_form_override();
  if (forced >= 0) return forced == 1;
  return static_cast<double>(C) * D + static_cast<double>(R) * ncol < static_cast<double>(R) * C;
}

// rows per float64 chunk of A: at most 2^23 elements (64 MiB)
inline int64_t gram_chunk_rows(int64_t D) {
  return std::max<int64_t>(1, (int64_t(1) << 23) / std::max<int64_t>(D, 1));
}

// K = A^T A in float64 (A: [R, D] in any floating dtype)
inline at::Tensor gram64(const at::Tensor& A) {
  const int64_t R = A.size(0), D = A.size(1);
  if (A.scalar_type() == at::kDouble) return at::mm(A.t(), A);
  at::Tensor K = at::zeros({D, D}, A.options().dtype(at::kDouble));
  const int64_t T = gram_chunk_rows(D);
  for (int64_t r0 = 0; r0 < R; r0 += T) {
    const at::Tensor Ac = A.narrow(0, r0, std::min(T, R - r0)).to(at::kDouble);
    K.addmm_(Ac.t(), Ac);
  }
  return K;
}

// sum_{k,l} E_kl^2 from K (float64 0-dim tensor on K's device)
inline at::Tensor gram_sum_sq(const at::Tensor& K, int64_t Ds) {
  const int64_t Dt = K.size(0) - Ds;
  const at::Tensor ss = K.narrow(0, 0, Ds).narrow(1, 0, Ds);
  const at::Tensor tt = K.narrow(0, Ds, Dt).narrow(1, Ds, Dt);
  const at::Tensor st = K.narrow(0, 0, Ds).narrow(1, Ds, Dt);
  return ss.square().sum() + tt.square().sum() - 2 * st.square().sum();
}

// (E A S)[rows, cols] = A_rows (S K S)[:, cols] for cols = [0, Ds) if need_s, then [Ds, D) if
// need_t; returned in A's dtype, [R, ncol].
inline at::Tensor gram_rows_times(const at::Tensor& A_rows, const at::Tensor& K, int64_t Ds, bool need_s,
                                  bool need_t) {
  const int64_t D = K.size(0), Dt = D - Ds;
  const int64_t col0 = need_s ? 0 : Ds;
  const int64_t ncol = (need_s ? Ds : 0) + (need_t ? Dt : 0);
  // S K S: the student-teacher blocks change sign
  at::Tensor M = K.narrow(1, col0, ncol).clone();
  if (need_s) M.narrow(0, Ds, Dt).narrow(1, 0, Ds).neg_();
  if (need_t) M.narrow(0, 0, Ds).narrow(1, ncol - Dt, Dt).neg_();
  const int64_t R = A_rows.size(0);
  at::Tensor out = at::empty({R, ncol}, A_rows.options());
  if (A_rows.scalar_type() == at::kDouble) return at::mm_out(out, A_rows, M);
  const int64_t T = gram_chunk_rows(std::max(D, ncol));
  for (int64_t r0 = 0; r0 < R; r0 += T) {
    const int64_t n = std::min(T, R - r0);
    out.narrow(0, r0, n).copy_(at::mm(A_rows.narrow(0, r0, n).to(at::kDouble), M));
  }
  return out;
}

}  // namespace icakd
