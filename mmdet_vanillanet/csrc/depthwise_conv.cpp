// The series activation's depthwise conv (KxK, stride 1, zero padding K/2, one filter per channel) on
// channels-last CPU maps, for the fused VanillaNet's inference: bf16, fp32 or (int8 backbones) uint8 in and out,
// fp32 arithmetic, optionally of the block's 2x2 max pool (taken while reading the input).
//
// oneDNN runs VanillaNet's 9x9 depthwise convs at 60-110 GFLOP/s in bf16 on an AMX Xeon, a third of the fp32
// FMA rate, and they take half of the bf16 backbone's time. This kernel keeps K rows of a group of channels
// in an fp32 ring buffer (zero padded, so there are no edge cases in the inner loop), and computes a tile of
// 16 output pixels x 16 channels in registers: each input vector loaded once per kernel row feeds up to K
// FMAs, with the row's K weight vectors held in registers too.
//
// It needs AVX-512 (F, BW, VL, BF16) and is compiled for it whatever the build machine's default target;
// mmdet_vanillanet/models/cpu_kernels.py calls it only on CPUs that have these, and oneDNN otherwise.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

// x86-64 only; elsewhere (and with MMDET_VANILLANET_NO_AVX512 defined, how that build is tested) the library
// still builds, reports the kernel unsupported, and the channels-last copy works alone.
#if defined(__x86_64__) && !defined(MMDET_VANILLANET_NO_AVX512)
#define MMDET_VANILLANET_AVX512 1
#include <immintrin.h>
#else
#define MMDET_VANILLANET_AVX512 0
#endif

#include "huge_page_output.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;       // fp32 lanes of a zmm register: channels per vector
constexpr int kTile = 16;        // output pixels per register tile
constexpr int kTilesPerVector = 4; // tiles of one channel vector in a row, before the next vector
constexpr int kRowsPerTask = 32; // output rows one task computes, refilling the ring K-1 rows at its start
constexpr int kGroupVectors = 16;  // channel vectors per task, at most: 512 contiguous bytes of a bf16 pixel
constexpr int64_t kRingBytes = int64_t(1) << 20;  // the ring's budget: half of one core's L2 on current Xeons

#if MMDET_VANILLANET_AVX512

bool cpu_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

// How a map's elements become the kernel's fp32 values and go back. bf16 -> fp32 is exact (the bits move up by 16);
// fp32 -> bf16 rounds to nearest even, as torch does.
struct Bf16 {
  using Element = uint16_t;
  __m512 load(const Element* p, __mmask16 m) const {
    return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
  }
  void store(Element* p, __m512 v, __mmask16 m) const {
    _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
  }
};

struct Fp32 {
  using Element = float;
  __m512 load(const Element* p, __mmask16 m) const { return _mm512_maskz_loadu_ps(m, p); }
  void store(Element* p, __m512 v, __mmask16 m) const { _mm512_mask_storeu_ps(p, m, v); }
};

// uint8 maps of PT2E's per-tensor quantization: in, q - zero_point (the weights carry the input's scale); out,
// clamp(round_half_even(v / scale) + zero_point, 0, 255), as quantize_per_tensor computes it.
struct Uint8 {
  using Element = uint8_t;
  __m512 in_zero_point, out_inverse_scale;
  __m512i out_zero_point;
  __m512 load(const Element* p, __mmask16 m) const {
    return _mm512_sub_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(m, p))), in_zero_point);
  }
  void store(Element* p, __m512 v, __mmask16 m) const {
    __m512i q = _mm512_add_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(v, out_inverse_scale)), out_zero_point);
    q = _mm512_min_epi32(_mm512_max_epi32(q, _mm512_setzero_si512()), _mm512_set1_epi32(255));
    _mm512_mask_cvtepi32_storeu_epi8(p, m, q);
  }
};

inline __mmask16 lane_mask(int c, int channels) {
  return channels - c >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (channels - c)) - 1);
}

