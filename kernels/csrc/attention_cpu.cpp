// Attention softmax(Q K^T * scale) V for bf16 on CPUs with AVX512-BF16 (Zen 4, Cooper Lake and later).
//
// Why: torch's CPU flash attention runs bf16 at its fp32 speed (~130 GFLOP/s on 2 Zen 4 cores, for the
// SD1.5 shapes: 8 heads of 40 over 1024 tokens), a third of the bf16 matmul rate; there it was 13% of
// a bf16 denoising step for 5% of its FLOPs. Here both products use vdpbf16ps (bf16 pairs, fp32 sums).
//
// Per head, keys and values are packed once into the pair-interleaved layouts vdpbf16ps reads:
//   K: [key block of 16][dim pair p][16 keys][2]       scores of 16 keys per zmm, reduced over dim pairs
//   V: [key pair][dim block of 16][16 dims][2]         outputs of 16 dims per zmm, reduced over key pairs
// Then for each tile of query rows: scores (fp32) for all keys, exact softmax per row (max, exp, sum in
// fp32), probabilities rounded to bf16 (as torch's bf16 kernels do), P V, divide by the row sum. The
// tile's scores stay in L2: RT rows x M keys x 4 bytes (32 x 4096 x 4 = 512 KB at 512², 64x64 latents).
//
// Tensors arrive as raw addresses plus element strides (batch, head, row; the head dimension is
// contiguous), as in zero_conv_cpu.cpp: no libtorch, no torch ABI. Threads: OpenMP, with as many as
// the caller passes (torch.get_num_threads()). torch ships its own libgomp.so.1 and loads it first, so
// this module binds to that same runtime and its thread pool: threads started here instead ran against
// torch's OpenMP workers still spinning after the preceding matmul (the kernel took 1.4-2x longer).
#include <pybind11/pybind11.h>

#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <vector>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace py = pybind11;

namespace {

#define ENGINE_BF16_TARGET __attribute__((target("avx512f,avx512bw,avx512vl,avx512dq,avx512bf16")))

// Register tiles: QK^T takes RQ rows x 4 key blocks (24 fp32 accumulators), P V takes RP rows x 3 dim
// blocks (24): each loaded K or V vector then feeds 6 or 8 vdpbf16ps, each broadcast 4 or 3.
constexpr int64_t RQ = 6;
constexpr int64_t RP = 8;
constexpr int64_t RT = 48;  // query rows per work item (a multiple of RQ and RP; its scores stay in L2)

struct Head {
  const uint16_t* q;
  const uint16_t* k;
  const uint16_t* v;
  uint16_t* o;
};

struct Problem {
  int64_t B, H, N, M, D;
  const uint16_t *q, *k, *v;
  uint16_t* o;
  int64_t qs[3], ks[3], vs[3], os[3];  // (batch, head, row) strides in elements
  float scale;

