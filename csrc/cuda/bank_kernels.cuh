// Device code of the memory-bank ops (host wrappers in bank_cuda.cu). Plain C++ and
// cuda_reduce.cuh only -- no ATen -- so that tests/cuda_emu also runs these kernels on a CPU.
#pragma once

#include <cstdint>

#include "cuda_reduce.cuh"

namespace icakd {

constexpr int kChunk = 1024;  // rows staged in shared memory per step of the leader walk

template <typename bank_t>
__global__ void class_enqueue_kernel(bank_t* __restrict__ bank, int64_t* __restrict__ count, int64_t* __restrict__ ptr,
                                     float* __restrict__ sums, const bank_t* __restrict__ feats,
                                     const int64_t* __restrict__ labels, const bool* __restrict__ mask, int64_t N,
                                     int64_t C, int64_t S, int64_t D) {
  __shared__ int64_t red[32];
  __shared__ unsigned char match[kChunk];
  const int64_t i = blockIdx.x;
  const int64_t c = labels[i];
  if (!mask[i] || c < 0 || c >= C) return;  // uniform
  // leader test: no earlier kept row of class c
  int earlier = 0;
  for (int64_t j = threadIdx.x; j < i; j += blockDim.x) earlier |= (mask[j] && labels[j] == c) ? 1 : 0;
  if (__syncthreads_or(earlier)) return;
  int64_t cnt = 0;
  for (int64_t j = i + threadIdx.x; j < N; j += blockDim.x) cnt += (mask[j] && labels[j] == c) ? 1 : 0;
  const int64_t n = cuda::block_reduce(cnt, cuda::SumOp(), int64_t(0), red);
  const int64_t skip = n > S ? n - S : 0;
  const int64_t p0 = ((ptr[c] % S) + S) % S;
  const int64_t filled = count[c];
  float* sc = sums + c * D;
  int64_t r = 0;
  for (int64_t j0 = i; j0 < N; j0 += kChunk) {
    const int64_t len = (N - j0) < kChunk ? (N - j0) : kChunk;
    __syncthreads();
    for (int64_t t = threadIdx.x; t < len; t += blockDim.x)
      match[t] = (mask[j0 + t] && labels[j0 + t] == c) ? 1 : 0;
    __syncthreads();
    for (int64_t t = 0; t < len; ++t) {
      if (!match[t]) continue;  // uniform
      if (r >= skip) {
        const int64_t slot = (p0 + r - skip) % S;
        bank_t* dst = bank + (c * S + slot) * D;
        const bank_t* src = feats + (j0 + t) * D;
        const bool replace = slot < filled;
        for (int64_t d = threadIdx.x; d < D; d += blockDim.x) {
          const bank_t nv = src[d];
          const float delta = replace ? static_cast<float>(nv) - static_cast<float>(dst[d]) : static_cast<float>(nv);
          sc[d] += delta;
          dst[d] = nv;
        }
      }
      ++r;
    }
  }
  __syncthreads();  // every thread has read ptr[c] / count[c]
  if (threadIdx.x == 0) {
    ptr[c] = (p0 + (n < S ? n : S)) % S;
    count[c] = (filled + n) < S ? (filled + n) : S;
  }
}

template <typename bank_t>
__global__ void class_resync_kernel(const bank_t* __restrict__ bank, const int64_t* __restrict__ count,
                                    float* __restrict__ sums, const int64_t* __restrict__ classes, int64_t C, int64_t S,
                                    int64_t D) {
  const int64_t c = classes[blockIdx.x];
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (c < 0 || c >= C || d >= D) return;
  int64_t filled = count[c];
  filled = filled < 0 ? 0 : (filled > S ? S : filled);
  float acc = 0.f;
  for (int64_t s = 0; s < filled; ++s) acc += static_cast<float>(bank[(c * S + s) * D + d]);
  sums[c * D + d] = acc;
}

template <typename bank_t>
__global__ void fifo_enqueue_kernel(bank_t* __restrict__ bank, int64_t* __restrict__ bank_labels,
                                    const int64_t* __restrict__ ptr, const bank_t* __restrict__ feats,
                                    const int64_t* __restrict__ labels, const bool* __restrict__ mask, int64_t M,
                                    int64_t Nb, int64_t D) {
  __shared__ int64_t red[32];
  const int64_t i = blockIdx.x;
  if (!mask[i] || labels[i] < 0) return;  // uniform
  int64_t before = 0, total = 0;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) {
    const int64_t k = (mask[j] && labels[j] >= 0) ? 1 : 0;
    total += k;
    before += (j < i) ? k : 0;
  }
  const int64_t rank = cuda::block_reduce(before, cuda::SumOp(), int64_t(0), red);
  const int64_t n = cuda::block_reduce(total, cuda::SumOp(), int64_t(0), red);
  const int64_t skip = n > Nb ? n - Nb : 0;
  if (rank < skip) return;
  const int64_t p0 = ((ptr[0] % Nb) + Nb) % Nb;
  const int64_t slot = (p0 + rank - skip) % Nb;
  for (int64_t d = threadIdx.x; d < D; d += blockDim.x) bank[slot * D + d] = feats[i * D + d];
  if (threadIdx.x == 0) bank_labels[slot] = labels[i];
}

__global__ void fifo_ptr_kernel(int64_t* __restrict__ ptr, const int64_t* __restrict__ labels,
                                const bool* __restrict__ mask, int64_t M, int64_t Nb) {
  __shared__ int64_t red[32];
  int64_t total = 0;
  for (int64_t j = threadIdx.x; j < M; j += blockDim.x) total += (mask[j] && labels[j] >= 0) ? 1 : 0;
  const int64_t n = cuda::block_reduce(total, cuda::SumOp(), int64_t(0), red);
  if (threadIdx.x == 0) {
    const int64_t p0 = ((ptr[0] % Nb) + Nb) % Nb;
    ptr[0] = (p0 + (n < Nb ? n : Nb)) % Nb;
  }
}

// sums[c, d] = sum over the rows order[offsets[c] : offsets[c+1]] of src[row, d] (in that order)
template <typename in_t, typename out_t>
__global__ void segment_sum_kernel(const in_t* __restrict__ src, const int64_t* __restrict__ order,
                                   const int64_t* __restrict__ offsets, out_t* __restrict__ out, int64_t D) {
  const int64_t c = blockIdx.x;
  const int64_t d = static_cast<int64_t>(blockIdx.y) * blockDim.x + threadIdx.x;
  if (d >= D) return;
  out_t acc = 0;
  for (int64_t j = offsets[c]; j < offsets[c + 1]; ++j) acc += static_cast<out_t>(src[order[j] * D + d]);
  out[c * D + d] = acc;
}

}  // namespace icakd
