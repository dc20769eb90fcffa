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
  // CAM constraint (attention-transfer form) of maps of one resolution: mean_b |q_s[b] - q_t[b]|^2
  // with q = vec(cam) / max(|vec(cam)|, eps); the teacher map is a constant. Returns (loss,
  // q_s [B, H*W], norm_s [B]) in float32 (float64 for float64 maps); the backward takes q_s, q_t's
  // map and norm_s and gives dL/dcam_s in cam_s's dtype.
  m.def("cam_loss_fwd(Tensor cam_s, Tensor cam_t, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("cam_loss_bwd(Tensor grad_out, Tensor cam_s, Tensor cam_t, Tensor q_s, Tensor norm_s, float eps) -> Tensor");
  // One network's whole CAM step with a GAP + linear head (CPU kernel only): weights =
  // fc_weight[targets] / (H*W) (divided in fc_weight's dtype), then what cam_fwd(features, weights,
  // true) returns and, given the teacher's map cam_t [B,H,W] (a constant), what cam_loss_fwd(cam,
  // cam_t, eps) returns. Returns (cam, pooled, loss, pool_w, q_s, norm_s, q_t) with q_t the
  // teacher's unit rows [B, H*W] (the loss's dtype); loss, q_s, norm_s and q_t are empty tensors
  // without cam_t. targets are int64 in [0, C).
  m.def(
      "class_activation_fwd(Tensor features, Tensor fc_weight, Tensor targets, Tensor? cam_t, float eps) -> "
      "(Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor)");
  // (grad_features, grad_fc_weight): cam_loss_bwd's math on the saved q_s, norm_s and q_t (grad_loss
  // given), then cam_bwd's (the weights gathered again from fc_weight and targets), then the weights'
  // gradient / (H*W) added into the rows targets of a [C, K] tensor in fc_weight's dtype
  // (accumulated in float32, float64 for float64). A gradient that is not needed is returned as an
  // empty tensor.
  m.def(
      "class_activation_bwd(Tensor? grad_pooled, Tensor? grad_loss, Tensor features, Tensor fc_weight, "
      "Tensor targets, Tensor cam, Tensor pool_w, Tensor q_s, Tensor norm_s, Tensor q_t, float eps, "
      "bool need_features, bool need_fc_weight) -> (Tensor, Tensor)");
}
