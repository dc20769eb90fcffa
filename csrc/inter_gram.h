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
// match the teacher's, so A is built, and K and A (S K S) accumulated, in float64, in row chunks
// (A never exists as a whole); the result is then more accurate than the float32 direct form.
// float64 GEMMs are fast on CPUs and on data-centre GPUs (sm_80, sm_90, sm_100: tensor-core
// DGEMM), and 32-64x slower than float32 on other GPUs: inter_use_gram() takes that into account.
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <tuple>
#include <vector>

#include "checks.h"

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

// rows per float64 chunk of A: at most 2^22 elements (32 MiB); ICAKD_GRAM_CHUNK_ELEMS overrides
// the element count (tests use tiny chunks to cover the chunk loops at small shapes)
inline int64_t gram_chunk_rows(int64_t D) {
  int64_t elems = int64_t(1) << 22;
  if (const char* env = std::getenv("ICAKD_GRAM_CHUNK_ELEMS")) {
    const long long v = std::atoll(env);
    if (v > 0) elems = v;
  }
  return std::max<int64_t>(1, elems / std::max<int64_t>(D, 1));
}

// Rows of A = [v n_s, v n_t] in float64, built from the given rows of mu_s, mu_t and valid
// (any floating dtype, any device), with the rows' norms |mu_s|, |mu_t| (float64).
struct GramRows {
  at::Tensor A, norm_s, norm_t;
};

inline GramRows gram_rows64(const at::Tensor& ms_rows, const at::Tensor& mt_rows, const at::Tensor& valid_rows,
                            double eps) {
  const int64_t n = ms_rows.size(0), Ds = ms_rows.size(1), Dt = mt_rows.size(1);
  const at::Tensor ms = ms_rows.to(at::kDouble), mt = mt_rows.to(at::kDouble);
  const at::Tensor v = valid_rows.to(at::kDouble).unsqueeze(1);
  GramRows r;
  r.norm_s = at::linalg_vector_norm(ms, 2, {1}, false, std::nullopt);
  r.norm_t = at::linalg_vector_norm(mt, 2, {1}, false, std::nullopt);
  r.A = at::empty({n, Ds + Dt}, ms.options());
  at::Tensor a_s = r.A.narrow(1, 0, Ds), a_t = r.A.narrow(1, Ds, Dt);
  at::div_out(a_s, ms, r.norm_s.clamp_min(eps).unsqueeze(1)).mul_(v);
  at::div_out(a_t, mt, r.norm_t.clamp_min(eps).unsqueeze(1)).mul_(v);
  return r;
}

// Column blocks of K's symmetric product: K = A^T A needs only its blocks on and above the
// diagonal, nb (nb + 1) / 2 of nb^2 (75% of the flops at nb = 2, 62.5% at 4), the rest mirrored.
// Blocks stay at least 1024 columns wide on a GPU (a narrower GEMM output has too few tiles to
// fill the device) and 256 on a CPU; ICAKD_GRAM_BLOCKS overrides the count (tests).
inline std::vector<int64_t> gram_block_bounds(int64_t D, bool cuda) {
  int64_t nb = std::max<int64_t>(1, std::min<int64_t>(4, D / (cuda ? 1024 : 256)));
  if (const char* env = std::getenv("ICAKD_GRAM_BLOCKS")) {
    const long long v = std::atoll(env);
    if (v > 0) nb = std::min<int64_t>(v, std::max<int64_t>(D, 1));
  }
  std::vector<int64_t> bounds;
  for (int64_t i = 0; i <= nb; ++i) bounds.push_back(D * i / nb);
  return bounds;
}

