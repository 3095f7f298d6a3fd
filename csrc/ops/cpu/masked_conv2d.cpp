// CPU kernels of the masked (PixelCNN) convolution (mask and notation of
// ops/cuda/masked_conv2d.h): im2col restricted to the allowed taps, then ATen GEMMs.
//
// Column layout. The allowed (tap, input channel) pairs are numbered tap-major: row
// j = t·C_in + i for the taps t = r·k + s before the centre (t < T = c·k + c, every channel),
// then the centre tap's channels i < (C_in / G)·(G - 1 + type). Output group g reads exactly the
// first K_g = T·C_in + (C_in / G)·(g + type) rows, so each group's GEMM uses a prefix of the
// column matrix and of the packed weight (C_out, K) and never touches a masked tap: type A does
// about half the arithmetic of a dense k×k convolution.
//
// Parallel over the batch: each thread owns its column buffers; small images are batched
// several to a GEMM (gathered through a per-tap table of source pixels and transposed back into
// NCHW), large ones are cut into bands of output rows so that the column buffer stays bounded. grad_weight is accumulated in one partial per
// thread chunk and the partials are summed in a fixed order (deterministic for a given thread
// count); grad_x has a single writer per image. Half-precision inputs are computed in float32.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>
#include <vector>

#include "ops/masked_conv2d.h"

namespace pyvae {
namespace cpu {
namespace {

// Batch small images until a GEMM has at least this many columns (pixels).
constexpr int64_t kMinColumns = 512;
// Bound on a thread's column buffer (elements): large images are cut into bands of rows.
constexpr int64_t kColumnBudget = int64_t{1} << 20;

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width;
  int64_t k, centre, dilation, groups, type;
  int64_t taps_before;  // T: the allowed taps before the centre
  int64_t rows;         // K: rows of the column matrix (the largest K_g)

  Geometry(const at::Tensor& x, const at::Tensor& weight, int64_t mask_type,
           int64_t color_channels, int64_t dilation_)
      : batch(x.size(0)),
        in_channels(x.size(1)),
        out_channels(weight.size(0)),
        height(x.size(2)),
        width(x.size(3)),
        k(weight.size(2)),
        centre(weight.size(2) / 2),
        dilation(dilation_),
        groups(color_channels),
        type(mask_type),
        taps_before(centre * k + centre),
        rows(group_rows(color_channels - 1)) {}

