// Packed ternary (1.58-bit, bits=2) and binary (1-bit, bits=1) linear layers on CPU, fast at batch 1.
//
// Op: hf_compress_lowbit::linear(Tensor x, Tensor qweight, Tensor w_scale, Tensor? in_scale, Tensor? bias,
//                                int bits, int in_features, int isa=-1) -> Tensor
//
// Semantics (exactly hf_compress.quant.lowbit.lowbit_linear_reference):
//   x' = x * in_scale                         (float32; x is float32 or bfloat16 [..., K], other dtypes are
//                                              computed as float32 and cast back)
//   s  = absmax(x'_row) / 127 (1 for a zero row), q = clamp(round_half_even(x' / s), -127, 127)  (int8)
//   y  = float(double(sum_k q_k * w_k) * s * w_scale) + bias      (w_scale [1] or [N]; out in x's dtype)
// The integer sums are exact (int32), so every ISA path gives bit-identical results.
//
// Layout (hf_compress.quant.lowbit): qweight uint8 [N, K_pad / per_byte]; the input dim is cut into
// 64-byte blocks; byte j of block b holds the weights of columns b*64*per_byte + 64*s + j at bits
// s*bits.., s = 0..per_byte-1. Ternary code = w + 1 in {0, 1, 2}; binary bit 1 = +1, 0 = -1. So field s
// of a 64-byte block holds 64 *consecutive* columns, multiplied with 64 consecutive int8 activations.
//
// Every path computes raw = sum_k u_k * q_k with the unsigned field values u (code or bit), then
//   ternary: sum w*q = raw - sum q          (u = w + 1)
//   binary:  sum w*q = 2 * raw - sum q      (w = 2u - 1)
// with sum q computed once per activation row.
//
// `isa` picks the code path: -1 auto, 0 scalar, 1 AVX2, 2 AVX512-VNNI (an error if the CPU lacks it),
// 3 the large-batch int8 GEMM route. Auto: the best of 2 / 1 / 0 the CPU has (__builtin_cpu_supports)
// below kIntMmMinRows activation rows, route 3 from there on. It exists so tests can check every path
// on one machine; results never depend on it.
//
// AVX512-VNNI: _mm512_dpbusd_epi32 (unsigned x signed bytes, int32 sums). The fields are not shifted
// down: (w & (mask << s*bits)) = u * 2^(s*bits) goes straight into dpbusd, with one accumulator per
// field s, and the accumulators are shifted right (exactly: each is a multiple of 2^(s*bits)) once at
// the end. That is 2 vector ops per dpbusd (AND + dpbusd) instead of 3 with a shift. A lane gains at
// most 4 * 192 * 127 per block (ternary field 3 holding a code 3, which pack_ternary never writes): no
// int32 overflow below K ~ 5M (the op takes K <= 2^22).
// AVX2: fields shifted down and masked, _mm256_maddubs_epi16 (u <= 3, |q| <= 127: a pair is <= 762 and
// the int16 accumulator holds 4 blocks of 8 (ternary) / 16 (binary) pairs, < 32767), then
// _mm256_madd_epi16 with ones into int32 every 4 blocks.
// Scalar: the same sums in plain C++ (any CPU, any architecture).
// Tiling: R weight rows x MR activation rows per inner loop (tile_shape). M = 1 (decode): each
// activation load feeds several weight rows. M > 1: each weight block is loaded and masked once for MR
// activation rows. Large M: see kIntMmMinRows.
// Threads: at::parallel_for over tiles of output rows (torch's pool, torch.get_num_threads(); the
// extension is compiled with -fopenmp so that ATen's inline OpenMP parallel_for really runs in parallel).
// The activation quantization is fused (one pass for the absmax, one for the codes and their sum).

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define LOWBIT_X86 1
#define LOWBIT_AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni")))
#define LOWBIT_AVX2 __attribute__((target("avx2")))
#else
#define LOWBIT_X86 0
#endif

