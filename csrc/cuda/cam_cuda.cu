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
#include "cam_vec_layout.h"
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

// ---------------------------------------------------------------------------------------------
// Vectorised kernels (opt-in: ICAKD_CUDA_CAM=vec) for contiguous NCHW maps of 16- or 32-bit
// floats with K % V == 0 and V <= P <= 512, V = 16 / sizeof(element). Every access to the map is
// a 16-byte vector. V consecutive channels of one image are V*P contiguous elements, i.e. exactly
// P vectors, so thread j of a "group" always reads vector j of some V-channel group: its V
// elements sit at fixed (channel, pixel) positions -- channel c0 = V*j / P for the elements
// before `split`, c0 + 1 after it -- the same for every group. Each thread keeps its per-pixel
// factors (pooling weights, grad_cam) in registers, and every cross-thread sum goes through
// shared memory in a fixed order (deterministic, no atomics). A block is R groups of P threads
// (R = max(1, 256 / P)), rounded up to whole warps; grid (B, S), split s taking `gps`
// consecutive groups of every image.
//   forward:  cam_vec_partial_kernel -> part [B, S, P]  (weighted channel sums of each split)
//             cam_vec_pool_kernel    -> cam, pool_w (split 0 writes them) and pooled
//   backward: cam_vec_bwd_kernel     -> grad_features (16-byte stores) and grad_weights
// ---------------------------------------------------------------------------------------------

constexpr int kVecMaxPixels = 512;
constexpr int kVecMaxGroupsPerBlock = 32;

template <typename T, int N>
struct alignas(sizeof(T) * N) AlignedVec {
  T val[N];
};

template <int V>
using VecLane = vec_layout::Lane<V>;

// groups per block and splits per image for K channels of P pixels
struct VecGrid {
  int64_t groups, gps, splits;
  int R, threads;
};

inline VecGrid cam_vec_grid(int64_t K, int64_t P, int V) {
  VecGrid g;
  g.groups = K / V;
  g.gps = std::max<int64_t>(1, std::min<int64_t>(kVecMaxGroupsPerBlock, 4096 / P));
  g.splits = std::max<int64_t>(1, (g.groups + g.gps - 1) / g.gps);
  g.R = static_cast<int>(std::max<int64_t>(1, 256 / P));
  // whole warps: the block reductions shuffle over full warps (a partial last warp would name
  // lanes that do not exist); threads past R groups of P idle in the group loops
  g.threads = static_cast<int>((P * g.R + 31) / 32 * 32);
  return g;
}

// sum over the vectors of group-local channel c of the per-(vector, side) partials slot[j*2 + side]
template <int V>
__device__ __forceinline__ float vec_channel_sum(const float* slot, int c, int P) {
  float s = 0.f;
  const int last = vec_layout::last_vector(c, P, V);
  for (int j = vec_layout::first_vector(c, P, V); j <= last; ++j) s += slot[j * 2 + vec_layout::side(j, c, P, V)];
  return s;
}

