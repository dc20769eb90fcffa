// A small CPU emulation of the CUDA execution model, enough to run device code that uses
// threadIdx / blockIdx / blockDim / gridDim, static and dynamic shared memory, __syncthreads,
// __syncthreads_or and full-warp __shfl_xor_sync. Each block runs as blockDim real threads (blocks one after the
// other); __syncthreads is a barrier over the block's threads, a shuffle a barrier over the warp.
// A thread that returns counts as arrived at every later barrier, as on the GPU. Stricter than
// the hardware where it helps: a full-mask shuffle in a partial warp aborts (undefined on a GPU),
// and dynamic shared memory starts filled with NaN.
//
// Include this before the device code; launch with cuda_emu::launch(kernel, grid, block, smem,
// args...). Only for tests: it is slow and runs nothing on a GPU.
#pragma once

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <memory>
#include <thread>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

struct dim3 {
  unsigned int x, y, z;
  constexpr dim3(unsigned int x_ = 1, unsigned int y_ = 1, unsigned int z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace cuda_emu {

struct Block {
  std::unique_ptr<std::barrier<>> bar;
  std::vector<std::unique_ptr<std::barrier<>>> warp_bar;
  std::vector<uint64_t> lanes;  // one slot per thread, for shuffles
  std::vector<unsigned char> smem;
  std::atomic<int> vote{0};  // __syncthreads_or
  unsigned int threads = 0;
};

inline Block* current = nullptr;

template <typename T>
T* dynamic_smem() {
  return reinterpret_cast<T*>(current->smem.data());
}

[[noreturn]] inline void fail(const char* what) {
  std::fprintf(stderr, "cuda_emu: %s (block %u,%u thread %u)\n", what, blockIdx.x, blockIdx.y, threadIdx.x);
  std::abort();
}

inline unsigned int flat_thread() { return threadIdx.x + blockDim.x * (threadIdx.y + blockDim.y * threadIdx.z); }

}  // namespace cuda_emu

#define ICAKD_DYNAMIC_SMEM(T, name) T* name = cuda_emu::dynamic_smem<T>()

inline void __syncthreads() { cuda_emu::current->bar->arrive_and_wait(); }

inline int __syncthreads_or(int predicate) {
  cuda_emu::Block& b = *cuda_emu::current;
  b.bar->arrive_and_wait();  // the previous vote has been read by everyone
  if (predicate) b.vote.store(1);
  b.bar->arrive_and_wait();
  const int any = b.vote.load();
  b.bar->arrive_and_wait();
  if (cuda_emu::flat_thread() == 0) b.vote.store(0);  // before anyone passes the next vote's first barrier
  return any;
}

template <typename T>
T __shfl_xor_sync(unsigned int mask, T v, int offset) {
  static_assert(sizeof(T) <= sizeof(uint64_t), "shuffle of a value wider than 8 bytes");
  cuda_emu::Block& b = *cuda_emu::current;
  const unsigned int t = cuda_emu::flat_thread(), warp = t / 32, lane = t % 32;
  if (mask != 0xffffffffu) cuda_emu::fail("only full-mask shuffles are emulated");
  if ((warp + 1) * 32 > b.threads) cuda_emu::fail("full-mask shuffle in a partial warp (undefined on a GPU)");
  uint64_t bits = 0;
  std::memcpy(&bits, &v, sizeof(T));
  b.lanes[t] = bits;
  b.warp_bar[warp]->arrive_and_wait();
  const uint64_t got = b.lanes[warp * 32 + (lane ^ static_cast<unsigned int>(offset))];
  b.warp_bar[warp]->arrive_and_wait();  // nobody overwrites a slot before it was read
  T r;
  std::memcpy(&r, &got, sizeof(T));
  return r;
}

namespace cuda_emu {

// runs kernel<<<grid, block, smem_bytes>>>(args...) on the CPU; returns when every block is done
template <typename... KArgs, typename... Args>
void launch(void (*kernel)(KArgs...), dim3 grid, dim3 block, size_t smem_bytes, Args... args) {
  const unsigned int n = block.x * block.y * block.z;
  if (n == 0 || n > 1024) fail("block size must be 1..1024 threads");
  if (smem_bytes > 227 * 1024) fail("more dynamic shared memory than an H100/H200 block can have");
  gridDim = grid;
  blockDim = block;
  for (unsigned int bz = 0; bz < grid.z; ++bz)
    for (unsigned int by = 0; by < grid.y; ++by)
      for (unsigned int bx = 0; bx < grid.x; ++bx) {
        Block b;
        b.threads = n;
        b.bar = std::make_unique<std::barrier<>>(n);
        for (unsigned int w = 0; w * 32 < n; ++w)
          b.warp_bar.push_back(std::make_unique<std::barrier<>>(std::min(32u, n - w * 32)));
        b.lanes.assign(n, 0);
        b.smem.resize(smem_bytes + 16);
        for (size_t i = 0; i + sizeof(float) <= b.smem.size(); i += sizeof(float)) {
          const float nan = std::numeric_limits<float>::quiet_NaN();
          std::memcpy(b.smem.data() + i, &nan, sizeof(float));
        }
        current = &b;
        std::vector<std::thread> threads;
        threads.reserve(n);
        for (unsigned int t = 0; t < n; ++t) {
          threads.emplace_back([&, t] {
            threadIdx = dim3(t % block.x, (t / block.x) % block.y, t / (block.x * block.y));
            blockIdx = dim3(bx, by, bz);
            kernel(args...);
            // a finished thread no longer holds up the block's or its warp's barriers
            b.bar->arrive_and_drop();
            b.warp_bar[t / 32]->arrive_and_drop();
          });
        }
        for (auto& th : threads) th.join();
        current = nullptr;
      }
}

}  // namespace cuda_emu
