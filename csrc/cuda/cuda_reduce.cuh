// Warp and block reductions of the CUDA kernels (device code only, no ATen: tests/cuda_emu runs
// it on a CPU). Blocks must consist of whole warps: the shuffles name all 32 lanes.
#pragma once

namespace icakd {
namespace cuda {

struct SumOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a + b; }
};
struct MinOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return b < a ? b : a; }
};
struct MaxOp {
  template <typename T>
  __device__ __forceinline__ T operator()(T a, T b) const { return a < b ? b : a; }
};

template <typename T, typename Op>
__device__ __forceinline__ T warp_reduce(T v, Op op) {
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) v = op(v, __shfl_xor_sync(0xffffffffu, v, offset));
  return v;
}

// Reduce over the whole block; every thread gets the result. `smem` holds 32 elements; every
// thread of the block must call it (it synchronises).
template <typename T, typename Op>
__device__ __forceinline__ T block_reduce(T v, Op op, T identity, T* smem) {
  const int lane = threadIdx.x & 31;
  const int wid = threadIdx.x >> 5;
  const int nwarps = (blockDim.x + 31) >> 5;
  v = warp_reduce(v, op);
  __syncthreads();  // smem may still be read by a previous call
  if (lane == 0) smem[wid] = v;
  __syncthreads();
  v = (threadIdx.x < nwarps) ? smem[threadIdx.x] : identity;
  if (wid == 0) v = warp_reduce(v, op);
  if (threadIdx.x == 0) smem[0] = v;
  __syncthreads();
  return smem[0];
}

}  // namespace cuda
}  // namespace icakd