  int64_t pairs() const { return D / 2; }                // dim pairs of Q and K
  int64_t key_blocks() const { return (M + 15) / 16; }   // blocks of 16 keys
  int64_t key_pairs() const { return (M + 1) / 2; }
  int64_t dim_blocks() const { return (D + 15) / 16; }   // blocks of 16 output dims
  int64_t kp_size() const { return key_blocks() * pairs() * 16; }       // uint32 words per head
  int64_t vp_size() const { return key_pairs() * dim_blocks() * 16; }   // uint32 words per head
  int64_t padded_keys() const { return key_blocks() * 16; }
  Head head(int64_t bh) const {
    int64_t b = bh / H, h = bh % H;
    return {q + b * qs[0] + h * qs[1], k + b * ks[0] + h * ks[1], v + b * vs[0] + h * vs[1],
            o + b * os[0] + h * os[1]};
  }
};

inline uint32_t pair_at(const uint16_t* p) {
  uint32_t w;
  std::memcpy(&w, p, 4);
  return w;
}

void pack_head(const Problem& pr, const Head& hd, uint32_t* kp, uint32_t* vp) {
  const int64_t P = pr.pairs(), KB = pr.key_blocks(), DB = pr.dim_blocks(), M = pr.M, D = pr.D;
  for (int64_t kb = 0; kb < KB; ++kb)
    for (int64_t p = 0; p < P; ++p)
      for (int64_t lane = 0; lane < 16; ++lane) {
        int64_t m = kb * 16 + lane;
        kp[(kb * P + p) * 16 + lane] = m < M ? pair_at(hd.k + m * pr.ks[2] + 2 * p) : 0u;
      }
  for (int64_t mp = 0; mp < pr.key_pairs(); ++mp)
    for (int64_t db = 0; db < DB; ++db)
      for (int64_t lane = 0; lane < 16; ++lane) {
        int64_t d = db * 16 + lane, m0 = 2 * mp, m1 = 2 * mp + 1;
        uint32_t lo = d < D ? hd.v[m0 * pr.vs[2] + d] : 0u;
        uint32_t hi = (d < D && m1 < M) ? hd.v[m1 * pr.vs[2] + d] : 0u;
        vp[(mp * DB + db) * 16 + lane] = lo | (hi << 16);
      }
}

// exp(x) for x <= 0 (a score minus its row's max): 2^n * e^r with r = x - n ln2 in [-ln2/2, ln2/2]
// and a degree-6 Taylor polynomial for e^r (relative error < 2e-7, below bf16's 4e-3).
ENGINE_BF16_TARGET inline __m512 exp_nonpositive(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.0f));
  __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                  _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x);  // ln2, high bits: exact
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);     // ln2, low bits
  __m512 p = _mm512_set1_ps(1.0f / 720);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 120));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 24));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f / 6));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.0f));
  return _mm512_scalef_ps(p, n);
}

// scores[i][kb*16 ..] = scale * q_i . k for NB key blocks starting at kb, RQ rows.
template <int NB>
ENGINE_BF16_TARGET void qk_tile(const uint16_t* const* qrow, const uint32_t* kp, int64_t P, int64_t kb,
                                float* const* srow, __m512 scale) {
  __m512 acc[RQ][NB];
  for (int i = 0; i < RQ; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t p = 0; p < P; ++p) {
    __m512bh kv[NB];
    for (int j = 0; j < NB; ++j) kv[j] = (__m512bh)_mm512_loadu_si512(kp + ((kb + j) * P + p) * 16);
    for (int i = 0; i < RQ; ++i) {
      __m512bh qv = (__m512bh)_mm512_set1_epi32((int)pair_at(qrow[i] + 2 * p));
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], qv, kv[j]);
    }
  }
  for (int i = 0; i < RQ; ++i)
    for (int j = 0; j < NB; ++j) _mm512_storeu_ps(srow[i] + (kb + j) * 16, _mm512_mul_ps(acc[i][j], scale));
}

// out_i[db*16 ..] = (p_i . V)[...] / sum_i for NB dim blocks starting at db, RP rows; bf16, d < D only.
template <int NB>
ENGINE_BF16_TARGET void pv_tile(const uint16_t* const* prow, const uint32_t* vp, int64_t MP, int64_t DB,
                                int64_t db, const float* inv_sum, uint16_t* const* orow, int64_t D) {
  __m512 acc[RP][NB];
  for (int i = 0; i < RP; ++i)
    for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_setzero_ps();
  for (int64_t mp = 0; mp < MP; ++mp) {
    __m512bh vv[NB];
    for (int j = 0; j < NB; ++j) vv[j] = (__m512bh)_mm512_loadu_si512(vp + (mp * DB + db + j) * 16);
    for (int i = 0; i < RP; ++i) {
      __m512bh pv = (__m512bh)_mm512_set1_epi32((int)pair_at(prow[i] + 2 * mp));
      for (int j = 0; j < NB; ++j) acc[i][j] = _mm512_dpbf16_ps(acc[i][j], pv, vv[j]);
    }
  }
  for (int i = 0; i < RP; ++i) {
    if (orow[i] == nullptr) continue;  // a padding row of the last tile
    __m512 s = _mm512_set1_ps(inv_sum[i]);
    for (int j = 0; j < NB; ++j) {
      int64_t d0 = (db + j) * 16;
      __mmask16 valid = (__mmask16)(D - d0 >= 16 ? 0xFFFF : ((1u << (D - d0)) - 1));
      __m256bh out = _mm512_cvtneps_pbh(_mm512_mul_ps(acc[i][j], s));
      _mm256_mask_storeu_epi16(orow[i] + d0, valid, (__m256i)out);
    }
  }
}

