// The vectorised CUDA CAM kernels (opt-in ICAKD_CUDA_CAM=vec; host wrappers in cam_cuda.cu).
// Device code and plain C++ only -- no ATen -- so that tests/cuda_emu can also compile and run
// these very kernels on a CPU (threads for CUDA threads, barriers for __syncthreads).
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "cam_vec_layout.h"
#include "cuda_reduce.cuh"

#ifndef ICAKD_DYNAMIC_SMEM
#define ICAKD_DYNAMIC_SMEM(T, name) extern __shared__ T name[]
#endif

namespace icakd {

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

// the channel sums of `groups` V-channel groups from their per-(vector, side) partials
// slot[(group * P + j) * 2 + side] -> out[group * V + c], threads of the block taking channels in turn
template <int V>
__device__ __forceinline__ void vec_channel_sums(const float* slot, float* out, int64_t groups, int P) {
  for (int64_t i = threadIdx.x; i < groups * V; i += blockDim.x) {
    const float* s = slot + (i / V) * P * 2;
    const int c = static_cast<int>(i % V), last = vec_layout::last_vector(c, P, V);
    float t = 0.f;
    for (int j = vec_layout::first_vector(c, P, V); j <= last; ++j) t += s[j * 2 + vec_layout::side(j, c, P, V)];
    out[i] = t;
  }
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
  ICAKD_DYNAMIC_SMEM(float, sm);  // [R][V * P]
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
  ICAKD_DYNAMIC_SMEM(float, sm);  // camv [P], pw [P], slot [gps][P][2]
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
  vec_channel_sums<V>(slot, pooled + b * K + u0 * V, u1 - u0, P);
}

template <typename scalar_t, int V>
__global__ void __launch_bounds__(kVecMaxPixels, 1) cam_vec_bwd_kernel(
    const scalar_t* __restrict__ A, const float* __restrict__ w, const float* __restrict__ gs,
    const float* __restrict__ gp, const float* __restrict__ pw, scalar_t* __restrict__ gf, float* __restrict__ gw,
    int64_t K, int P, int64_t gps, int R) {
  ICAKD_DYNAMIC_SMEM(float, slot);  // [gps][P][2], for grad_weights
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
  vec_channel_sums<V>(slot, gw + b * K + u0 * V, u1 - u0, P);
}

}  // namespace icakd
