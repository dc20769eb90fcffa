// Helpers shared by the CUDA sources of icakd_fast._C: ATen / stream headers, launch sizes, and
// the warp / block reductions (cuda_reduce.cuh).
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>

#include <cstdint>

#include "cuda_reduce.cuh"

namespace icakd {
namespace cuda {

constexpr int kThreads = 256;

inline unsigned int blocks_for(int64_t n, int64_t per_block) {
  const int64_t b = (n + per_block - 1) / per_block;
  return static_cast<unsigned int>(b < 1 ? 1 : b);
}

}  // namespace cuda
}  // namespace icakd
