// Warp-level tensor-core building blocks of the skinny kernels: the m16n8k16 bf16 mma, its operand
// fragments loaded from shared memory, and cp.async. Each primitive has a GPU body (inline PTX) and a
// host body used by the emulator (csrc/tests/test_cuda_emulated.cpp), which runs the same kernel
// source with one host fiber per CUDA thread; the host mma follows the PTX ISA fragment layout
// element by element, so a kernel that puts an element in the wrong register fails on the host too.
//
// Fragment layout of mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 (PTX ISA, "Matrix
// fragments for mma.m16n8k16 with floating point type"); g = lane / 4, t = lane % 4, and the lower
// 16 bits of a register hold the element with the smaller column (A) or row (B) index:
//   A (16 x 16, row-major)  reg i in 0..3: row g + 8 (i & 1), columns 2t + 8 (i >> 1) + {0, 1}
//   B (16 x 8,  column-major) reg i in 0..1: rows 2t + 8 i + {0, 1}, column g
//   C (16 x 8,  fp32)       element i in 0..3: row g + 8 (i >> 1), column 2t + (i & 1)
//
// Operands. bf16 tensor data enters the mma as is. Anything else is split into bf16 terms whose sum
// is the value: fp16 -> hi + lo exactly (11 significant bits fit in two bf16), fp32 -> hi + lo within
// 2^-18 relative (u, du and fp32 adapters). A product of two operands sums every term product with
// fp32 accumulation (bf16 x bf16 products are exact), so products of bf16/fp16 data are exact and an
// fp32 operand costs at most 2^-18 relative: far below the bf16/fp16 rounding of the activations it
// meets, and in fp32's exponent range (fp16 terms would underflow small gradients).
// fp32 activations skip the tensor cores (tf32 would change the numerics): the same operand calls
// then hold plain floats and the product is 64 FMAs per lane, in the same output layout.
#pragma once

#include "common.cuh"

#include <cstdint>
#include <cstring>
#include <type_traits>

namespace lowcost {
namespace cuda {

struct FragA {
  uint32_t x[4];
};
struct FragB {
  uint32_t x[2];
};
struct FragC {
  float x[4];
};

__device__ __forceinline__ int lane_id() { return static_cast<int>(threadIdx.x) % 32; }
__device__ __forceinline__ int warp_id() { return static_cast<int>(threadIdx.x) / 32; }

// Row and column (inside the 16 x 8 tile) of accumulator element i of this lane.
__device__ __forceinline__ int frag_c_row(int i) { return lane_id() / 4 + 8 * (i >> 1); }
__device__ __forceinline__ int frag_c_col(int i) { return 2 * (lane_id() % 4) + (i & 1); }

// ---- bf16 packing ---------------------------------------------------------------------------
__device__ __forceinline__ float bf16_bits_to_float(uint32_t bits16) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(bits16 << 16);
#else
  const uint32_t w = bits16 << 16;
  float f;
  std::memcpy(&f, &w, sizeof(f));
  return f;
#endif
}

// Two floats rounded to nearest-even bf16; `first` in the low half.
__device__ __forceinline__ uint32_t pack_bf16x2(float first, float second) {
#if defined(__CUDA_ARCH__)
  uint32_t out;
  asm("cvt.rn.bf16x2.f32 %0, %1, %2;\n" : "=r"(out) : "f"(second), "f"(first));
  return out;
#else
  return static_cast<uint32_t>(c10::BFloat16(first).x) | (static_cast<uint32_t>(c10::BFloat16(second).x) << 16);
#endif
}

// The remainder v - bf16(v) (0 where bf16(v) is v or not finite).
__device__ __forceinline__ float bf16_remainder(float v, float hi) { return hi == v ? 0.0f : v - hi; }

// ---- the mma -----------------------------------------------------------------------------------
#if defined(LOWCOST_CUDA_EMULATION)
// One lane's operands, published to the other lanes of its warp by the host mma.
struct MmaLaneOperands {
  FragA a;
  FragB b;
};
// This warp's 32 slots for this call (csrc/tests/test_cuda_emulated.cpp): two banks used alternately,
// so a lane can publish its next call's operands while slower lanes still read this call's.
MmaLaneOperands* emulated_warp_slots();

// Element (row, col) of the warp's A operand, read from the lane and register the layout names.
inline float emulated_a(const MmaLaneOperands* s, int row, int col) {
  const int lane = (row % 8) * 4 + (col % 8) / 2;
  const uint32_t reg = s[lane].a.x[(row / 8) + 2 * (col / 8)];
  return bf16_bits_to_float((col % 2) ? (reg >> 16) : (reg & 0xFFFFu));
}

inline float emulated_b(const MmaLaneOperands* s, int row, int col) {
  const int lane = col * 4 + (row % 8) / 2;
  const uint32_t reg = s[lane].b.x[row / 8];
  return bf16_bits_to_float((row % 2) ? (reg >> 16) : (reg & 0xFFFFu));
}
#endif

// d += a b for the warp's 16 x 8 tile (all 32 lanes must call it together).
__device__ __forceinline__ void mma_bf16_16816(FragC& d, const FragA& a, const FragB& b) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, "
      "{%8, %9}, {%0, %1, %2, %3};\n"
      : "+f"(d.x[0]), "+f"(d.x[1]), "+f"(d.x[2]), "+f"(d.x[3])
      : "r"(a.x[0]), "r"(a.x[1]), "r"(a.x[2]), "r"(a.x[3]), "r"(b.x[0]), "r"(b.x[1]));
