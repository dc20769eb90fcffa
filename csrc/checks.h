// Argument validation and output allocation shared by the CPU (cpu/*.cpp) and CUDA (cuda/*.cu)
// host wrappers of icakd_fast._C. Host side only: no CUDA headers here.
//
// Rules every wrapper follows (docs/cpp_extension.md, "Argument checks"):
//  1. the op's check_* function runs first, before any allocation, conversion, data_ptr() read or
//     kernel launch; it reads metadata only (defined, dtype, dim, sizes, device) and returns the
//     sizes the kernel needs;
//  2. every tensor argument must be on the kernel's device type and on one device (the CUDA
//     wrappers accept a one-element CPU tensor for the scalar `grad_out` only): a kernel can be
//     reached with tensors of another device (a mix of CPU and CUDA arguments dispatches to the
//     CUDA kernel), and a host pointer handed to a kernel is not an error the kernel can report;
//  3. values (labels, classes) are validated on the host for CPU tensors only
//     (check_index_range); the CUDA kernels never read the host copy of a value and skip indices
//     outside the valid range (no host synchronisation);
//  4. every message names the argument.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <initializer_list>
#include <optional>
#include <tuple>

#include "common.h"

namespace icakd {

// ---------------------------------------------------------------------------------------------
// generic checks
// ---------------------------------------------------------------------------------------------

inline void check_defined(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.defined(), name, " must be a defined tensor");
}

inline void check_float(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(at::isFloatingType(t.scalar_type()), name, " must be a floating tensor, got ", t.scalar_type());
}

inline void check_dim(const at::Tensor& t, int64_t dim, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() == dim, name, " must be ", dim, "-D, got shape ", t.sizes());
}

inline void check_dtype(const at::Tensor& t, at::ScalarType dt, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.scalar_type() == dt, name, " must be ", dt, ", got ", t.scalar_type());
}

// t must be 1-D of length n
inline void check_vector(const at::Tensor& t, int64_t n, const char* name, const char* what) {
  check_defined(t, name);
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, name, " must be [", what, "] = [", n, "], got shape ", t.sizes());
}

inline void check_one_element(const at::Tensor& t, const char* name) {
  check_defined(t, name);
  TORCH_CHECK(t.numel() == 1, name, " must hold one element, got shape ", t.sizes());
}

struct NamedTensor {
  const at::Tensor* t;
  const char* name;
};

// Every defined tensor in `args` must be on the kernel's device type and on one device (that of
// the first argument). Called by every wrapper before it touches data.
inline c10::Device check_devices(c10::DeviceType kernel, std::initializer_list<NamedTensor> args) {
  const NamedTensor* ref = nullptr;
  for (const NamedTensor& a : args) {
    if (a.t == nullptr || !a.t->defined()) continue;
    TORCH_CHECK(a.t->device().type() == kernel, a.name, " must be a ", c10::DeviceTypeName(kernel),
                " tensor (this call runs the op's ", c10::DeviceTypeName(kernel), " kernel), got a tensor on ",
                a.t->device());
    if (ref == nullptr) ref = &a;
    TORCH_CHECK(a.t->device() == ref->t->device(), a.name, " must be on ", ref->t->device(), " (the device of ",
                ref->name, "), got ", a.t->device());
  }
  TORCH_CHECK(ref != nullptr, "no tensor argument");
  return ref->t->device();
}

// Host-side range check of an int64 index tensor (CPU tensors only: reads the values).
inline void check_index_range(const at::Tensor& idx, int64_t lo, int64_t hi, const char* name) {
  TORCH_INTERNAL_ASSERT(idx.device().is_cpu() && idx.scalar_type() == at::kLong);
  const at::Tensor c = idx.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  const int64_t n = c.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] >= lo && p[i] < hi, name, " out of range: ", name, "[", i, "] = ", p[i], " is not in [", lo,
                ", ", hi, ")");
  }
}