ENGINE_BF16_TARGET void qk_rows(const uint16_t* const* qrow, const uint32_t* kp, int64_t P, int64_t KB,
                                float* const* srow, __m512 scale) {
  int64_t kb = 0;
  for (; kb + 4 <= KB; kb += 4) qk_tile<4>(qrow, kp, P, kb, srow, scale);
  switch (KB - kb) {
    case 3: qk_tile<3>(qrow, kp, P, kb, srow, scale); break;
    case 2: qk_tile<2>(qrow, kp, P, kb, srow, scale); break;
    case 1: qk_tile<1>(qrow, kp, P, kb, srow, scale); break;
    default: break;
  }
}

ENGINE_BF16_TARGET void pv_rows(const uint16_t* const* prow, const uint32_t* vp, int64_t MP, int64_t DB,
                                const float* inv_sum, uint16_t* const* orow, int64_t D) {
  int64_t db = 0;
  for (; db + 3 <= DB; db += 3) pv_tile<3>(prow, vp, MP, DB, db, inv_sum, orow, D);
  switch (DB - db) {
    case 2: pv_tile<2>(prow, vp, MP, DB, db, inv_sum, orow, D); break;
    case 1: pv_tile<1>(prow, vp, MP, DB, db, inv_sum, orow, D); break;
    default: break;
  }
}

// Softmax of one row of scores over the first M of MK (padded) keys: bf16 probabilities into prob
// (zero past M), returns 1 / their fp32 sum.
ENGINE_BF16_TARGET float softmax_row(const float* s, int64_t M, int64_t MK, uint16_t* prob) {
  __m512 vmax = _mm512_set1_ps(-INFINITY);
  for (int64_t m = 0; m < MK; m += 16) {
    __mmask16 valid = (__mmask16)(M - m >= 16 ? 0xFFFF : (M > m ? (1u << (M - m)) - 1 : 0));
    vmax = _mm512_mask_max_ps(vmax, valid, vmax, _mm512_loadu_ps(s + m));
  }
  __m512 row_max = _mm512_set1_ps(_mm512_reduce_max_ps(vmax));
  __m512 vsum = _mm512_setzero_ps();
  for (int64_t m = 0; m < MK; m += 16) {
    __mmask16 valid = (__mmask16)(M - m >= 16 ? 0xFFFF : (M > m ? (1u << (M - m)) - 1 : 0));
    __m512 e = _mm512_maskz_mov_ps(valid, exp_nonpositive(_mm512_sub_ps(_mm512_loadu_ps(s + m), row_max)));
    __m256bh eb = _mm512_cvtneps_pbh(e);
    _mm256_storeu_si256((__m256i*)(prob + m), (__m256i)eb);
    vsum = _mm512_add_ps(vsum, _mm512_cvtpbh_ps(eb));  // the sum of what P V multiplies
  }
  return 1.0f / _mm512_reduce_add_ps(vsum);
}

