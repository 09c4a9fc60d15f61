// C++/OpenMP CPU implementation of the fused zero-conv residual addition, fp32.
//
// Every layout is handed over in GEMM form per batch image b:
//   out[b][m][n] = skip[b][m][n] + sum_k s_k * (sum_j A_k[b][m][j] * B_k[b][j][n] + bias_k[m or n])
// NCHW:          m = channel, n = pixel,   A = W (C, Ck),  B = features (Ck, P)
// channels-last: m = pixel,   n = channel, A = features (P, Ck), B = W^T (Ck, C)
// so the n axis always has stride 1 in B, skip and out, and the inner loop over n vectorises.
//
// Tensors arrive as raw addresses plus element strides (from torch's data_ptr/stride): the module
// links against nothing but pybind11, so it builds without torch's headers and cannot break on a
// torch ABI change.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <algorithm>
#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

// Register tile: MR rows of m by NR columns of n accumulate in registers (6 x 16 floats: 12 ymm
// with AVX2, 6 zmm with AVX-512); NC columns of n form a panel the MR rows of A are reused across.
// Overridable with -DENGINE_MR/NR/NC for tuning: on the 2-vCPU VM we measure on, timings drift
// 2x within seconds and 8x32 or 4x48 tiles were not distinguishable from 6x16.
#ifndef ENGINE_MR
#define ENGINE_MR 6
#endif
#ifndef ENGINE_NR
#define ENGINE_NR 16
#endif
#ifndef ENGINE_NC
#define ENGINE_NC 64
#endif
constexpr int64_t MR = ENGINE_MR;
constexpr int64_t NR = ENGINE_NR;
constexpr int64_t NC = ENGINE_NC;

struct Net {
  const float* a;
  const float* b;
  const float* bias;
  int64_t k;
  int64_t a_sb, a_sm, a_sk;  // A strides: batch, m, reduction
  int64_t b_sb, b_sk;        // B strides: batch, reduction (n stride is 1)
  float scale;
};

// acc[r][c] = sum_j A[m0 + r][j] * B[j][n0 + c] for a full MR x NR tile.
inline void micro_full(const Net& net, const float* a, const float* b, float acc[MR][NR]) {
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t c = 0; c < NR; ++c) acc[r][c] = 0.f;
  for (int64_t j = 0; j < net.k; ++j) {
    const float* brow = b + j * net.b_sk;
    for (int64_t r = 0; r < MR; ++r) {
      const float av = a[r * net.a_sm + j * net.a_sk];
#pragma omp simd
      for (int64_t c = 0; c < NR; ++c) acc[r][c] += av * brow[c];
    }
  }
}

// The same for an edge tile of mr x nr (mr <= MR, nr <= NR): bounds-checked, slower, rare.
inline void micro_edge(const Net& net, const float* a, const float* b, int64_t mr, int64_t nr,
                       float acc[MR][NR]) {
  for (int64_t r = 0; r < MR; ++r)
    for (int64_t c = 0; c < NR; ++c) acc[r][c] = 0.f;
  for (int64_t j = 0; j < net.k; ++j) {
    const float* brow = b + j * net.b_sk;
    for (int64_t r = 0; r < mr; ++r) {
      const float av = a[r * net.a_sm + j * net.a_sk];
      for (int64_t c = 0; c < nr; ++c) acc[r][c] += av * brow[c];
    }
  }
}