// Output pixels start ... start + count - 1 (count <= kTile) of one row and one channel vector, from the K ring
// rows that feed that row (`kLanes` floats per pixel, column 0 is K/2 columns left of the row's first output).
template <int K, typename Codec>
void output_tile(const float* const* rows, const float* weight, const float* bias, typename Codec::Element* out,
                 int start, int count, int channels, int c, __mmask16 m, const Codec& codec) {
  const __m512 b = _mm512_maskz_loadu_ps(m, bias + c);
  __m512 acc[kTile];
#pragma GCC unroll 16
  for (int r = 0; r < kTile; ++r) acc[r] = b;
  for (int i = 0; i < K; ++i) {
    const float* row = rows[i] + int64_t(start) * kLanes;
    __m512 w[K];
#pragma GCC unroll 16
    for (int j = 0; j < K; ++j) w[j] = _mm512_maskz_loadu_ps(m, weight + int64_t(i * K + j) * channels + c);
#pragma GCC unroll 32
    for (int q = 0; q < kTile + K - 1; ++q) {
      const __m512 x = _mm512_load_ps(row + q * kLanes);
#pragma GCC unroll 16
      for (int r = 0; r < kTile; ++r) {
        const int j = q - r;
        if (j >= 0 && j < K) acc[r] = _mm512_fmadd_ps(x, w[j], acc[r]);
      }
    }
  }
  typename Codec::Element* o = out + int64_t(start) * channels + c;
  for (int r = 0; r < count; ++r) codec.store(o + int64_t(r) * channels, acc[r], m);
}

// NaN-propagating maximum, as torch's max pool computes it (vmaxps returns its second operand for a NaN).
inline __m512 max_with_nan(__m512 a, __m512 b) {
  return _mm512_mask_blend_ps(_mm512_cmp_ps_mask(a, a, _CMP_UNORD_Q), _mm512_max_ps(a, b), a);
}

// The whole conv, optionally of the 2x2 max pool (stride 2, floor) of `x` (pool = 2: `x` is (in_height, in_width),
// the conv's map (height, width) = (in_height / 2, in_width / 2)). A task is (image, group of channel vectors,
// strip of columns, band of output rows). Its ring holds the K rows of the conv's input that the current output
// row reads, over the strip and K/2 columns either side, in fp32 with zeros outside the map: slot = row mod K,
// then [vector][column][lane]. Filling it reads whole pixels of the group (512 contiguous bytes in bf16), which
// the hardware prefetchers follow, and takes the pool's maxima on the way.
template <int K, typename Codec>
void depthwise(const typename Codec::Element* x, const float* weight, const float* bias, typename Codec::Element* y,
               int64_t batch, int in_height, int in_width, int channels, int pool, const Codec& codec) {
  constexpr int P = K / 2;
  const int height = in_height / pool, width = in_width / pool;
  const int vectors = (channels + kLanes - 1) / kLanes;
  const int groups = (vectors + kGroupVectors - 1) / kGroupVectors;
  const int group = (vectors + groups - 1) / groups;
  const int most_columns = std::max<int64_t>(kTile, kRingBytes / (int64_t(K) * group * kLanes * 4) - 2 * P);
  const int strips = (width + most_columns - 1) / most_columns;
  const int strip = (width + strips - 1) / strips;
  const int bands = (height + kRowsPerTask - 1) / kRowsPerTask;
  const int ring_columns = std::max(strip, kTile) + 2 * P;
  const int64_t vector_row = int64_t(ring_columns) * kLanes;  // floats
  const int64_t slot_floats = group * vector_row;
  const int64_t pixel_step = channels, row_step = int64_t(in_width) * channels;  // in x
  at::parallel_for(0, batch * groups * strips * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> storage(K * slot_floats + kLanes);
    float* ring = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    for (int64_t task = begin; task < end; ++task) {
      const int band = int(task % bands);
      const int s0 = int(task / bands % strips) * strip;
      const int v0 = int(task / bands / strips % groups) * group;
      const int v1 = std::min(vectors, v0 + group);
      const int64_t n = task / bands / strips / groups;
      const auto* image = x + n * in_height * row_step;
      const int columns = std::min(strip, width - s0);
      auto fill = [&](int row) {
        float* slot = ring + ((row % K + K) % K) * slot_floats;
        const bool inside = row >= 0 && row < height;
        for (int col = 0; col < ring_columns; ++col) {
          const int w = s0 - P + col;
          float* dst = slot + col * kLanes;
          if (!inside || w < 0 || w >= width) {
            for (int v = v0; v < v1; ++v) _mm512_store_ps(dst + (v - v0) * vector_row, _mm512_setzero_ps());
            continue;
          }
          const auto* src = image + int64_t(row) * pool * row_step + int64_t(w) * pool * pixel_step;
          for (int v = v0; v < v1; ++v) {
            const __mmask16 m = lane_mask(v * kLanes, channels);
            const auto* p = src + v * kLanes;
            __m512 value = codec.load(p, m);
            if (pool == 2) {
              value = max_with_nan(max_with_nan(value, codec.load(p + pixel_step, m)),
                                   max_with_nan(codec.load(p + row_step, m), codec.load(p + row_step + pixel_step, m)));
            }
            _mm512_store_ps(dst + (v - v0) * vector_row, value);
          }
        }
      };
      const int h0 = band * kRowsPerTask, h1 = std::min(height, h0 + kRowsPerTask);
      for (int input_row = h0 - P; input_row < h0 + P; ++input_row) fill(input_row);
      for (int h = h0; h < h1; ++h) {
        fill(h + P);
        auto* out = y + ((n * height + h) * width + s0) * channels;
        const float* rows[K];
        for (int i = 0; i < K; ++i) rows[i] = ring + ((h + i - P + K) % K) * slot_floats;
        // kTilesPerVector tiles of a vector, then the next vector: the tiles' pixels are written whole (the
        // group's channels) before the next tiles, and a vector's weights are read from L1 after its first tile
        for (int t0 = 0; t0 < columns; t0 += kTilesPerVector * kTile) {
          for (int v = v0; v < v1; ++v) {
            const float* vector_rows[K];
            for (int i = 0; i < K; ++i) vector_rows[i] = rows[i] + (v - v0) * vector_row;
            for (int t = t0; t < std::min(columns, t0 + kTilesPerVector * kTile); t += kTile) {
              const int start = columns >= kTile ? std::min(t, columns - kTile) : 0;  // the last tile overlaps
              const int count = std::min(kTile, columns - start);
              output_tile<K>(vector_rows, weight, bias, out, start, count, channels, v * kLanes,
                             lane_mask(v * kLanes, channels), codec);
            }
          }
        }
      }
    }
  });
}

