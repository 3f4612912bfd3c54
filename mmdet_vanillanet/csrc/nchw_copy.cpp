// A channels-last map copied to NCHW-contiguous memory: a cache-blocked transpose of each image's (H*W, C)
// matrix. torch's own copy runs this transpose at 0.5-1 GB/s in bf16 (37 ms for a 1024 x 80 x 120 map on a
// Xeon), the blocked one 5-7x faster; the fused VanillaNet's bf16 outputs go through it (the int8 backbone's come
// out of inductor NCHW already).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "huge_page_output.h"

#include <algorithm>
#include <cstdint>

namespace {

constexpr int64_t kPixels = 16;    // pixels per block: one cache line of an fp32 output row
constexpr int64_t kChannels = 64;  // channels per block: one or two cache lines of an input pixel

template <typename T>
void transpose(const T* x, T* y, int64_t batch, int64_t channels, int64_t pixels) {
  const int64_t pixel_blocks = (pixels + kPixels - 1) / kPixels;
  const int64_t channel_blocks = (channels + kChannels - 1) / kChannels;
  at::parallel_for(0, batch * pixel_blocks * channel_blocks, 1, [&](int64_t begin, int64_t end) {
    for (int64_t block = begin; block < end; ++block) {
      const int64_t c0 = block % channel_blocks * kChannels;
      const int64_t p0 = block / channel_blocks % pixel_blocks * kPixels;
      const int64_t image = block / channel_blocks / pixel_blocks * channels * pixels;
      const int64_t c1 = std::min(channels, c0 + kChannels), p1 = std::min(pixels, p0 + kPixels);
      for (int64_t c = c0; c < c1; ++c)
        for (int64_t p = p0; p < p1; ++p) y[image + c * pixels + p] = x[image + p * channels + c];
    }
  });
}

at::Tensor channels_last_to_nchw(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() && x.dim() == 4 && x.is_contiguous(at::MemoryFormat::ChannelsLast),
              "channels_last_to_nchw: x must be a 4-D channels-last CPU tensor, got sizes ", x.sizes(), " strides ",
              x.strides());
  at::Tensor y = mmdet_vanillanet::empty_output(x.sizes(), x.options(), at::MemoryFormat::Contiguous);
  const int64_t batch = x.size(0), channels = x.size(1), pixels = x.size(2) * x.size(3);
  switch (x.element_size()) {
    case 2:
      transpose(reinterpret_cast<const uint16_t*>(x.data_ptr()), reinterpret_cast<uint16_t*>(y.data_ptr()), batch,
                channels, pixels);
      break;
    case 4:
      transpose(reinterpret_cast<const uint32_t*>(x.data_ptr()), reinterpret_cast<uint32_t*>(y.data_ptr()), batch,
                channels, pixels);
      break;
    default:
      y.copy_(x);
  }
  return y;
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(mmdet_vanillanet, m) {
  m.def("channels_last_to_nchw(Tensor x) -> Tensor");
}

TORCH_LIBRARY_IMPL(mmdet_vanillanet, CPU, m) { m.impl("channels_last_to_nchw", &channels_last_to_nchw); }
