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
  // The whole structure term of one step (docs/backend_contract.md, "structure"): both networks'
  // centroids over bank sums + the batch rows kept by keep_* (undefined: every row), the valid
  // classes (both totals >= min_count), the intra loss and the inter loss with the batch's classes
  // live. Returns (intra, inter, mu_s, mu_t, valid, total_s, gram, unit_s, unit_t, norm_s); gram
  // is the float64 K of the Gram form, or an empty tensor when the direct form ran. The teacher
  // side is a constant. With normalize, f_s and f_t are raw rows that the op first normalises as
  // F.normalize(dim=1) does, with eps: unit_s, unit_t are those unit rows (in f_s's dtype) and
  // norm_s the student rows' norms (float32, float64 for float64 rows); without it, f_s and f_t
  // are the unit rows and the last three outputs are empty. With projection ([D, Dx], normalize
  // only), the student's raw rows are f_s @ projection^T (f_s [B, Dx]; the product in float32,
  // float64 if either is float64), then normalised.
  m.def(
      "structure_fwd(Tensor sums_s, Tensor count_s, Tensor sums_t, Tensor count_t, Tensor f_s, Tensor f_t, "
      "Tensor labels, Tensor? keep_s, Tensor? keep_t, int min_count, float eps, bool normalize=False, "
      "Tensor? projection=None) "
      "-> (Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (dL/df_s, dL/dprojection) of structure_fwd from the gradients of its two losses; f_s and f_t
  // are the unit rows. With norm_s (structure_fwd's, after normalize), the gradient of the raw
  // rows (in f_s's dtype); with x_s and projection (structure_fwd's f_s and projection), the
  // gradients of those two (in their dtypes). dL/dprojection is an empty tensor without it.
  m.def(
      "structure_bwd(Tensor grad_intra, Tensor grad_inter, Tensor f_s, Tensor f_t, Tensor mu_s, Tensor mu_t, "
      "Tensor valid, Tensor total_s, Tensor labels, Tensor? keep_s, Tensor gram, float eps, "
      "Tensor? norm_s=None, Tensor? x_s=None, Tensor? projection=None) -> (Tensor, Tensor)");
}
