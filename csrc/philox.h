// Philox4x32-10 counter-based generator and the dropout mask of docs/lora_linear_spec.md.
//
// Header-only, usable from host C++ and CUDA device code. Every backend derives the mask of
// element (m, k) of a logical (M, K) matrix from its int64 index i = m*K + k:
//   key     = (lo32(seed), hi32(seed))
//   counter = (lo32(i >> 2), hi32(i >> 2), 0, 0); the element takes output word i & 3
//   keep    = word >= threshold, threshold = floor(p * 2^32)
//   value   = keep ? float32(x) * keep_scale : 0,  keep_scale = float32(1 / (1 - p))
#pragma once

#include "host_device.h"

#include <cstdint>

namespace lowcost {

struct Philox4 {
  uint32_t w[4];
};

constexpr uint32_t kPhiloxM0 = 0xD2511F53u;
constexpr uint32_t kPhiloxM1 = 0xCD9E8D57u;
constexpr uint32_t kPhiloxW0 = 0x9E3779B9u;
constexpr uint32_t kPhiloxW1 = 0xBB67AE85u;

LOWCOST_HD void mulhilo32(uint32_t a, uint32_t b, uint32_t& hi, uint32_t& lo) {
#if defined(__CUDA_ARCH__)
  lo = a * b;
  hi = __umulhi(a, b);
#else
  const uint64_t prod = static_cast<uint64_t>(a) * static_cast<uint64_t>(b);
  hi = static_cast<uint32_t>(prod >> 32);
  lo = static_cast<uint32_t>(prod);
#endif
}

// Ten Philox rounds; the first round uses the key as given, the key is bumped after each round.
LOWCOST_HD Philox4 philox4x32_10(uint32_t c0, uint32_t c1, uint32_t c2, uint32_t c3,
                                 uint32_t k0, uint32_t k1) {
#if defined(__CUDA_ARCH__)
#pragma unroll
#endif
  for (int round = 0; round < 10; ++round) {
    uint32_t hi0, lo0, hi1, lo1;
    mulhilo32(kPhiloxM0, c0, hi0, lo0);
    mulhilo32(kPhiloxM1, c2, hi1, lo1);
    const uint32_t n0 = hi1 ^ c1 ^ k0;
    const uint32_t n2 = hi0 ^ c3 ^ k1;
    c0 = n0;
    c1 = lo1;
    c2 = n2;
    c3 = lo0;
    k0 += kPhiloxW0;
    k1 += kPhiloxW1;
  }
  Philox4 out;
  out.w[0] = c0;
  out.w[1] = c1;
  out.w[2] = c2;
  out.w[3] = c3;
  return out;
}

// Dropout parameters, computed once on the host from (seed, p) and passed by value to kernels.
struct DropoutParams {
  uint32_t key0;        // seed & 0xFFFFFFFF
  uint32_t key1;        // (seed >> 32) & 0xFFFFFFFF
  uint32_t threshold;   // keep iff word >= threshold
  float keep_scale;     // float32(1 / (1 - p))
  bool enabled;         // p > 0; when false no word is generated and the mask is all-keep, scale 1
};

// Host-side construction. p must already be validated to lie in [0, 1).
inline DropoutParams make_dropout_params(int64_t seed, double p) {
  DropoutParams d;
  const uint64_t s = static_cast<uint64_t>(seed);  // two's complement, as Python's & and >> give
  d.key0 = static_cast<uint32_t>(s & 0xFFFFFFFFull);
  d.key1 = static_cast<uint32_t>((s >> 32) & 0xFFFFFFFFull);
  d.enabled = p > 0.0;
  // Python: int(p * 4294967296.0), truncation toward zero of a non-negative double below 2^32.
  d.threshold = d.enabled ? static_cast<uint32_t>(static_cast<uint64_t>(p * 4294967296.0)) : 0u;
  d.keep_scale = d.enabled ? static_cast<float>(1.0 / (1.0 - p)) : 1.0f;
  return d;
}

// The four words of counter group `group` (= i >> 2).
LOWCOST_HD Philox4 philox_group(const DropoutParams& d, uint64_t group) {
  return philox4x32_10(static_cast<uint32_t>(group), static_cast<uint32_t>(group >> 32), 0u, 0u,
                       d.key0, d.key1);
}

// Bit t of the result: word t of `r` passes the threshold (constant indices only, so device code
// keeps the words in registers).
LOWCOST_HD uint32_t keep_bits(const Philox4& r, uint32_t threshold) {
  return (r.w[0] >= threshold ? 1u : 0u) | (r.w[1] >= threshold ? 2u : 0u) |
         (r.w[2] >= threshold ? 4u : 0u) | (r.w[3] >= threshold ? 8u : 0u);
}

// The word of logical element i.
LOWCOST_HD uint32_t philox_word(const DropoutParams& d, uint64_t i) {
  const Philox4 r = philox_group(d, i >> 2);
  const uint32_t t = static_cast<uint32_t>(i & 3);
  return t == 0 ? r.w[0] : (t == 1 ? r.w[1] : (t == 2 ? r.w[2] : r.w[3]));
}

LOWCOST_HD bool dropout_keep(const DropoutParams& d, uint64_t i) {
  return !d.enabled || philox_word(d, i) >= d.threshold;
}

// Keep flags of the four consecutive logical elements i0 .. i0+3 (bit t set = element i0+t kept).
// One generator call when i0 is a multiple of 4, two otherwise.
LOWCOST_HD uint32_t dropout_keep4(const DropoutParams& d, uint64_t i0) {
  if (!d.enabled) return 0xFu;
  const uint64_t g = i0 >> 2;
  const uint32_t phase = static_cast<uint32_t>(i0 & 3);
  uint32_t bits = keep_bits(philox_group(d, g), d.threshold);
  if (phase != 0) bits |= keep_bits(philox_group(d, g + 1), d.threshold) << 4;
  return (bits >> phase) & 0xFu;
}

// Keep flags of the eight consecutive logical elements i0 .. i0+7 (bit t set = element i0+t kept).
// Two generator calls when i0 is a multiple of 4, three otherwise.
LOWCOST_HD uint32_t dropout_keep8(const DropoutParams& d, uint64_t i0) {
  if (!d.enabled) return 0xFFu;
  const uint64_t g = i0 >> 2;
  const uint32_t phase = static_cast<uint32_t>(i0 & 3);
  uint32_t bits = keep_bits(philox_group(d, g), d.threshold) |
                  (keep_bits(philox_group(d, g + 1), d.threshold) << 4);
  if (phase != 0) bits |= keep_bits(philox_group(d, g + 2), d.threshold) << 8;
  return (bits >> phase) & 0xFFu;
}

// Applies the mask value rule to an fp32 value: keep ? v * keep_scale : 0 (a select, so NaN/inf in a
// dropped element still gives 0).
LOWCOST_HD float dropout_apply(const DropoutParams& d, bool keep, float v) {
  return keep ? (d.enabled ? v * d.keep_scale : v) : 0.0f;
}

}  // namespace lowcost
