// CUDA kernels of the Grad-CAM ops: one thread block per image. Contiguous NCHW and
// channels_last feature maps are read in place (element (b, k, p) at b*K*P + k*sK + p*sP:
// sK = P, sP = 1 for NCHW; sK = 1, sP = K for channels_last); other layouts are copied to NCHW.
//
// Forward: the weighted channel sum runs on (pixel, channel group) threads: a pass covers Pt
// pixels (the next power of two >= H*W, at least a warp, at most the block), the block's
// kThreads / Pt groups take every G-th channel with four independent accumulators, and a
// shared-memory sum over the groups gives each pixel (so a 7x7 map keeps all 256 threads busy
// instead of 49, coalesced over H*W). Then a block reduction gives the min/max/sum of the map,
// then warps own channels for the CAM-weighted pooling. Backward: threads own (channel, pixel)
// elements for grad_features, warps own channels for grad_weights. float32 accumulation (float64
// for float64 inputs).
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "cam_vec_kernels.cuh"
#include "cuda_utils.cuh"

#include <algorithm>
#include <cstdlib>
#include <string>
#include <type_traits>

namespace icakd {
namespace {

using at::Tensor;
using cuda::kThreads;

// pixels per pass of the weighted sum: a power of two in [32, kThreads], >= P when P <= kThreads
inline int cam_pixels_per_pass(int64_t P) {
  int pt = 32;
  while (pt < kThreads && pt < P) pt *= 2;
  return pt;
}

// launched with kThreads threads; Pt = cam_pixels_per_pass(P)
template <typename scalar_t, typename acc_t>
__global__ void cam_fwd_kernel(const scalar_t* __restrict__ A, const acc_t* __restrict__ w, acc_t* __restrict__ cam,
                               acc_t* __restrict__ pool_w, acc_t* __restrict__ pooled, int64_t K, int64_t P,
                               int64_t sK, int64_t sP, int Pt, bool with_pooled) {
  __shared__ acc_t red[32];
  __shared__ acc_t part[kThreads];
  const int64_t b = blockIdx.x;
  const scalar_t* Ab = A + b * K * P;
  const acc_t* wb = w + b * K;
  acc_t* camb = cam + b * P;
  const int G = kThreads / Pt;                                   // channel groups (Pt divides kThreads)
  const int g = static_cast<int>(threadIdx.x) / Pt, pl = static_cast<int>(threadIdx.x) % Pt;
  acc_t lo = INFINITY, hi = -INFINITY;
  for (int64_t p0 = 0; p0 < P; p0 += Pt) {
    const int64_t p = p0 + pl;
    acc_t s0 = 0, s1 = 0, s2 = 0, s3 = 0;
    if (p < P) {
      int64_t k = g;
      const scalar_t* Ap = Ab + p * sP;
      for (; k + 3 * G < K; k += 4 * G) {
        s0 += wb[k] * static_cast<acc_t>(Ap[k * sK]);
        s1 += wb[k + G] * static_cast<acc_t>(Ap[(k + G) * sK]);
        s2 += wb[k + 2 * G] * static_cast<acc_t>(Ap[(k + 2 * G) * sK]);
        s3 += wb[k + 3 * G] * static_cast<acc_t>(Ap[(k + 3 * G) * sK]);
      }
      for (; k < K; k += G) s0 += wb[k] * static_cast<acc_t>(Ap[k * sK]);
    }
    part[threadIdx.x] = (s0 + s1) + (s2 + s3);
    __syncthreads();
    if (g == 0 && p < P) {
      acc_t t = 0;
      for (int j = 0; j < G; ++j) t += part[j * Pt + pl];
      const acc_t v = t > acc_t(0) ? t : acc_t(0);
      camb[p] = v;
      lo = v < lo ? v : lo;
      hi = v > hi ? v : hi;
    }
    __syncthreads();  // part is rewritten by the next pass
  }
  if (!with_pooled) return;  // uniform over the block
  lo = cuda::block_reduce(lo, cuda::MinOp(), acc_t(INFINITY), red);
  hi = cuda::block_reduce(hi, cuda::MaxOp(), acc_t(-INFINITY), red);
  const acc_t den_mm = (hi - lo) + acc_t(1e-7);
  acc_t* pwb = pool_w + b * P;
  acc_t msum = 0;
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) {
    const acc_t m = (camb[p] - lo) / den_mm;
    pwb[p] = m;
    msum += m;
  }
  msum = cuda::block_reduce(msum, cuda::SumOp(), acc_t(0), red);
  const acc_t uniform = acc_t(1) / static_cast<acc_t>(P);
  for (int64_t p = threadIdx.x; p < P; p += blockDim.x) pwb[p] = msum > acc_t(0) ? pwb[p] / msum : uniform;
  __syncthreads();  // pool_w of this image complete and visible to the block
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
  for (int64_t k = warp; k < K; k += nwarps) {
    const scalar_t* row = Ab + k * sK;
    acc_t t = 0;
    for (int64_t p = lane; p < P; p += 32) t += pwb[p] * static_cast<acc_t>(row[p * sP]);
    t = cuda::warp_reduce(t, cuda::SumOp());
    if (lane == 0) pooled[b * K + k] = t;
  }
}

// grid (B, k-chunks): block (b, j) handles channels [j*kc, min(K, (j+1)*kc))
template <typename scalar_t, typename acc_t>
__global__ void cam_bwd_kernel(const scalar_t* __restrict__ A, const acc_t* __restrict__ w,
                               const acc_t* __restrict__ gs, const acc_t* __restrict__ gp,
                               const acc_t* __restrict__ pw, scalar_t* __restrict__ gf, acc_t* __restrict__ gw,
                               int64_t K, int64_t P, int64_t sK, int64_t sP, int64_t kc) {
  const int64_t b = blockIdx.x;
  const int64_t k0 = static_cast<int64_t>(blockIdx.y) * kc;
  const int64_t k1 = k0 + kc < K ? k0 + kc : K;
  if (k0 >= k1) return;
  const acc_t* gsb = gs ? gs + b * P : nullptr;
  const acc_t* pwb = gp ? pw + b * P : nullptr;
  if (gf) {
    const int64_t n = (k1 - k0) * P;
    scalar_t* out = gf + (b * K + k0) * P;
    for (int64_t idx = threadIdx.x; idx < n; idx += blockDim.x) {
      const int64_t k = k0 + idx / P;
      const int64_t p = idx % P;
      acc_t v = 0;
      if (gsb) v += gsb[p] * w[b * K + k];
      if (pwb) v += gp[b * K + k] * pwb[p];
      out[idx] = static_cast<scalar_t>(v);
    }
  }
  if (gw) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, nwarps = blockDim.x >> 5;
    for (int64_t k = k0 + warp; k < k1; k += nwarps) {
      acc_t t = 0;
      if (gsb) {
        const scalar_t* row = A + b * K * P + k * sK;
        for (int64_t p = lane; p < P; p += 32) t += gsb[p] * static_cast<acc_t>(row[p * sP]);
      }
      t = cuda::warp_reduce(t, cuda::SumOp());
      if (lane == 0) gw[b * K + k] = t;
    }
  }
}

