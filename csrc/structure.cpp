// Schemas of the centroid and category-structure ops (docs/backend_contract.md, "centroids",
// "intra", "inter").
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(icakd_fast_C, m) {
  m.def("centroids_fwd(Tensor sums, Tensor counts, Tensor feats, Tensor labels) -> (Tensor, Tensor)");
  m.def("intra_fwd(Tensor f_s, Tensor f_t, Tensor mu_s, Tensor mu_t, Tensor labels, Tensor valid) -> Tensor");
  m.def(
      "intra_bwd(Tensor grad_out, Tensor f_s, Tensor f_t, Tensor mu_s, Tensor mu_t, Tensor labels, "
      "Tensor valid) -> Tensor");
  m.def("inter_fwd(Tensor mu_s, Tensor mu_t, Tensor valid, float eps) -> Tensor");
  // (grad_mu_s, grad_mu_t) in the accumulation dtype; a gradient not asked for is an empty tensor.
  m.def(
      "inter_bwd(Tensor grad_out, Tensor mu_s, Tensor mu_t, Tensor valid, Tensor? live, bool need_s, "
      "bool need_t, float eps) -> (Tensor, Tensor)");
  // The Gram form as two steps: the forward also returns K = A^T A (float64 [Ds + Dt, Ds + Dt]),
  // which the backward takes instead of recomputing it (O(C D^2) saved). max_live >= 0: at most
  // that many rows are valid and live (the caller's bound), so only dL/dmu_s of max_live rows is
  // computed, without a host synchronisation (grad_mu_t, when asked for, still takes every row).
  m.def("inter_gram_fwd(Tensor mu_s, Tensor mu_t, Tensor valid, float eps) -> (Tensor, Tensor)");
  m.def(
      "inter_gram_bwd(Tensor grad_out, Tensor gram, Tensor mu_s, Tensor mu_t, Tensor valid, Tensor? live, "
      "bool need_s, bool need_t, float eps, int max_live=-1) -> (Tensor, Tensor)");
}