Uint8 make_uint8_codec(int64_t in_zero_point, double out_scale, int64_t out_zero_point) {
  return Uint8{_mm512_set1_ps(float(in_zero_point)), _mm512_set1_ps(float(1.0 / out_scale)),
               _mm512_set1_epi32(int(out_zero_point))};
}

#pragma GCC pop_options

template <typename Codec>
void dispatch_kernel_size(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y,
                          int pool, const Codec& codec) {
  using Element = typename Codec::Element;
  const auto* xp = reinterpret_cast<const Element*>(x.data_ptr());
  auto* yp = reinterpret_cast<Element*>(y.data_ptr());
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const int64_t n = x.size(0);
  const int c = int(x.size(1)), h = int(x.size(2)), w = int(x.size(3));
  switch (weight.size(0)) {
    case 3: depthwise<3>(xp, wp, bp, yp, n, h, w, c, pool, codec); break;
    case 5: depthwise<5>(xp, wp, bp, yp, n, h, w, c, pool, codec); break;
    case 7: depthwise<7>(xp, wp, bp, yp, n, h, w, c, pool, codec); break;
    case 9: depthwise<9>(xp, wp, bp, yp, n, h, w, c, pool, codec); break;
    case 11: depthwise<11>(xp, wp, bp, yp, n, h, w, c, pool, codec); break;
    case 13: depthwise<13>(xp, wp, bp, yp, n, h, w, c, pool, codec); break;
    default: TORCH_CHECK(false, "depthwise_conv_nhwc: kernel size ", weight.size(0), " is not one of 3, 5, ..., 13");
  }
}

void run(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y, int pool) {
  if (x.scalar_type() == at::kBFloat16) {
    dispatch_kernel_size(x, weight, bias, y, pool, Bf16{});
  } else {
    dispatch_kernel_size(x, weight, bias, y, pool, Fp32{});
  }
}

void run_quantized(const at::Tensor& x, int64_t x_zero_point, const at::Tensor& weight, const at::Tensor& bias,
                   double out_scale, int64_t out_zero_point, at::Tensor& y) {
  dispatch_kernel_size(x, weight, bias, y, 1, make_uint8_codec(x_zero_point, out_scale, out_zero_point));
}