// Host-side upper bound of an int64 index tensor (CPU only): every value < hi.
inline void check_index_below(const at::Tensor& idx, int64_t hi, const char* name) {
  TORCH_INTERNAL_ASSERT(idx.device().is_cpu() && idx.scalar_type() == at::kLong);
  const at::Tensor c = idx.contiguous();
  const int64_t* p = c.const_data_ptr<int64_t>();
  const int64_t n = c.numel();
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(p[i] < hi, name, " out of range: ", name, "[", i, "] = ", p[i], " >= ", hi);
  }
}

// Buffers given to a mutating op may be views: work on contiguous copies and write back.
struct WritableContig {
  at::Tensor target, work;
  explicit WritableContig(const at::Tensor& t) : target(t), work(t.is_contiguous() ? t : t.contiguous()) {}
  void commit() {
    if (!work.is_same(target)) target.copy_(work);
  }
};

// ---------------------------------------------------------------------------------------------
// cam
// ---------------------------------------------------------------------------------------------

struct CamDims {
  int64_t B, K, H, W, P;
  at::ScalarType out_dt;  // promote(features, weights)
  at::ScalarType acc;     // float32, or float64 when an input is float64
};

// the dims of a feature map [B, K, H, W] whose maps are weighted by `weights` (any tensor of the
// weights' dtype)
inline CamDims cam_dims(const at::Tensor& features, const at::Tensor& weights) {
  CamDims d;
  d.B = features.size(0);
  d.K = features.size(1);
  d.H = features.size(2);
  d.W = features.size(3);
  d.P = d.H * d.W;
  d.out_dt = at::promote_types(features.scalar_type(), weights.scalar_type());
  d.acc = acc_type_of(features.scalar_type(), weights.scalar_type());
  return d;
}

inline CamDims check_cam(const at::Tensor& features, const at::Tensor& weights, c10::DeviceType kernel) {
  check_float(features, "features");
  check_float(weights, "weights");
  check_dim(features, 4, "features");
  check_dim(weights, 2, "weights");
  TORCH_CHECK(weights.size(0) == features.size(0) && weights.size(1) == features.size(1), "weights must be [B, K] = [",
              features.size(0), ", ", features.size(1), "], got shape ", weights.sizes());
  check_devices(kernel, {{&features, "features"}, {&weights, "weights"}});
  return cam_dims(features, weights);
}

// Outputs of cam_fwd, in the accumulation dtype (cam and pooled are cast to out_dt at the end).
// The CAM kernels read a feature map in place when it is contiguous NCHW or contiguous
// channels_last (NHWC); any other layout is copied to NCHW first.
inline bool cam_reads_channels_last(const at::Tensor& features) {
  return features.dim() == 4 && !features.is_contiguous() &&
         features.is_contiguous(at::MemoryFormat::ChannelsLast);
}

struct CamFwdOutputs {
  at::Tensor cam, pooled, pool_w;
};

inline CamFwdOutputs alloc_cam_fwd(const at::Tensor& features, const CamDims& d, bool with_pooled) {
  const auto opts = features.options().dtype(d.acc);
  CamFwdOutputs o;
  o.cam = at::empty({d.B, d.H, d.W}, opts);
  o.pooled = with_pooled ? at::empty({d.B, d.K}, opts) : at::empty({0}, features.options().dtype(d.out_dt));
  o.pool_w = with_pooled ? at::empty({d.B, d.P}, opts) : at::empty({0}, opts);
  return o;
}

inline std::tuple<at::Tensor, at::Tensor, at::Tensor> finish_cam_fwd(CamFwdOutputs& o, const CamDims& d,
                                                                     bool with_pooled) {
  if (with_pooled && (d.B == 0 || d.P == 0)) o.pooled.zero_();
  return {o.cam.to(d.out_dt), o.pooled.to(d.out_dt), o.pool_w};
}

// cam_bwd operands, validated and converted to the accumulation dtype (contiguous).
struct CamBwdOperands {
  CamDims d;
  bool has_gc = false, has_gp = false;
  at::Tensor gs;  // [B, P]: grad_cam * (cam > 0)
  at::Tensor gp;  // [B, K]: grad_pooled
  at::Tensor pw;  // [B, P]: pool_w
  at::Tensor w;   // [B, K]: weights
};

