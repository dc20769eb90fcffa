// CPU kernels of the Grad-CAM ops: one image per task (at::parallel_for over the batch).
//
// The feature map is read twice per image in the forward (weighted channel sum, then the
// CAM-weighted pooling) and once in the backward; an image ([K, H*W]) stays in cache between the
// passes. Everything accumulates in float32 (float64 for float64 inputs).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <vector>

#include "../common.h"

namespace icakd {
namespace {

using at::Tensor;

int64_t image_grain(int64_t per_image) {
  // about 32k elements of work per task at least
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(per_image, 1));
}

// One image of the forward. Inlined into cam_fwd_image_f32 (compiled for several instruction
// sets, chosen at load time) and into the generic instantiations.
template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void cam_fwd_image(const scalar_t* Ab, const acc_t* wb, acc_t* cb, acc_t* pw,
                                                           acc_t* ob, acc_t* sp, int64_t K, int64_t P,
                                                           bool with_pooled) {
  for (int64_t p = 0; p < P; ++p) sp[p] = acc_t(0);
  for (int64_t k = 0; k < K; ++k) {
    const acc_t wk = wb[k];
    const scalar_t* row = Ab + k * P;
    for (int64_t p = 0; p < P; ++p) sp[p] += wk * static_cast<acc_t>(row[p]);
  }
  acc_t lo = std::numeric_limits<acc_t>::infinity();
  acc_t hi = -std::numeric_limits<acc_t>::infinity();
  for (int64_t p = 0; p < P; ++p) {
    const acc_t v = sp[p] > acc_t(0) ? sp[p] : acc_t(0);
    cb[p] = v;
    lo = std::min(lo, v);
    hi = std::max(hi, v);
  }
  if (!with_pooled) return;
  // min-max map m, pooling weights m / sum(m) (uniform when sum(m) == 0)
  const acc_t den_mm = (hi - lo) + acc_t(1e-7);
  acc_t msum = 0;
  for (int64_t p = 0; p < P; ++p) {
    const acc_t m = (cb[p] - lo) / den_mm;
    pw[p] = m;
    msum += m;
  }
  if (msum > acc_t(0)) {
    for (int64_t p = 0; p < P; ++p) pw[p] = pw[p] / msum;
  } else {
    const acc_t u = acc_t(1) / static_cast<acc_t>(P);
    for (int64_t p = 0; p < P; ++p) pw[p] = u;
  }
  for (int64_t k = 0; k < K; ++k) ob[k] = dot_acc<acc_t>(pw, Ab + k * P, P);
}

#if defined(__GNUC__) && defined(__x86_64__) && !defined(__clang__)
#define ICAKD_TARGET_CLONES __attribute__((target_clones("avx512f", "avx2", "default")))
#else
#define ICAKD_TARGET_CLONES
#endif

ICAKD_TARGET_CLONES
void cam_fwd_image_f32(const float* Ab, const float* wb, float* cb, float* pw, float* ob, float* sp, int64_t K,
                       int64_t P, bool with_pooled) {
  cam_fwd_image<float, float>(Ab, wb, cb, pw, ob, sp, K, P, with_pooled);
}

template <typename scalar_t, typename acc_t>
void cam_fwd_kernel(const scalar_t* A, const acc_t* w, acc_t* cam, acc_t* pooled, acc_t* pool_w, int64_t B,
                    int64_t K, int64_t P, bool with_pooled) {
  at::parallel_for(0, B, image_grain(K * P), [&](int64_t b0, int64_t b1) {
    std::vector<acc_t> s(P);
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* Ab = A + b * K * P;
      acc_t* pw = with_pooled ? pool_w + b * P : nullptr;
      acc_t* ob = with_pooled ? pooled + b * K : nullptr;
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        cam_fwd_image_f32(Ab, w + b * K, cam + b * P, pw, ob, s.data(), K, P, with_pooled);
      } else {
        cam_fwd_image<scalar_t, acc_t>(Ab, w + b * K, cam + b * P, pw, ob, s.data(), K, P, with_pooled);
      }
    }
  });
}