#else  // not x86-64: check_arguments refuses every call before these

bool cpu_supported() { return false; }
void run(const at::Tensor&, const at::Tensor&, const at::Tensor&, at::Tensor&, int) {}
void run_quantized(const at::Tensor&, int64_t, const at::Tensor&, const at::Tensor&, double, int64_t, at::Tensor&) {}

#endif

void check_arguments(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(cpu_supported(), "depthwise_conv_nhwc needs a CPU with AVX-512 (F, BW, VL) and AVX512_BF16");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4, "depthwise_conv_nhwc: x must be a 4-D CPU tensor, got sizes ",
              x.sizes());
  const int64_t c = x.size(1);
  TORCH_CHECK(x.numel() < (int64_t(1) << 31) && c > 0, "depthwise_conv_nhwc: x has ", x.numel(), " elements");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == weight.size(1) && weight.size(2) == c &&
                  weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.device().is_cpu(),
              "depthwise_conv_nhwc: weight must be contiguous fp32 (K, K, C) with C = ", c, ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == c && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                  bias.device().is_cpu(),
              "depthwise_conv_nhwc: bias must be contiguous fp32 (C,) with C = ", c, ", got ", bias.sizes());
}

// `pool` = 2: the conv of F.max_pool2d(x, 2) (floor), without the pooled map in memory.
at::Tensor depthwise_conv_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, int64_t pool) {
  check_arguments(x, weight, bias);
  TORCH_CHECK(x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "depthwise_conv_nhwc: x must be channels-last contiguous, got strides ", x.strides());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "depthwise_conv_nhwc: x must be bf16 or fp32, got ", x.scalar_type());
  TORCH_CHECK(pool == 1 || pool == 2, "depthwise_conv_nhwc: pool must be 1 (none) or 2 (2x2 max pool), got ", pool);
  at::Tensor y = mmdet_vanillanet::empty_output({x.size(0), x.size(1), x.size(2) / pool, x.size(3) / pool}, x.options(),
                                                at::MemoryFormat::ChannelsLast);
  if (y.numel() == 0) return y;
  run(x, weight, bias, y, int(pool));
  return y;
}

// The same conv between uint8 maps quantized per tensor: `weight` holds the dequantized weights times the input's
// scale, so that a sum over (q - x_zero_point) * weight is the fp32 conv of the dequantized input.
at::Tensor quantized_depthwise_conv_nhwc(const at::Tensor& x, int64_t x_zero_point, const at::Tensor& weight,
                                         const at::Tensor& bias, double out_scale, int64_t out_zero_point) {
  check_arguments(x, weight, bias);
  TORCH_CHECK(x.scalar_type() == at::kByte, "quantized_depthwise_conv_nhwc: x must be uint8, got ", x.scalar_type());
  TORCH_CHECK(out_scale > 0 && 0 <= x_zero_point && x_zero_point <= 255 && 0 <= out_zero_point &&
                  out_zero_point <= 255,
              "quantized_depthwise_conv_nhwc: scales must be > 0 and zero points in [0, 255]");
  const at::Tensor input = x.contiguous(at::MemoryFormat::ChannelsLast);
  at::Tensor y = mmdet_vanillanet::empty_output(input.sizes(), input.options(), at::MemoryFormat::ChannelsLast);
  if (x.numel() == 0) return y;
  run_quantized(input, x_zero_point, weight, bias, out_scale, out_zero_point, y);
  return y;
}

bool depthwise_conv_nhwc_supported() { return cpu_supported(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdet_vanillanet, m) {
  m.def("depthwise_conv_nhwc(Tensor x, Tensor weight, Tensor bias, int pool=1) -> Tensor");
  m.def(
      "quantized_depthwise_conv_nhwc(Tensor x, int x_zero_point, Tensor weight, Tensor bias, float out_scale, "
      "int out_zero_point) -> Tensor");
  m.def("depthwise_conv_nhwc_supported() -> bool", &depthwise_conv_nhwc_supported);
}

TORCH_LIBRARY_IMPL(mmdet_vanillanet, CPU, m) {
  m.impl("depthwise_conv_nhwc", &depthwise_conv_nhwc);
  m.impl("quantized_depthwise_conv_nhwc", &quantized_depthwise_conv_nhwc);
}