// grad_pooled [B, K] and the pooling weights pool_w [B, H*W] of a CAM backward
inline void check_pooled_grad(const at::Tensor& grad_pooled, const at::Tensor& pool_w, const CamDims& d) {
  check_float(grad_pooled, "grad_pooled");
  check_float(pool_w, "pool_w");
  TORCH_CHECK(grad_pooled.numel() == d.B * d.K, "grad_pooled must be [B, K] = [", d.B, ", ", d.K, "], got shape ",
              grad_pooled.sizes());
  TORCH_CHECK(pool_w.numel() == d.B * d.P, "pool_w must be [B, H*W] = [", d.B, ", ", d.P, "], got shape ",
              pool_w.sizes());
}

inline CamBwdOperands check_cam_bwd(const std::optional<at::Tensor>& grad_cam,
                                    const std::optional<at::Tensor>& grad_pooled, const at::Tensor& features,
                                    const at::Tensor& weights, const at::Tensor& cam, const at::Tensor& pool_w,
                                    c10::DeviceType kernel) {
  CamBwdOperands op;
  op.d = check_cam(features, weights, kernel);
  const CamDims& d = op.d;
  op.has_gc = grad_cam.has_value() && grad_cam->defined();
  op.has_gp = grad_pooled.has_value() && grad_pooled->defined();
  const at::Tensor none;
  check_defined(cam, "cam");
  check_defined(pool_w, "pool_w");
  check_devices(kernel, {{&features, "features"},
                         {op.has_gc ? &*grad_cam : &none, "grad_cam"},
                         {op.has_gp ? &*grad_pooled : &none, "grad_pooled"},
                         {&cam, "cam"},
                         {&pool_w, "pool_w"}});
  if (op.has_gc) {
    check_float(*grad_cam, "grad_cam");
    check_float(cam, "cam");
    TORCH_CHECK(grad_cam->numel() == d.B * d.P, "grad_cam must be [B, H, W] = [", d.B, ", ", d.H, ", ", d.W,
                "], got shape ", grad_cam->sizes());
    TORCH_CHECK(cam.numel() == d.B * d.P, "cam must be [B, H, W] = [", d.B, ", ", d.H, ", ", d.W, "], got shape ",
                cam.sizes());
  }
  if (op.has_gp) check_pooled_grad(*grad_pooled, pool_w, d);
  // every check passed: convert
  if (op.has_gc) {
    op.gs = (grad_cam->reshape({d.B, d.P}).to(d.acc) * cam.reshape({d.B, d.P}).gt(0).to(d.acc)).contiguous();
  }
  if (op.has_gp) {
    op.gp = grad_pooled->reshape({d.B, d.K}).to(d.acc).contiguous();
    op.pw = pool_w.reshape({d.B, d.P}).to(d.acc).contiguous();
  }
  op.w = weights.to(d.acc).contiguous();
  return op;
}

struct CamBwdOutputs {
  at::Tensor gf, gw;
};

// grad_features [B, K, H, W] contiguous in the dtype of features (whatever their layout: the fake
// kernel says so), grad_weights in the accumulation dtype
inline CamBwdOutputs alloc_cam_bwd(const at::Tensor& features, const CamDims& d, bool need_features,
                                   bool need_weights) {
  const auto opts = features.options().dtype(d.acc);
  CamBwdOutputs o;
  o.gf = need_features ? at::empty({d.B, d.K, d.H, d.W}, features.options()) : at::empty({0}, features.options());
  o.gw = need_weights ? at::empty({d.B, d.K}, opts) : at::empty({0}, opts);
  return o;
}

inline bool cam_bwd_has_work(const CamDims& d, bool need_features, bool need_weights) {
  return (need_features || need_weights) && d.B * d.K * d.P > 0;
}