template <typename scalar_t, typename acc_t>
inline __attribute__((always_inline)) void cam_bwd_image(const scalar_t* Ab, const acc_t* wb, const acc_t* gsb,
                                                           const acc_t* gpb, const acc_t* pwb, scalar_t* gfb,
                                                           acc_t* gwb, int64_t K, int64_t P) {
  for (int64_t k = 0; k < K; ++k) {
    const scalar_t* row = Ab + k * P;
    if (gfb) {
      scalar_t* out = gfb + k * P;
      const acc_t wk = wb[k];
      const acc_t gk = gpb ? gpb[k] : acc_t(0);
      if (gsb && pwb) {
        for (int64_t p = 0; p < P; ++p) out[p] = static_cast<scalar_t>(gsb[p] * wk + gk * pwb[p]);
      } else if (gsb) {
        for (int64_t p = 0; p < P; ++p) out[p] = static_cast<scalar_t>(gsb[p] * wk);
      } else if (pwb) {
        for (int64_t p = 0; p < P; ++p) out[p] = static_cast<scalar_t>(gk * pwb[p]);
      } else {
        for (int64_t p = 0; p < P; ++p) out[p] = static_cast<scalar_t>(0);
      }
    }
    if (gwb) gwb[k] = gsb ? dot_acc<acc_t>(gsb, row, P) : acc_t(0);
  }
}

ICAKD_TARGET_CLONES
void cam_bwd_image_f32(const float* Ab, const float* wb, const float* gsb, const float* gpb, const float* pwb,
                       float* gfb, float* gwb, int64_t K, int64_t P) {
  cam_bwd_image<float, float>(Ab, wb, gsb, gpb, pwb, gfb, gwb, K, P);
}

template <typename scalar_t, typename acc_t>
void cam_bwd_kernel(const scalar_t* A, const acc_t* w, const acc_t* gs, const acc_t* gp, const acc_t* pw,
                    scalar_t* gf, acc_t* gw, int64_t B, int64_t K, int64_t P) {
  at::parallel_for(0, B, image_grain(K * P), [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
      const scalar_t* Ab = A + b * K * P;
      const acc_t* gsb = gs ? gs + b * P : nullptr;
      const acc_t* gpb = gp ? gp + b * K : nullptr;
      const acc_t* pwb = gp ? pw + b * P : nullptr;
      scalar_t* gfb = gf ? gf + b * K * P : nullptr;
      acc_t* gwb = gw ? gw + b * K : nullptr;
      if constexpr (std::is_same_v<scalar_t, float> && std::is_same_v<acc_t, float>) {
        cam_bwd_image_f32(Ab, w + b * K, gsb, gpb, pwb, gfb, gwb, K, P);
      } else {
        cam_bwd_image<scalar_t, acc_t>(Ab, w + b * K, gsb, gpb, pwb, gfb, gwb, K, P);
      }
    }
  });
}

void check_cam_inputs(const Tensor& features, const Tensor& weights) {
  check_float(features, "features");
  check_float(weights, "weights");
  check_dim(features, 4, "features");
  check_dim(weights, 2, "weights");
  TORCH_CHECK(weights.size(0) == features.size(0) && weights.size(1) == features.size(1), "weights must be [B, K] = [",
              features.size(0), ", ", features.size(1), "], got ", weights.sizes());
  check_same_device(features, weights, "weights");
}

std::tuple<Tensor, Tensor, Tensor> cam_fwd_cpu(const Tensor& features, const Tensor& weights, bool with_pooled) {
  check_cam_inputs(features, weights);
  const int64_t B = features.size(0), K = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t P = H * W;
  const auto out_dt = at::promote_types(features.scalar_type(), weights.scalar_type());
  const auto acc = acc_type_of(features.scalar_type(), weights.scalar_type());
  const Tensor A = features.contiguous();
  const Tensor w = weights.to(acc).contiguous();
  const auto opts = features.options().dtype(acc);
  Tensor cam = at::empty({B, H, W}, opts);
  Tensor pooled = with_pooled ? at::empty({B, K}, opts) : at::empty({0}, features.options().dtype(out_dt));
  Tensor pool_w = with_pooled ? at::empty({B, P}, opts) : at::empty({0}, opts);
  if (B > 0 && P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "icakd_cam_fwd_cpu", [&] {
      if (acc == at::kDouble) {
        cam_fwd_kernel<scalar_t, double>(A.const_data_ptr<scalar_t>(), w.const_data_ptr<double>(),
                                         cam.data_ptr<double>(), with_pooled ? pooled.data_ptr<double>() : nullptr,
                                         with_pooled ? pool_w.data_ptr<double>() : nullptr, B, K, P, with_pooled);
      } else {
        cam_fwd_kernel<scalar_t, float>(A.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), cam.data_ptr<float>(),
                                        with_pooled ? pooled.data_ptr<float>() : nullptr,
                                        with_pooled ? pool_w.data_ptr<float>() : nullptr, B, K, P, with_pooled);
      }
    });
  } else if (with_pooled) {
    pooled.zero_();
  }
  return {cam.to(out_dt), pooled.to(out_dt), pool_w};
}

