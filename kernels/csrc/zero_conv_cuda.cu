// CUDA implementation of the fused zero-conv residual addition, in the same GEMM form as the CPU
// one (see zero_conv_cpu.cpp): per batch image, out = skip + sum_k s_k * (A_k @ B_k + bias_k).
// A classic shared-memory tiled GEMM: a 64 x 64 output tile per block, 16-deep reduction steps,
// 256 threads each holding a 4 x 4 sub-tile, inputs converted to fp32 on load, so fp16/bf16
// accumulate in fp32. The skip tile is read and the output written once, after every net.
// It is the portable fallback for GPUs without Triton; the Triton kernel uses tensor cores.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "zero_conv_cuda.h"

namespace zero_conv {
namespace {

constexpr int BM = 64, BN = 64, BK = 16, THREADS = 256, TM = 4, TN = 4;

__device__ __forceinline__ float to_f(float v) { return v; }
__device__ __forceinline__ float to_f(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_f(__nv_bfloat16 v) { return __bfloat162float(v); }
template <typename T> __device__ __forceinline__ T from_f(float v);
template <> __device__ __forceinline__ float from_f<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_f<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

template <typename T>
__global__ void __launch_bounds__(THREADS) zero_conv_add_kernel(const Params p) {
  __shared__ float as[BK][BM + 1];  // +1: rows written with stride BM would hit one bank
  __shared__ float bs[BK][BN];
  const int64_t bi = blockIdx.z;
  const int64_t m0 = int64_t(blockIdx.y) * BM, n0 = int64_t(blockIdx.x) * BN;
  const int tx = threadIdx.x % 16, ty = threadIdx.x / 16;
  float res[TM][TN] = {};
  for (int k = 0; k < p.num_nets; ++k) {
    const NetArgs& net = p.nets[k];
    const T* a = static_cast<const T*>(net.a) + bi * net.a_sb;
    const T* b = static_cast<const T*>(net.b) + bi * net.b_sb;
    float acc[TM][TN] = {};
    for (int64_t k0 = 0; k0 < net.k; k0 += BK) {
      for (int i = threadIdx.x; i < BM * BK; i += THREADS) {
        const int r = i / BK, kk = i % BK;  // consecutive threads walk the reduction axis of A
        const int64_t m = m0 + r, j = k0 + kk;
        as[kk][r] = (m < p.m && j < net.k) ? to_f(a[m * net.a_sm + j * net.a_sk]) : 0.f;
      }
      for (int i = threadIdx.x; i < BK * BN; i += THREADS) {
        const int kk = i / BN, c = i % BN;  // consecutive threads walk n: coalesced when b_sn == 1
        const int64_t n = n0 + c, j = k0 + kk;
        bs[kk][c] = (n < p.n && j < net.k) ? to_f(b[j * net.b_sk + n * net.b_sn]) : 0.f;
      }
      __syncthreads();
#pragma unroll
      for (int kk = 0; kk < BK; ++kk) {
        float av[TM], bv[TN];
#pragma unroll
        for (int i = 0; i < TM; ++i) av[i] = as[kk][ty + 16 * i];
#pragma unroll
        for (int j = 0; j < TN; ++j) bv[j] = bs[kk][tx + 16 * j];
#pragma unroll
        for (int i = 0; i < TM; ++i)
#pragma unroll
          for (int j = 0; j < TN; ++j) acc[i][j] += av[i] * bv[j];
      }
      __syncthreads();
    }
    const float scale = p.scales[k];
    const T* bias = static_cast<const T*>(net.bias);
#pragma unroll
    for (int i = 0; i < TM; ++i)
#pragma unroll
      for (int j = 0; j < TN; ++j) {
        const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
        if (m < p.m && n < p.n) res[i][j] += scale * (acc[i][j] + to_f(bias[p.bias_along_m ? m : n]));
      }
  }
  const T* skip = static_cast<const T*>(p.skip) + bi * p.skip_sb;
  T* out = static_cast<T*>(p.out) + bi * p.out_sb;
#pragma unroll
  for (int i = 0; i < TM; ++i)
#pragma unroll
    for (int j = 0; j < TN; ++j) {
      const int64_t m = m0 + ty + 16 * i, n = n0 + tx + 16 * j;
      // Same thread reads skip then writes out for this element: out may alias skip.
      if (m < p.m && n < p.n)
        out[m * p.out_sm + n * p.out_sn] = from_f<T>(to_f(skip[m * p.skip_sm + n * p.skip_sn]) + res[i][j]);
    }
}

}  // namespace

std::string launch(DType dtype, const Params& params, int64_t stream) {
  if (params.batch == 0 || params.m == 0 || params.n == 0) return "";
  if (params.batch > 65535 || (params.m + BM - 1) / BM > 65535)
    return "batch " + std::to_string(params.batch) + " or m " + std::to_string(params.m) + " exceeds the grid";
  const dim3 grid((params.n + BN - 1) / BN, (params.m + BM - 1) / BM, params.batch);
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (dtype) {
    case DType::f32: zero_conv_add_kernel<float><<<grid, THREADS, 0, s>>>(params); break;
    case DType::f16: zero_conv_add_kernel<__half><<<grid, THREADS, 0, s>>>(params); break;
    case DType::bf16: zero_conv_add_kernel<__nv_bfloat16><<<grid, THREADS, 0, s>>>(params); break;
    default: return "unknown dtype code " + std::to_string(static_cast<int>(dtype));
  }
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? "" : cudaGetErrorString(err);
}

}  // namespace zero_conv