// sum of f[e] * x[e] over the elements of each channel of a vector -> slot[0] (channel c0) and
// slot[1] (c0 + 1): vector j's two partials of a channel sum
template <int V, typename Vec>
__device__ __forceinline__ void vec_split_dot(const float* f, const Vec& x, int split, float* slot) {
  float s0 = 0.f, s1 = 0.f;
#pragma unroll
  for (int e = 0; e < V; ++e) {
    const float t = f[e] * static_cast<float>(x.val[e]);
    if (e < split) s0 += t; else s1 += t;
  }
  slot[0] = s0;
  slot[1] = s1;
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kVecMaxPixels, 1) cam_vec_partial_kernel(
    const scalar_t* __restrict__ A, const float* __restrict__ w, float* __restrict__ part, int64_t K, int P, int64_t gps,
    int R) {
  extern __shared__ float sm[];  // [R][V * P]
  using Vec = AlignedVec<scalar_t, V>;
  const int64_t b = blockIdx.x, s = blockIdx.y, S = gridDim.y;
  const int r = static_cast<int>(threadIdx.x) / P, j = static_cast<int>(threadIdx.x) % P;
  const VecLane<V> L(j, P);
  const int64_t groups = K / V, u0 = s * gps, u1 = std::min<int64_t>(groups, u0 + gps);
  const scalar_t* Ab = A + b * K * P;
  const float* wb = w + b * K;
  float acc[V];
#pragma unroll
  for (int e = 0; e < V; ++e) acc[e] = 0.f;
  // <= gps, int32 (an int64 trip count costs a division call); 0 for the threads past R groups
  const int n = r < R ? static_cast<int>(u1 - u0) : 0;
#pragma unroll 4
  for (int t = r; t < n; t += R) {
    const int64_t u = u0 + t;
    const Vec x = *reinterpret_cast<const Vec*>(Ab + u * V * P + V * j);
    const float wa = wb[u * V + L.c0];
    const float wz = L.split < V ? wb[u * V + L.c0 + 1] : 0.f;
#pragma unroll
    for (int e = 0; e < V; ++e) acc[e] += (e < L.split ? wa : wz) * static_cast<float>(x.val[e]);
  }
  if (r < R) {
#pragma unroll
    for (int e = 0; e < V; ++e) sm[r * V * P + V * j + e] = acc[e];
  }
  __syncthreads();
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    float t = 0.f;
    for (int rr = 0; rr < R; ++rr)
      for (int c = 0; c < V; ++c) t += sm[rr * V * P + c * P + p];
    part[(b * S + s) * P + p] = t;
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kVecMaxPixels, 1) cam_vec_pool_kernel(
    const scalar_t* __restrict__ A, const float* __restrict__ part, float* __restrict__ cam, float* __restrict__ pool_w,
    float* __restrict__ pooled, int64_t K, int P, int64_t gps, int R, int64_t nsplit) {
  extern __shared__ float sm[];  // camv [P], pw [P], slot [gps][P][2]
  __shared__ float red[32];
  using Vec = AlignedVec<scalar_t, V>;
  float* camv = sm;
  float* pw = sm + P;
  float* slot = sm + 2 * P;
  const int64_t b = blockIdx.x, s = blockIdx.y;
  float lo = INFINITY, hi = -INFINITY;
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    float t = 0.f;
    for (int64_t q = 0; q < nsplit; ++q) t += part[(b * nsplit + q) * P + p];
    const float v = t > 0.f ? t : 0.f;
    camv[p] = v;
    lo = fminf(lo, v);
    hi = fmaxf(hi, v);
    if (s == 0) cam[b * P + p] = v;
  }
  if (pooled == nullptr) return;  // uniform over the grid
  lo = cuda::block_reduce(lo, cuda::MinOp(), INFINITY, red);
  hi = cuda::block_reduce(hi, cuda::MaxOp(), -INFINITY, red);
  const float den_mm = (hi - lo) + 1e-7f;
  float msum = 0.f;
  for (int p = threadIdx.x; p < P; p += blockDim.x) msum += (camv[p] - lo) / den_mm;
  msum = cuda::block_reduce(msum, cuda::SumOp(), 0.f, red);  // synchronises: camv complete
  for (int p = threadIdx.x; p < P; p += blockDim.x) {
    const float m = (camv[p] - lo) / den_mm;
    const float v = msum > 0.f ? m / msum : 1.f / static_cast<float>(P);
    pw[p] = v;
    if (s == 0) pool_w[b * P + p] = v;
  }
  __syncthreads();
  const int r = static_cast<int>(threadIdx.x) / P, j = static_cast<int>(threadIdx.x) % P;
  const VecLane<V> L(j, P);
  float q[V];
#pragma unroll
  for (int e = 0; e < V; ++e) q[e] = pw[L.pix[e]];
  const int64_t groups = K / V, u0 = s * gps, u1 = std::min<int64_t>(groups, u0 + gps);
  const scalar_t* Ab = A + b * K * P;
  // <= gps, int32 (an int64 trip count costs a division call); 0 for the threads past R groups
  const int n = r < R ? static_cast<int>(u1 - u0) : 0;
