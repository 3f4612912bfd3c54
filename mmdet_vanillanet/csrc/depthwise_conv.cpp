// The series activation's depthwise conv (KxK, stride 1, zero padding K/2, one filter per channel) on
// channels-last CPU maps, for the fused VanillaNet's inference: bf16 or fp32 in and out, fp32 arithmetic.
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
#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int kLanes = 16;       // fp32 lanes of a zmm register: channels per vector
constexpr int kTile = 16;        // output pixels per register tile
constexpr int kRowsPerTask = 32; // output rows one task computes, refilling the ring K-1 rows at its start
constexpr int kGroupVectors = 16;  // channel vectors per task, at most: 512 contiguous bytes of a bf16 pixel
constexpr int64_t kRingBytes = int64_t(1) << 20;  // the ring's budget: half of one core's L2 on current Xeons

bool cpu_supported() {
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bf16");
}

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512bf16")

inline __m512 load(const uint16_t* p, __mmask16 m) {  // bf16 -> fp32 is exact: the bits move up by 16
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(m, p)), 16));
}
inline __m512 load(const float* p, __mmask16 m) { return _mm512_maskz_loadu_ps(m, p); }
inline void store(uint16_t* p, __m512 v, __mmask16 m) {  // round to nearest even, as torch rounds to bf16
  _mm256_mask_storeu_epi16(p, m, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}
inline void store(float* p, __m512 v, __mmask16 m) { _mm512_mask_storeu_ps(p, m, v); }

inline __mmask16 lane_mask(int c, int channels) {
  return channels - c >= kLanes ? __mmask16(0xFFFF) : __mmask16((1u << (channels - c)) - 1);
}

// Output pixels start ... start + count - 1 (count <= kTile) of one row and one channel vector, from the K ring
// rows that feed that row (`kLanes` floats per pixel, column 0 is K/2 columns left of the row's first output).
template <int K, typename T>
void output_tile(const float* const* rows, const float* weight, const float* bias, T* out, int start, int count,
                 int channels, int c, __mmask16 m) {
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
  T* o = out + int64_t(start) * channels + c;
  for (int r = 0; r < count; ++r) store(o + int64_t(r) * channels, acc[r], m);
}

// The whole conv. A task is (image, group of channel vectors, strip of columns, band of output rows). Its ring
// holds the K input rows that the current output row reads, over the strip and K/2 columns either side, converted
// to fp32 with zeros outside the image: slot = input row mod K, then [vector][column][lane]. Filling it reads
// whole pixels of the group (512 contiguous bytes in bf16), which the hardware prefetchers follow.
template <int K, typename T>
void depthwise(const T* x, const float* weight, const float* bias, T* y, int64_t batch, int height, int width,
               int channels) {
  constexpr int P = K / 2;
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
  at::parallel_for(0, batch * groups * strips * bands, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> storage(K * slot_floats + kLanes);
    float* ring = reinterpret_cast<float*>((reinterpret_cast<uintptr_t>(storage.data()) + 63) & ~uintptr_t(63));
    for (int64_t task = begin; task < end; ++task) {
      const int band = int(task % bands);
      const int s0 = int(task / bands % strips) * strip;
      const int v0 = int(task / bands / strips % groups) * group;
      const int v1 = std::min(vectors, v0 + group);
      const int64_t image = task / bands / strips / groups * int64_t(height) * width * channels;
      const int columns = std::min(strip, width - s0);
      auto fill = [&](int input_row) {
        float* slot = ring + ((input_row % K + K) % K) * slot_floats;
        const bool inside = input_row >= 0 && input_row < height;
        for (int col = 0; col < ring_columns; ++col) {
          const int w = s0 - P + col;
          float* dst = slot + col * kLanes;
          if (!inside || w < 0 || w >= width) {
            for (int v = v0; v < v1; ++v) _mm512_store_ps(dst + (v - v0) * vector_row, _mm512_setzero_ps());
            continue;
          }
          const T* src = x + image + (int64_t(input_row) * width + w) * channels;
          for (int v = v0; v < v1; ++v)
            _mm512_store_ps(dst + (v - v0) * vector_row, load(src + v * kLanes, lane_mask(v * kLanes, channels)));
        }
      };
      const int h0 = band * kRowsPerTask, h1 = std::min(height, h0 + kRowsPerTask);
      for (int input_row = h0 - P; input_row < h0 + P; ++input_row) fill(input_row);
      for (int h = h0; h < h1; ++h) {
        fill(h + P);
        T* out = y + image + (int64_t(h) * width + s0) * channels;
        const float* rows[K];
        for (int i = 0; i < K; ++i) rows[i] = ring + ((h + i - P + K) % K) * slot_floats;
        // tiles outer, vectors inner: a tile's pixels are written whole (the group's channels) before the next
        for (int t = 0; t < columns; t += kTile) {
          const int start = columns >= kTile ? std::min(t, columns - kTile) : 0;  // the last tile overlaps
          const int count = std::min(kTile, columns - start);
          for (int v = v0; v < v1; ++v) {
            const float* vector_rows[K];
            for (int i = 0; i < K; ++i) vector_rows[i] = rows[i] + (v - v0) * vector_row;
            output_tile<K>(vector_rows, weight, bias, out, start, count, channels, v * kLanes,
                           lane_mask(v * kLanes, channels));
          }
        }
      }
    }
  });
}

