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
#include "bank_kernels.cuh"
#include "cuda_utils.cuh"

namespace icakd {
namespace {

using at::Tensor;
using cuda::kThreads;

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