namespace {

constexpr int64_t kBlockBytes = 64;
constexpr int32_t kInt8Max = 127;
// Software prefetch distance in the weight stream. The rows of a matrix are contiguous, so this is a
// couple of tiles ahead. Measured on one core: 27 -> 36 GB/s for a 3 MB weight (beyond L2), 6.9 -> 10 GB/s
// from DRAM (512 bytes ahead: 8.6 GB/s, 8 KB: no better than 4 KB).
constexpr int64_t kPrefetchBytes = 4096;

enum Isa : int64_t { kScalar = 0, kAvx2 = 1, kAvx512Vnni = 2 };

bool cpu_has(int64_t isa) {
  if (isa == kScalar) return true;
#if LOWBIT_X86
  __builtin_cpu_init();
  if (isa == kAvx2) return __builtin_cpu_supports("avx2");
  if (isa == kAvx512Vnni)
    return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
           __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni");
#endif
  return false;
}

int64_t best_isa() {
  static const int64_t best = cpu_has(kAvx512Vnni) ? kAvx512Vnni : cpu_has(kAvx2) ? kAvx2 : kScalar;
  return best;
}

// ------------------------------------------------------------------------------ activation quantization
// quantize_row: x'[0..K) -> q[0..Kp) (zeros past K), returns the row scale s and sets *qsum = sum q.
// All paths: the same float32 multiply, exact max, IEEE division and round-half-to-even, so the codes
// equal hf_compress.quant.int8.quantize_rows bit for bit.

inline float to_f32(float v) { return v; }
inline float to_f32(c10::BFloat16 v) { return static_cast<float>(v); }

inline float row_scale(float absmax) { return absmax > 0.f ? absmax / static_cast<float>(kInt8Max) : 1.f; }

template <typename T>
float quantize_row_scalar(const T* x, const float* in_scale, int64_t K, int64_t Kp, int8_t* q, int32_t* qsum) {
  float amax = 0.f;
  for (int64_t k = 0; k < K; ++k) {
    float v = to_f32(x[k]);
    if (in_scale) v *= in_scale[k];
    amax = std::max(amax, std::fabs(v));
  }
  const float s = row_scale(amax);
  int32_t sum = 0;
  for (int64_t k = 0; k < K; ++k) {
    float v = to_f32(x[k]);
    if (in_scale) v *= in_scale[k];
    float r = std::nearbyint(v / s);  // default rounding mode: half to even, like torch.round
    r = std::min(std::max(r, -127.f), 127.f);
    q[k] = static_cast<int8_t>(r);
    sum += q[k];
  }
  std::memset(q + K, 0, Kp - K);
  *qsum = sum;
  return s;
}

#if LOWBIT_X86
LOWBIT_AVX512 inline __m512 load16(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
LOWBIT_AVX512 inline __m512 load16(const c10::BFloat16* p, __mmask16 m) {
  __m256i h = _mm256_maskz_loadu_epi16(m, p);  // bf16 -> f32 is a 16-bit shift, exact
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}

template <typename T>
LOWBIT_AVX512 float quantize_row_avx512(const T* x, const float* in_scale, int64_t K, int64_t Kp, int8_t* q,
                                        int32_t* qsum) {
  __m512 amax = _mm512_setzero_ps();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    __m512 v = load16(x + k, m);
    if (in_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, in_scale + k));
    amax = _mm512_max_ps(amax, _mm512_abs_ps(v));
  }
  const float s = row_scale(_mm512_reduce_max_ps(amax));
  const __m512 vs = _mm512_set1_ps(s);
  const __m512i lo = _mm512_set1_epi32(-kInt8Max), hi = _mm512_set1_epi32(kInt8Max);
  __m512i sum = _mm512_setzero_si512();
  for (int64_t k = 0; k < K; k += 16) {
    const __mmask16 m = K - k >= 16 ? (__mmask16)0xFFFF : (__mmask16)((1u << (K - k)) - 1);
    __m512 v = load16(x + k, m);
    if (in_scale) v = _mm512_mul_ps(v, _mm512_maskz_loadu_ps(m, in_scale + k));
    __m512i r = _mm512_cvt_roundps_epi32(_mm512_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    r = _mm512_min_epi32(_mm512_max_epi32(r, lo), hi);
    sum = _mm512_add_epi32(sum, r);  // masked-off lanes loaded 0 -> code 0
    _mm_mask_storeu_epi8(q + k, m, _mm512_cvtepi32_epi8(r));
  }
  std::memset(q + K, 0, Kp - K);
  *qsum = _mm512_reduce_add_epi32(sum);
  return s;
}

LOWBIT_AVX2 inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
LOWBIT_AVX2 inline __m256 load8(const c10::BFloat16* p) {
  __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}

template <typename T>
LOWBIT_AVX2 float quantize_row_avx2(const T* x, const float* in_scale, int64_t K, int64_t Kp, int8_t* q,
                                    int32_t* qsum) {
  const int64_t K8 = K & ~int64_t(7);
  const __m256 sign = _mm256_set1_ps(-0.f);
  __m256 amax = _mm256_setzero_ps();
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 v = load8(x + k);
    if (in_scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(in_scale + k));
    amax = _mm256_max_ps(amax, _mm256_andnot_ps(sign, v));
  }
  float a8[8];
  _mm256_storeu_ps(a8, amax);
  float amax_f = 0.f;
  for (float v : a8) amax_f = std::max(amax_f, v);
  for (int64_t k = K8; k < K; ++k) {
    float v = to_f32(x[k]);
    if (in_scale) v *= in_scale[k];
    amax_f = std::max(amax_f, std::fabs(v));
  }
  const float s = row_scale(amax_f);
  const __m256 vs = _mm256_set1_ps(s);
  const __m256i lo = _mm256_set1_epi32(-kInt8Max), hi = _mm256_set1_epi32(kInt8Max);
  __m256i sum = _mm256_setzero_si256();
  for (int64_t k = 0; k < K8; k += 8) {
    __m256 v = load8(x + k);
    if (in_scale) v = _mm256_mul_ps(v, _mm256_loadu_ps(in_scale + k));
    __m256 r = _mm256_round_ps(_mm256_div_ps(v, vs), _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m256i ri = _mm256_min_epi32(_mm256_max_epi32(_mm256_cvttps_epi32(r), lo), hi);
    sum = _mm256_add_epi32(sum, ri);
    __m128i p16 = _mm_packs_epi32(_mm256_castsi256_si128(ri), _mm256_extracti128_si256(ri, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(q + k), _mm_packs_epi16(p16, p16));
  }
  int32_t s8[8];
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(s8), sum);
  int32_t total = 0;
  for (int32_t v : s8) total += v;
  for (int64_t k = K8; k < K; ++k) {
    float v = to_f32(x[k]);
    if (in_scale) v *= in_scale[k];
    float r = std::min(std::max(std::nearbyint(v / s), -127.f), 127.f);
    q[k] = static_cast<int8_t>(r);
    total += q[k];
  }
  std::memset(q + K, 0, Kp - K);
  *qsum = total;
  return s;
}
#endif  // LOWBIT_X86

// ----------------------------------------------------------------------------------------- dot tiles
// A tile computes raw[m * R + r] = sum_k u(row n0 + r, k) * q(row m0 + m, k) over all nb blocks, for
// R weight rows (stride w_stride bytes) and MR activation rows (stride x_stride bytes).
using TileFn = void (*)(const uint8_t* w, int64_t w_stride, const int8_t* x, int64_t x_stride, int64_t nb,
                        int32_t* raw);

template <int BITS>
void tile_scalar(const uint8_t* w, int64_t w_stride, const int8_t* x, int64_t x_stride, int64_t nb, int R,
                 int MR, int32_t* raw) {
  constexpr int S = 8 / BITS;
  constexpr int kMask = (1 << BITS) - 1;
  for (int m = 0; m < MR; ++m) {
    for (int r = 0; r < R; ++r) {
      const uint8_t* wr = w + r * w_stride;
      const int8_t* xm = x + m * x_stride;
      int32_t acc = 0;
      for (int64_t b = 0; b < nb; ++b) {
        const uint8_t* wb = wr + b * kBlockBytes;
        const int8_t* xb = xm + b * kBlockBytes * S;
        for (int s = 0; s < S; ++s)
          for (int j = 0; j < kBlockBytes; ++j) acc += ((wb[j] >> (s * BITS)) & kMask) * xb[s * kBlockBytes + j];
      }
      raw[m * R + r] = acc;
    }
  }
}

#if LOWBIT_X86
// acc += dpbusd(u, x). Inline asm because GCC 12 wraps _mm512_dpbusd_epi32 on loop-carried accumulators in
// register copies (two vmovdqa per dpbusd, plus spills): measured 1.35x slower on the M = 1 tile.
LOWBIT_AVX512 inline __m512i dpbusd(__m512i acc, __m512i u, __m512i x) {
  asm("vpdpbusd %2, %1, %0" : "+v"(acc) : "v"(u), "v"(x));
  return acc;
}

template <int BITS, int R, int MR>
LOWBIT_AVX512 void tile_vnni(const uint8_t* w, int64_t w_stride, const int8_t* x, int64_t x_stride, int64_t nb,
                             int32_t* raw) {
  constexpr int S = 8 / BITS;
  __m512i acc[MR][R][S];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r)
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) acc[m][r][s] = _mm512_setzero_si512();
  for (int64_t b = 0; b < nb; ++b) {
    __m512i wv[R];
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      const uint8_t* wb = w + r * w_stride + b * kBlockBytes;
      wv[r] = _mm512_loadu_si512(wb);
      _mm_prefetch(reinterpret_cast<const char*>(wb + kPrefetchBytes), _MM_HINT_T0);
    }
    const int8_t* xb = x + b * kBlockBytes * S;