std::tuple<Tensor, Tensor> cam_bwd_cpu(const std::optional<Tensor>& grad_cam, const std::optional<Tensor>& grad_pooled,
                                       const Tensor& features, const Tensor& weights, const Tensor& cam,
                                       const Tensor& pool_w, bool need_features, bool need_weights) {
  check_cam_inputs(features, weights);
  const int64_t B = features.size(0), K = features.size(1), H = features.size(2), W = features.size(3);
  const int64_t P = H * W;
  const auto acc = acc_type_of(features.scalar_type(), weights.scalar_type());
  const auto opts = features.options().dtype(acc);
  const bool has_gc = grad_cam.has_value() && grad_cam->defined();
  const bool has_gp = grad_pooled.has_value() && grad_pooled->defined();
  Tensor gs, gp, pw;
  if (has_gc) {
    TORCH_CHECK(grad_cam->numel() == B * P, "grad_cam must have B*H*W elements, got ", grad_cam->sizes());
    TORCH_CHECK(cam.numel() == B * P, "cam must have B*H*W elements, got ", cam.sizes());
    gs = (grad_cam->reshape({B, P}).to(acc) * cam.reshape({B, P}).gt(0).to(acc)).contiguous();
  }
  if (has_gp) {
    TORCH_CHECK(grad_pooled->numel() == B * K, "grad_pooled must be [B, K], got ", grad_pooled->sizes());
    TORCH_CHECK(pool_w.numel() == B * P, "pool_w must be [B, H*W], got ", pool_w.sizes());
    gp = grad_pooled->reshape({B, K}).to(acc).contiguous();
    pw = pool_w.reshape({B, P}).to(acc).contiguous();
  }
  const Tensor A = features.contiguous();
  const Tensor w = weights.to(acc).contiguous();
  Tensor gf = need_features ? at::empty({B, K, H, W}, features.options()) : at::empty({0}, features.options());
  Tensor gw = need_weights ? at::empty({B, K}, opts) : at::empty({0}, opts);
  if ((need_features || need_weights) && B * K * P > 0) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "icakd_cam_bwd_cpu", [&] {
      if (acc == at::kDouble) {
        cam_bwd_kernel<scalar_t, double>(A.const_data_ptr<scalar_t>(), w.const_data_ptr<double>(),
                                         has_gc ? gs.const_data_ptr<double>() : nullptr,
                                         has_gp ? gp.const_data_ptr<double>() : nullptr,
                                         has_gp ? pw.const_data_ptr<double>() : nullptr,
                                         need_features ? gf.data_ptr<scalar_t>() : nullptr,
                                         need_weights ? gw.data_ptr<double>() : nullptr, B, K, P);
      } else {
        cam_bwd_kernel<scalar_t, float>(A.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(),
                                        has_gc ? gs.const_data_ptr<float>() : nullptr,
                                        has_gp ? gp.const_data_ptr<float>() : nullptr,
                                        has_gp ? pw.const_data_ptr<float>() : nullptr,
                                        need_features ? gf.data_ptr<scalar_t>() : nullptr,
                                        need_weights ? gw.data_ptr<float>() : nullptr, B, K, P);
      }
    });
  } else {
    if (need_features) gf.zero_();
    if (need_weights) gw.zero_();
  }
  return {gf, need_weights ? gw.to(weights.scalar_type()) : at::empty({0}, weights.options())};
}

Tensor spatial_mean_cpu(const Tensor& grads) {
  check_float(grads, "grads");
  check_dim(grads, 4, "grads");
  const int64_t B = grads.size(0), K = grads.size(1), P = grads.size(2) * grads.size(3);
  const Tensor g = grads.contiguous();
  Tensor out = at::empty({B, K}, grads.options());
  if (B * K == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "icakd_spatial_mean_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const scalar_t* src = g.const_data_ptr<scalar_t>();
    scalar_t* dst = out.data_ptr<scalar_t>();
    at::parallel_for(0, B * K, std::max<int64_t>(1, 32768 / std::max<int64_t>(P, 1)), [&](int64_t r0, int64_t r1) {
      for (int64_t r = r0; r < r1; ++r) {
        const scalar_t* row = src + r * P;
        const acc_t t = sum_acc<acc_t>(row, P);
        dst[r] = static_cast<scalar_t>(P > 0 ? t / static_cast<acc_t>(P) : std::numeric_limits<acc_t>::quiet_NaN());
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CPU, m) {
  m.impl("cam_fwd", &cam_fwd_cpu);
  m.impl("cam_bwd", &cam_bwd_cpu);
  m.impl("spatial_mean", &spatial_mean_cpu);
}

}  // namespace icakd