ENGINE_BF16_TARGET void run_tile(const Problem& pr, const Head& hd, const uint32_t* kp, const uint32_t* vp,
                                 int64_t row0, float* scores, uint16_t* probs) {
  const int64_t MK = pr.padded_keys(), rows = std::min(RT, pr.N - row0);
  const __m512 scale = _mm512_set1_ps(pr.scale);
  float inv_sum[RT];
  for (int64_t r = 0; r < rows; r += RQ) {
    const uint16_t* qrow[RQ];
    float* srow[RQ];
    for (int64_t i = 0; i < RQ; ++i) {
      int64_t n = row0 + std::min(r + i, rows - 1);  // padding rows repeat the last row, never stored
      qrow[i] = hd.q + n * pr.qs[2];
      srow[i] = scores + (r + i) * MK;
    }
    qk_rows(qrow, kp, pr.pairs(), pr.key_blocks(), srow, scale);
  }
  for (int64_t r = 0; r < rows; ++r) inv_sum[r] = softmax_row(scores + r * MK, pr.M, MK, probs + r * MK);
  for (int64_t r = 0; r < rows; r += RP) {
    const uint16_t* prow[RP];
    uint16_t* orow[RP];
    float inv[RP];
    for (int64_t i = 0; i < RP; ++i) {
      bool real = r + i < rows;
      int64_t rr = real ? r + i : rows - 1;
      prow[i] = probs + rr * MK;
      orow[i] = real ? hd.o + (row0 + r + i) * pr.os[2] : nullptr;
      inv[i] = inv_sum[rr];
    }
    pv_rows(prow, vp, pr.key_pairs(), pr.dim_blocks(), inv, orow, pr.D);
  }
}

template <class Fn>
void parallel(int64_t items, int threads, Fn fn) {
  threads = (int)std::max<int64_t>(1, std::min<int64_t>(threads, items));
#pragma omp parallel for schedule(dynamic) num_threads(threads)
  for (int64_t i = 0; i < items; ++i) {
#ifdef _OPENMP
    fn(omp_get_thread_num(), i);
#else
    fn(0, i);
#endif
  }
}

bool cpu_supported() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512bf16");
}

void attention_bf16(uintptr_t q, uintptr_t k, uintptr_t v, uintptr_t o, int64_t B, int64_t H, int64_t N,
                    int64_t M, int64_t D, py::tuple qs, py::tuple ks, py::tuple vs, py::tuple os, double scale,
                    int threads) {
  if (!cpu_supported()) throw std::runtime_error("this CPU has no AVX512-BF16");
  if (B < 1 || H < 1 || N < 1 || M < 1 || D < 2 || D % 2)
    throw std::invalid_argument("attention_bf16: need B, H, N, M >= 1 and an even head dim");
  Problem pr{B, H, N, M, D, reinterpret_cast<const uint16_t*>(q), reinterpret_cast<const uint16_t*>(k),
             reinterpret_cast<const uint16_t*>(v), reinterpret_cast<uint16_t*>(o), {}, {}, {}, {}, (float)scale};
  for (int i = 0; i < 3; ++i) {
    pr.qs[i] = qs[i].cast<int64_t>();
    pr.ks[i] = ks[i].cast<int64_t>();
    pr.vs[i] = vs[i].cast<int64_t>();
    pr.os[i] = os[i].cast<int64_t>();
  }
  const int64_t heads = B * H, tiles = (N + RT - 1) / RT, MK = pr.padded_keys();
  std::vector<uint32_t> kp(heads * pr.kp_size()), vp(heads * pr.vp_size());
  std::vector<std::vector<float>> scores(std::max(threads, 1));
  std::vector<std::vector<uint16_t>> probs(std::max(threads, 1));
  py::gil_scoped_release release;
  parallel(heads, threads, [&](int, int64_t bh) {
    pack_head(pr, pr.head(bh), kp.data() + bh * pr.kp_size(), vp.data() + bh * pr.vp_size());
  });
  parallel(heads * tiles, threads, [&](int t, int64_t item) {
    if (scores[t].empty()) {
      scores[t].resize(RT * MK);
      probs[t].resize(RT * MK);
    }
    int64_t bh = item / tiles, tile = item % tiles;
    run_tile(pr, pr.head(bh), kp.data() + bh * pr.kp_size(), vp.data() + bh * pr.vp_size(), tile * RT,
             scores[t].data(), probs[t].data());
  });
}

}  // namespace

PYBIND11_MODULE(_attention_cpu, m) {
  m.doc() = "bf16 attention with AVX512-BF16 (see kernels/attention.py)";
  m.def("supported", &cpu_supported, "whether this CPU has the AVX512-BF16 instructions the kernel uses");
  m.def("attention_bf16", &attention_bf16, "o = softmax(q k^T * scale) v per (batch, head); raw addresses");
}
