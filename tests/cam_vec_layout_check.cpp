// Checks the index plan of the vectorised CUDA CAM kernels (csrc/cuda/cam_vec_layout.h) for every
// pixel count they accept; built and run by tests/test_cam_vec_layout.py with the host compiler.
#include <cstdio>
#include <set>
#include <utility>
#include <vector>

#include "cam_vec_layout.h"

using icakd::vec_layout::first_vector;
using icakd::vec_layout::Lane;
using icakd::vec_layout::last_vector;
using icakd::vec_layout::side;

static int failures = 0;

#define EXPECT(cond, ...)                           \
  do {                                              \
    if (!(cond)) {                                  \
      if (failures < 20) std::printf(__VA_ARGS__);  \
      ++failures;                                   \
    }                                               \
  } while (0)

template <int V>
void check(int P) {
  // every element of a V-channel group is read exactly once, at the (channel, pixel) Lane says
  std::vector<int> seen(V * P, 0);
  std::vector<std::set<std::pair<int, int>>> holders(V);  // channel -> {(vector, side)}
  for (int j = 0; j < P; ++j) {
    const Lane<V> L(j, P);
    EXPECT(L.split >= 1 && L.split <= V, "V=%d P=%d j=%d: split %d\n", V, P, j, L.split);
    for (int e = 0; e < V; ++e) {
      const int c = e < L.split ? L.c0 : L.c0 + 1;
      EXPECT(c >= 0 && c < V, "V=%d P=%d j=%d e=%d: channel %d\n", V, P, j, e, c);
      EXPECT(L.pix[e] >= 0 && L.pix[e] < P, "V=%d P=%d j=%d e=%d: pixel %d\n", V, P, j, e, L.pix[e]);
      const int f = c * P + L.pix[e];
      EXPECT(f == V * j + e, "V=%d P=%d j=%d e=%d: flat %d\n", V, P, j, e, f);
      if (f >= 0 && f < V * P) ++seen[f];
      if (c >= 0 && c < V) holders[c].insert({j, e < L.split ? 0 : 1});
    }
  }
  for (int f = 0; f < V * P; ++f) EXPECT(seen[f] == 1, "V=%d P=%d: element %d read %d times\n", V, P, f, seen[f]);
  // the channel sums visit exactly the (vector, side) partials holding that channel's elements
  for (int c = 0; c < V; ++c) {
    std::set<std::pair<int, int>> plan;
    for (int j = first_vector(c, P, V); j <= last_vector(c, P, V); ++j) plan.insert({j, side(j, c, P, V)});
    EXPECT(plan == holders[c], "V=%d P=%d: channel %d sums %zu partials, %zu hold it\n", V, P, c, plan.size(),
           holders[c].size());
  }
}

int main() {
  int cases = 0;
  for (int P = 8; P <= 512; ++P, ++cases) check<8>(P);
  for (int P = 4; P <= 512; ++P, ++cases) check<4>(P);
  std::printf("%d layouts checked, %d failures\n", cases, failures);
  return failures == 0 ? 0 : 1;
}