// K = A^T A in float64, A built chunk by chunk from mu_s / mu_t (never whole: the extra memory is
// one chunk plus K, whatever C); only the blocks on and above the diagonal are multiplied
inline at::Tensor gram64(const at::Tensor& mu_s, const at::Tensor& mu_t, const at::Tensor& valid, double eps) {
  const int64_t C = mu_s.size(0), D = mu_s.size(1) + mu_t.size(1);
  at::Tensor K = at::zeros({D, D}, mu_s.options().dtype(at::kDouble));
  const std::vector<int64_t> b = gram_block_bounds(D, mu_s.is_cuda());
  const size_t nb = b.size() - 1;
  const int64_t T = gram_chunk_rows(D);
  for (int64_t r0 = 0; r0 < C; r0 += T) {
    const int64_t n = std::min(T, C - r0);
    const at::Tensor A = gram_rows64(mu_s.narrow(0, r0, n), mu_t.narrow(0, r0, n), valid.narrow(0, r0, n), eps).A;
    for (size_t i = 0; i < nb; ++i) {
      const at::Tensor Ai = A.narrow(1, b[i], b[i + 1] - b[i]);
      at::Tensor Krow = K.narrow(0, b[i], b[i + 1] - b[i]);
      // the row of blocks (i, i..nb-1) in one product: columns b[i].. of A
      Krow.narrow(1, b[i], D - b[i]).addmm_(Ai.t(), A.narrow(1, b[i], D - b[i]));
    }
  }
  for (size_t i = 0; i + 1 < nb; ++i) {  // mirror the blocks below the diagonal
    const int64_t w = b[i + 1] - b[i];
    K.narrow(0, b[i + 1], D - b[i + 1]).narrow(1, b[i], w).copy_(K.narrow(0, b[i], w).narrow(1, b[i + 1], D - b[i + 1]).t());
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

// Backward of the Gram form from K: (dL/dmu_s if need_s, dL/dmu_t if need_t; empty otherwise) in
// the dtype of `opts`. `rows`: int64 indices of the rows to compute (the others are zero), or an
// undefined tensor for every row; `live`: bool [C] or undefined -- rows of dL/dmu_s outside it are
// zero. Per chunk of rows, all in float64: dL/dn = 4 grad_out / |V|^2 * A_rows (S K S), then the
// normalisation's backward. No host synchronisation.
inline std::tuple<at::Tensor, at::Tensor> gram_backward(const at::Tensor& grad_out, const at::Tensor& K,
                                                        const at::Tensor& mu_s, const at::Tensor& mu_t,
                                                        const at::Tensor& valid, double eps, const at::Tensor& rows,
                                                        const at::Tensor& live, bool need_s, bool need_t,
                                                        const at::TensorOptions& opts) {
  const int64_t C = mu_s.size(0);
  const bool all_rows = !rows.defined();
  auto alloc = [&](bool need, int64_t width) {
    if (!need) return at::empty({0}, opts);
    return all_rows ? at::empty({C, width}, opts) : at::zeros({C, width}, opts);
  };
  at::Tensor gs = alloc(need_s, mu_s.size(1)), gt = alloc(need_t, mu_t.size(1));
  const at::Tensor nv = valid.sum().to(at::kDouble);
  const at::Tensor s64 = grad_out.reshape({}).to(at::kDouble) * 4 / (nv * nv).clamp_min(1);
  const int64_t Ds = mu_s.size(1), Dt = mu_t.size(1), D = Ds + Dt;
  const int64_t col0 = need_s ? 0 : Ds;
  const int64_t ncol = (need_s ? Ds : 0) + (need_t ? Dt : 0);
  // S K S: the student-teacher blocks change sign
  at::Tensor M = K.narrow(1, col0, ncol).clone();
  if (need_s) M.narrow(0, Ds, Dt).narrow(1, 0, Ds).neg_();
  if (need_t) M.narrow(0, 0, Ds).narrow(1, ncol - Dt, Dt).neg_();
  const int64_t R = all_rows ? C : rows.size(0);
  const int64_t T = gram_chunk_rows(std::max(D, ncol));
  for (int64_t r0 = 0; r0 < R; r0 += T) {
    const int64_t n = std::min(T, R - r0);
    const at::Tensor idx = all_rows ? at::Tensor() : rows.narrow(0, r0, n);
    auto pick = [&](const at::Tensor& x) { return all_rows ? x.narrow(0, r0, n) : x.index_select(0, idx); };
    const GramRows g = gram_rows64(pick(mu_s), pick(mu_t), pick(valid), eps);
    at::Tensor G = at::mm(g.A, M).mul_(s64);  // [n, ncol]
    for (int part = 0; part < 2; ++part) {
      if ((part == 0 && !need_s) || (part == 1 && !need_t)) continue;
      at::Tensor dn = part == 0 ? G.narrow(1, 0, Ds) : G.narrow(1, ncol - Dt, Dt);
      normalize_backward_(dn, part == 0 ? g.A.narrow(1, 0, Ds) : g.A.narrow(1, Ds, Dt),
                          part == 0 ? g.norm_s : g.norm_t, eps);
      if (part == 0 && live.defined()) dn.mul_(pick(live).to(at::kDouble).unsqueeze(1));
      at::Tensor& out = part == 0 ? gs : gt;
      if (all_rows) {
        out.narrow(0, r0, n).copy_(dn);
      } else {
        out.index_copy_(0, idx, dn.to(out.scalar_type()));
      }
    }
  }
  return {gs, gt};
}

// Rows for a backward that needs dL/dmu_s of live rows only, when the caller bounds their number
// (max_live >= 0, e.g. the batch size when `live` marks the classes of a batch): the first max_live
// rows of a stable sort that puts the wanted rows (valid and live) first -- no host
// synchronisation, O(max_live D^2) instead of O(C D^2). The bound is the caller's promise (the
// Python API checks it on the device). Undefined (every row) when a bound does not help.
inline at::Tensor bounded_live_rows(const at::Tensor& valid, const at::Tensor& live, int64_t max_live) {
  const int64_t C = valid.size(0);
  if (!live.defined() || max_live < 0 || max_live >= C) return at::Tensor();
  const at::Tensor unwanted = at::logical_not(at::logical_and(valid, live)).to(at::kByte);
  const at::Tensor order = std::get<1>(at::sort(unwanted, /*stable=*/true, /*dim=*/0, /*descending=*/false));
  return order.narrow(0, 0, max_live);
}

// Loss of the Gram form and K itself (saved by the autograd Function for the backward, which then
// skips the O(C D^2) product): (loss in `acc`, K [D, D] float64).
inline std::tuple<at::Tensor, at::Tensor> gram_forward(const at::Tensor& mu_s, const at::Tensor& mu_t,
                                                       const at::Tensor& valid, double eps, at::ScalarType acc) {
  at::Tensor K = gram64(mu_s, mu_t, valid, eps);
  const at::Tensor nv = valid.sum().to(at::kDouble);
  at::Tensor loss = (gram_sum_sq(K, mu_s.size(1)) / (nv * nv).clamp_min(1)).to(acc);
  return {loss, K};
}

}  // namespace icakd
