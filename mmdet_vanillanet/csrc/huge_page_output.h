// The kernels' output tensors. A large map freshly allocated by torch's CPU allocator lives in new anonymous
// memory, and its first write faults in every 4 KiB page: 12 ms of the 22 ms depthwise conv of a 512 x 160 x 240
// bf16 map on 2 cores of a (virtualised) Xeon. Asking for transparent huge pages before that first write
// (madvise, where the system's THP mode is "madvise" or "always") makes it one fault per 2 MiB.
#pragma once

#include <ATen/ATen.h>

#ifdef __linux__
#include <sys/mman.h>
#endif

#include <cstdint>

namespace mmdet_vanillanet {

inline at::Tensor empty_output(at::IntArrayRef sizes, const at::TensorOptions& options, at::MemoryFormat format) {
  at::Tensor out = at::empty(sizes, options.memory_format(format));
#ifdef __linux__
  constexpr uintptr_t kPage = 4096, kHugePage = uintptr_t(1) << 21;
  const auto start = reinterpret_cast<uintptr_t>(out.data_ptr());
  const uintptr_t begin = (start + kPage - 1) & ~(kPage - 1), end = (start + out.nbytes()) & ~(kPage - 1);
  if (end > begin + 2 * kHugePage) madvise(reinterpret_cast<void*>(begin), end - begin, MADV_HUGEPAGE);  // a hint
#endif
  return out;
}

}  // namespace mmdet_vanillanet