#else
  __trap();  // the launchers refuse GPUs below compute capability 8.0
#endif
#elif defined(LOWCOST_CUDA_EMULATION)
  MmaLaneOperands* slots = emulated_warp_slots();
  slots[lane_id()] = {a, b};
  __syncwarp();
  for (int i = 0; i < 4; ++i) {
    const int row = frag_c_row(i), col = frag_c_col(i);
    float sum = d.x[i];
    for (int k = 0; k < 16; ++k) sum += emulated_a(slots, row, k) * emulated_b(slots, k, col);
    d.x[i] = sum;
  }
#endif
}

// ---- operands ----------------------------------------------------------------------------------
// Number of bf16 terms that represent one element of T on the tensor-core path.
template <typename T>
constexpr int kTerms = std::is_same<T, c10::BFloat16>::value ? 1 : 2;

// The tensor-core path is taken for half-precision activations; fp32 activations use FMAs.
template <typename ActT>
constexpr bool kUseMma = !std::is_same<ActT, float>::value;

template <typename T, bool Mma>
struct OperandA;  // the lane's share of a 16 x 16 A operand
template <typename T, bool Mma>
struct OperandB;  // the lane's share of a 16 x 8 B operand

template <typename T>
struct OperandA<T, true> {
  FragA t[kTerms<T>];
};
template <typename T>
struct OperandB<T, true> {
  FragB t[kTerms<T>];
};
template <typename T>
struct OperandA<T, false> {
  float v[2][16];  // rows g and g + 8, columns 0..15
};
template <typename T>
struct OperandB<T, false> {
  float v[16][2];  // rows 0..15, columns 2t and 2t + 1
};

// The elements p[0] and p[Step] as the bf16 term registers of one fragment register.
template <typename T, int Step>
__device__ __forceinline__ void pair_terms(const T* p, uint32_t (&out)[kTerms<T>]) {
  if constexpr (kTerms<T> == 1) {
    if constexpr (Step == 1) {
      out[0] = *reinterpret_cast<const uint32_t*>(p);
    } else {
      out[0] = static_cast<uint32_t>(p[0].x) | (static_cast<uint32_t>(p[Step].x) << 16);
    }
  } else {
    const float v0 = to_float(p[0]), v1 = to_float(p[Step]);
    out[0] = pack_bf16x2(v0, v1);
    out[1] = pack_bf16x2(bf16_remainder(v0, bf16_bits_to_float(out[0] & 0xFFFFu)),
                         bf16_remainder(v1, bf16_bits_to_float(out[0] >> 16)));
  }
}

// A operand whose element (i, k) is p[i * RS + k * CS] (p points at element (0, 0) of the 16 x 16 block).
template <bool Mma, int RS, int CS, typename T>
__device__ __forceinline__ OperandA<T, Mma> load_operand_a(const T* p) {
  OperandA<T, Mma> op;
  const int g = lane_id() / 4, t = lane_id() % 4;
  if constexpr (Mma) {
#pragma unroll
    for (int reg = 0; reg < 4; ++reg) {
      uint32_t terms[kTerms<T>];
      pair_terms<T, CS>(p + (g + 8 * (reg & 1)) * RS + (2 * t + 8 * (reg >> 1)) * CS, terms);
#pragma unroll
      for (int n = 0; n < kTerms<T>; ++n) op.t[n].x[reg] = terms[n];
    }
  } else {
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int k = 0; k < 16; ++k) op.v[h][k] = to_float(p[(g + 8 * h) * RS + k * CS]);
  }
  return op;
}