#pragma unroll 2
  for (int t = r; t < n; t += R) {
    const int64_t u = u0 + t;
    const Vec x = *reinterpret_cast<const Vec*>(Ab + u * V * P + V * j);
    vec_split_dot<V>(q, x, L.split, slot + (t * P + j) * 2);
  }
  __syncthreads();
  for (int64_t i = threadIdx.x; i < (u1 - u0) * V; i += blockDim.x) {
    const int64_t ul = i / V;
    const int c = static_cast<int>(i % V);
    pooled[b * K + (u0 + ul) * V + c] = vec_channel_sum<V>(slot + ul * P * 2, c, P);
  }
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kVecMaxPixels, 1) cam_vec_bwd_kernel(
    const scalar_t* __restrict__ A, const float* __restrict__ w, const float* __restrict__ gs,
    const float* __restrict__ gp, const float* __restrict__ pw, scalar_t* __restrict__ gf, float* __restrict__ gw,
    int64_t K, int P, int64_t gps, int R) {
  extern __shared__ float slot[];  // [gps][P][2], for grad_weights
  using Vec = AlignedVec<scalar_t, V>;
  const int64_t b = blockIdx.x, s = blockIdx.y;
  const int r = static_cast<int>(threadIdx.x) / P, j = static_cast<int>(threadIdx.x) % P;
  const VecLane<V> L(j, P);
  float g[V], q[V];
#pragma unroll
  for (int e = 0; e < V; ++e) {
    g[e] = gs ? gs[b * P + L.pix[e]] : 0.f;
    q[e] = pw ? pw[b * P + L.pix[e]] : 0.f;
  }
  const int64_t groups = K / V, u0 = s * gps, u1 = std::min<int64_t>(groups, u0 + gps);
  const int64_t base = b * K * P;
  const float* wb = w + b * K;
  const float* gpb = gp ? gp + b * K : nullptr;
  const bool read_a = gw != nullptr && gs != nullptr;
  // <= gps, int32 (an int64 trip count costs a division call); 0 for the threads past R groups
  const int n = r < R ? static_cast<int>(u1 - u0) : 0;
#pragma unroll 2
  for (int t = r; t < n; t += R) {
    const int64_t u = u0 + t;
    const int64_t off = base + u * V * P + V * j;
    const int64_t ka = u * V + L.c0, kz = L.split < V ? ka + 1 : ka;
    if (gf) {
      const float wa = wb[ka], wz = wb[kz];
      const float pa = gpb ? gpb[ka] : 0.f, pz = gpb ? gpb[kz] : 0.f;
      Vec y;
#pragma unroll
      for (int e = 0; e < V; ++e)
        y.val[e] = static_cast<scalar_t>(g[e] * (e < L.split ? wa : wz) + (e < L.split ? pa : pz) * q[e]);
      *reinterpret_cast<Vec*>(gf + off) = y;
    }
    if (read_a) {
      const Vec x = *reinterpret_cast<const Vec*>(A + off);  // one 16-byte load, then registers
      vec_split_dot<V>(g, x, L.split, slot + (t * P + j) * 2);
    } else if (gw) {  // no grad_cam: grad_weights is zero
      slot[(t * P + j) * 2] = 0.f;
      slot[(t * P + j) * 2 + 1] = 0.f;
    }
  }
  if (gw == nullptr) return;  // uniform over the grid
  __syncthreads();
  for (int64_t i = threadIdx.x; i < (u1 - u0) * V; i += blockDim.x) {
    const int64_t ul = i / V;
    const int c = static_cast<int>(i % V);
    gw[b * K + (u0 + ul) * V + c] = vec_channel_sum<V>(slot + ul * P * 2, c, P);
  }
}

// ICAKD_CUDA_CAM=vec selects the vectorised kernels where they apply (read at each call)
inline bool cam_vec_requested() {
  const char* env = std::getenv("ICAKD_CUDA_CAM");
  return env != nullptr && std::string(env) == "vec";
}

inline int cam_vec_width(at::ScalarType t) {
  switch (t) {
    case at::kHalf:
    case at::kBFloat16:
      return 8;
    case at::kFloat:
      return 4;
    default:
      return 0;
  }
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

template <typename Fn>
void cam_vec_dispatch(at::ScalarType t, Fn&& fn) {
  switch (t) {
    case at::kHalf:
      fn(c10::Half(), std::integral_constant<int, 8>());
      break;
    case at::kBFloat16:
      fn(c10::BFloat16(), std::integral_constant<int, 8>());
      break;
    default:
      fn(float(), std::integral_constant<int, 4>());
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
    cam_vec_dispatch(A.scalar_type(), [&](auto tag, auto width) {
      using scalar_t = decltype(tag);
      cam_vec_fwd_launch<scalar_t, decltype(width)::value>(A, w, cam, with_pooled ? &pool_w : nullptr,
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
    cam_vec_dispatch(A.scalar_type(), [&](auto tag, auto width) {
      using scalar_t = decltype(tag);
      cam_vec_bwd_launch<scalar_t, decltype(width)::value>(A, op, need_features ? &gf : nullptr,
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