template <typename scalar_t, typename acc_t>
__global__ void spatial_mean_kernel(const scalar_t* __restrict__ g, scalar_t* __restrict__ out, int64_t rows, int64_t P) {
  const int lane = threadIdx.x & 31;
  const int64_t r = static_cast<int64_t>(blockIdx.x) * (blockDim.x >> 5) + (threadIdx.x >> 5);
  if (r >= rows) return;  // whole warp leaves together
  acc_t t = 0;
  for (int64_t p = lane; p < P; p += 32) t += static_cast<acc_t>(g[r * P + p]);
  t = cuda::warp_reduce(t, cuda::SumOp());
  if (lane == 0) out[r] = static_cast<scalar_t>(t / static_cast<acc_t>(P));
}

// ICAKD_CUDA_CAM=vec selects the vectorised kernels where they apply (read at each call)
inline bool cam_vec_requested() {
  const char* env = std::getenv("ICAKD_CUDA_CAM");
  return env != nullptr && std::string(env) == "vec";
}

// elements per 16-byte vector of the map
template <typename scalar_t>
constexpr int kVecWidth = 16 / static_cast<int>(sizeof(scalar_t));

inline int cam_vec_width(at::ScalarType t) {
  return (t == at::kHalf || t == at::kBFloat16 || t == at::kFloat) ? 16 / static_cast<int>(c10::elementSize(t)) : 0;
}

// whether the vectorised kernels take this map (and float32 accumulation)
inline bool cam_vec_applies(const Tensor& features, const CamDims& d) {
  const int V = cam_vec_width(features.scalar_type());
  return cam_vec_requested() && V > 0 && d.acc == at::kFloat && features.is_contiguous() && d.K % V == 0 &&
         d.P >= V && d.P <= kVecMaxPixels && reinterpret_cast<uintptr_t>(features.const_data_ptr()) % 16 == 0;
}

