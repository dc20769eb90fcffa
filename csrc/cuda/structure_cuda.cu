// CUDA kernels of the centroid, intra-class and inter-class ops (no host synchronisation).
//
// centroids: the batch is grouped by class with a stable sort, then one block per class (threads
//   own columns) adds its rows in batch order: deterministic, no atomics.
// intra: one block per row; the mean over valid rows is a device-side reduction.
// inter: E = A B^T with A = [v n_s, v n_t], B = [v n_s, -v n_t] is formed tile by tile with
//   cuBLAS (at::mm); the forward adds |E_tile|^2 (symmetric: diagonal block once, right blocks
//   twice); the backward multiplies E_tile by B. With `live` and no teacher gradient, a dedicated
//   kernel computes only the live rows: one block per row, blocks of other rows exit at once, so
//   the cost is O(P*C*D) without knowing P on the host.
//   When C is large against Ds + Dt (ImageNet-21k), the Gram form of inter_gram.h replaces both:
//   float64 cuBLAS GEMMs over A alone, O(C D^2), every row of the backward computed then masked
//   (no host synchronisation). It is chosen only on GPUs with full-rate float64 (sm_80, sm_90,
//   sm_100) unless C exceeds 64 D.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "../inter_gram.h"
#include "cuda_utils.cuh"