#pragma GCC unroll 8
    for (int s = 0; s < S; ++s) {
      const __m512i mask = _mm512_set1_epi8(static_cast<char>(((1 << BITS) - 1) << (s * BITS)));
      __m512i u[R];
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) u[r] = _mm512_and_si512(wv[r], mask);  // u * 2^(s*BITS), not shifted
#pragma GCC unroll 8
      for (int m = 0; m < MR; ++m) {
        const __m512i xv = _mm512_loadu_si512(xb + m * x_stride + s * kBlockBytes);
#pragma GCC unroll 8
        for (int r = 0; r < R; ++r) acc[m][r][s] = dpbusd(acc[m][r][s], u[r], xv);
      }
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m512i t = acc[m][r][0];
#pragma GCC unroll 8
      for (int s = 1; s < S; ++s) t = _mm512_add_epi32(t, _mm512_srai_epi32(acc[m][r][s], s * BITS));
      raw[m * R + r] = _mm512_reduce_add_epi32(t);
    }
}

template <int BITS, int R, int MR>
LOWBIT_AVX2 void tile_avx2(const uint8_t* w, int64_t w_stride, const int8_t* x, int64_t x_stride, int64_t nb,
                           int32_t* raw) {
  constexpr int S = 8 / BITS;
  constexpr int kFlush = 4;  // blocks per int16 accumulation (bound in the header comment)
  const __m256i mask = _mm256_set1_epi8((1 << BITS) - 1);
  const __m256i ones = _mm256_set1_epi16(1);
  __m256i acc[MR][R];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) acc[m][r] = _mm256_setzero_si256();
  for (int64_t b0 = 0; b0 < nb; b0 += kFlush) {
    __m256i acc16[MR][R];
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc16[m][r] = _mm256_setzero_si256();
    const int64_t b1 = std::min(nb, b0 + kFlush);
    for (int64_t b = b0; b < b1; ++b) {
      const int8_t* xb = x + b * kBlockBytes * S;
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r)
        _mm_prefetch(reinterpret_cast<const char*>(w + r * w_stride + b * kBlockBytes + kPrefetchBytes), _MM_HINT_T0);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {  // two 32-byte halves of the 64-byte block
        const uint8_t* wb = w + b * kBlockBytes + h * 32;
#pragma GCC unroll 8
        for (int s = 0; s < S; ++s) {
          // Weights and activations are (re)loaded from L1 at each use: 16 ymm registers hold only the
          // 2 * R * MR accumulators, the mask and a temporary.
#pragma GCC unroll 8
          for (int r = 0; r < R; ++r) {
            const __m256i wv = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(wb + r * w_stride));
            const __m256i u = _mm256_and_si256(_mm256_srli_epi16(wv, s * BITS), mask);
#pragma GCC unroll 8
            for (int m = 0; m < MR; ++m) {
              const __m256i xv =
                  _mm256_loadu_si256(reinterpret_cast<const __m256i*>(xb + m * x_stride + s * kBlockBytes + h * 32));
              // Saturating add: never saturates here (bound above), but it keeps GCC from reassociating the
              // int16 sums into a tree of live products that spills (measured: 50 stack accesses per tile).
              acc16[m][r] = _mm256_adds_epi16(acc16[m][r], _mm256_maddubs_epi16(u, xv));
            }
          }
        }
      }
    }
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
      for (int r = 0; r < R; ++r) acc[m][r] = _mm256_add_epi32(acc[m][r], _mm256_madd_epi16(acc16[m][r], ones));
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 8
    for (int r = 0; r < R; ++r) {
      __m128i t = _mm_add_epi32(_mm256_castsi256_si128(acc[m][r]), _mm256_extracti128_si256(acc[m][r], 1));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0x4E));
      t = _mm_add_epi32(t, _mm_shuffle_epi32(t, 0xB1));
      raw[m * R + r] = _mm_cvtsi128_si32(t);
    }
}
#endif  // LOWBIT_X86