template <typename scalar_t, int V>
void cam_vec_fwd_launch(const Tensor& A, const Tensor& w, Tensor& cam, Tensor* pool_w, Tensor* pooled,
                        const CamDims& d) {
  const VecGrid g = cam_vec_grid(d.K, d.P, V);
  const int P = static_cast<int>(d.P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(d.B), static_cast<unsigned int>(g.splits));
  Tensor part = at::empty({d.B, g.splits, d.P}, w.options());
  cam_vec_partial_kernel<scalar_t, V><<<grid, g.threads, sizeof(float) * g.R * V * P, stream>>>(
      A.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), part.data_ptr<float>(), d.K, P, g.gps, g.R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  const bool with_pooled = pooled != nullptr;
  const dim3 grid2(static_cast<unsigned int>(d.B), with_pooled ? static_cast<unsigned int>(g.splits) : 1u);
  const size_t smem = sizeof(float) * (2 * P + (with_pooled ? g.gps * P * 2 : 0));
  cam_vec_pool_kernel<scalar_t, V><<<grid2, g.threads, smem, stream>>>(
      A.const_data_ptr<scalar_t>(), part.const_data_ptr<float>(), cam.data_ptr<float>(),
      with_pooled ? pool_w->data_ptr<float>() : nullptr, with_pooled ? pooled->data_ptr<float>() : nullptr, d.K, P,
      g.gps, g.R, g.splits);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

template <typename scalar_t, int V>
void cam_vec_bwd_launch(const Tensor& A, const CamBwdOperands& op, Tensor* gf, Tensor* gw) {
  const CamDims& d = op.d;
  const VecGrid g = cam_vec_grid(d.K, d.P, V);
  const int P = static_cast<int>(d.P);
  auto stream = c10::cuda::getCurrentCUDAStream();
  const dim3 grid(static_cast<unsigned int>(d.B), static_cast<unsigned int>(g.splits));
  const size_t smem = gw != nullptr ? sizeof(float) * g.gps * P * 2 : 0;
  cam_vec_bwd_kernel<scalar_t, V><<<grid, g.threads, smem, stream>>>(
      A.const_data_ptr<scalar_t>(), op.w.const_data_ptr<float>(), op.has_gc ? op.gs.const_data_ptr<float>() : nullptr,
      op.has_gp ? op.gp.const_data_ptr<float>() : nullptr, op.has_gp ? op.pw.const_data_ptr<float>() : nullptr,
      gf != nullptr ? gf->data_ptr<scalar_t>() : nullptr, gw != nullptr ? gw->data_ptr<float>() : nullptr, d.K, P,
      g.gps, g.R);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// the map types cam_vec_width accepts
template <typename Fn>
void cam_vec_dispatch(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kHalf:
      fn(c10::Half());
      break;
    case at::kBFloat16:
      fn(c10::BFloat16());
      break;
    default:
      fn(float());
      break;
  }
}

std::tuple<Tensor, Tensor, Tensor> cam_fwd_cuda(const Tensor& features, const Tensor& weights, bool with_pooled) {
  const CamDims d = check_cam(features, weights, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = d.B, K = d.K, P = d.P;
  const auto acc = d.acc;
  const bool cl = cam_reads_channels_last(features);
  const Tensor A = cl ? features : features.contiguous();
  const int64_t sK = cl ? 1 : P, sP = cl ? K : 1;
  const Tensor w = weights.to(acc).contiguous();
  CamFwdOutputs o = alloc_cam_fwd(features, d, with_pooled);
  Tensor& cam = o.cam;
  Tensor& pooled = o.pooled;
  Tensor& pool_w = o.pool_w;
  if (B > 0 && P > 0 && K > 0 && cam_vec_applies(features, d)) {
    cam_vec_dispatch(A.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      cam_vec_fwd_launch<scalar_t, kVecWidth<scalar_t>>(A, w, cam, with_pooled ? &pool_w : nullptr,
                                                        with_pooled ? &pooled : nullptr, d);
    });
  } else if (B > 0 && P > 0) {
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "icakd_cam_fwd_cuda", [&] {
      if (acc == at::kDouble) {
        cam_fwd_kernel<scalar_t, double><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
            A.const_data_ptr<scalar_t>(), w.const_data_ptr<double>(), cam.data_ptr<double>(),
            with_pooled ? pool_w.data_ptr<double>() : nullptr, with_pooled ? pooled.data_ptr<double>() : nullptr, K, P,
            sK, sP, cam_pixels_per_pass(P), with_pooled);
      } else {
        cam_fwd_kernel<scalar_t, float><<<static_cast<unsigned int>(B), kThreads, 0, stream>>>(
            A.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), cam.data_ptr<float>(),
            with_pooled ? pool_w.data_ptr<float>() : nullptr, with_pooled ? pooled.data_ptr<float>() : nullptr, K, P,
            sK, sP, cam_pixels_per_pass(P), with_pooled);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return finish_cam_fwd(o, d, with_pooled);
}

std::tuple<Tensor, Tensor> cam_bwd_cuda(const std::optional<Tensor>& grad_cam, const std::optional<Tensor>& grad_pooled,
                                        const Tensor& features, const Tensor& weights, const Tensor& cam,
                                        const Tensor& pool_w, bool need_features, bool need_weights) {
  const CamBwdOperands op = check_cam_bwd(grad_cam, grad_pooled, features, weights, cam, pool_w, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(features.device());
  const int64_t B = op.d.B, K = op.d.K, P = op.d.P;
  const auto acc = op.d.acc;
  const bool has_gc = op.has_gc, has_gp = op.has_gp;
  const Tensor &gs = op.gs, &gp = op.gp, &pw = op.pw, &w = op.w;
  // the features are read only for grad_weights, and only where grad_cam is given
  const bool cl = cam_reads_channels_last(features);
  const bool read_a = need_weights && has_gc;
  const Tensor A = (read_a && !cl) ? features.contiguous() : features;
  const int64_t sK = cl ? 1 : P, sP = cl ? K : 1;
  CamBwdOutputs o = alloc_cam_bwd(features, op.d, need_features, need_weights);
  Tensor& gf = o.gf;
  Tensor& gw = o.gw;
  if (cam_bwd_has_work(op.d, need_features, need_weights) && cam_vec_applies(features, op.d)) {
    cam_vec_dispatch(A.scalar_type(), [&](auto tag) {
      using scalar_t = decltype(tag);
      cam_vec_bwd_launch<scalar_t, kVecWidth<scalar_t>>(A, op, need_features ? &gf : nullptr,
                                                        need_weights ? &gw : nullptr);
    });
  } else if (cam_bwd_has_work(op.d, need_features, need_weights)) {
    // about 8 warps' worth of channels per block, at most 65535 chunks
    int64_t kc = std::max<int64_t>(8, (K + 65534) / 65535);
    const dim3 grid(static_cast<unsigned int>(B), static_cast<unsigned int>((K + kc - 1) / kc));
    auto stream = c10::cuda::getCurrentCUDAStream();
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, A.scalar_type(), "icakd_cam_bwd_cuda", [&] {
      if (acc == at::kDouble) {
        cam_bwd_kernel<scalar_t, double><<<grid, kThreads, 0, stream>>>(
            A.const_data_ptr<scalar_t>(), w.const_data_ptr<double>(), has_gc ? gs.const_data_ptr<double>() : nullptr,
            has_gp ? gp.const_data_ptr<double>() : nullptr, has_gp ? pw.const_data_ptr<double>() : nullptr,
            need_features ? gf.data_ptr<scalar_t>() : nullptr, need_weights ? gw.data_ptr<double>() : nullptr, K, P,
            sK, sP, kc);
      } else {
        cam_bwd_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
            A.const_data_ptr<scalar_t>(), w.const_data_ptr<float>(), has_gc ? gs.const_data_ptr<float>() : nullptr,
            has_gp ? gp.const_data_ptr<float>() : nullptr, has_gp ? pw.const_data_ptr<float>() : nullptr,
            need_features ? gf.data_ptr<scalar_t>() : nullptr, need_weights ? gw.data_ptr<float>() : nullptr, K, P,
            sK, sP, kc);
      }
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  return finish_cam_bwd(o, weights, op.d, need_features, need_weights);
}

Tensor spatial_mean_cuda(const Tensor& grads) {
  check_spatial_mean(grads, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard guard(grads.device());
  const int64_t B = grads.size(0), K = grads.size(1), P = grads.size(2) * grads.size(3);
  const Tensor g = grads.contiguous();
  Tensor out = at::empty({B, K}, grads.options());
  if (B * K == 0) return out;
  if (P == 0) return out.fill_(NAN);
  const int64_t rows = B * K, warps = kThreads / 32;
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, g.scalar_type(), "icakd_spatial_mean_cuda", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    spatial_mean_kernel<scalar_t, acc_t><<<cuda::blocks_for(rows, warps), kThreads, 0, stream>>>(
        g.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), rows, P);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CUDA, m) {
  m.impl("cam_fwd", &cam_fwd_cuda);
  m.impl("cam_bwd", &cam_bwd_cuda);
  m.impl("spatial_mean", &spatial_mean_cuda);
}

}  // namespace icakd
