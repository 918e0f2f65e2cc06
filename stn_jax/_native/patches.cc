// Native CPU kernels for stn_jax.conv's patch extraction (im2col) and its
// transpose (XLA FFI). Same semantics as the pure-JAX lowering in
// stn_jax/conv.py, which is the reference:
//
//   patches:   x (B, H, W, C) -> p (B, OH, OW, KH * KW * C),
//              p[b, y, x, (i * KW + j) * C + c] = x[b, y * SH + i, x * SW + j, c]
//   unpatches: its transpose, p -> x, summing where windows overlap.
//
// In channels-last order a window's row (KW pixels x C channels) is contiguous
// in both arrays, so each is one copy or one vectorised add. Work is split
// over XLA's intra-op thread pool by image; `unpatches` gives each image to one
// task and visits its windows in a fixed order, so results are bit-identical
// from run to run.

#include <algorithm>
#include <cstdint>
#include <cstring>

#include "parallel.h"
#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;
using stn::ParallelFor;

namespace {

struct Geometry {
  int64_t batch, height, width, channels;  // the image side (B, H, W, C)
  int64_t out_h, out_w;                    // windows per column and row
  int64_t kh, kw, sh, sw;
  int64_t row() const { return kw * channels; }          // floats in one window row
  int64_t window() const { return kh * kw * channels; }  // floats in one patch
};

ffi::Error MakeGeometry(ffi::Span<const int64_t> image_dims, ffi::Span<const int64_t> patch_dims,
                        ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> strides, Geometry* g) {
  if (image_dims.size() != 4 || patch_dims.size() != 4 || kernel.size() != 2 || strides.size() != 2) {
    return ffi::Error::InvalidArgument("stn patches: expected (B, H, W, C) images and 2-D kernel and strides");
  }
  *g = {image_dims[0], image_dims[1], image_dims[2], image_dims[3], patch_dims[1], patch_dims[2],
        kernel[0],     kernel[1],     strides[0],    strides[1]};
  if (g->kh < 1 || g->kw < 1 || g->sh < 1 || g->sw < 1 || patch_dims[0] != g->batch ||
      patch_dims[3] != g->window() || g->out_h != (g->height - g->kh) / g->sh + 1 ||
      g->out_w != (g->width - g->kw) / g->sw + 1) {
    return ffi::Error::InvalidArgument("stn patches: image and patch shapes do not match the kernel and strides");
  }
  return ffi::Error::Success();
}

ffi::Error Patches(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> image, ffi::ResultBuffer<ffi::F32> out,
                   ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> strides) {
  Geometry g;
  if (auto err = MakeGeometry(image.dimensions(), out->dimensions(), kernel, strides, &g); !err.success()) {
    return err;
  }
  const float* x = image.typed_data();
  float* p = out->typed_data();
  const int64_t row = g.row();
  ParallelFor(pool, g.batch * g.out_h, [&](int64_t task) {
    const int64_t b = task / g.out_h, y = task % g.out_h;
    float* dst = p + task * g.out_w * g.window();
    for (int64_t ox = 0; ox < g.out_w; ++ox) {
      for (int64_t i = 0; i < g.kh; ++i, dst += row) {
        const float* src = x + ((b * g.height + y * g.sh + i) * g.width + ox * g.sw) * g.channels;
        std::memcpy(dst, src, row * sizeof(float));
      }
    }
  });
  return ffi::Error::Success();
}

ffi::Error Unpatches(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> patches, ffi::ResultBuffer<ffi::F32> out,
                     ffi::Span<const int64_t> kernel, ffi::Span<const int64_t> strides) {
  Geometry g;
  if (auto err = MakeGeometry(out->dimensions(), patches.dimensions(), kernel, strides, &g); !err.success()) {
    return err;
  }
  const float* p = patches.typed_data();
  float* x = out->typed_data();
  const int64_t row = g.row();
  const int64_t image = g.height * g.width * g.channels;
  ParallelFor(pool, g.batch, [&](int64_t b) {
    float* img = x + b * image;
    std::fill(img, img + image, 0.0f);
    const float* src = p + b * g.out_h * g.out_w * g.window();
    for (int64_t y = 0; y < g.out_h; ++y) {
      for (int64_t ox = 0; ox < g.out_w; ++ox) {
        for (int64_t i = 0; i < g.kh; ++i, src += row) {
          float* dst = img + ((y * g.sh + i) * g.width + ox * g.sw) * g.channels;
#pragma omp simd
          for (int64_t k = 0; k < row; ++k) dst[k] += src[k];
        }
      }
    }
  });
  return ffi::Error::Success();
}

}  // namespace

#define STN_PATCHES_BIND                         \
  ffi::Ffi::Bind()                               \
      .Ctx<ffi::ThreadPool>()                    \
      .Arg<ffi::Buffer<ffi::F32>>()              \
      .Ret<ffi::Buffer<ffi::F32>>()              \
      .Attr<ffi::Span<const int64_t>>("kernel")  \
      .Attr<ffi::Span<const int64_t>>("strides")

XLA_FFI_DEFINE_HANDLER_SYMBOL(StnPatchesF32, Patches, STN_PATCHES_BIND);
XLA_FFI_DEFINE_HANDLER_SYMBOL(StnUnpatchesF32, Unpatches, STN_PATCHES_BIND);