namespace icakd {
namespace {

using at::Tensor;
using cuda::kThreads;

template <typename acc_t>
__global__ void centroids_kernel(const acc_t* __restrict__ sums, const int64_t* __restrict__ counts,
                                 const acc_t* __restrict__ feats, const int64_t* __restrict__ order,
                                 const int64_t* __restrict__ offsets, acc_t* __restrict__ mu,
                                 int64_t* __restrict__ total, int64_t D) {
  const int64_t c = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  const int64_t beg = offsets[c], end = offsets[c + 1];
  const int64_t tot = counts[c] + (end - beg);
  if (blockIdx.y == 0 && threadIdx.x == 0) total[c] = tot;
  if (d >= D) return;
  acc_t acc = 0;
  for (int64_t j = beg; j < end; ++j) acc += feats[order[j] * D + d];
  mu[c * D + d] = (sums[c * D + d] + acc) / static_cast<acc_t>(tot > 1 ? tot : 1);
}

// per row b: d = f_s - mu_s[y] - f_t + mu_t[y] (zero when y is not valid) -> dout, |d|^2 -> per_row
template <typename acc_t>
__global__ void intra_rows_kernel(const acc_t* __restrict__ fs, const acc_t* __restrict__ ft,
                                  const acc_t* __restrict__ ms, const acc_t* __restrict__ mt,
                                  const int64_t* __restrict__ labels, const bool* __restrict__ valid,
                                  acc_t* __restrict__ per_row, acc_t* __restrict__ dout, int64_t C, int64_t D) {
  __shared__ acc_t red[32];
  const int64_t b = blockIdx.x;
  const int64_t c = labels[b];
  const bool ok = c >= 0 && c < C && valid[c];
  acc_t t = 0;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
    acc_t x = 0;
    if (ok) x = (fs[b * D + d] - ms[c * D + d]) - (ft[b * D + d] - mt[c * D + d]);
    t += x * x;
    if (dout) dout[b * D + d] = x;
  }
  if (per_row) {
    t = cuda::block_reduce(t, cuda::SumOp(), acc_t(0), red);
    if (threadIdx.x == 0) per_row[b] = t;
  }
}

// out[k, :Ds] = sum_l (A[k] . B[l]) * B[l, :Ds] for rows k with live[k]; other rows untouched.
template <typename acc_t>
__global__ void inter_live_rows_kernel(const acc_t* __restrict__ A, const acc_t* __restrict__ B,
                                       const bool* __restrict__ live, acc_t* __restrict__ out, int64_t C, int64_t Ds,
                                       int64_t Dtot) {
  constexpr int kCols = 64;
  __shared__ acc_t e[kCols];
  const int64_t k = blockIdx.x;
  if (!live[k]) return;  // uniform
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  const acc_t* a = A + k * Dtot;
  acc_t* o = out + k * Ds;
  for (int64_t l0 = 0; l0 < C; l0 += kCols) {
    const int64_t ncols = (C - l0) < kCols ? (C - l0) : kCols;
    for (int j = warp; j < kCols; j += nwarps) {
      acc_t s = 0;
      if (j < ncols) {
        const acc_t* bl = B + (l0 + j) * Dtot;
        for (int64_t d = lane; d < Dtot; d += 32) s += a[d] * bl[d];
      }
      s = cuda::warp_reduce(s, cuda::SumOp());
      if (lane == 0) e[j] = s;
    }
    __syncthreads();
    for (int64_t d = threadIdx.x; d < Ds; d += blockDim.x) {
      acc_t acc = o[d];
      for (int j = 0; j < ncols; ++j) acc += e[j] * B[(l0 + j) * Dtot + d];
      o[d] = acc;
    }
    __syncthreads();
  }
}

// ---------------------------------------------------------------------------------------------

std::tuple<Tensor, Tensor> centroids_fwd_cuda(const Tensor& sums_, const Tensor& counts_, const Tensor& feats_,
                                              const Tensor& labels_) {
  // labels outside [0, C) are not counted (the CPU kernel raises; checking here would synchronise)
  const CentroidDims dims = check_centroids(sums_, counts_, feats_, labels_, c10::DeviceType::CUDA);
  const int64_t C = dims.C, D = dims.D;
  const c10::cuda::CUDAGuard guard(sums_.device());
  const auto out_dt = dims.out_dt;
  const Tensor sums = sums_.to(out_dt).contiguous();
  const Tensor feats = feats_.to(out_dt).contiguous();
  const Tensor counts = counts_.contiguous();
  const auto sorted = at::sort(labels_, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor order = std::get<1>(sorted).contiguous();
  const Tensor offsets = at::searchsorted(std::get<0>(sorted), at::arange(C + 1, labels_.options())).contiguous();
  Tensor mu = at::empty({C, D}, sums.options());
  Tensor total = at::empty({C}, counts.options());
  if (C == 0) return {mu, total};
  const dim3 grid(static_cast<unsigned int>(C), cuda::blocks_for(D, kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(out_dt, "icakd_centroids_cuda", [&] {
    centroids_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(
        sums.const_data_ptr<scalar_t>(), counts.const_data_ptr<int64_t>(), feats.const_data_ptr<scalar_t>(),
        order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(), mu.data_ptr<scalar_t>(),
        total.data_ptr<int64_t>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {mu, total};
}

// number of rows whose class is in [0, C) and valid (device tensor, acc dtype); rows with a label
// outside [0, C) count as invalid, as in intra_rows_kernel
Tensor intra_valid_rows(const IntraArgs& a) {
  if (a.C == 0) return at::zeros({}, a.f_s.options());
  const Tensor in_range = a.labels.ge(0).logical_and(a.labels.lt(a.C));
  const Tensor v = a.valid.index_select(0, a.labels.clamp(0, a.C - 1)).logical_and(in_range);
  return v.to(a.acc).sum();
}

Tensor intra_fwd_cuda(const Tensor& f_s, const Tensor& f_t, const Tensor& mu_s, const Tensor& mu_t,
                      const Tensor& labels, const Tensor& valid) {
  const IntraArgs a = intra_args(f_s, f_t, mu_s, mu_t, labels, valid, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(f_s.device());
  if (a.B == 0) return at::zeros({}, f_s.options().dtype(a.acc));
  Tensor per_row = at::empty({a.B}, f_s.options().dtype(a.acc));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.acc, "icakd_intra_fwd_cuda", [&] {
    intra_rows_kernel<scalar_t><<<static_cast<unsigned int>(a.B), kThreads, 0, stream>>>(
        a.f_s.const_data_ptr<scalar_t>(), a.f_t.const_data_ptr<scalar_t>(), a.mu_s.const_data_ptr<scalar_t>(),
        a.mu_t.const_data_ptr<scalar_t>(), a.labels.const_data_ptr<int64_t>(), a.valid.const_data_ptr<bool>(),
        per_row.data_ptr<scalar_t>(), nullptr, a.C, a.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return per_row.sum() / intra_valid_rows(a).clamp_min(1);
}

Tensor intra_bwd_cuda(const Tensor& grad_out, const Tensor& f_s, const Tensor& f_t, const Tensor& mu_s,
                      const Tensor& mu_t, const Tensor& labels, const Tensor& valid) {
  check_grad_out(grad_out, f_s, "f_s", c10::DeviceType::CUDA);
  const IntraArgs a = intra_args(f_s, f_t, mu_s, mu_t, labels, valid, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(f_s.device());
  Tensor gd = at::empty({a.B, a.D}, f_s.options().dtype(a.acc));
  if (a.B == 0) return gd;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(a.acc, "icakd_intra_bwd_cuda", [&] {
    intra_rows_kernel<scalar_t><<<static_cast<unsigned int>(a.B), kThreads, 0, stream>>>(
        a.f_s.const_data_ptr<scalar_t>(), a.f_t.const_data_ptr<scalar_t>(), a.mu_s.const_data_ptr<scalar_t>(),
        a.mu_t.const_data_ptr<scalar_t>(), a.labels.const_data_ptr<int64_t>(), a.valid.const_data_ptr<bool>(),
        nullptr, gd.data_ptr<scalar_t>(), a.C, a.D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  const Tensor scale = grad_out.reshape({}).to(a.acc) * 2 / intra_valid_rows(a).clamp_min(1);
  return gd.mul_(scale);
}

// float64 GEMMs at (nearly) the float32 rate: A100 (sm_80), H100/H200 (sm_90), B100/B200 (sm_100)
bool slow_fp64(const at::Device& device) {
  int major = 0, minor = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device.index()));
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device.index()));
  const bool fast = (major == 8 && minor == 0) || major == 9 || (major == 10 && minor == 0);
  return !fast;
}

// rows per tile: a [T, C] tile of E holds at most 2^25 elements (128 MiB in float32)
int64_t inter_tile_rows(int64_t C) {
  const int64_t t = (int64_t(1) << 25) / std::max<int64_t>(C, 1);
  return std::max<int64_t>(64, std::min<int64_t>(t, std::max<int64_t>(C, 1)));
}

Tensor inter_fwd_cuda(const Tensor& mu_s, const Tensor& mu_t, const Tensor& valid, double eps) {
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, nullptr, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu_s.device());
  if (inter_use_gram(d.C, d.Ds + d.Dt, slow_fp64(mu_s.device()))) {
    return std::get<0>(gram_forward(mu_s, mu_t, valid, eps, d.acc));
  }
  const InterOperands op = inter_operands(mu_s, mu_t, valid, eps, d);
  const int64_t C = d.C, T = inter_tile_rows(C);
  Tensor diag = at::zeros({}, op.A.options());
  Tensor off = at::zeros({}, op.A.options());
  for (int64_t r0 = 0; r0 < C; r0 += T) {
    const int64_t rows = std::min(T, C - r0);
    const Tensor At = op.A.narrow(0, r0, rows);
    const Tensor Ed = at::mm(At, op.B.narrow(0, r0, rows).t()).view({-1});
    diag.add_(at::dot(Ed, Ed));
    if (r0 + rows < C) {
      const Tensor Eo = at::mm(At, op.B.narrow(0, r0 + rows, C - r0 - rows).t()).view({-1});
      off.add_(at::dot(Eo, Eo));
    }
  }
  return (diag + 2 * off) / (op.nvalid * op.nvalid).clamp_min(1);
}

std::tuple<Tensor, Tensor> inter_gram_fwd_cuda(const Tensor& mu_s, const Tensor& mu_t, const Tensor& valid,
                                               double eps) {
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, nullptr, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu_s.device());
  return gram_forward(mu_s, mu_t, valid, eps, d.acc);
}

std::tuple<Tensor, Tensor> inter_gram_bwd_cuda(const Tensor& grad_out, const Tensor& gram, const Tensor& mu_s,
                                               const Tensor& mu_t, const Tensor& valid,
                                               const std::optional<Tensor>& live, bool need_s, bool need_t,
                                               double eps, int64_t max_live) {
  const InterDims d =
      check_inter_gram_bwd(grad_out, gram, mu_s, mu_t, valid, live, eps, max_live, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu_s.device());
  const auto opts = mu_s.options().dtype(d.acc);
  if (!need_s && !need_t) return {at::empty({0}, opts), at::empty({0}, opts)};
  // P is not known on the host: every row, or the first max_live rows in wanted-first order when
  // the caller bounds P; rows of grad_mu_s outside `live` are zero
  const Tensor live_c = live.has_value() && live->defined() ? live->contiguous() : Tensor();
  const Tensor rows = need_t ? Tensor() : bounded_live_rows(valid, live_c, max_live);
  return gram_backward(grad_out, gram, mu_s, mu_t, valid, eps, rows, live_c, need_s, need_t, opts);
}

std::tuple<Tensor, Tensor> inter_bwd_cuda(const Tensor& grad_out, const Tensor& mu_s, const Tensor& mu_t,
                                          const Tensor& valid, const std::optional<Tensor>& live, bool need_s,
                                          bool need_t, double eps) {
  const bool has_live = live.has_value() && live->defined();
  const InterDims d = check_inter(mu_s, mu_t, valid, eps, has_live ? &*live : nullptr, c10::DeviceType::CUDA);
  check_grad_out(grad_out, mu_s, "mu_s", c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(mu_s.device());
  const int64_t C = d.C, Ds = d.Ds, Dt = d.Dt, Dtot = Ds + Dt;
  const auto opts = mu_s.options().dtype(d.acc);
  if (!need_s && !need_t) return {at::empty({0}, opts), at::empty({0}, opts)};
  const Tensor live_c = has_live ? live->contiguous() : Tensor();
  Tensor gs = at::empty({0}, opts), gt = at::empty({0}, opts);
  if (inter_use_gram(C, Dtot, slow_fp64(mu_s.device()))) {
    return gram_backward(grad_out, gram64(mu_s, mu_t, valid, eps), mu_s, mu_t, valid, eps, Tensor(), live_c, need_s,
                         need_t, opts);
  }
  const InterOperands op = inter_operands(mu_s, mu_t, valid, eps, d);
  const Tensor scale = grad_out.reshape({}).to(d.acc) * 4 / (op.nvalid * op.nvalid).clamp_min(1);
  if (has_live && !need_t) {
    Tensor dn = at::zeros({C, Ds}, opts);
    if (C > 0) {
      auto stream = c10::cuda::getCurrentCUDAStream();
      AT_DISPATCH_FLOATING_TYPES(d.acc, "icakd_inter_live_rows_cuda", [&] {
        inter_live_rows_kernel<scalar_t><<<static_cast<unsigned int>(C), kThreads, 0, stream>>>(
            op.A.const_data_ptr<scalar_t>(), op.B.const_data_ptr<scalar_t>(), live_c.const_data_ptr<bool>(),
            dn.data_ptr<scalar_t>(), C, Ds, Dtot);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      });
    }
    dn.mul_(scale);
    gs = normalize_backward(dn, op.A.narrow(1, 0, Ds), op.norm_s, eps);
    return {gs, gt};
  }
  const int64_t col0 = need_s ? 0 : Ds;
  const int64_t ncol = (need_s ? Ds : 0) + (need_t ? Dt : 0);
  const Tensor Bsel = op.B.narrow(1, col0, ncol);
  Tensor G = at::empty({C, ncol}, opts);
  const int64_t T = inter_tile_rows(C);
  for (int64_t r0 = 0; r0 < C; r0 += T) {
    const int64_t rows = std::min(T, C - r0);
    const Tensor E = at::mm(op.A.narrow(0, r0, rows), op.B.t());
    Tensor Gt = G.narrow(0, r0, rows);
    at::mm_out(Gt, E, Bsel);
  }
  G.mul_(scale);
  if (need_s) {
    gs = normalize_backward(G.narrow(1, 0, Ds), op.A.narrow(1, 0, Ds), op.norm_s, eps);
    if (has_live) gs.mul_(live_c.to(d.acc).unsqueeze(1));
  }
  if (need_t) {
    gt = normalize_backward(G.narrow(1, need_s ? Ds : 0, Dt), op.A.narrow(1, Ds, Dt), op.norm_t, eps);
  }
  return {gs, gt};
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CUDA, m) {
  m.impl("centroids_fwd", &centroids_fwd_cuda);
  m.impl("intra_fwd", &intra_fwd_cuda);
  m.impl("intra_bwd", &intra_bwd_cuda);
  m.impl("inter_fwd", &inter_fwd_cuda);
  m.impl("inter_bwd", &inter_bwd_cuda);
  m.impl("inter_gram_fwd", &inter_gram_fwd_cuda);
  m.impl("inter_gram_bwd", &inter_gram_bwd_cuda);
}

}  // namespace icakd
