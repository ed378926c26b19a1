// CPU dropout ops: philox_dropout (x~ = D (.) x) and philox_dropout_pair_ (D (.) x, and z masked in place,
// with one generation of the mask), bit for bit the mask of docs/lora_linear_spec.md (csrc/philox.h).
//
// Each row m of the logical (M, K) matrix covers the element indices i = m*K .. m*K+K-1. A row's keep
// masks (one uint32 per element, all ones = kept) come from the Philox groups that cover it: eight groups
// (32 elements) per AVX2 step where the CPU has AVX2, one group per call otherwise; the masks are then
// applied to the row (an AVX2 select for contiguous float32, a scalar loop for other dtypes or strides).
// Rows are independent, so results do not depend on the number of threads.
#include "ops_cpu.h"

#include "../checks.h"
#include "../dispatch.h"
#include "../philox.h"

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define LOWCOST_X86_AVX2 1
#endif

namespace lowcost {
namespace cpu {
namespace {

constexpr uint32_t kKeep = 0xFFFFFFFFu;

// masks[j] for the elements i0 .. i0+n-1, one Philox call per group they touch.
void keep_masks_scalar(const DropoutParams& d, uint64_t i0, int64_t n, uint32_t* masks) {
  int64_t j = 0;
  while (j < n) {
    const uint64_t i = i0 + static_cast<uint64_t>(j);
    const Philox4 r = philox_group(d, i >> 2);
    for (uint64_t t = i & 3; t < 4 && j < n; ++t, ++j) masks[j] = r.w[t] >= d.threshold ? kKeep : 0u;
  }
}

#ifdef LOWCOST_X86_AVX2
// (hi, lo) 32-bit halves of m * c in each of 8 uint32 lanes; m holds the multiplier in every 64-bit lane.
__attribute__((target("avx2"))) inline void mulhilo8(__m256i m, __m256i c, __m256i& hi, __m256i& lo) {
  const __m256i even = _mm256_mul_epu32(c, m);                          // lanes 0, 2, 4, 6 (64-bit)
  const __m256i odd = _mm256_mul_epu32(_mm256_srli_epi64(c, 32), m);    // lanes 1, 3, 5, 7
  lo = _mm256_blend_epi32(even, _mm256_slli_epi64(odd, 32), 0xAA);
  hi = _mm256_blend_epi32(_mm256_srli_epi64(even, 32), odd, 0xAA);
}

// All-ones lanes where word >= threshold (unsigned): max(word, threshold) == word.
__attribute__((target("avx2"))) inline __m256i keep8(__m256i word, __m256i threshold) {
  return _mm256_cmpeq_epi32(_mm256_max_epu32(word, threshold), word);
}

// Masks of the 32*B elements of groups g .. g+8B-1 (g's first element first), stored at masks[0 .. 32B-1].
// B independent batches of eight groups run interleaved, so one batch's multiplies hide the other's
// latency. Lane j of word vector t of a batch is element 4(g+j)+t; a 4x8 transpose puts them in order.
template <int B>
__attribute__((target("avx2"))) inline void keep_masks_batches(const DropoutParams& d, uint64_t g, uint32_t* masks) {
  alignas(32) uint32_t lo32[8 * B], hi32[8 * B];
  for (int j = 0; j < 8 * B; ++j) {
    lo32[j] = static_cast<uint32_t>(g + static_cast<uint64_t>(j));
    hi32[j] = static_cast<uint32_t>((g + static_cast<uint64_t>(j)) >> 32);
  }
  __m256i c0[B], c1[B], c2[B], c3[B];
  for (int b = 0; b < B; ++b) {
    c0[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(lo32 + 8 * b));
    c1[b] = _mm256_load_si256(reinterpret_cast<const __m256i*>(hi32 + 8 * b));
    c2[b] = _mm256_setzero_si256();
    c3[b] = _mm256_setzero_si256();
  }
  __m256i k0 = _mm256_set1_epi32(static_cast<int>(d.key0)), k1 = _mm256_set1_epi32(static_cast<int>(d.key1));
  const __m256i m0 = _mm256_set1_epi64x(kPhiloxM0), m1 = _mm256_set1_epi64x(kPhiloxM1);
  const __m256i w0 = _mm256_set1_epi32(static_cast<int>(kPhiloxW0));
  const __m256i w1 = _mm256_set1_epi32(static_cast<int>(kPhiloxW1));
  for (int round = 0; round < 10; ++round) {
    for (int b = 0; b < B; ++b) {
      __m256i hi0, lo0, hi1, lo1;
      mulhilo8(m0, c0[b], hi0, lo0);
      mulhilo8(m1, c2[b], hi1, lo1);
      c0[b] = _mm256_xor_si256(_mm256_xor_si256(hi1, c1[b]), k0);
      c2[b] = _mm256_xor_si256(_mm256_xor_si256(hi0, c3[b]), k1);
      c1[b] = lo1;
      c3[b] = lo0;
    }
    k0 = _mm256_add_epi32(k0, w0);
    k1 = _mm256_add_epi32(k1, w1);
  }
  const __m256i threshold = _mm256_set1_epi32(static_cast<int>(d.threshold));
  for (int b = 0; b < B; ++b) {
    const __m256i k_0 = keep8(c0[b], threshold), k_1 = keep8(c1[b], threshold);
    const __m256i k_2 = keep8(c2[b], threshold), k_3 = keep8(c3[b], threshold);
    const __m256i t0 = _mm256_unpacklo_epi32(k_0, k_1), t1 = _mm256_unpackhi_epi32(k_0, k_1);
    const __m256i t2 = _mm256_unpacklo_epi32(k_2, k_3), t3 = _mm256_unpackhi_epi32(k_2, k_3);
    const __m256i g04 = _mm256_unpacklo_epi64(t0, t2), g15 = _mm256_unpackhi_epi64(t0, t2);  // groups 0|4, 1|5
    const __m256i g26 = _mm256_unpacklo_epi64(t1, t3), g37 = _mm256_unpackhi_epi64(t1, t3);  // groups 2|6, 3|7
    __m256i* out = reinterpret_cast<__m256i*>(masks + 32 * b);
    _mm256_storeu_si256(out + 0, _mm256_permute2x128_si256(g04, g15, 0x20));
    _mm256_storeu_si256(out + 1, _mm256_permute2x128_si256(g26, g37, 0x20));
    _mm256_storeu_si256(out + 2, _mm256_permute2x128_si256(g04, g15, 0x31));
    _mm256_storeu_si256(out + 3, _mm256_permute2x128_si256(g26, g37, 0x31));
  }
}

__attribute__((target("avx2"))) void keep_masks_avx2(const DropoutParams& d, uint64_t i0, int64_t n,
                                                     uint32_t* masks) {
  const int64_t head = std::min<int64_t>(n, static_cast<int64_t>((4 - (i0 & 3)) & 3));
  keep_masks_scalar(d, i0, head, masks);
  int64_t j = head;
  for (; j + 64 <= n; j += 64) keep_masks_batches<2>(d, (i0 + static_cast<uint64_t>(j)) >> 2, masks + j);
  for (; j + 32 <= n; j += 32) keep_masks_batches<1>(d, (i0 + static_cast<uint64_t>(j)) >> 2, masks + j);
  keep_masks_scalar(d, i0 + static_cast<uint64_t>(j), n - j, masks + j);
}

// out[k] = masks[k] ? x[k] * scale : 0 for contiguous float32 (a select: a dropped NaN gives +0).
__attribute__((target("avx2"))) void apply_masks_f32_avx2(const uint32_t* masks, const float* x, float* out,
                                                          int64_t n, float scale) {
  const __m256 s = _mm256_set1_ps(scale);
  int64_t k = 0;
  for (; k + 8 <= n; k += 8) {
    const __m256 keep = _mm256_castsi256_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(masks + k)));
    _mm256_storeu_ps(out + k, _mm256_and_ps(keep, _mm256_mul_ps(_mm256_loadu_ps(x + k), s)));
  }
  for (; k < n; ++k) out[k] = masks[k] ? x[k] * scale : 0.0f;
}

bool cpu_has_avx2() {
  static const bool has = __builtin_cpu_supports("avx2");
  return has;
}
#endif

void keep_masks(const DropoutParams& d, uint64_t i0, int64_t n, uint32_t* masks) {
#ifdef LOWCOST_X86_AVX2
  if (cpu_has_avx2()) return keep_masks_avx2(d, i0, n, masks);
#endif
  keep_masks_scalar(d, i0, n, masks);
}

// One row: out[k] = D_k (.) src[k * stride] in T, with the row's masks.
template <typename T>
void apply_masks(const DropoutParams& d, const uint32_t* masks, const T* src, int64_t stride, T* out, int64_t n) {
#ifdef LOWCOST_X86_AVX2
  if constexpr (std::is_same_v<T, float>) {
    if (stride == 1 && cpu_has_avx2()) return apply_masks_f32_avx2(masks, src, out, n, d.keep_scale);
  }
#endif
  for (int64_t k = 0; k < n; ++k) {
    out[k] = static_cast<T>(dropout_apply(d, masks[k] != 0u, static_cast<float>(src[k * stride])));
  }
}

// Rows per parallel chunk so that a chunk covers at least ~32k elements.
int64_t row_grain(int64_t K) {
  return std::max<int64_t>(1, 32768 / std::max<int64_t>(1, K));
}

// For each row m: masks of the row, then visit(m, masks).
template <typename F>
void for_each_masked_row(const DropoutParams& d, int64_t M, int64_t K, F&& visit) {
  at::parallel_for(0, M, row_grain(K), [&](int64_t m_begin, int64_t m_end) {
    std::vector<uint32_t> masks(static_cast<size_t>(K));
    for (int64_t m = m_begin; m < m_end; ++m) {
      keep_masks(d, static_cast<uint64_t>(m) * static_cast<uint64_t>(K), K, masks.data());
      visit(m, masks.data());
    }
  });
}

}  // namespace