inline std::tuple<at::Tensor, at::Tensor> finish_cam_bwd(CamBwdOutputs& o, const at::Tensor& weights,
                                                         const CamDims& d, bool need_features, bool need_weights) {
  if (!cam_bwd_has_work(d, need_features, need_weights)) {
    if (need_features) o.gf.zero_();
    if (need_weights) o.gw.zero_();
  }
  return {o.gf, need_weights ? o.gw.to(weights.scalar_type()) : at::empty({0}, weights.options())};
}

inline void check_spatial_mean(const at::Tensor& grads, c10::DeviceType kernel) {
  check_float(grads, "grads");
  check_dim(grads, 4, "grads");
  check_devices(kernel, {{&grads, "grads"}});
}

// ---------------------------------------------------------------------------------------------
// banks
// ---------------------------------------------------------------------------------------------

// a batch of rows to enqueue: feats [N, D], labels [N] int64, mask [N] bool
inline int64_t check_batch(const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& mask, int64_t D) {
  check_float(feats, "feats");
  check_dim(feats, 2, "feats");
  TORCH_CHECK(feats.size(1) == D, "feats must be [N, D] with D = ", D, " (the bank's), got shape ", feats.sizes());
  const int64_t N = feats.size(0);
  check_dtype(labels, at::kLong, "labels");
  check_dtype(mask, at::kBool, "mask");
  check_vector(labels, N, "labels", "N");
  check_vector(mask, N, "mask", "N");
  return N;
}

struct ClassBankDims {
  int64_t C, S, D, N;
};

inline ClassBankDims check_class_bank_state(const at::Tensor& bank, const at::Tensor& count, const at::Tensor& sums) {
  check_float(bank, "bank");
  check_dim(bank, 3, "bank");
  ClassBankDims d;
  d.C = bank.size(0);
  d.S = bank.size(1);
  d.D = bank.size(2);
  d.N = 0;
  TORCH_CHECK(d.S > 0, "bank must have at least one slot per class, got shape ", bank.sizes());
  check_dtype(count, at::kLong, "count");
  check_vector(count, d.C, "count", "C");
  check_dtype(sums, at::kFloat, "sums");
  check_dim(sums, 2, "sums");
  TORCH_CHECK(sums.size(0) == d.C && sums.size(1) == d.D, "sums must be [C, D] = [", d.C, ", ", d.D, "], got shape ",
              sums.sizes());
  return d;
}

inline ClassBankDims check_class_bank_enqueue(const at::Tensor& bank, const at::Tensor& count, const at::Tensor& ptr,
                                              const at::Tensor& sums, const at::Tensor& feats,
                                              const at::Tensor& labels, const at::Tensor& mask,
                                              c10::DeviceType kernel) {
  ClassBankDims d = check_class_bank_state(bank, count, sums);
  check_dtype(ptr, at::kLong, "ptr");
  check_vector(ptr, d.C, "ptr", "C");
  d.N = check_batch(feats, labels, mask, d.D);
  check_devices(kernel, {{&bank, "bank"},
                         {&count, "count"},
                         {&ptr, "ptr"},
                         {&sums, "sums"},
                         {&feats, "feats"},
                         {&labels, "labels"},
                         {&mask, "mask"}});
  return d;
}

// (dims, number of classes to resync)
inline std::tuple<ClassBankDims, int64_t> check_class_bank_resync(const at::Tensor& bank, const at::Tensor& count,
                                                                  const at::Tensor& sums, const at::Tensor& classes,
                                                                  c10::DeviceType kernel) {
  const ClassBankDims d = check_class_bank_state(bank, count, sums);
  check_dtype(classes, at::kLong, "classes");
  check_dim(classes, 1, "classes");
  check_devices(kernel, {{&bank, "bank"}, {&count, "count"}, {&sums, "sums"}, {&classes, "classes"}});
  return {d, classes.size(0)};
}

struct FifoDims {
  int64_t Nb, D, M;
};

inline FifoDims check_fifo_state(const at::Tensor& bank, const at::Tensor& bank_labels, bool need_rows) {
  check_float(bank, "bank");
  check_dim(bank, 2, "bank");
  FifoDims d;
  d.Nb = bank.size(0);
  d.D = bank.size(1);
  d.M = 0;
  TORCH_CHECK(!need_rows || d.Nb > 0, "bank must have at least one row, got shape ", bank.sizes());
  check_dtype(bank_labels, at::kLong, "bank_labels");
  check_vector(bank_labels, d.Nb, "bank_labels", "N");
  return d;
}