// Tile shapes (R weight rows x MR activation rows), measured on the 2-core AVX512 host at K = 2048:
// M = 1: 4 x 1 (ternary) / 2 x 1 (binary): each activation load feeds R rows. M > 1: 2 x 2 (ternary,
// 1.4 ns per 64-byte weight block and activation row, against 1.7 for 1 x 4 and 1.6 for 4 x 1) / 1 x 2
// (binary). Accumulators: VNNI R*MR*per_byte zmm (<= 16 of 32), AVX2 2*R*MR ymm (<= 8 of 16).
struct TileShape {
  int rows, xrows;
};

TileShape tile_shape(int64_t isa, int64_t bits, int64_t M) {
  if (isa == kAvx512Vnni && bits == 1) return M == 1 ? TileShape{2, 1} : TileShape{1, 2};
  return M == 1 ? TileShape{4, 1} : TileShape{2, 2};
}

#if LOWBIT_X86
// The compiled tile for r <= R, mr <= MR of the shapes above (tails of N and M take the smaller ones).
#define LOWBIT_PICK(KERNEL, BITS, r, mr)                      \
  switch ((r) * 8 + (mr)) {                                     \
    case 1 * 8 + 1: return KERNEL<BITS, 1, 1>;                  \
    case 2 * 8 + 1: return KERNEL<BITS, 2, 1>;                  \
    case 3 * 8 + 1: return KERNEL<BITS, 3, 1>;                  \
    case 4 * 8 + 1: return KERNEL<BITS, 4, 1>;                  \
    case 1 * 8 + 2: return KERNEL<BITS, 1, 2>;                  \
    case 2 * 8 + 2: return KERNEL<BITS, 2, 2>;                  \
    default: TORCH_CHECK(false, "lowbit linear: no tile ", r, "x", mr); \
  }

template <int BITS>
TileFn vnni_fn(int r, int mr) {
  if constexpr (BITS == 1) {  // 8 accumulators per (row, activation row): at most 2 x 1 or 1 x 2
    if (r == 2) return tile_vnni<1, 2, 1>;
    return mr == 2 ? tile_vnni<1, 1, 2> : tile_vnni<1, 1, 1>;
  } else {
    LOWBIT_PICK(tile_vnni, BITS, r, mr)
  }
}

template <int BITS>
TileFn avx2_fn(int r, int mr) { LOWBIT_PICK(tile_avx2, BITS, r, mr) }
#undef LOWBIT_PICK
#endif