void zero_conv_add_f32(int64_t out_addr, int64_t skip_addr, int64_t batch, int64_t m_size, int64_t n_size,
                       int64_t out_sb, int64_t out_sm, int64_t skip_sb, int64_t skip_sm,
                       const std::vector<std::array<int64_t, 9>>& nets_in, const std::vector<float>& scales,
                       bool bias_along_m, int threads) {
  if (nets_in.size() != scales.size() || nets_in.empty())
    throw std::invalid_argument("zero_conv_add_f32: need one scale per net and at least one net; got " +
                                std::to_string(nets_in.size()) + " nets, " + std::to_string(scales.size()) +
                                " scales");
  std::vector<Net> nets;
  for (size_t i = 0; i < nets_in.size(); ++i) {
    const auto& t = nets_in[i];
    nets.push_back(Net{reinterpret_cast<const float*>(t[0]), reinterpret_cast<const float*>(t[1]),
                       reinterpret_cast<const float*>(t[2]), t[3], t[4], t[5], t[6], t[7], t[8], scales[i]});
  }
  float* out = reinterpret_cast<float*>(out_addr);
  const float* skip = reinterpret_cast<const float*>(skip_addr);
  const int64_t panels = (n_size + NC - 1) / NC;
  const int64_t m_tiles = (m_size + MR - 1) / MR;
  // Work items: (batch, n panel, block of m tiles). Splitting m too keeps both cores busy at 8x8,
  // where there is one n panel per image.
  const int64_t m_split = std::max<int64_t>(1, std::min<int64_t>(m_tiles, 8));
  const int64_t m_tiles_per_item = (m_tiles + m_split - 1) / m_split;
  const int64_t items = batch * panels * m_split;

#pragma omp parallel for schedule(static) num_threads(threads)
  for (int64_t item = 0; item < items; ++item) {
    const int64_t bi = item / (panels * m_split);
    const int64_t panel = (item / m_split) % panels;
    const int64_t ms = item % m_split;
    const int64_t n_begin = panel * NC, n_end = std::min(n_size, n_begin + NC);
    const int64_t mt_end = std::min(m_tiles, (ms + 1) * m_tiles_per_item);
    float acc[MR][NR];
    float res[MR][NR];
    for (int64_t mt = ms * m_tiles_per_item; mt < mt_end; ++mt) {
      const int64_t m0 = mt * MR;
      const int64_t mr = std::min(MR, m_size - m0);
      for (int64_t n0 = n_begin; n0 < n_end; n0 += NR) {
        const int64_t nr = std::min(NR, n_end - n0);
        for (int64_t r = 0; r < MR; ++r)
          for (int64_t c = 0; c < NR; ++c) res[r][c] = 0.f;
        for (const Net& net : nets) {
          const float* a = net.a + bi * net.a_sb + m0 * net.a_sm;
          const float* b = net.b + bi * net.b_sb + n0;
          if (mr == MR && nr == NR)
            micro_full(net, a, b, acc);
          else
            micro_edge(net, a, b, mr, nr, acc);
          for (int64_t r = 0; r < mr; ++r)
            for (int64_t c = 0; c < nr; ++c) {
              const float bias = bias_along_m ? net.bias[m0 + r] : net.bias[n0 + c];
              res[r][c] += net.scale * (acc[r][c] + bias);
            }
        }
        // skip is read right before out is written, element by element: out may alias skip.
        for (int64_t r = 0; r < mr; ++r) {
          const float* srow = skip + bi * skip_sb + (m0 + r) * skip_sm + n0;
          float* orow = out + bi * out_sb + (m0 + r) * out_sm + n0;
          for (int64_t c = 0; c < nr; ++c) orow[c] = srow[c] + res[r][c];
        }
      }
    }
  }
}

}  // namespace

PYBIND11_MODULE(_zero_conv_cpu, m) {
  m.doc() = "Fused ControlNet zero-conv residual addition, C++/OpenMP, fp32 (see kernels/native.py)";
  m.def("zero_conv_add_f32", &zero_conv_add_f32, py::arg("out"), py::arg("skip"), py::arg("batch"),
        py::arg("m"), py::arg("n"), py::arg("out_sb"), py::arg("out_sm"), py::arg("skip_sb"), py::arg("skip_sm"),
        py::arg("nets"), py::arg("scales"), py::arg("bias_along_m"), py::arg("threads"),
        py::call_guard<py::gil_scoped_release>(),
        "nets: (a, b, bias, k, a_sb, a_sm, a_sk, b_sb, b_sk) per net, addresses and element strides");
#ifdef _OPENMP
  m.attr("openmp") = true;
#else
  m.attr("openmp") = false;
#endif
}
