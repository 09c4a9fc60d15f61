// pybind11 binding of the CUDA implementation (zero_conv_cuda.cu); addresses and element strides
// come from torch tensors in kernels/native.py, so no torch headers are needed.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <array>
#include <stdexcept>
#include <vector>

#include "zero_conv_cuda.h"

namespace py = pybind11;

static void zero_conv_add(int dtype, int64_t out, int64_t skip, int64_t batch, int64_t m, int64_t n,
                          std::array<int64_t, 3> out_strides, std::array<int64_t, 3> skip_strides,
                          const std::vector<std::array<int64_t, 10>>& nets, int64_t scales, bool bias_along_m,
                          int64_t stream) {
  if (nets.empty() || nets.size() > zero_conv::kMaxNets)
    throw std::invalid_argument("zero_conv_add: got " + std::to_string(nets.size()) + " nets; 1 to " +
                                std::to_string(zero_conv::kMaxNets) + " per launch are allowed");
  zero_conv::Params p{};
  p.out = reinterpret_cast<void*>(out);
  p.skip = reinterpret_cast<const void*>(skip);
  p.batch = batch, p.m = m, p.n = n;
  p.out_sb = out_strides[0], p.out_sm = out_strides[1], p.out_sn = out_strides[2];
  p.skip_sb = skip_strides[0], p.skip_sm = skip_strides[1], p.skip_sn = skip_strides[2];
  p.scales = reinterpret_cast<const float*>(scales);
  p.num_nets = static_cast<int>(nets.size());
  p.bias_along_m = bias_along_m;
  for (size_t i = 0; i < nets.size(); ++i) {
    const auto& t = nets[i];
    p.nets[i] = zero_conv::NetArgs{reinterpret_cast<const void*>(t[0]), reinterpret_cast<const void*>(t[1]),
                                   reinterpret_cast<const void*>(t[2]), t[3], t[4], t[5], t[6], t[7], t[8], t[9]};
  }
  const std::string err = zero_conv::launch(static_cast<zero_conv::DType>(dtype), p, stream);
  if (!err.empty()) throw std::runtime_error("zero_conv_add CUDA launch failed: " + err);
}

PYBIND11_MODULE(_zero_conv_cuda, mod) {
  mod.doc() = "Fused ControlNet zero-conv residual addition, CUDA, fp32/fp16/bf16 (see kernels/native.py)";
  mod.def("zero_conv_add", &zero_conv_add, py::arg("dtype"), py::arg("out"), py::arg("skip"), py::arg("batch"),
          py::arg("m"), py::arg("n"), py::arg("out_strides"), py::arg("skip_strides"), py::arg("nets"),
          py::arg("scales"), py::arg("bias_along_m"), py::arg("stream"),
          "nets: (a, b, bias, k, a_sb, a_sm, a_sk, b_sb, b_sk, b_sn) per net; dtype 0 fp32, 1 fp16, 2 bf16");
  mod.attr("max_nets") = zero_conv::kMaxNets;
}