void tile_dispatch(int64_t isa, int64_t bits, int r, int mr, const uint8_t* w, int64_t w_stride, const int8_t* x,
                   int64_t x_stride, int64_t nb, int32_t* raw) {
#if LOWBIT_X86
  if (isa == kAvx512Vnni) return (bits == 2 ? vnni_fn<2>(r, mr) : vnni_fn<1>(r, mr))(w, w_stride, x, x_stride, nb, raw);
  if (isa == kAvx2) return (bits == 2 ? avx2_fn<2>(r, mr) : avx2_fn<1>(r, mr))(w, w_stride, x, x_stride, nb, raw);
#endif
  if (bits == 2) return tile_scalar<2>(w, w_stride, x, x_stride, nb, r, mr, raw);
  return tile_scalar<1>(w, w_stride, x, x_stride, nb, r, mr, raw);
}

// ------------------------------------------------------------------------------- large batches (int_mm)
// From kIntMmMinRows activation rows on, the weights are expanded chunk by chunk into signed int8
// (-1/0/+1 or -1/+1, [rows, Kp], a chunk of about 512 KB so it stays in L2) and multiplied by
// at::_int_mm (oneDNN: AMX / VNNI int8 GEMM with int32 sums, so still exact). Measured at K=2048, N=5632,
// ternary, 2 threads, tiles vs this route (bf16 F.linear): 8 rows 0.34 vs 0.63 ms (0.79), 16 rows 0.62 vs
// 0.57 (0.83), 64 rows 2.7 vs 1.06 (1.52), 256 rows 10.5 vs 2.7 (3.2); one thread: the same crossover.
constexpr int64_t kIntMmMinRows = 16;
constexpr int64_t kIsaIntMm = 3;  // isa value forcing this route (tests)

template <int BITS>
void unpack_rows_scalar(const uint8_t* w, int64_t w_stride, int64_t rows, int64_t nb, int8_t* out) {
  constexpr int S = 8 / BITS;
  constexpr int kMask = (1 << BITS) - 1;
  const int64_t Kp = nb * kBlockBytes * S;
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b)
      for (int s = 0; s < S; ++s)
        for (int j = 0; j < kBlockBytes; ++j) {
          const int u = (w[r * w_stride + b * kBlockBytes + j] >> (s * BITS)) & kMask;
          out[r * Kp + (b * S + s) * kBlockBytes + j] = static_cast<int8_t>(BITS == 2 ? u - 1 : 2 * u - 1);
        }
}

#if LOWBIT_X86
template <int BITS>
LOWBIT_AVX512 void unpack_rows_avx512(const uint8_t* w, int64_t w_stride, int64_t rows, int64_t nb, int8_t* out) {
  constexpr int S = 8 / BITS;
  const int64_t Kp = nb * kBlockBytes * S;
  const __m512i mask = _mm512_set1_epi8((1 << BITS) - 1);
  const __m512i one = _mm512_set1_epi8(1);
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t b = 0; b < nb; ++b) {
      const __m512i wv = _mm512_loadu_si512(w + r * w_stride + b * kBlockBytes);
#pragma GCC unroll 8
      for (int s = 0; s < S; ++s) {
        __m512i u = _mm512_and_si512(_mm512_srli_epi16(wv, s * BITS), mask);
        if (BITS == 1) u = _mm512_add_epi8(u, u);
        _mm512_storeu_si512(out + r * Kp + (b * S + s) * kBlockBytes, _mm512_sub_epi8(u, one));
      }
    }
}
#endif

// The output rows' epilogue: y[n] = float(double(dot) * s_row * w_scale[n]) + bias[n], in float32 or
// bfloat16 (round to nearest even, as Tensor.to), the reference's operations in its order.
struct Epilogue {
  const float* ws_f;  // w_scale as float32, or
  const double* ws_d;  // as float64
  bool ws_per_channel;
  const float* bias;  // float32 or null
  bool out_bf16;
  void* out;
  int64_t N;

  inline void store(int64_t m, int64_t n, int32_t dot, double srow) const {
    const int64_t c = ws_per_channel ? n : 0;
    const double wsc = ws_f ? static_cast<double>(ws_f[c]) : ws_d[c];
    float y = static_cast<float>(static_cast<double>(dot) * srow * wsc);
    if (bias) y += bias[n];
    if (out_bf16)
      static_cast<c10::BFloat16*>(out)[m * N + n] = c10::BFloat16(y);
    else
      static_cast<float*>(out)[m * N + n] = y;
  }
};

