// Host-side interface of the CUDA fused zero-conv residual addition (zero_conv_cuda.cu).
// Kept free of CUDA and pybind11 headers so the binding compiles with the plain C++ compiler.
#pragma once
#include <cstdint>
#include <string>

namespace zero_conv {

constexpr int kMaxNets = 4;  // nets per launch; kernels/native.py chains launches for more

enum class DType : int { f32 = 0, f16 = 1, bf16 = 2 };

struct NetArgs {
  const void* a;
  const void* b;
  const void* bias;
  int64_t k;
  int64_t a_sb, a_sm, a_sk;  // A strides (elements): batch, m, reduction
  int64_t b_sb, b_sk, b_sn;  // B strides (elements): batch, reduction, n
};

struct Params {
  void* out;
  const void* skip;
  int64_t batch, m, n;
  int64_t out_sb, out_sm, out_sn;
  int64_t skip_sb, skip_sm, skip_sn;
  const float* scales;  // device, one per net in this launch
  int num_nets;
  bool bias_along_m;
  NetArgs nets[kMaxNets];
};

// Launches on `stream` (a cudaStream_t as an integer). Returns "" or the CUDA error text.
std::string launch(DType dtype, const Params& params, int64_t stream);

}  // namespace zero_conv
