// Schemas of the Grad-CAM ops (see docs/backend_contract.md, section "cam").
#include <torch/library.h>

TORCH_LIBRARY_FRAGMENT(icakd_fast_C, m) {
  // (cam [B,H,W], pooled [B,K], pool_w [B,H*W]); pooled and pool_w are empty when with_pooled is false.
  m.def("cam_fwd(Tensor features, Tensor weights, bool with_pooled) -> (Tensor, Tensor, Tensor)");
  // (grad_features, grad_weights); a gradient that is not needed is returned as an empty tensor.
  m.def(
      "cam_bwd(Tensor? grad_cam, Tensor? grad_pooled, Tensor features, Tensor weights, Tensor cam, "
      "Tensor pool_w, bool need_features, bool need_weights) -> (Tensor, Tensor)");
  m.def("spatial_mean(Tensor grads) -> Tensor");
}