inline FifoDims check_fifo_bank_enqueue(const at::Tensor& bank, const at::Tensor& bank_labels, const at::Tensor& ptr,
                                        const at::Tensor& feats, const at::Tensor& labels, const at::Tensor& mask,
                                        c10::DeviceType kernel) {
  FifoDims d = check_fifo_state(bank, bank_labels, /*need_rows=*/true);
  check_dtype(ptr, at::kLong, "ptr");
  check_one_element(ptr, "ptr");
  d.M = check_batch(feats, labels, mask, d.D);
  check_devices(kernel, {{&bank, "bank"},
                         {&bank_labels, "bank_labels"},
                         {&ptr, "ptr"},
                         {&feats, "feats"},
                         {&labels, "labels"},
                         {&mask, "mask"}});
  return d;
}

inline FifoDims check_fifo_bank_sums(const at::Tensor& bank, const at::Tensor& bank_labels, int64_t num_classes,
                                     c10::DeviceType kernel) {
  const FifoDims d = check_fifo_state(bank, bank_labels, /*need_rows=*/false);
  TORCH_CHECK(num_classes >= 0, "num_classes must be >= 0, got ", num_classes);
  check_devices(kernel, {{&bank, "bank"}, {&bank_labels, "bank_labels"}});
  return d;
}

// ---------------------------------------------------------------------------------------------
// centroids, intra, inter
// ---------------------------------------------------------------------------------------------

struct CentroidDims {
  int64_t C, D, B;
  at::ScalarType out_dt;
};

inline CentroidDims check_centroids(const at::Tensor& sums, const at::Tensor& counts, const at::Tensor& feats,
                                    const at::Tensor& labels, c10::DeviceType kernel) {
  check_float(sums, "sums");
  check_dim(sums, 2, "sums");
  check_float(feats, "feats");
  check_dim(feats, 2, "feats");
  CentroidDims d;
  d.C = sums.size(0);
  d.D = sums.size(1);
  d.B = feats.size(0);
  TORCH_CHECK(feats.size(1) == d.D, "feats must be [B, D] with D = ", d.D, " (the width of sums), got shape ",
              feats.sizes());
  check_dtype(counts, at::kLong, "counts");
  check_vector(counts, d.C, "counts", "C");
  check_dtype(labels, at::kLong, "labels");
  check_vector(labels, d.B, "labels", "B");
  check_devices(kernel, {{&sums, "sums"}, {&counts, "counts"}, {&feats, "feats"}, {&labels, "labels"}});
  d.out_dt = at::promote_types(sums.scalar_type(), feats.scalar_type());
  return d;
}

// intra operands, validated and converted to the accumulation dtype (contiguous)
struct IntraArgs {
  at::Tensor f_s, f_t, mu_s, mu_t, labels, valid;
  int64_t B, D, C;
  at::ScalarType acc;
};

