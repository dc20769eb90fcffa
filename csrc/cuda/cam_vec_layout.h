// Index plan of the vectorised CUDA CAM kernels (cam_cuda.cu), kept free of CUDA and torch so
// that tests/test_cam_vec_layout.py can compile it with the host compiler and check it on a CPU.
//
// V channels of one image are V*P contiguous elements = P vectors of V elements (16 bytes).
// Thread j of a group always reads vector j: element e is flat index f = V*j + e of the group,
// i.e. channel f / P and pixel f % P. With V <= P a vector spans at most two channels.
#pragma once

#ifdef __CUDACC__
#define ICAKD_HD __host__ __device__ __forceinline__
#define ICAKD_UNROLL _Pragma("unroll")
#else
#define ICAKD_HD inline
#define ICAKD_UNROLL
#endif

namespace icakd {
namespace vec_layout {

// the elements of vector j: channel c0 for e < split, c0 + 1 for split <= e < V; pixel pix[e]
template <int V>
struct Lane {
  int c0, split;
  int pix[V];
  ICAKD_HD Lane(int j, int P) {
    c0 = (V * j) / P;
    const int s = (c0 + 1) * P - V * j;
    split = s < V ? s : V;
    ICAKD_UNROLL
    for (int e = 0; e < V; ++e) pix[e] = V * j + e - (e < split ? c0 : c0 + 1) * P;
  }
};

// the vectors holding elements of group channel c: first..last (inclusive)
ICAKD_HD int first_vector(int c, int P, int V) { return (c * P) / V; }
ICAKD_HD int last_vector(int c, int P, int V) { return (c * P + P - 1) / V; }

// which of vector j's two partial sums (0: its channel c0, 1: channel c0 + 1) belongs to channel c
ICAKD_HD int side(int j, int c, int P, int V) { return (V * j) / P == c ? 0 : 1; }

}  // namespace vec_layout
}  // namespace icakd