// B operand whose element (k, n) is p[k * RS + n * CS].
template <bool Mma, int RS, int CS, typename T>
__device__ __forceinline__ OperandB<T, Mma> load_operand_b(const T* p) {
  OperandB<T, Mma> op;
  const int g = lane_id() / 4, t = lane_id() % 4;
  if constexpr (Mma) {
#pragma unroll
    for (int reg = 0; reg < 2; ++reg) {
      uint32_t terms[kTerms<T>];
      pair_terms<T, RS>(p + (2 * t + 8 * reg) * RS + g * CS, terms);
#pragma unroll
      for (int n = 0; n < kTerms<T>; ++n) op.t[n].x[reg] = terms[n];
    }
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k)
#pragma unroll
      for (int c = 0; c < 2; ++c) op.v[k][c] = to_float(p[k * RS + (2 * t + c) * CS]);
  }
  return op;
}

// A B operand of ones (its product with A gives the row sums of A in every column).
template <bool Mma>
__device__ __forceinline__ OperandB<c10::BFloat16, Mma> ones_operand_b() {
  OperandB<c10::BFloat16, Mma> op;
  if constexpr (Mma) {
    op.t[0].x[0] = op.t[0].x[1] = 0x3F803F80u;  // bf16 1.0 in both halves
  } else {
#pragma unroll
    for (int k = 0; k < 16; ++k) op.v[k][0] = op.v[k][1] = 1.0f;
  }
  return op;
}

// d += a b: every product of an A term and a B term on the tensor cores, smallest first (exact term
// products, fp32 accumulation); 64 FMAs per lane on the fp32 path.
template <typename TA, typename TB>
__device__ __forceinline__ void mma(FragC& d, const OperandA<TA, true>& a, const OperandB<TB, true>& b) {
#pragma unroll
  for (int i = kTerms<TA> - 1; i >= 0; --i)
#pragma unroll
    for (int j = kTerms<TB> - 1; j >= 0; --j) mma_bf16_16816(d, a.t[i], b.t[j]);
}

template <typename TA, typename TB>
__device__ __forceinline__ void mma(FragC& d, const OperandA<TA, false>& a, const OperandB<TB, false>& b) {
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    float s = d.x[i];
#pragma unroll
    for (int k = 0; k < 16; ++k) s = fmaf(a.v[i >> 1][k], b.v[k][i & 1], s);
    d.x[i] = s;
  }
}

__device__ __forceinline__ void zero(FragC& d) {
#pragma unroll
  for (int i = 0; i < 4; ++i) d.x[i] = 0.0f;
}

// ---- cp.async --------------------------------------------------------------------------------
#if defined(LOWCOST_CUDA_EMULATION)
void emulated_cp_async(void* smem, const void* gmem, int src_bytes);  // queued until a wait
void emulated_cp_async_commit();
void emulated_cp_async_wait(int pending);
#endif

// Copies 16 bytes global -> shared; only the first src_bytes are read, the rest is zero-filled.
// Both addresses 16-byte aligned.
__device__ __forceinline__ void cp_async_16(void* smem, const void* gmem, int src_bytes) {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(src_bytes));
#else
  __trap();
#endif
#elif defined(LOWCOST_CUDA_EMULATION)
  emulated_cp_async(smem, gmem, src_bytes);
#endif
}

__device__ __forceinline__ void cp_async_commit() {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.commit_group;\n" ::);
#endif
#elif defined(LOWCOST_CUDA_EMULATION)
  emulated_cp_async_commit();
#endif
}

// Waits until at most `Pending` of this thread's committed groups are still in flight.
template <int Pending>
__device__ __forceinline__ void cp_async_wait() {
#if defined(__CUDA_ARCH__)
#if __CUDA_ARCH__ >= 800
  asm volatile("cp.async.wait_group %0;\n" ::"n"(Pending) : "memory");
#endif
#elif defined(LOWCOST_CUDA_EMULATION)
  emulated_cp_async_wait(Pending);
#endif
}

}  // namespace cuda
}  // namespace lowcost