inline IntraArgs intra_args(const at::Tensor& f_s, const at::Tensor& f_t, const at::Tensor& mu_s,
                            const at::Tensor& mu_t, const at::Tensor& labels, const at::Tensor& valid,
                            c10::DeviceType kernel) {
  check_float(f_s, "f_s");
  check_float(f_t, "f_t");
  check_float(mu_s, "mu_s");
  check_float(mu_t, "mu_t");
  check_dim(f_s, 2, "f_s");
  check_dim(mu_s, 2, "mu_s");
  IntraArgs a;
  a.B = f_s.size(0);
  a.D = f_s.size(1);
  a.C = mu_s.size(0);
  TORCH_CHECK(f_t.sizes() == f_s.sizes(), "f_t must have the shape of f_s ", f_s.sizes(), ", got shape ", f_t.sizes());
  TORCH_CHECK(mu_s.size(1) == a.D, "mu_s must be [C, D] with D = ", a.D, " (the width of f_s), got shape ",
              mu_s.sizes());
  TORCH_CHECK(mu_t.sizes() == mu_s.sizes(), "mu_t must have the shape of mu_s ", mu_s.sizes(), ", got shape ",
              mu_t.sizes());
  check_dtype(labels, at::kLong, "labels");
  check_vector(labels, a.B, "labels", "B");
  check_dtype(valid, at::kBool, "valid");
  check_vector(valid, a.C, "valid", "C");
  check_devices(kernel, {{&f_s, "f_s"},
                         {&f_t, "f_t"},
                         {&mu_s, "mu_s"},
                         {&mu_t, "mu_t"},
                         {&labels, "labels"},
                         {&valid, "valid"}});
  if (kernel == c10::DeviceType::CPU) check_index_range(labels, 0, a.C, "labels");
  const bool dbl = f_s.scalar_type() == at::kDouble || f_t.scalar_type() == at::kDouble ||
                   mu_s.scalar_type() == at::kDouble || mu_t.scalar_type() == at::kDouble;
  a.acc = dbl ? at::kDouble : at::kFloat;
  // [B, D] and [C, D] operands: converting to the accumulation dtype costs one pass and keeps the
  // kernels to a single instantiation per accumulation dtype.
  a.f_s = f_s.to(a.acc).contiguous();
  a.f_t = f_t.to(a.acc).contiguous();
  a.mu_s = mu_s.to(a.acc).contiguous();
  a.mu_t = mu_t.to(a.acc).contiguous();
  a.labels = labels.contiguous();
  a.valid = valid.contiguous();
  return a;
}

// grad_out of a scalar loss: one floating element, on the op's device (CUDA kernels also take a
// CPU scalar)
inline void check_grad_out(const at::Tensor& grad_out, const at::Tensor& ref, const char* ref_name,
                           c10::DeviceType kernel) {
  check_float(grad_out, "grad_out");
  check_one_element(grad_out, "grad_out");
  if (kernel == c10::DeviceType::CUDA && grad_out.device().is_cpu()) return;
  check_devices(kernel, {{&ref, ref_name}, {&grad_out, "grad_out"}});
}

struct InterDims {
  int64_t C, Ds, Dt;
  at::ScalarType acc;
};

inline InterDims check_inter(const at::Tensor& mu_s, const at::Tensor& mu_t, const at::Tensor& valid, double eps,
                             const at::Tensor* live, c10::DeviceType kernel) {
  check_float(mu_s, "mu_s");
  check_float(mu_t, "mu_t");
  check_dim(mu_s, 2, "mu_s");
  check_dim(mu_t, 2, "mu_t");
  InterDims d;
  d.C = mu_s.size(0);
  d.Ds = mu_s.size(1);
  d.Dt = mu_t.size(1);
  TORCH_CHECK(mu_t.size(0) == d.C, "mu_t must have C = ", d.C, " rows (those of mu_s), got shape ", mu_t.sizes());
  check_dtype(valid, at::kBool, "valid");
  check_vector(valid, d.C, "valid", "C");
  if (live != nullptr && live->defined()) {
    check_dtype(*live, at::kBool, "live");
    check_vector(*live, d.C, "live", "C");
  }
  TORCH_CHECK(eps > 0, "eps must be > 0, got ", eps);
  const at::Tensor none;
  check_devices(kernel, {{&mu_s, "mu_s"}, {&mu_t, "mu_t"}, {&valid, "valid"}, {live ? live : &none, "live"}});
  d.acc = acc_type_of(mu_s.scalar_type(), mu_t.scalar_type());
  return d;
}