at::Tensor philox_dropout(const at::Tensor& x, int64_t seed, double p) {
  const LoraDims dims = check_philox_dropout_args(x, seed, p, c10::DeviceType::CPU);
  at::Tensor out = at::empty({dims.M, dims.K}, x.options());
  if (out.numel() == 0) return out;
  const DropoutParams d = make_dropout_params(seed, p);
  if (!d.enabled) return out.copy_(x);
  dispatch_act(x.scalar_type(), "philox_dropout", [&](auto xv) {
    using T = decltype(xv);
    const T* xp = x.data_ptr<T>();
    T* op = out.data_ptr<T>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    for_each_masked_row(d, dims.M, dims.K, [&](int64_t m, const uint32_t* masks) {
      apply_masks<T>(d, masks, xp + m * sx0, sx1, op + m * dims.K, dims.K);
    });
  });
  return out;
}

at::Tensor philox_dropout_pair_(const at::Tensor& x, at::Tensor& z, int64_t seed, double p) {
  const LoraDims dims = check_philox_dropout_pair_args(x, z, seed, p, c10::DeviceType::CPU);
  at::Tensor x_out = at::empty({dims.M, dims.K}, x.options());
  if (x_out.numel() == 0) return x_out;
  const DropoutParams d = make_dropout_params(seed, p);
  if (!d.enabled) return x_out.copy_(x);
  dispatch_act(x.scalar_type(), "philox_dropout_pair_", [&](auto xv) {
    using T = decltype(xv);
    const T* xp = x.data_ptr<T>();
    T* xo = x_out.data_ptr<T>();
    float* zp = z.data_ptr<float>();
    const int64_t sx0 = x.stride(0), sx1 = x.stride(1);
    for_each_masked_row(d, dims.M, dims.K, [&](int64_t m, const uint32_t* masks) {
      apply_masks<T>(d, masks, xp + m * sx0, sx1, xo + m * dims.K, dims.K);
      apply_masks<float>(d, masks, zp + m * dims.K, 1, zp + m * dims.K, dims.K);   // in place: same row
    });
  });
  return x_out;
}

}  // namespace cpu
}  // namespace lowcost

TORCH_LIBRARY_IMPL(lowcost, CPU, m) {
  m.impl("philox_dropout", &lowcost::cpu::philox_dropout);
  m.impl("philox_dropout_pair_", &lowcost::cpu::philox_dropout_pair_);
}