  int64_t pixels() const { return height * width; }
  int64_t in_group() const { return in_channels / groups; }
  int64_t out_group() const { return out_channels / groups; }
  // The centre tap's input channels that output group g may read.
  int64_t centre_channels(int64_t g) const { return in_group() * (g + type); }
  // K_g: the prefix of the column matrix that output group g reads.
  int64_t group_rows(int64_t g) const {
    return taps_before * in_channels + centre_channels(g);
  }
};

// What one GEMM covers: `images` whole images when they are small, else one image's band of
// `band_rows` output rows.
struct Tiling {
  int64_t images;
  int64_t band_rows;
};

Tiling choose_tiling(const Geometry& g) {
  const int64_t pixels = std::max<int64_t>(g.pixels(), 1);
  const int64_t rows = std::max<int64_t>(g.rows, 1);
  if (pixels < kMinColumns) {
    const int64_t threads = std::max<int64_t>(at::get_num_threads(), 1);
    int64_t images = (kMinColumns + pixels - 1) / pixels;
    images = std::min(images, std::max<int64_t>(kColumnBudget / (rows * pixels), 1));
    // Leave every thread at least one group of images.
    images = std::min(images, std::max<int64_t>((g.batch + threads - 1) / threads, 1));
    return {images, g.height};
  }
  const int64_t band = kColumnBudget / (rows * std::max<int64_t>(g.width, 1));
  return {1, std::clamp<int64_t>(band, 1, g.height)};
}

// cols[j, (b, h, w)] = x[n0 + b, i, h0 + h + dr, w + ds] (0 outside the image) for the rows
// j = t·C_in + i < K, with (dr, ds) the dilated offset of tap t; cols is (K, images·band·W).
template <typename scalar_t, typename acc_t>
void im2col(const scalar_t* x, const Geometry& g, int64_t n0, int64_t images, int64_t h0,
            int64_t band, acc_t* cols) {
  const int64_t W = g.width, H = g.height, columns = images * band * W;
  for (int64_t j = 0; j < g.rows; ++j) {
    const int64_t t = j / g.in_channels, i = j % g.in_channels;
    const int64_t dr = (t / g.k - g.centre) * g.dilation, ds = (t % g.k - g.centre) * g.dilation;
    // Output columns w whose source column w + ds lies inside the image.
    const int64_t w_begin = std::clamp<int64_t>(-ds, 0, W);
    const int64_t w_end = std::max(std::clamp<int64_t>(W - ds, 0, W), w_begin);
    acc_t* row = cols + j * columns;
    for (int64_t b = 0; b < images; ++b) {
      const scalar_t* plane = x + ((n0 + b) * g.in_channels + i) * g.pixels();
      for (int64_t h = 0; h < band; ++h) {
        acc_t* out = row + (b * band + h) * W;
        const int64_t hs = h0 + h + dr;
        if (hs < 0 || hs >= H) {
          std::fill(out, out + W, acc_t(0));
          continue;
        }
        const scalar_t* src = plane + hs * W;
        std::fill(out, out + w_begin, acc_t(0));
        for (int64_t w = w_begin; w < w_end; ++w) out[w] = static_cast<acc_t>(src[w + ds]);
        std::fill(out + w_end, out + W, acc_t(0));
      }
    }
  }
}

// The adjoint of im2col: grad_x[b, i, h0 + h + dr, w + ds] += cols[j, (b, h, w)] inside the
// image, with grad_x (images, C_in, H, W) in acc_t.
template <typename acc_t>
void col2im(const acc_t* cols, const Geometry& g, int64_t images, int64_t h0, int64_t band,
            acc_t* grad_x) {
  const int64_t W = g.width, H = g.height, columns = images * band * W;
  for (int64_t j = 0; j < g.rows; ++j) {
    const int64_t t = j / g.in_channels, i = j % g.in_channels;
    const int64_t dr = (t / g.k - g.centre) * g.dilation, ds = (t % g.k - g.centre) * g.dilation;
    const int64_t w_begin = std::clamp<int64_t>(-ds, 0, W);
    const int64_t w_end = std::max(std::clamp<int64_t>(W - ds, 0, W), w_begin);
    const acc_t* row = cols + j * columns;
    for (int64_t b = 0; b < images; ++b) {
      acc_t* plane = grad_x + (b * g.in_channels + i) * g.pixels();
      for (int64_t h = 0; h < band; ++h) {
        const int64_t hs = h0 + h + dr;
        if (hs < 0 || hs >= H) continue;
        const acc_t* in = row + (b * band + h) * W;
        acc_t* dst = plane + hs * W;
        for (int64_t w = w_begin; w < w_end; ++w) dst[w + ds] += in[w];
      }
    }
  }
}

// For images of fewer than kMinColumns pixels: for each tap, the source pixel of every output
// pixel (-1 in the padding), so that a column row of an image is one loop over its pixels rather
// than one short loop per image row.
std::vector<int64_t> tap_sources(const Geometry& g) {
  const int64_t taps = g.rows == 0 ? 0 : (g.rows - 1) / g.in_channels + 1;
  std::vector<int64_t> sources(static_cast<size_t>(taps * g.pixels()));
  for (int64_t t = 0; t < taps; ++t) {
    const int64_t dr = (t / g.k - g.centre) * g.dilation, ds = (t % g.k - g.centre) * g.dilation;
    for (int64_t h = 0; h < g.height; ++h) {
      for (int64_t w = 0; w < g.width; ++w) {
        const int64_t hs = h + dr, ws = w + ds;
        const bool inside = hs >= 0 && hs < g.height && ws >= 0 && ws < g.width;
        sources[static_cast<size_t>(t * g.pixels() + h * g.width + w)] =
            inside ? hs * g.width + ws : -1;
      }
    }
  }
  return sources;
}

// im2col of whole small images through the table of tap_sources.
template <typename scalar_t, typename acc_t>
void im2col_images(const scalar_t* x, const Geometry& g, const int64_t* sources, int64_t n0,
                   int64_t images, acc_t* cols) {
  const int64_t P = g.pixels(), columns = images * P;
  for (int64_t j = 0; j < g.rows; ++j) {
    const int64_t* source = sources + (j / g.in_channels) * P;
    acc_t* row = cols + j * columns;
    for (int64_t b = 0; b < images; ++b) {
      const scalar_t* plane = x + ((n0 + b) * g.in_channels + j % g.in_channels) * P;
      acc_t* out = row + b * P;
      for (int64_t p = 0; p < P; ++p) {
        out[p] = source[p] >= 0 ? static_cast<acc_t>(plane[source[p]]) : acc_t(0);
      }
    }
  }
}

// col2im of whole small images through the table of tap_sources (a tap maps distinct output
// pixels to distinct source pixels, so one row never adds twice into one element).
template <typename acc_t>
void col2im_images(const acc_t* cols, const Geometry& g, const int64_t* sources, int64_t images,
                   acc_t* grad_x) {
  const int64_t P = g.pixels(), columns = images * P;
  for (int64_t j = 0; j < g.rows; ++j) {
    const int64_t* source = sources + (j / g.in_channels) * P;
    const acc_t* row = cols + j * columns;
    for (int64_t b = 0; b < images; ++b) {
      acc_t* plane = grad_x + (b * g.in_channels + j % g.in_channels) * P;
      const acc_t* in = row + b * P;
      for (int64_t p = 0; p < P; ++p) {
        if (source[p] >= 0) plane[source[p]] += in[p];
      }
    }
  }
}

// The allowed taps of weight as a (C_out, K) matrix in the column layout, with the centre tap's
// masked channel pairs set to 0 (they are never read from weight).
at::Tensor pack_weight(const at::Tensor& weight, const Geometry& g, at::ScalarType acc) {
  const int64_t c = g.centre, Ci = g.in_channels;
  at::Tensor packed = at::empty({g.out_channels, g.rows}, weight.options().dtype(acc));
  if (c > 0) {
    // The full rows r < c, then the taps s < c of the centre row, as (C_out, ..., C_in).
    packed.narrow(1, 0, c * g.k * Ci)
        .view({g.out_channels, c, g.k, Ci})
        .copy_(weight.narrow(2, 0, c).permute({0, 2, 3, 1}));
    packed.narrow(1, c * g.k * Ci, c * Ci)
        .view({g.out_channels, c, Ci})
        .copy_(weight.select(2, c).narrow(2, 0, c).permute({0, 2, 1}));
  }
  const int64_t centre_rows = g.rows - g.taps_before * Ci;
  if (centre_rows == 0) return packed;
  for (int64_t grp = 0; grp < g.groups; ++grp) {
    const int64_t o0 = grp * g.out_group(), allowed = g.centre_channels(grp);
    at::Tensor block = packed.narrow(0, o0, g.out_group()).narrow(1, g.taps_before * Ci,
                                                                   centre_rows);
    block.zero_();
    if (allowed > 0) {
      block.narrow(1, 0, allowed)
          .copy_(weight.narrow(0, o0, g.out_group()).narrow(1, 0, allowed).select(3, c).select(2,
                                                                                             c));
    }
  }
  return packed;
}

// The inverse of pack_weight for gradients: (C_out, K) -> (C_out, C_in, k, k) in `dtype`, with
// exact zeros at every masked tap.
at::Tensor unpack_weight_grad(const at::Tensor& packed, const Geometry& g, at::ScalarType dtype) {
  at::Tensor taps = at::zeros({g.out_channels, g.k, g.k, g.in_channels}, packed.options());
  taps.view({g.out_channels, g.k * g.k * g.in_channels}).narrow(1, 0, g.rows).copy_(packed);
  at::Tensor grad_weight = at::empty({g.out_channels, g.in_channels, g.k, g.k},
                                     packed.options().dtype(dtype));
  grad_weight.copy_(taps.permute({0, 3, 1, 2}));
  return grad_weight;
}

// The first rows x columns of a flat buffer as a contiguous matrix (im2col and col2im rely on
// rows of exactly `columns` elements).
at::Tensor matrix(const at::Tensor& flat, int64_t rows, int64_t columns) {
  return flat.narrow(0, 0, rows * columns).view({rows, columns});
}

// The (C_out, images·band·W) slab of an NCHW tensor covered by one GEMM, as
// (images, C_out, band·W).
at::Tensor slab(const at::Tensor& t, const Geometry& g, int64_t n0, int64_t images, int64_t h0,
                int64_t band) {
  return t.narrow(0, n0, images)
      .view({images, t.size(1), g.pixels()})
      .narrow(2, h0 * g.width, band * g.width);
}

at::Tensor masked_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t mask_type,
                                     int64_t color_channels, int64_t dilation) {
  check_masked_conv2d_args(x, weight, bias, mask_type, color_channels, dilation);
  const Geometry g(x, weight, mask_type, color_channels, dilation);
  at::Tensor y = at::empty({g.batch, g.out_channels, g.height, g.width}, x.options());
  if (y.numel() == 0) return y;
  const at::ScalarType acc = masked_conv2d_acc_dtype(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc);
  const at::Tensor packed = pack_weight(weight, g, acc);
  const std::optional<at::Tensor> bias_acc =
      bias.has_value() ? std::optional<at::Tensor>(bias->to(acc).unsqueeze(1)) : std::nullopt;
  const Tiling tiling = choose_tiling(g);
  const int64_t image_groups = (g.batch + tiling.images - 1) / tiling.images;
  const bool direct = tiling.images == 1 && acc == x.scalar_type();
  const bool small = g.pixels() < kMinColumns;  // whole images per GEMM, gathered by table
  const std::vector<int64_t> sources = small ? tap_sources(g) : std::vector<int64_t>();

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_forward_cpu", [&] {
        using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
        const scalar_t* x_data = x.const_data_ptr<scalar_t>();
        at::parallel_for(0, image_groups, 1, [&](int64_t begin, int64_t end) {
          // Pool threads do not inherit the caller's dispatch state; nothing here needs autograd.
          const at::AutoDispatchBelowADInplaceOrView below_autograd;
          const int64_t max_columns = tiling.images * tiling.band_rows * g.width;
          at::Tensor cols = at::empty({g.rows * max_columns}, acc_options);
          at::Tensor staging = direct ? at::Tensor()
                                      : at::empty({g.out_channels, max_columns}, acc_options);
          for (int64_t ig = begin; ig < end; ++ig) {
            const int64_t n0 = ig * tiling.images;
            const int64_t images = std::min(tiling.images, g.batch - n0);
            for (int64_t h0 = 0; h0 < g.height; h0 += tiling.band_rows) {
              const int64_t band = std::min(tiling.band_rows, g.height - h0);
              const int64_t columns = images * band * g.width;
              at::Tensor cols_now = matrix(cols, g.rows, columns);
              if (small) {
                im2col_images(x_data, g, sources.data(), n0, images,
                              cols_now.mutable_data_ptr<acc_t>());
              } else {
                im2col(x_data, g, n0, images, h0, band, cols_now.mutable_data_ptr<acc_t>());
              }
              at::Tensor target = slab(y, g, n0, images, h0, band);
              // One image in the compute dtype is written in place (rows strided by H·W).
              at::Tensor out = direct ? target.select(0, 0) : staging.narrow(1, 0, columns);
              if (bias_acc.has_value()) out.copy_(bias_acc->expand({g.out_channels, columns}));
              for (int64_t grp = 0; grp < g.groups; ++grp) {
                const int64_t o0 = grp * g.out_group(), rows = g.group_rows(grp);
                at::Tensor out_g = out.narrow(0, o0, g.out_group());
                const at::Tensor w_g = packed.narrow(0, o0, g.out_group()).narrow(1, 0, rows);
                const at::Tensor cols_g = cols_now.narrow(0, 0, rows);
                if (bias_acc.has_value()) {
                  out_g.addmm_(w_g, cols_g);
                } else {
                  at::mm_out(out_g, w_g, cols_g);
                }
              }
              if (!direct) {
                target.copy_(out.view({g.out_channels, images, band * g.width}).transpose(0, 1));
              }
            }
          }
        });
      });
  return y;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, int64_t mask_type,
    int64_t color_channels, int64_t dilation, std::array<bool, 3> output_mask) {
  check_masked_conv2d_backward_args(grad_y, x, weight, mask_type, color_channels, dilation);
  const Geometry g(x, weight, mask_type, color_channels, dilation);
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = masked_conv2d_acc_dtype(dtype);
  const at::TensorOptions acc_options = x.options().dtype(acc);
  const bool need_x = output_mask[0], need_w = output_mask[1];

  // grad_bias: a plain reduction over (N, H, W), accumulated in acc.
  at::Tensor grad_bias = output_mask[2]
                             ? grad_y.sum(at::IntArrayRef{0, 2, 3}, /*keepdim=*/false, acc).to(dtype)
                             : at::empty({0}, x.options());
  // col2im adds into grad_x: zeroed here when it is written in place.
  const bool direct_x = acc == dtype;
  at::Tensor grad_x = !need_x    ? at::empty({0}, x.options())
                      : direct_x ? at::zeros_like(x)
                                 : at::empty_like(x);
  const Tiling tiling = choose_tiling(g);
  const int64_t image_groups = (g.batch + tiling.images - 1) / tiling.images;
  // Fixed chunks of image groups, one grad_weight partial each, summed in order below.
  const int64_t chunks = std::min<int64_t>(std::max(at::get_num_threads(), 1), image_groups);
  std::vector<at::Tensor> partials(static_cast<size_t>(chunks));
  for (at::Tensor& partial : partials) {
    partial = need_w ? at::zeros({g.out_channels, g.rows}, acc_options) : at::Tensor();
  }

  if ((need_x || need_w) && x.numel() != 0 && grad_y.numel() != 0) {
    const at::Tensor packed = need_x ? pack_weight(weight, g, acc) : at::Tensor();
    const bool direct_y = tiling.images == 1 && acc == dtype;
    const bool small = g.pixels() < kMinColumns;  // whole images per GEMM, gathered by table
    const std::vector<int64_t> sources = small ? tap_sources(g) : std::vector<int64_t>();
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "masked_conv2d_backward_cpu", [&] {
          using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
          const scalar_t* x_data = x.const_data_ptr<scalar_t>();
          at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
            // Pool threads do not inherit the caller's dispatch state; nothing here needs
            // autograd.
            const at::AutoDispatchBelowADInplaceOrView below_autograd;
            const int64_t max_columns = tiling.images * tiling.band_rows * g.width;
            at::Tensor cols = at::empty({g.rows * max_columns}, acc_options);
            at::Tensor grad_y_acc =
                direct_y ? at::Tensor() : at::empty({g.out_channels, max_columns}, acc_options);
            at::Tensor grad_x_acc =
                need_x && !direct_x
                    ? at::empty({tiling.images, g.in_channels, g.height, g.width}, acc_options)
                    : at::Tensor();
            for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
              at::Tensor& partial = partials[static_cast<size_t>(chunk)];
              for (int64_t ig = image_groups * chunk / chunks;
                   ig < image_groups * (chunk + 1) / chunks; ++ig) {
                const int64_t n0 = ig * tiling.images;
                const int64_t images = std::min(tiling.images, g.batch - n0);
                at::Tensor grad_x_images;  // (images, C_in, H, W) in acc_t, added into by col2im
                if (need_x) {
                  grad_x_images = direct_x ? grad_x.narrow(0, n0, images)
                                           : grad_x_acc.narrow(0, 0, images).zero_();
                }
                for (int64_t h0 = 0; h0 < g.height; h0 += tiling.band_rows) {
                  const int64_t band = std::min(tiling.band_rows, g.height - h0);
                  const int64_t columns = images * band * g.width;
                  const at::Tensor source = slab(grad_y, g, n0, images, h0, band);
                  at::Tensor gy;  // (C_out, columns) in acc_t
                  if (direct_y) {
                    gy = source.select(0, 0);
                  } else {
                    gy = grad_y_acc.narrow(1, 0, columns);
                    gy.view({g.out_channels, images, band * g.width})
                        .copy_(source.transpose(0, 1));
                  }
                  at::Tensor cols_now = matrix(cols, g.rows, columns);
                  if (need_w) {
                    if (small) {
                      im2col_images(x_data, g, sources.data(), n0, images,
                                    cols_now.mutable_data_ptr<acc_t>());
                    } else {
                      im2col(x_data, g, n0, images, h0, band,
                             cols_now.mutable_data_ptr<acc_t>());
                    }
                    for (int64_t grp = 0; grp < g.groups; ++grp) {
                      const int64_t o0 = grp * g.out_group(), rows = g.group_rows(grp);
                      if (rows == 0) continue;
                      partial.narrow(0, o0, g.out_group())
                          .narrow(1, 0, rows)
                          .addmm_(gy.narrow(0, o0, g.out_group()),
                                  cols_now.narrow(0, 0, rows).t());
                    }
                  }
                  if (need_x && g.rows > 0) {
                    // The column buffer is free again: reuse it for grad_cols = packed^T · gy.
                    at::mm_out(cols_now, packed.t(), gy);
                    if (small) {
                      col2im_images(cols_now.const_data_ptr<acc_t>(), g, sources.data(), images,
                                    grad_x_images.mutable_data_ptr<acc_t>());
                    } else {
                      col2im(cols_now.const_data_ptr<acc_t>(), g, images, h0, band,
                             grad_x_images.mutable_data_ptr<acc_t>());
                    }
                  }
                }
                if (need_x && !direct_x) grad_x.narrow(0, n0, images).copy_(grad_x_images);
              }
            }
          });
        });
  }

  at::Tensor grad_weight = at::empty({0}, x.options());
  if (need_w) {
    at::Tensor packed_grad = at::zeros({g.out_channels, g.rows}, acc_options);
    for (const at::Tensor& partial : partials) packed_grad.add_(partial);
    grad_weight = unpack_weight_grad(packed_grad, g, dtype);
  }
  return {grad_x, grad_weight, grad_bias};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("masked_conv2d_forward", &masked_conv2d_forward_cpu);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace pyvae