// ------------------------------------------------------------------------------------------------ op
at::Tensor lowbit_linear(const at::Tensor& x, const at::Tensor& qweight, const at::Tensor& w_scale,
                         const c10::optional<at::Tensor>& in_scale, const c10::optional<at::Tensor>& bias,
                         int64_t bits, int64_t in_features, int64_t isa) {
  TORCH_CHECK(bits == 1 || bits == 2, "lowbit linear: bits must be 1 (binary) or 2 (ternary), got ", bits);
  // Upper bound: the int32 sums (|sum| <= 2 * 127 * K, and the VNNI lanes' pre-shift sums) cannot overflow.
  TORCH_CHECK(in_features > 0 && in_features <= (int64_t(1) << 22), "lowbit linear: in_features must be in [1, 2^22], got ",
              in_features);
  TORCH_CHECK(x.device().is_cpu() && qweight.device().is_cpu(), "lowbit linear: CPU tensors only");
  TORCH_CHECK(x.dim() >= 1 && x.size(-1) == in_features, "lowbit linear: x must be [..., ", in_features,
              "], got ", x.sizes());
  const int64_t per_byte = 8 / bits;
  const int64_t block_cols = kBlockBytes * per_byte;
  const int64_t K = in_features;
  const int64_t Kp = (K + block_cols - 1) / block_cols * block_cols;
  TORCH_CHECK(qweight.scalar_type() == at::kByte && qweight.dim() == 2 && qweight.size(1) * per_byte == Kp,
              "lowbit linear: qweight must be uint8 [out, ", Kp / per_byte, "] for in_features=", K,
              ", bits=", bits, "; got ", qweight.scalar_type(), " ", qweight.sizes());
  const int64_t N = qweight.size(0);
  TORCH_CHECK(w_scale.numel() == 1 || w_scale.numel() == N, "lowbit linear: w_scale must have 1 or ", N,
              " elements, got ", w_scale.numel());
  if (in_scale) TORCH_CHECK(in_scale->numel() == K, "lowbit linear: in_scale must have ", K, " elements");
  if (bias) TORCH_CHECK(bias->numel() == N, "lowbit linear: bias must have ", N, " elements");
  TORCH_CHECK(isa >= -1 && isa <= kIsaIntMm && (isa < 0 || isa == kIsaIntMm || cpu_has(isa)), "lowbit linear: isa ",
              isa, " (-1 auto, 0 scalar, 1 AVX2, 2 AVX512-VNNI, 3 int8 GEMM) is not supported by this CPU");

  const at::ScalarType out_dtype = x.scalar_type();
  at::Tensor x2 = x.dim() == 2 ? x : x.reshape({-1, K});
  if (out_dtype != at::kFloat && out_dtype != at::kBFloat16) x2 = x2.to(at::kFloat);
  x2 = x2.contiguous();
  const bool x_bf16 = x2.scalar_type() == at::kBFloat16;
  const int64_t M = x2.size(0);
  if (isa < 0) isa = M >= kIntMmMinRows ? kIsaIntMm : best_isa();
  const int64_t quant_isa = isa == kIsaIntMm ? best_isa() : isa;  // the activation quantization's path

  c10::SmallVector<int64_t, 5> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = N;
  at::Tensor out = at::empty(out_shape, x2.options());  // contiguous: row m of [M, N] at m * N
  if (M == 0 || N == 0) return out.scalar_type() == out_dtype ? out : out.to(out_dtype);

  const at::Tensor qw = qweight.contiguous();
  // w_scale is read as float32 (exact for float16/bfloat16 too) or float64: widened to double per output.
  const at::Tensor ws = w_scale.scalar_type() == at::kDouble ? w_scale.contiguous() : w_scale.to(at::kFloat).contiguous();
  at::Tensor ins, bs;
  if (in_scale) ins = in_scale->to(at::kFloat).contiguous();
  if (bias) bs = bias->to(at::kFloat).contiguous();
  const float* ins_p = in_scale ? ins.data_ptr<float>() : nullptr;
  const float* bias_p = bias ? bs.data_ptr<float>() : nullptr;
  const Epilogue epi{ws.scalar_type() == at::kFloat ? ws.data_ptr<float>() : nullptr,
                     ws.scalar_type() == at::kDouble ? ws.data_ptr<double>() : nullptr,
                     ws.numel() != 1,
                     bias_p,
                     x_bf16,
                     out.data_ptr(),
                     N};

  // 1. Quantize every activation row once (codes padded with zeros to Kp), its scale and its code sum.
  // Scratch: codes [M, Kp] (64-byte aligned), row scales, row code sums. Decode-sized calls reuse a
  // per-calling-thread buffer (no allocation per call); large batches get a temporary one.
  thread_local std::vector<uint8_t> small_buf;
  const int64_t scratch = M * Kp + M * int64_t(sizeof(float) + sizeof(int32_t)) + kBlockBytes;
  at::Tensor big_buf;
  uint8_t* raw_scratch;
  if (scratch <= (int64_t(1) << 20)) {
    if (static_cast<int64_t>(small_buf.size()) < scratch) small_buf.resize(scratch);
    raw_scratch = small_buf.data();
  } else {
    big_buf = at::empty({scratch}, x2.options().dtype(at::kByte));
    raw_scratch = big_buf.data_ptr<uint8_t>();
  }
  int8_t* xq_p = reinterpret_cast<int8_t*>((reinterpret_cast<uintptr_t>(raw_scratch) + kBlockBytes - 1) &
                                           ~uintptr_t(kBlockBytes - 1));
  float* xs = reinterpret_cast<float*>(xq_p + M * Kp);  // Kp is a multiple of 256: aligned
  int32_t* xsum = reinterpret_cast<int32_t*>(xs + M);
  const void* x_p = x2.data_ptr();
  at::parallel_for(0, M, std::max<int64_t>(1, 65536 / K), [&](int64_t m0, int64_t m1) {
    for (int64_t m = m0; m < m1; ++m) {
      int8_t* q = xq_p + m * Kp;
      if (x_bf16) {
        const c10::BFloat16* xr = static_cast<const c10::BFloat16*>(x_p) + m * K;
#if LOWBIT_X86
        if (quant_isa == kAvx512Vnni) { xs[m] = quantize_row_avx512(xr, ins_p, K, Kp, q, &xsum[m]); continue; }
        if (quant_isa == kAvx2) { xs[m] = quantize_row_avx2(xr, ins_p, K, Kp, q, &xsum[m]); continue; }
#endif
        xs[m] = quantize_row_scalar(xr, ins_p, K, Kp, q, &xsum[m]);
      } else {
        const float* xr = static_cast<const float*>(x_p) + m * K;
#if LOWBIT_X86
        if (quant_isa == kAvx512Vnni) { xs[m] = quantize_row_avx512(xr, ins_p, K, Kp, q, &xsum[m]); continue; }
        if (quant_isa == kAvx2) { xs[m] = quantize_row_avx2(xr, ins_p, K, Kp, q, &xsum[m]); continue; }
#endif
        xs[m] = quantize_row_scalar(xr, ins_p, K, Kp, q, &xsum[m]);
      }
    }
  });

  const int64_t w_stride = Kp / per_byte;
  const int64_t nb = Kp / block_cols;
  const uint8_t* w_p = qw.data_ptr<uint8_t>();

  if (isa == kIsaIntMm) {
    // 2a. Large batches: chunks of output rows spread over the threads; each thread expands its chunk to
    // signed int8 (kept in L2), multiplies it with at::_int_mm (single-threaded inside the parallel
    // region) and writes the epilogue. One parallel region per call: measured 1.3-2x faster with 2
    // threads than chunks in sequence each split by oneDNN.
    const int64_t chunk = std::max<int64_t>(16, std::min<int64_t>(N, (int64_t(512) << 10) / Kp));
    const int64_t n_chunks = (N + chunk - 1) / chunk;
    const bool vnni = cpu_has(kAvx512Vnni);
    at::parallel_for(0, n_chunks, 1, [&](int64_t c0, int64_t c1) {
      c10::InferenceMode guard;  // plain integer GEMMs: no autograd bookkeeping in the workers
      const at::Tensor xq_t = at::from_blob(xq_p, {M, Kp}, at::TensorOptions().dtype(at::kChar));
      at::Tensor wbuf = at::empty({chunk, Kp}, at::TensorOptions().dtype(at::kChar));
      int8_t* wbuf_p = wbuf.data_ptr<int8_t>();
      for (int64_t c = c0; c < c1; ++c) {
        const int64_t n0 = c * chunk, nc = std::min(chunk, N - n0);
        const uint8_t* src = w_p + n0 * w_stride;
#if LOWBIT_X86
        if (vnni && bits == 2) unpack_rows_avx512<2>(src, w_stride, nc, nb, wbuf_p);
        if (vnni && bits == 1) unpack_rows_avx512<1>(src, w_stride, nc, nb, wbuf_p);
#endif
        if (!vnni && bits == 2) unpack_rows_scalar<2>(src, w_stride, nc, nb, wbuf_p);
        if (!vnni && bits == 1) unpack_rows_scalar<1>(src, w_stride, nc, nb, wbuf_p);
        const at::Tensor acc = at::_int_mm(xq_t, wbuf.narrow(0, 0, nc).t());  // [M, nc] int32, exact
        const int32_t* acc_p = acc.data_ptr<int32_t>();
        for (int64_t m = 0; m < M; ++m)
          for (int64_t i = 0; i < nc; ++i) epi.store(m, n0 + i, acc_p[m * nc + i], xs[m]);
      }
    });
    return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
  }

  // 2b. Tiles of output rows spread over the threads; each tile's integer sums, then the epilogue.
  const TileShape shape = tile_shape(isa, bits, M);
  const int64_t n_tiles = (N + shape.rows - 1) / shape.rows;
  // Small layers stay on one thread: waking the pool costs a few microseconds, about 100 KB of work.
  const int64_t tile_work = shape.rows * w_stride * M;
  const int64_t grain = std::max<int64_t>(1, (int64_t(1) << 17) / tile_work);
  at::parallel_for(0, n_tiles, grain, [&](int64_t t0, int64_t t1) {
    int32_t raw[16];
    for (int64_t t = t0; t < t1; ++t) {
      const int64_t n0 = t * shape.rows;
      const int r = static_cast<int>(std::min<int64_t>(shape.rows, N - n0));
      for (int64_t m0 = 0; m0 < M; m0 += shape.xrows) {
        const int mr = static_cast<int>(std::min<int64_t>(shape.xrows, M - m0));
        tile_dispatch(isa, bits, r, mr, w_p + n0 * w_stride, w_stride, xq_p + m0 * Kp, Kp, nb, raw);
        for (int m = 0; m < mr; ++m) {
          const int32_t qs = xsum[m0 + m];
          for (int i = 0; i < r; ++i) {
            const int32_t u = raw[m * r + i];
            epi.store(m0 + m, n0 + i, bits == 2 ? u - qs : 2 * u - qs, xs[m0 + m]);
          }
        }
      }
    }
  });
  return out.scalar_type() == out_dtype ? out : out.to(out_dtype);
}