#pragma GCC pop_options

template <typename T>
void dispatch_kernel_size(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias, at::Tensor& y) {
  const T* xp = reinterpret_cast<const T*>(x.data_ptr());
  T* yp = reinterpret_cast<T*>(y.data_ptr());
  const float* wp = weight.data_ptr<float>();
  const float* bp = bias.data_ptr<float>();
  const int64_t n = x.size(0);
  const int c = int(x.size(1)), h = int(x.size(2)), w = int(x.size(3));
  switch (weight.size(0)) {
    case 3: depthwise<3>(xp, wp, bp, yp, n, h, w, c); break;
    case 5: depthwise<5>(xp, wp, bp, yp, n, h, w, c); break;
    case 7: depthwise<7>(xp, wp, bp, yp, n, h, w, c); break;
    case 9: depthwise<9>(xp, wp, bp, yp, n, h, w, c); break;
    case 11: depthwise<11>(xp, wp, bp, yp, n, h, w, c); break;
    case 13: depthwise<13>(xp, wp, bp, yp, n, h, w, c); break;
    default: TORCH_CHECK(false, "depthwise_conv_nhwc: kernel size ", weight.size(0), " is not one of 3, 5, ..., 13");
  }
}

at::Tensor depthwise_conv_nhwc(const at::Tensor& x, const at::Tensor& weight, const at::Tensor& bias) {
  TORCH_CHECK(cpu_supported(), "depthwise_conv_nhwc needs a CPU with AVX-512 (F, BW, VL) and AVX512_BF16");
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "depthwise_conv_nhwc: x must be a 4-D channels-last CPU tensor, got sizes ", x.sizes(), " strides ",
              x.strides());
  TORCH_CHECK(x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat,
              "depthwise_conv_nhwc: x must be bf16 or fp32, got ", x.scalar_type());
  const int64_t c = x.size(1);
  TORCH_CHECK(x.numel() < (int64_t(1) << 31) && c > 0, "depthwise_conv_nhwc: x has ", x.numel(), " elements");
  TORCH_CHECK(weight.dim() == 3 && weight.size(0) == weight.size(1) && weight.size(2) == c &&
                  weight.scalar_type() == at::kFloat && weight.is_contiguous() && weight.device().is_cpu(),
              "depthwise_conv_nhwc: weight must be contiguous fp32 (K, K, C) with C = ", c, ", got ", weight.sizes());
  TORCH_CHECK(bias.dim() == 1 && bias.size(0) == c && bias.scalar_type() == at::kFloat && bias.is_contiguous() &&
                  bias.device().is_cpu(),
              "depthwise_conv_nhwc: bias must be contiguous fp32 (C,) with C = ", c, ", got ", bias.sizes());
  at::Tensor y = at::empty_like(x, at::MemoryFormat::ChannelsLast);
  if (x.numel() == 0) return y;
  if (x.scalar_type() == at::kBFloat16) {
    dispatch_kernel_size<uint16_t>(x, weight, bias, y);
  } else {
    dispatch_kernel_size<float>(x, weight, bias, y);
  }
  return y;
}

bool depthwise_conv_nhwc_supported() { return cpu_supported(); }

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdet_vanillanet, m) {
  m.def("depthwise_conv_nhwc(Tensor x, Tensor weight, Tensor bias) -> Tensor");
  m.def("depthwise_conv_nhwc_supported() -> bool", &depthwise_conv_nhwc_supported);
}

TORCH_LIBRARY_IMPL(mmdet_vanillanet, CPU, m) { m.impl("depthwise_conv_nhwc", &depthwise_conv_nhwc); }
