// CUDA kernels of the memory-bank ops. No float atomics anywhere: results are bit-identical for
// the same inputs, and no host synchronisation.
//
// class_bank_enqueue_: one thread block per batch row; the block of the first kept row of a class
// (its "leader") owns that class: it walks the class's rows in batch order, replaces the slots and
// adds the deltas to the float32 running sum (threads own feature columns), then moves ptr/count.
// Blocks of the other rows exit after the leader test. fifo: one block per row computes its rank
// among kept rows; a one-block kernel then moves ptr. Segment sums (fifo sums) sort the labels
// (stable) and give one block per class.
#include <ATen/Dispatch.h>
#include <torch/library.h>

#include "../checks.h"
#include "cuda_utils.cuh"

namespace icakd {
namespace {

using at::Tensor;
using cuda::kThreads;

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

void class_bank_enqueue_cuda(const Tensor& bank_, const Tensor& count_, const Tensor& ptr_, const Tensor& sums_,
                             const Tensor& feats_, const Tensor& labels_, const Tensor& mask_) {
  const ClassBankDims dims =
      check_class_bank_enqueue(bank_, count_, ptr_, sums_, feats_, labels_, mask_, c10::DeviceType::CUDA);
  const int64_t C = dims.C, S = dims.S, D = dims.D, N = dims.N;
  if (N == 0) return;
  const c10::cuda::CUDAGuard guard(bank_.device());
  WritableContig bank(bank_), count(count_), ptr(ptr_), sums(sums_);
  const Tensor feats = feats_.to(bank_.scalar_type()).contiguous();
  const Tensor labels = labels_.contiguous();
  const Tensor mask = mask_.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank_.scalar_type(), "icakd_class_enqueue_cuda", [&] {
    class_enqueue_kernel<scalar_t><<<static_cast<unsigned int>(N), kThreads, 0, stream>>>(
        bank.work.data_ptr<scalar_t>(), count.work.data_ptr<int64_t>(), ptr.work.data_ptr<int64_t>(),
        sums.work.data_ptr<float>(), feats.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(),
        mask.const_data_ptr<bool>(), N, C, S, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  bank.commit();
  count.commit();
  ptr.commit();
  sums.commit();
}

void class_bank_resync_cuda(const Tensor& bank_, const Tensor& count_, const Tensor& sums_, const Tensor& classes_) {
  const auto checked = check_class_bank_resync(bank_, count_, sums_, classes_, c10::DeviceType::CUDA);
  const ClassBankDims dims = std::get<0>(checked);
  const int64_t k = std::get<1>(checked);
  const int64_t C = dims.C, S = dims.S, D = dims.D;
  if (k == 0 || D == 0) return;
  const c10::cuda::CUDAGuard guard(bank_.device());
  const Tensor bank = bank_.contiguous();
  const Tensor count = count_.contiguous();
  const Tensor classes = classes_.contiguous();
  WritableContig sums(sums_);
  const dim3 grid(static_cast<unsigned int>(k), cuda::blocks_for(D, kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "icakd_class_resync_cuda", [&] {
    class_resync_kernel<scalar_t><<<grid, kThreads, 0, stream>>>(bank.const_data_ptr<scalar_t>(),
                                                                 count.const_data_ptr<int64_t>(),
                                                                 sums.work.data_ptr<float>(),
                                                                 classes.const_data_ptr<int64_t>(), C, S, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  sums.commit();
}

void fifo_bank_enqueue_cuda(const Tensor& bank_, const Tensor& bank_labels_, const Tensor& ptr_, const Tensor& feats_,
                            const Tensor& labels_, const Tensor& mask_) {
  const FifoDims dims =
      check_fifo_bank_enqueue(bank_, bank_labels_, ptr_, feats_, labels_, mask_, c10::DeviceType::CUDA);
  const int64_t Nb = dims.Nb, D = dims.D, M = dims.M;
  if (M == 0) return;
  const c10::cuda::CUDAGuard guard(bank_.device());
  WritableContig bank(bank_), bank_labels(bank_labels_), ptr(ptr_);
  const Tensor feats = feats_.to(bank_.scalar_type()).contiguous();
  const Tensor labels = labels_.contiguous();
  const Tensor mask = mask_.contiguous();
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank_.scalar_type(), "icakd_fifo_enqueue_cuda", [&] {
    fifo_enqueue_kernel<scalar_t><<<static_cast<unsigned int>(M), kThreads, 0, stream>>>(
        bank.work.data_ptr<scalar_t>(), bank_labels.work.data_ptr<int64_t>(), ptr.work.const_data_ptr<int64_t>(),
        feats.const_data_ptr<scalar_t>(), labels.const_data_ptr<int64_t>(), mask.const_data_ptr<bool>(), M, Nb, D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  fifo_ptr_kernel<<<1, kThreads, 0, stream>>>(ptr.work.data_ptr<int64_t>(), labels.const_data_ptr<int64_t>(),
                                              mask.const_data_ptr<bool>(), M, Nb);
  C10_CUDA_KERNEL_LAUNCH_CHECK();
  bank.commit();
  bank_labels.commit();
  ptr.commit();
}

std::tuple<Tensor, Tensor> fifo_bank_sums_cuda(const Tensor& bank_, const Tensor& bank_labels_, int64_t num_classes) {
  const FifoDims dims = check_fifo_bank_sums(bank_, bank_labels_, num_classes, c10::DeviceType::CUDA);
  const int64_t D = dims.D;
  const c10::cuda::CUDAGuard guard(bank_.device());
  const Tensor bank = bank_.contiguous();
  // empty slots (label < 0) and out-of-range labels sort past the last class
  const Tensor key = at::where(bank_labels_.ge(0), bank_labels_, at::full_like(bank_labels_, num_classes))
                         .clamp_max(num_classes);
  const auto sorted = at::sort(key, /*stable=*/true, /*dim=*/0, /*descending=*/false);
  const Tensor order = std::get<1>(sorted).contiguous();
  const Tensor bounds = at::arange(num_classes + 1, key.options());
  const Tensor offsets = at::searchsorted(std::get<0>(sorted), bounds).contiguous();
  Tensor counts = (offsets.narrow(0, 1, num_classes) - offsets.narrow(0, 0, num_classes)).contiguous();
  Tensor sums = at::empty({num_classes, D}, bank.options().dtype(at::kFloat));
  if (num_classes == 0 || D == 0) return {sums, counts};
  const dim3 grid(static_cast<unsigned int>(num_classes), cuda::blocks_for(D, kThreads));
  auto stream = c10::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, bank.scalar_type(), "icakd_fifo_sums_cuda", [&] {
    segment_sum_kernel<scalar_t, float><<<grid, kThreads, 0, stream>>>(
        bank.const_data_ptr<scalar_t>(), order.const_data_ptr<int64_t>(), offsets.const_data_ptr<int64_t>(),
        sums.data_ptr<float>(), D);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {sums, counts};
}

}  // namespace

TORCH_LIBRARY_IMPL(icakd_fast_C, CUDA, m) {
  m.impl("class_bank_enqueue_", &class_bank_enqueue_cuda);
  m.impl("class_bank_resync_", &class_bank_resync_cuda);
  m.impl("fifo_bank_enqueue_", &fifo_bank_enqueue_cuda);
  m.impl("fifo_bank_sums", &fifo_bank_sums_cuda);
}

}  // namespace icakd