// K = A^T A from inter_gram_fwd: float64 [Ds + Dt, Ds + Dt] on the operands' device
inline void check_gram(const at::Tensor& K, const at::Tensor& mu_s, const InterDims& d, c10::DeviceType kernel) {
  const int64_t D = d.Ds + d.Dt;
  check_devices(kernel, {{&mu_s, "mu_s"}, {&K, "gram"}});
  TORCH_CHECK(K.scalar_type() == at::kDouble, "gram must be float64 (the K of inter_gram_fwd), got ", K.scalar_type());
  TORCH_CHECK(K.dim() == 2 && K.size(0) == D && K.size(1) == D, "gram must be [Ds + Dt, Ds + Dt] = [", D, ", ", D,
              "] (the K of inter_gram_fwd), got shape ", K.sizes());
}

// Every argument of inter_gram_bwd (the operands as for inter_bwd, then grad_out, K and max_live)
inline InterDims check_inter_gram_bwd(const at::Tensor& grad_out, const at::Tensor& gram, const at::Tensor& mu_s,
                                      const at::Tensor& mu_t, const at::Tensor& valid,
                                      const std::optional<at::Tensor>& live, double eps, int64_t max_live,
                                      c10::DeviceType kernel) {
  TORCH_CHECK(max_live >= -1, "inter_gram_bwd: max_live must be -1 (no bound) or >= 0, got ", max_live);
  const bool has_live = live.has_value() && live->defined();
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, has_live ? &*live : nullptr, kernel);
  check_grad_out(grad_out, mu_s, "mu_s", kernel);
  check_gram(gram, mu_s, d, kernel);
  return d;
}

// A = [v n_s, v n_t], B = [v n_s, -v n_t] ([C, Ds + Dt], acc dtype), n = mu / max(|mu|, eps)
// row-wise (as F.normalize), v = valid; row norms and |V| (a 0-dim tensor on the op's device).
// (The Gram form of inter_gram.h builds its own float64 rows of A instead.)
struct InterOperands {
  at::Tensor A, B;
  at::Tensor norm_s, norm_t;
  at::Tensor nvalid;
};

inline InterOperands inter_operands(const at::Tensor& mu_s, const at::Tensor& mu_t, const at::Tensor& valid,
                                    double eps, const InterDims& d) {
  InterOperands op;
  const at::Tensor v = valid.to(d.acc).unsqueeze(1);
  const at::Tensor ms = mu_s.to(d.acc);
  const at::Tensor mt = mu_t.to(d.acc);
  op.norm_s = at::linalg_vector_norm(ms, 2, {1}, false, std::nullopt);
  op.norm_t = at::linalg_vector_norm(mt, 2, {1}, false, std::nullopt);
  op.A = at::empty({d.C, d.Ds + d.Dt}, ms.options());
  at::Tensor a_s = op.A.narrow(1, 0, d.Ds), a_t = op.A.narrow(1, d.Ds, d.Dt);
  at::div_out(a_s, ms, op.norm_s.clamp_min(eps).unsqueeze(1)).mul_(v);
  at::div_out(a_t, mt, op.norm_t.clamp_min(eps).unsqueeze(1)).mul_(v);
  op.B = op.A.clone();
  op.B.narrow(1, d.Ds, d.Dt).neg_();
  op.nvalid = v.sum();
  return op;
}

// dmu = (dn - n (n . dn)) / |mu| where |mu| > eps, dn / eps otherwise (rows of n are v * n)
inline at::Tensor normalize_backward(const at::Tensor& dn, const at::Tensor& n, const at::Tensor& norm, double eps) {
  const at::Tensor proj = (n * dn).sum(1, true);
  const at::Tensor big = norm.gt(eps).unsqueeze(1);
  const at::Tensor nrm = norm.unsqueeze(1);
  return at::where(big, (dn - n * proj) / at::where(big, nrm, at::ones_like(nrm)), dn / eps);
}

// the same, in place on dn, with no [C, D] temporary besides n * dn
inline void normalize_backward_(at::Tensor& dn, const at::Tensor& n, const at::Tensor& norm, double eps) {
  const at::Tensor big = norm.gt(eps).unsqueeze(1);
  const at::Tensor proj = at::where(big, (n * dn).sum(1, true), at::zeros({}, dn.options()));
  dn.addcmul_(n, proj, -1);
  dn.div_(norm.clamp_min(eps).unsqueeze(1));
}

}  // namespace icakd