// The packed GPTQ layout (hf_compress.quant.layout) dequantized and transposed: out[k, n] =
// float(q[k, n] - zeros[g_idx[k], n]) * scales[g_idx[k], n] in float32, [K, N], the same operations as
// hf_compress.kernels.unpack.dequantize (so bit-identical). q[k, n] is the bits-wide field at bit k*bits of
// column n's little-endian stream of int32 words (qweight [ceil(K*bits/32), N]); 3-bit fields may span two words.
// One pass writes each output float once; rows of k are spread over the threads. Training through a packed
// layer (LoRA) multiplies by this weight twice per step, so the dequantization must cost far less than a GEMM.
at::Tensor dequantize_gptq(const at::Tensor& qweight, const at::Tensor& zeros, const at::Tensor& scales,
                           const at::Tensor& g_idx, int64_t bits, int64_t in_features) {
  TORCH_CHECK(qweight.dim() == 2 && qweight.scalar_type() == at::kInt, "qweight must be int32 [words, N]");
  TORCH_CHECK(bits == 2 || bits == 3 || bits == 4 || bits == 8, "bits must be 2, 3, 4 or 8, got ", bits);
  const int64_t K = in_features, N = qweight.size(1);
  TORCH_CHECK(qweight.size(0) * 32 >= K * bits, "qweight holds fewer than in_features codes");
  TORCH_CHECK(zeros.dim() == 2 && zeros.size(1) == N && zeros.scalar_type() == at::kInt, "zeros must be int32 [G, N]");
  TORCH_CHECK(scales.sizes() == zeros.sizes() && scales.scalar_type() == at::kFloat, "scales must be float32 [G, N]");
  TORCH_CHECK(g_idx.dim() == 1 && g_idx.size(0) == K && g_idx.scalar_type() == at::kInt, "g_idx must be int32 [K]");
  const auto qw = qweight.contiguous(), zs = zeros.contiguous(), sc = scales.contiguous(), gi = g_idx.contiguous();
  const int64_t G = zs.size(0);
  const int32_t* gp = gi.data_ptr<int32_t>();
  for (int64_t k = 0; k < K; ++k) TORCH_CHECK(gp[k] >= 0 && gp[k] < G, "g_idx[", k, "] = ", gp[k], " is not a group");
  auto out = at::empty({K, N}, qweight.options().dtype(at::kFloat));
  const uint32_t* q = reinterpret_cast<const uint32_t*>(qw.data_ptr<int32_t>());
  const int32_t* z = zs.data_ptr<int32_t>();
  const float* s = sc.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const uint32_t mask = (1u << bits) - 1u;
  at::parallel_for(0, K, std::max<int64_t>(1, 16384 / std::max<int64_t>(N, 1)), [&](int64_t k0, int64_t k1) {
    for (int64_t k = k0; k < k1; ++k) {
      const int64_t bit = k * bits, word = bit >> 5;
      const int shift = static_cast<int>(bit & 31), spill = shift + static_cast<int>(bits) - 32;
      const uint32_t* w0 = q + word * N;
      const int32_t* zr = z + static_cast<int64_t>(gp[k]) * N;
      const float* sr = s + static_cast<int64_t>(gp[k]) * N;
      float* orow = o + k * N;
      if (spill <= 0) {
        for (int64_t n = 0; n < N; ++n)
          orow[n] = static_cast<float>(static_cast<int32_t>((w0[n] >> shift) & mask) - zr[n]) * sr[n];
      } else {  // a 3-bit field across two words: its low bits end word `word`, its high bits start the next
        const uint32_t* w1 = w0 + N;
        for (int64_t n = 0; n < N; ++n) {
          const uint32_t v = ((w0[n] >> shift) | (w1[n] << (bits - spill))) & mask;
          orow[n] = static_cast<float>(static_cast<int32_t>(v) - zr[n]) * sr[n];
        }
      }
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY(hf_compress_lowbit, m) {
  m.def(
      "linear(Tensor x, Tensor qweight, Tensor w_scale, Tensor? in_scale, Tensor? bias, int bits, int in_features, "
      "int isa=-1) -> Tensor");
  // The path isa=-1 picks on this CPU (0 scalar, 1 AVX2, 2 AVX512-VNNI).
  m.def("best_isa() -> int", []() -> int64_t { return best_isa(); });
  m.def("dequantize_gptq(Tensor qweight, Tensor zeros, Tensor scales, Tensor g_idx, int bits, int in_features) -> Tensor");
}

TORCH_LIBRARY_IMPL(hf_compress_lowbit, CPU, m) {
  m.impl("linear", &lowbit_linear);
  m.impl("dequantize_gptq", &dequantize_gptq);
}
