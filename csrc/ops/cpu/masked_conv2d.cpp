// CPU kernels of the masked (PixelCNN) convolution (mask and notation of
// ops/masked_conv2d.h): pixel-major im2col restricted to the allowed taps that fall inside
// the image, then GEMMs (ops/cpu/gemm.h) over blocks of pixels of the whole batch.
//
// Columns. A column matrix has one row per output pixel holding, one after the other, the C
// channels of the source pixel of each tap of a tap list, then the centre pixel's channels that
// some channel group may read. The forward list holds the allowed taps before the centre (r < c,
// or r = c and s < c) in raster order, followed by the centre tap's input channels
// [0, C_in / G · (G - 1 + type)). The adjoint list holds the same taps with negated offsets (the
// adjoint of a shift is the opposite shift), each kernel row in reverse order so that a row's
// sources stay left to right, followed by the centre tap's output channels
// [C_out / G · (1 - type), C_out) that feed some input group. With x and grad_y in channels-last
// (N·H·W, C):
//
//   forward:     y (m, C_out)        = cols_x (m, K_x) · W_x (K_x, C_out)  (+ bias)
//   grad_x:      grad_x (m, C_in)    = cols_g (m, K_g) · W_g (K_g, C_in)
//   grad_weight: G (C_in, K_g)      += x (m, C_in)^T · cols_g (m, K_g)
//
// where cols_x gathers x and cols_g gathers grad_y: the backward gathers once for both of its
// GEMMs (dW[o, i, tap] = Σ_p x[p, i] · grad_y[p - offset, o]). The centre tap's masked channel
// pairs are zeros in the packed W_x and W_g (masked weights are never read) and their entries of
// G are replaced by exact zeros when grad_weight is unpacked. A type-A layer does about half the
// arithmetic of a dense k×k convolution.
//
// Padding. Output pixels are grouped into classes that read the same taps inside the image:
// bands of rows by the kernel rows that fall outside the image (the top rows of the forward, the
// bottom ones of the adjoint), and on small images (a patch VAE's 3×3 or 5×5 blocks, where it
// saves at least a tenth of the work) also bands of columns. A class's GEMMs skip the taps that
// read only padding; in a row-only class these are a prefix of the list, so its weights are a
// view, otherwise a copy. Elsewhere the gather writes zeros for padding. Leaving out products with
// padding zeros changes nothing numerically; taps entirely outside the image are never listed.
//
// Work items (see Plan). Small images are processed in groups of whole images, every class of a
// group in turn, on the group's data moved into thread-local channels-last / class-major buffers
// that stay in cache. On large images an item is a block of one class's pixels across the batch
// (the gathered input is moved into channels-last for the whole batch first) and moves its own
// pixels between NCHW and rows. Tiled transposes do those moves (converting to and from the
// compute dtype and adding the bias). Column matrices are sized to stay in the core's L2 cache.
// Threads each take a fixed chunk of items of about equal cost (single-threaded GEMMs inside). G
// is accumulated in one partial per chunk and the partials are summed in a fixed order
// (deterministic for a given thread count). Half-precision inputs are computed in float32,
// float64 in float64.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

#include "ops/cpu/gemm.h"
#include "ops/masked_conv2d.h"

namespace pyvae {
namespace cpu {
namespace {

// Bound on an item's column matrix (elements): it and the GEMM's operands stay in L2.
constexpr int64_t kBlockElements = int64_t{1} << 16;
// Bounds on the pixels of an item: enough rows for an efficient GEMM, few enough for the cache.
constexpr int64_t kMinBlockPixels = 64;
constexpr int64_t kMaxBlockPixels = 1024;

// Consecutive taps first .. first + count - 1 of a list whose source pixels are
// (h + dr, w + ds + j): one contiguous copy of count·C channels in channels-last.
struct Span {
  int64_t first, count, dr, ds;
};

// The taps of one pass in column order, as kernel indices r·k + s and source offsets.
struct TapList {
  std::vector<int64_t> index;
  std::vector<Span> spans;

  int64_t size() const { return static_cast<int64_t>(index.size()); }
  void add(int64_t tap, int64_t dr, int64_t ds) {
    if (!spans.empty() && spans.back().dr == dr && spans.back().ds + spans.back().count == ds) {
      ++spans.back().count;
    } else {
      spans.push_back({size(), 1, dr, ds});
    }
    index.push_back(tap);
  }
};

struct Geometry {
  int64_t batch, in_channels, out_channels, height, width;
  int64_t k, centre, dilation, groups, type;
  TapList forward;  // allowed taps before the centre, raster order
  TapList adjoint;  // the same taps, offsets negated, each kernel row reversed

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
        type(mask_type) {
    for (int64_t r = 0; r <= centre; ++r) {
      const int64_t row_end = r < centre ? k : centre;
      // Taps whose offset is at least the image size read only padding: left out.
      const auto inside = [&](int64_t s) {
        return (centre - r) * dilation < height && std::abs(s - centre) * dilation < width;
      };
      for (int64_t s = 0; s < row_end; ++s) {
        if (inside(s)) forward.add(r * k + s, (r - centre) * dilation, (s - centre) * dilation);
      }
      for (int64_t s = row_end - 1; s >= 0; --s) {
        if (inside(s)) adjoint.add(r * k + s, (centre - r) * dilation, (centre - s) * dilation);
      }
    }
  }

  int64_t pixels() const { return height * width; }
  int64_t in_group() const { return in_channels / groups; }
  int64_t out_group() const { return out_channels / groups; }
  // The centre tap's input channels [0, centre_in) that some output group reads, and its output
  // channels [centre_out_begin, C_out) that feed some input group.
  int64_t centre_in() const { return in_group() * (groups - 1 + type); }
  int64_t centre_out_begin() const { return out_group() * (1 - type); }
  int64_t centre_out() const { return out_channels - centre_out_begin(); }
  int64_t columns_x() const { return forward.size() * in_channels + centre_in(); }
  int64_t columns_g() const { return adjoint.size() * out_channels + centre_out(); }
};

// (C_out, C_in) boolean mask of the centre tap: group(i) < group(o) + type.
at::Tensor centre_mask(const Geometry& g, const at::TensorOptions& options) {
  const at::Tensor group_out =
      at::arange(g.out_channels, options.dtype(at::kLong)).div(g.out_group(), "floor");
  const at::Tensor group_in =
      at::arange(g.in_channels, options.dtype(at::kLong)).div(g.in_group(), "floor");
  return group_in.unsqueeze(0).lt(group_out.unsqueeze(1) + g.type);
}

at::Tensor tap_index(const TapList& taps, const at::TensorOptions& options) {
  return at::tensor(taps.index, options.dtype(at::kLong));
}

// W_x (K_x, C_out): row j·C_in + i for the j-th forward tap (r, s) is weight[:, i, r, s]; the
// centre rows are weight[:, i, c, c] where allowed, else 0 (masked weights are never read).
at::Tensor pack_weight_x(const at::Tensor& w, const Geometry& g, const at::Tensor& mask) {
  const int64_t Co = g.out_channels, Ci = g.in_channels, c = g.centre;
  const at::Tensor taps = w.permute({2, 3, 1, 0}).reshape({g.k * g.k, Ci, Co});
  const at::Tensor before = taps.index_select(0, tap_index(g.forward, w.options()));
  const at::Tensor centre =
      at::where(mask, w.select(3, c).select(2, c), 0).narrow(1, 0, g.centre_in()).t();
  return at::cat({before.reshape({-1, Co}), centre}, 0).contiguous();
}

// W_g (K_g, C_in): row j·C_out + o for the j-th adjoint tap (r, s) is weight[o, :, r, s]; the
// centre rows are weight[o, :, c, c] for o >= centre_out_begin where allowed, else 0.
at::Tensor pack_weight_g(const at::Tensor& w, const Geometry& g, const at::Tensor& mask) {
  const int64_t Co = g.out_channels, Ci = g.in_channels, c = g.centre;
  const at::Tensor taps = w.permute({2, 3, 0, 1}).reshape({g.k * g.k, Co, Ci});
  const at::Tensor before = taps.index_select(0, tap_index(g.adjoint, w.options()));
  const at::Tensor centre = at::where(mask, w.select(3, c).select(2, c), 0)
                                .narrow(0, g.centre_out_begin(), g.centre_out());
  return at::cat({before.reshape({-1, Ci}), centre}, 0).contiguous();
}

// The inverse of the layout of W_g for the gradient G (C_in, K_g): (C_out, C_in, k, k) in
// `dtype`, exactly 0 at every masked or left-out tap.
at::Tensor unpack_weight_grad(const at::Tensor& packed, const Geometry& g, const at::Tensor& mask,
                              at::ScalarType dtype) {
  const int64_t Co = g.out_channels, Ci = g.in_channels, c = g.centre;
  at::Tensor taps = at::zeros({Ci, g.k * g.k, Co}, packed.options());
  const int64_t before = g.adjoint.size() * Co;
  if (before > 0) {
    taps.index_copy_(1, tap_index(g.adjoint, packed.options()),
                     packed.narrow(1, 0, before).view({Ci, g.adjoint.size(), Co}));
  }
  if (g.centre_out() > 0) {
    taps.select(1, c * g.k + c)
        .narrow(1, g.centre_out_begin(), g.centre_out())
        .copy_(at::where(mask.t().narrow(1, g.centre_out_begin(), g.centre_out()),
                         packed.narrow(1, before, g.centre_out()), 0));
  }
  at::Tensor grad_weight = at::empty({Co, Ci, g.k, g.k}, packed.options().dtype(dtype));
  grad_weight.copy_(taps.view({Ci, g.k, g.k, Co}).permute({3, 0, 1, 2}));
  return grad_weight;
}

// Output pixels that read the same taps inside the image: rows [row_begin, row_end) × columns
// [col_begin, col_end) of every image. spans are the (parts of the) list's spans they read, in
// list order: their columns of the class's column matrix, then the centre tap's. When they are
// the list's taps first, first + 1, ... to its end (a suffix), the class's packed weights and
// weight gradient are a contiguous range of the full ones; else first = -1.
struct Class {
  int64_t row_begin, row_end, col_begin, col_end;
  std::vector<Span> spans;
  int64_t taps, first;
  int64_t start = 0;  // class-major layout: the pixels of the earlier classes per image

  int64_t width() const { return col_end - col_begin; }
  int64_t pixels() const { return (row_end - row_begin) * width(); }  // per image
};

// Runs of consecutive positions [begin, end) with equal key(position).
template <typename Key>
std::vector<std::pair<int64_t, int64_t>> runs_of(int64_t size, const Key& key) {
  std::vector<std::pair<int64_t, int64_t>> runs;
  for (int64_t i = 0; i < size; ++i) {
    if (!runs.empty() && key(i) == key(runs.back().first)) {
      runs.back().second = i + 1;
    } else {
      runs.push_back({i, i + 1});
    }
  }
  return runs;
}

// The classes of one pass. Rows are split by which spans fall inside the image's rows. Columns are
// split by which taps of each span fall inside its columns only where that saves at least a tenth
// of the work (small images); otherwise a class spans whole rows and its gather writes zeros for
// the taps beyond the left and right edges.
std::vector<Class> make_classes(const Geometry& g, const TapList& taps, bool& split_columns) {
  const int64_t H = g.height, W = g.width;
  const auto row_key = [&](int64_t h) {
    std::vector<bool> inside;
    for (const Span& span : taps.spans) inside.push_back(h + span.dr >= 0 && h + span.dr < H);
    return inside;
  };
  // The taps [j0, j1) of each span inside the image's columns at column w.
  const auto column_key = [&](int64_t w) {
    std::vector<std::pair<int64_t, int64_t>> inside;
    for (const Span& span : taps.spans) {
      const int64_t j0 = std::clamp<int64_t>(-(w + span.ds), 0, span.count);
      inside.push_back({j0, std::max(j0, std::clamp<int64_t>(W - (w + span.ds), 0, span.count))});
    }
    return inside;
  };
  const auto build = [&](bool split_columns) {
    std::vector<Class> classes;
    const auto columns = split_columns ? runs_of(W, column_key)
                                       : std::vector<std::pair<int64_t, int64_t>>{{0, W}};
    for (const auto& [row_begin, row_end] : runs_of(H, row_key)) {
      const std::vector<bool> rows_inside = row_key(row_begin);
      for (const auto& [col_begin, col_end] : columns) {
        Class cls{row_begin, row_end, col_begin, col_end, {}, 0, taps.size()};
        const auto cols_inside = column_key(col_begin);
        bool suffix = true;
        int64_t next = 0;  // the list position after the class's taps so far
        for (size_t s = 0; s < taps.spans.size(); ++s) {
          Span span = taps.spans[s];
          if (!rows_inside[s]) continue;
          if (split_columns) {
            const auto [j0, j1] = cols_inside[s];
            if (j1 == j0) continue;
            span = {span.first + j0, j1 - j0, span.dr, span.ds + j0};
          }
          if (cls.spans.empty()) {
            cls.first = span.first;
          } else {
            suffix = suffix && span.first == next;
          }
          next = span.first + span.count;
          cls.taps += span.count;
          cls.spans.push_back(span);
        }
        if (!cls.spans.empty() && (!suffix || next != taps.size())) cls.first = -1;
        classes.push_back(std::move(cls));
      }
    }
    return classes;
  };
  const auto work = [&](const std::vector<Class>& classes) {
    int64_t total = 0;
    for (const Class& cls : classes) total += cls.pixels() * (cls.taps + 1);
    return total;
  };
  std::vector<Class> rows_only = build(false);
  split_columns = false;
  if (W == 1) return rows_only;
  std::vector<Class> split = build(true);
  split_columns = 10 * work(split) <= 9 * work(rows_only);
  return split_columns ? split : rows_only;
}

// Where pixel q of image n (of a run of `images` images) lives in a (images·H·W, C) matrix: row
// images·start[q] + n·count[q] + index[q]. Channels-last: start 0, count H·W, index q.
// Class-major: rows ordered by class, then image, then pixel (start: the pixels of the earlier
// classes per image, count: the class's pixels per image, index: q's place in its class).
struct Layout {
  std::vector<int64_t> start, count, index;

  int64_t row(int64_t images, int64_t n, int64_t q) const {
    const size_t p = static_cast<size_t>(q);
    return images * start[p] + n * count[p] + index[p];
  }
};

Layout channels_last_layout(int64_t pixels) {
  Layout layout{std::vector<int64_t>(static_cast<size_t>(pixels), 0),
                std::vector<int64_t>(static_cast<size_t>(pixels), pixels),
                std::vector<int64_t>(static_cast<size_t>(pixels))};
  for (int64_t q = 0; q < pixels; ++q) layout.index[static_cast<size_t>(q)] = q;
  return layout;
}

// Also sets each class's start.
Layout class_major_layout(const Geometry& g, std::vector<Class>& classes) {
  Layout layout;
  for (auto* v : {&layout.start, &layout.count, &layout.index}) {
    v->resize(static_cast<size_t>(g.pixels()));
  }
  int64_t start = 0;
  for (Class& cls : classes) {
    cls.start = start;
    for (int64_t j = 0; j < cls.pixels(); ++j) {
      const size_t q = static_cast<size_t>((cls.row_begin + j / cls.width()) * g.width +
                                           cls.col_begin + j % cls.width());
      layout.start[q] = start;
      layout.count[q] = cls.pixels();
      layout.index[q] = j;
    }
    start += cls.pixels();
  }
  return layout;
}

// A pass runs in one of two ways.
//
// Grouped (small images, whose classes split columns): an item is a group of whole images. A
// thread moves the group's inputs into channels-last (and, for the weight gradient, x into
// class-major order) in buffers of its own, runs every class's gather and GEMMs on them, its
// results landing in a class-major buffer, and moves those back into NCHW: everything stays in
// cache and every GEMM reads and writes contiguous rows.
//
// Blocked (large images, whole-row classes): the input to gather is moved into channels-last
// for the whole batch first; an item is a block of up to `block` consecutive pixels v = n·L + j
// (n the image, j the pixel among the class's L pixels of that image) of one class, across
// images; its pixels are long runs in each image, which the item moves between NCHW and its own
// rows in cache.
struct Item {
  int64_t cls, begin, count;  // grouped: cls -1, images [begin, begin + count)
};

// The items [chunks[c], chunks[c + 1]) of chunk c cost about the same (one chunk per thread).
struct Plan {
  bool grouped;
  std::vector<Class> classes;
  Layout layout;  // class-major, grouped only
  std::vector<Item> items;
  std::vector<size_t> chunks;
};

// Pixels per GEMM: an item's column matrix stays in L2, and the GEMM has enough rows.
int64_t block_pixels(const Geometry& g) {
  const int64_t row = std::max<int64_t>({g.columns_x(), g.columns_g(), 1});
  return std::clamp<int64_t>(kBlockElements / row, kMinBlockPixels, kMaxBlockPixels);
}

// channels, centre_count: the columns of a tap and of the centre tap in this pass's columns.
Plan make_plan(const Geometry& g, const TapList& taps, int64_t channels, int64_t centre_count,
               int64_t chunks) {
  Plan plan;
  plan.classes = make_classes(g, taps, plan.grouped);
  const int64_t block = block_pixels(g);
  std::vector<int64_t> costs;
  if (plan.grouped) {
    plan.layout = class_major_layout(g, plan.classes);
    // Enough images that the largest class's GEMM has about `block` rows.
    int64_t largest = 1;
    for (const Class& cls : plan.classes) largest = std::max(largest, cls.pixels());
    const int64_t images = std::max<int64_t>(1, block / largest);
    for (int64_t begin = 0; begin < g.batch; begin += images) {
      plan.items.push_back({-1, begin, std::min(images, g.batch - begin)});
      costs.push_back(plan.items.back().count);
    }
  } else {
    for (size_t c = 0; c < plan.classes.size(); ++c) {
      const int64_t pixels = g.batch * plan.classes[c].pixels();
      for (int64_t begin = 0; begin < pixels; begin += block) {
        plan.items.push_back({static_cast<int64_t>(c), begin, std::min(block, pixels - begin)});
      }
    }
    // Items that read the same images run close together (their inputs stay in cache).
    const auto first_image = [&](const Item& item) {
      return item.begin / plan.classes[static_cast<size_t>(item.cls)].pixels();
    };
    std::stable_sort(plan.items.begin(), plan.items.end(), [&](const Item& a, const Item& b) {
      return first_image(a) < first_image(b);
    });
    for (const Item& item : plan.items) {
      const int64_t taps_read = plan.classes[static_cast<size_t>(item.cls)].taps;
      costs.push_back(item.count * (taps_read * channels + centre_count + g.in_channels +
                                    g.out_channels));
    }
  }
  int64_t total = 0;
  for (const int64_t cost : costs) total += cost;
  plan.chunks.assign(static_cast<size_t>(chunks) + 1, plan.items.size());
  plan.chunks[0] = 0;
  int64_t done = 0;
  size_t c = 1;
  for (size_t i = 0; i < plan.items.size(); ++i) {
    done += costs[i];
    while (c < static_cast<size_t>(chunks) && done * chunks >= total * static_cast<int64_t>(c)) {
      plan.chunks[c++] = i + 1;
    }
  }
  return plan;
}

// The rows of a class's packed weights (K_c, ·) out of the full packed (K, ·): a view when its
// taps are a suffix of the list, else a copy.
at::Tensor class_weight(const at::Tensor& packed, const Class& cls, int64_t channels,
                        int64_t taps, int64_t centre_count) {
  if (cls.first >= 0) {
    return packed.narrow(0, cls.first * channels, packed.size(0) - cls.first * channels);
  }
  std::vector<at::Tensor> parts;
  for (const Span& span : cls.spans) {
    parts.push_back(packed.narrow(0, span.first * channels, span.count * channels));
  }
  parts.push_back(packed.narrow(0, taps * channels, centre_count));
  return at::cat(parts, 0);
}

// Adds the weight gradient of a class that is not a suffix, G_c (C_in, K_c), into its columns
// of G (C_in, K).
void add_class_gradient(at::Tensor& G, const at::Tensor& G_c, const Class& cls, int64_t channels,
                        int64_t taps, int64_t centre_count) {
  int64_t column = 0;
  for (const Span& span : cls.spans) {
    const int64_t width = span.count * channels;
    G.narrow(1, span.first * channels, width).add_(G_c.narrow(1, column, width));
    column += width;
  }
  G.narrow(1, taps * channels, centre_count).add_(G_c.narrow(1, column, centre_count));
}

// cols (m, taps·C + centre_count): for the pixels v0 .. v0 + m - 1 of a class, the C channels of
// src (images·H·W, C, channels-last) at the source pixel of each of the class's taps (0 outside
// the image), then channels [centre_begin, centre_begin + centre_count) of the pixel itself.
template <typename T>
void gather(const T* src, int64_t C, const Geometry& g, const Class& cls, int64_t centre_begin,
            int64_t centre_count, int64_t v0, int64_t m, T* cols) {
  const int64_t H = g.height, W = g.width, P = g.pixels(), L = cls.pixels(), cw = cls.width();
  const int64_t K = cls.taps * C + centre_count;
  int64_t n = v0 / L, j = v0 % L;
  for (int64_t i = 0; i < m; ++i, ++j) {
    if (j == L) {
      j = 0;
      ++n;
    }
    const int64_t h = cls.row_begin + j / cw, w = cls.col_begin + j % cw;
    const T* image = src + n * P * C;
    T* out = cols + i * K;
    for (const Span& span : cls.spans) {
      const int64_t hs = h + span.dr, ws = w + span.ds, count = span.count;
      // Taps [j0, j1) of the span read inside the image.
      const int64_t j0 = hs < 0 || hs >= H ? count : std::clamp<int64_t>(-ws, 0, count);
      const int64_t j1 = std::max(j0, std::clamp<int64_t>(W - ws, 0, count));
      if (j0 > 0) std::memset(out, 0, j0 * C * sizeof(T));
      if (j1 > j0) {
        std::memcpy(out + j0 * C, image + (hs * W + ws + j0) * C, (j1 - j0) * C * sizeof(T));
      }
      if (j1 < count) std::memset(out + j1 * C, 0, (count - j1) * C * sizeof(T));
      out += count * C;
    }
    if (centre_count > 0) {
      std::memcpy(out, image + (h * W + w) * C + centre_begin, centre_count * sizeof(T));
    }
  }
}

// Between `length` consecutive pixels q, q + 1, ... of an NCHW image (C planes of P pixels) and
// C-channel rows, row_of(j) the row of pixel q + j: to_rows: rows = planes (as acc_t); else
// planes = rows + bias (as the planes' type). In tiles of kTile pixels × kTile channels, walking
// kTile planes at a time.
template <bool to_rows, typename plane_t, typename acc_t, typename RowOf>
void transpose_pixels(plane_t* image, int64_t P, int64_t C, int64_t q, int64_t length,
                      const RowOf& row_of, const acc_t* bias) {
  constexpr int64_t kTile = 16;
  for (int64_t c0 = 0; c0 < C; c0 += kTile) {
    const int64_t nc = std::min(kTile, C - c0);
    for (int64_t q0 = q; q0 < q + length; q0 += kTile) {
      const int64_t nq = std::min(kTile, q + length - q0);
      decltype(row_of(0)) row[kTile];
      for (int64_t j = 0; j < nq; ++j) row[j] = row_of(q0 - q + j) + c0;
      if (nq == kTile && nc == kTile) {  // fixed-size loops the compiler unrolls
        acc_t tile[kTile][kTile];  // [pixel][channel]
        if constexpr (to_rows) {
          for (int64_t i = 0; i < kTile; ++i) {
            for (int64_t j = 0; j < kTile; ++j) {
              tile[j][i] = static_cast<acc_t>(image[(c0 + i) * P + q0 + j]);
            }
          }
          for (int64_t j = 0; j < kTile; ++j) {
            for (int64_t i = 0; i < kTile; ++i) row[j][i] = tile[j][i];
          }
        } else {
          for (int64_t j = 0; j < kTile; ++j) {
            for (int64_t i = 0; i < kTile; ++i) tile[j][i] = row[j][i];
          }
          for (int64_t i = 0; i < kTile; ++i) {
            const acc_t b = bias != nullptr ? bias[c0 + i] : acc_t(0);
            for (int64_t j = 0; j < kTile; ++j) {
              image[(c0 + i) * P + q0 + j] = static_cast<plane_t>(tile[j][i] + b);
            }
          }
        }
      } else {
        for (int64_t i = 0; i < nc; ++i) {
          if constexpr (to_rows) {
            for (int64_t j = 0; j < nq; ++j) {
              row[j][i] = static_cast<acc_t>(image[(c0 + i) * P + q0 + j]);
            }
          } else {
            const acc_t b = bias != nullptr ? bias[c0 + i] : acc_t(0);
            for (int64_t j = 0; j < nq; ++j) {
              image[(c0 + i) * P + q0 + j] = static_cast<plane_t>(row[j][i] + b);
            }
          }
        }
      }
    }
  }
}

// Between `images` whole NCHW images (planes: the first one's) and rows laid out by `layout`.
template <bool to_rows, typename plane_t, typename row_t>
void transpose_images(plane_t* planes, row_t* rows, int64_t images, int64_t C, int64_t P,
                      const Layout& layout, const std::remove_const_t<row_t>* bias) {
  for (int64_t n = 0; n < images; ++n) {
    transpose_pixels<to_rows>(
        planes + n * C * P, P, C, 0, P,
        [&](int64_t q) { return rows + layout.row(images, n, q) * C; }, bias);
  }
}

// Between an item's pixels of NCHW `planes` (N, C, H·W) and rows (m, C).
template <bool to_rows, typename plane_t, typename row_t>
void transpose_item(plane_t* planes, row_t* rows, int64_t C, const Geometry& g, const Class& cls,
                    int64_t v0, int64_t m, const std::remove_const_t<row_t>* bias) {
  const int64_t P = g.pixels(), L = cls.pixels(), cw = cls.width();
  for (int64_t offset = 0; offset < m;) {
    const int64_t v = v0 + offset, n = v / L, j = v % L;
    // Runs of consecutive pixels; whole-width classes run on across rows.
    const int64_t length = std::min(m - offset, cw == g.width ? L - j : cw - j % cw);
    const int64_t q = (cls.row_begin + j / cw) * g.width + cls.col_begin + j % cw;
    transpose_pixels<to_rows>(planes + n * C * P, P, C, q, length,
                              [&](int64_t i) { return rows + (offset + i) * C; }, bias);
    offset += length;
  }
}

// (N, C, H, W) -> channels-last (N·H·W, C) in the compute dtype, in parallel over images.
at::Tensor channels_last(const at::Tensor& t, at::ScalarType acc) {
  const int64_t N = t.size(0), C = t.size(1), P = t.size(2) * t.size(3);
  at::Tensor out = at::empty({N * P, C}, t.options().dtype(acc));
  if (out.numel() == 0) return out;
  const Layout layout = channels_last_layout(P);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "channels_last", [&] {
    using acc_t = accumulation_t<scalar_t>;
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    acc_t* dst = out.mutable_data_ptr<acc_t>();
    const int64_t grain = std::max<int64_t>(1, (int64_t{1} << 14) / std::max<int64_t>(C * P, 1));
    at::parallel_for(0, N, grain, [&](int64_t begin, int64_t end) {
      transpose_images<true>(src + begin * C * P, dst + begin * P * C, end - begin, C, P, layout,
                             static_cast<const acc_t*>(nullptr));
    });
  });
  return out;
}

// The first rows·columns elements of a flat buffer as a (rows, columns) matrix.
at::Tensor matrix(const at::Tensor& flat, int64_t rows, int64_t columns) {
  return flat.narrow(0, 0, rows * columns).view({rows, columns});
}

at::Tensor masked_conv2d_forward_cpu(const at::Tensor& x, const at::Tensor& weight,
                                     const std::optional<at::Tensor>& bias, int64_t mask_type,
                                     int64_t color_channels, int64_t dilation) {
  check_masked_conv2d_args(x, weight, bias, mask_type, color_channels, dilation);
  const Geometry g(x, weight, mask_type, color_channels, dilation);
  at::Tensor y = at::empty({g.batch, g.out_channels, g.height, g.width}, x.options());
  if (y.numel() == 0) return y;
  const at::ScalarType acc = accumulation_dtype(x.scalar_type());
  const at::TensorOptions acc_options = x.options().dtype(acc);
  const int64_t K = g.columns_x(), Ci = g.in_channels, Co = g.out_channels, P = g.pixels();
  if (K == 0) {  // every tap masked or outside the image: y = bias
    if (bias.has_value()) {
      y.copy_(bias->view({1, Co, 1, 1}).expand_as(y));
    } else {
      y.zero_();
    }
    return y;
  }
  const at::Tensor packed = pack_weight_x(weight.to(acc), g, centre_mask(g, acc_options));
  const int64_t chunks = std::max(at::get_num_threads(), 1);
  const Plan plan = make_plan(g, g.forward, Ci, g.centre_in(), chunks);
  std::vector<at::Tensor> weights;
  for (const Class& cls : plan.classes) {
    weights.push_back(class_weight(packed, cls, Ci, g.forward.size(), g.centre_in()));
  }
  const at::Tensor x_cl = plan.grouped ? at::Tensor() : channels_last(x, acc);
  const at::Tensor bias_acc = bias.has_value() ? bias->to(acc) : at::Tensor();
  const int64_t block = block_pixels(g);
  const int64_t group = plan.grouped ? plan.items.front().count : 0;  // images per group
  const Layout plain = channels_last_layout(P);

  AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kHalf, at::kBFloat16, x.scalar_type(), "masked_conv2d_forward_cpu", [&] {
        using acc_t = accumulation_t<scalar_t>;
        const scalar_t* x_data = x.const_data_ptr<scalar_t>();
        const acc_t* bias_data = bias_acc.defined() ? bias_acc.const_data_ptr<acc_t>() : nullptr;
        scalar_t* y_data = y.mutable_data_ptr<scalar_t>();
        at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
          // Pool threads do not inherit the caller's dispatch state; nothing here needs autograd.
          const at::AutoDispatchBelowADInplaceOrView below_autograd;
          // Grouped: the group's x (channels-last) and y (class-major); blocked: a block's y.
          const int64_t rows = plan.grouped ? group * P : block;
          const at::Tensor cols = at::empty({rows * K}, acc_options);
          const at::Tensor x_rows =
              plan.grouped ? at::empty({rows, Ci}, acc_options) : at::Tensor();
          const at::Tensor y_rows = at::empty({rows, Co}, acc_options);
          // y rows [row, row + m) = the class's GEMM over the pixels v0 .. v0 + m - 1 of src.
          const auto compute = [&](const acc_t* src, const Class& cls, size_t c, int64_t v0,
                                   int64_t m, int64_t row) {
            at::Tensor out = y_rows.narrow(0, row, m);
            const int64_t Kc = cls.taps * Ci + g.centre_in();
            if (Kc == 0) {
              out.zero_();
              return;
            }
            at::Tensor cols_now = matrix(cols, m, Kc);
            gather(src, Ci, g, cls, 0, g.centre_in(), v0, m, cols_now.mutable_data_ptr<acc_t>());
            matmul(out, cols_now, weights[c], /*accumulate=*/false);
          };
          for (size_t i = plan.chunks[static_cast<size_t>(chunk_begin)];
               i < plan.chunks[static_cast<size_t>(chunk_end)]; ++i) {
            const Item& item = plan.items[i];
            if (plan.grouped) {
              const int64_t n0 = item.begin, images = item.count;
              acc_t* xr = x_rows.mutable_data_ptr<acc_t>();
              transpose_images<true>(x_data + n0 * Ci * P, xr, images, Ci, P, plain,
                                     static_cast<const acc_t*>(nullptr));
              for (size_t c = 0; c < plan.classes.size(); ++c) {
                const Class& cls = plan.classes[c];
                const int64_t m = images * cls.pixels();
                if (m > 0) compute(xr, cls, c, 0, m, images * cls.start);
              }
              transpose_images<false>(y_data + n0 * Co * P, y_rows.const_data_ptr<acc_t>(),
                                      images, Co, P, plan.layout, bias_data);
            } else {
              const size_t c = static_cast<size_t>(item.cls);
              compute(x_cl.const_data_ptr<acc_t>(), plan.classes[c], c, item.begin, item.count, 0);
              transpose_item<false>(y_data, y_rows.const_data_ptr<acc_t>(), Co, g,
                                    plan.classes[c], item.begin, item.count, bias_data);
            }
          }
        });
      });
  return y;
}

// ---- backward ---------------------------------------------------------------------------------
//
// grad_x = cols(grad_y) · W over the adjoint taps and G = x^T · cols(grad_y), per class of pixels,
// over the same work items as the forward. The work is cut into chunks, one G partial (and,
// grouped, one grad_bias partial) per chunk, summed in chunk order, so the result does not
// depend on the thread count.

// What every chunk of one backward call reads.
struct BackwardJob {
  const Geometry& g;
  const Plan& plan;
  const std::vector<at::Tensor>& weights;  // per class, when grad_x is needed
  at::TensorOptions acc_options;
  int64_t K, Ci, Co, P;
  bool need_x, need_w, need_bias;
  at::Tensor grad_y_cl;  // blocked plans: grad_y in channels-last for the whole batch
  Layout plain;          // grouped plans: the channels-last layout of grad_y's rows
};

// One thread's buffers, reused over its chunks. Grouped: a group's grad_y (channels-last), x and
// grad_x (class-major); blocked: a block's x and grad_x.
struct BackwardScratch {
  at::Tensor cols, gy_rows, x_rows, gx_rows;
  at::Tensor partial;                      // this chunk's G, (Ci, K)
  std::vector<at::Tensor> class_partials;  // classes whose columns are not a range of G's

  explicit BackwardScratch(const BackwardJob& job) {
    const int64_t rows =
        job.plan.grouped ? job.plan.items.front().count * job.P : block_pixels(job.g);
    const at::TensorOptions& o = job.acc_options;
    cols = at::empty({rows * job.K}, o);
    if (job.plan.grouped) gy_rows = at::empty({rows, job.Co}, o);
    if (job.need_w) x_rows = at::empty({rows, job.Ci}, o);
    if (job.need_x) gx_rows = at::empty({rows, job.Ci}, o);
  }
};

// Class c's GEMMs over the pixels v0 .. v0 + m - 1 of src (grad_y rows), with x and grad_x at
// rows [row, row + m) of the scratch.
template <typename acc_t>
void class_backward(const BackwardJob& job, BackwardScratch& s, const acc_t* src, size_t c,
                    int64_t v0, int64_t m, int64_t row) {
  const Class& cls = job.plan.classes[c];
  const Geometry& g = job.g;
  const int64_t Kc = cls.taps * job.Co + g.centre_out();
  if (Kc == 0) {
    if (job.need_x) s.gx_rows.narrow(0, row, m).zero_();
    return;
  }
  at::Tensor cols_now = matrix(s.cols, m, Kc);
  gather(src, job.Co, g, cls, g.centre_out_begin(), g.centre_out(), v0, m,
         cols_now.mutable_data_ptr<acc_t>());
  if (job.need_x) {
    at::Tensor out = s.gx_rows.narrow(0, row, m);
    matmul(out, cols_now, job.weights[c], /*accumulate=*/false);
  }
  if (job.need_w) {
    if (cls.first < 0 && !s.class_partials[c].defined()) {
      s.class_partials[c] = at::zeros({job.Ci, Kc}, job.acc_options);
    }
    at::Tensor target =
        cls.first >= 0 ? s.partial.narrow(1, cls.first * job.Co, Kc) : s.class_partials[c];
    matmul(target, s.x_rows.narrow(0, row, m).t(), cols_now, /*accumulate=*/true);
  }
}

// A grouped item: whole images n0 .. n0 + count - 1, every class; adds their grad_y sums to
// bias_partial when the bias gradient is needed.
template <typename scalar_t>
void grouped_item_backward(const BackwardJob& job, BackwardScratch& s, const Item& item,
                           const scalar_t* x_data, const scalar_t* gy_data, scalar_t* gx_data,
                           at::Tensor& bias_partial) {
  using acc_t = accumulation_t<scalar_t>;
  const acc_t* none = nullptr;
  const int64_t n0 = item.begin, images = item.count, Ci = job.Ci, Co = job.Co, P = job.P;
  acc_t* gyr = s.gy_rows.mutable_data_ptr<acc_t>();
  transpose_images<true>(gy_data + n0 * Co * P, gyr, images, Co, P, job.plain, none);
  if (job.need_bias) {
    const at::Tensor sum = s.gy_rows.narrow(0, 0, images * P).sum(0);
    bias_partial = bias_partial.defined() ? bias_partial.add_(sum) : sum;
  }
  if (job.need_w) {
    transpose_images<true>(x_data + n0 * Ci * P, s.x_rows.mutable_data_ptr<acc_t>(), images, Ci,
                           P, job.plan.layout, none);
  }
  for (size_t c = 0; c < job.plan.classes.size(); ++c) {
    const Class& cls = job.plan.classes[c];
    const int64_t m = images * cls.pixels();
    if (m > 0) class_backward(job, s, gyr, c, 0, m, images * cls.start);
  }
  if (job.need_x) {
    transpose_images<false>(gx_data + n0 * Ci * P, s.gx_rows.const_data_ptr<acc_t>(), images, Ci,
                            P, job.plan.layout, none);
  }
}

// A blocked item: a block of pixels of one class, over the whole batch.
template <typename scalar_t>
void blocked_item_backward(const BackwardJob& job, BackwardScratch& s, const Item& item,
                           const scalar_t* x_data, scalar_t* gx_data) {
  using acc_t = accumulation_t<scalar_t>;
  const acc_t* none = nullptr;
  const size_t c = static_cast<size_t>(item.cls);
  const Class& cls = job.plan.classes[c];
  if (job.need_w) {
    transpose_item<true>(x_data, s.x_rows.mutable_data_ptr<acc_t>(), job.Ci, job.g, cls,
                         item.begin, item.count, none);
  }
  class_backward(job, s, job.grad_y_cl.const_data_ptr<acc_t>(), c, item.begin, item.count, 0);
  if (job.need_x) {
    transpose_item<false>(gx_data, s.gx_rows.const_data_ptr<acc_t>(), job.Ci, job.g, cls,
                          item.begin, item.count, none);
  }
}

// The items of one chunk; returns its G partial (undefined when G is not needed).
template <typename scalar_t>
at::Tensor chunk_backward(const BackwardJob& job, BackwardScratch& s, int64_t chunk,
                          const scalar_t* x_data, const scalar_t* gy_data, scalar_t* gx_data,
                          at::Tensor& bias_partial) {
  s.partial = job.need_w ? at::zeros({job.Ci, job.K}, job.acc_options) : at::Tensor();
  s.class_partials.assign(job.plan.classes.size(), at::Tensor());
  const size_t first = job.plan.chunks[static_cast<size_t>(chunk)];
  const size_t last = job.plan.chunks[static_cast<size_t>(chunk) + 1];
  for (size_t i = first; i < last; ++i) {
    if (job.plan.grouped) {
      grouped_item_backward(job, s, job.plan.items[i], x_data, gy_data, gx_data, bias_partial);
    } else {
      blocked_item_backward(job, s, job.plan.items[i], x_data, gx_data);
    }
  }
  for (size_t c = 0; c < s.class_partials.size(); ++c) {
    if (s.class_partials[c].defined()) {
      add_class_gradient(s.partial, s.class_partials[c], job.plan.classes[c], job.Co,
                         job.g.adjoint.size(), job.g.centre_out());
    }
  }
  return s.partial;
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> masked_conv2d_backward_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, int64_t mask_type,
    int64_t color_channels, int64_t dilation, std::array<bool, 3> output_mask) {
  check_masked_conv2d_backward_args(grad_y, x, weight, mask_type, color_channels, dilation);
  const Geometry g(x, weight, mask_type, color_channels, dilation);
  const at::ScalarType dtype = x.scalar_type();
  const at::ScalarType acc = accumulation_dtype(dtype);
  const at::TensorOptions acc_options = x.options().dtype(acc);
  const int64_t K = g.columns_g(), Ci = g.in_channels, Co = g.out_channels;
  const bool work = x.numel() != 0 && K > 0;
  const bool need_x = output_mask[0] && work, need_w = output_mask[1] && work;
  at::Tensor grad_x = !output_mask[0] ? at::empty({0}, x.options())
                      : work          ? at::empty_like(x)
                                      : at::zeros_like(x);
  const at::Tensor mask = centre_mask(g, acc_options);
  at::Tensor packed_grad = at::zeros({Ci, K}, acc_options);
  at::Tensor grad_bias;

  if (need_x || need_w) {
    const int64_t chunks = std::max(at::get_num_threads(), 1);
    const Plan plan = make_plan(g, g.adjoint, Co, g.centre_out(), chunks);
    std::vector<at::Tensor> weights;
    if (need_x) {
      const at::Tensor packed = pack_weight_g(weight.to(acc), g, mask);
      for (const Class& cls : plan.classes) {
        weights.push_back(class_weight(packed, cls, Co, g.adjoint.size(), g.centre_out()));
      }
    }
    const BackwardJob job{g, plan, weights, acc_options, K, Ci, Co, g.pixels(), need_x, need_w,
                          output_mask[2],
                          plan.grouped ? at::Tensor() : channels_last(grad_y, acc),
                          channels_last_layout(g.pixels())};
    if (output_mask[2] && !plan.grouped) grad_bias = job.grad_y_cl.sum(0);
    std::vector<at::Tensor> partials(static_cast<size_t>(chunks));
    std::vector<at::Tensor> bias_partials(static_cast<size_t>(chunks));
    AT_DISPATCH_FLOATING_TYPES_AND2(
        at::kHalf, at::kBFloat16, dtype, "masked_conv2d_backward_cpu", [&] {
          const scalar_t* x_data = x.const_data_ptr<scalar_t>();
          const scalar_t* gy_data = grad_y.const_data_ptr<scalar_t>();
          scalar_t* gx_data = need_x ? grad_x.mutable_data_ptr<scalar_t>() : nullptr;
          at::parallel_for(0, chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
            // Pool threads do not inherit the caller's dispatch state; nothing here needs
            // autograd.
            const at::AutoDispatchBelowADInplaceOrView below_autograd;
            BackwardScratch scratch(job);
            for (int64_t chunk = chunk_begin; chunk < chunk_end; ++chunk) {
              const size_t k = static_cast<size_t>(chunk);
              at::Tensor partial = chunk_backward(job, scratch, chunk, x_data, gy_data, gx_data,
                                                  bias_partials[k]);
              if (need_w) partials[k] = partial;
            }
          });
        });
    for (const at::Tensor& partial : partials) {
      if (partial.defined()) packed_grad.add_(partial);
    }
    if (output_mask[2] && plan.grouped) {
      grad_bias = at::zeros({Co}, acc_options);
      for (const at::Tensor& b : bias_partials) {
        if (b.defined()) grad_bias.add_(b);
      }
    }
  }
  if (output_mask[2] && !grad_bias.defined()) {
    grad_bias = grad_y.sum(at::IntArrayRef{0, 2, 3}, /*keepdim=*/false, acc);
  }

  return {grad_x,
          output_mask[1] ? unpack_weight_grad(packed_grad, g, mask, dtype)
                         : at::empty({0}, x.options()),
          output_mask[2] ? grad_bias.to(dtype) : at::empty({0}, x.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(pyvae, CPU, m) {
  m.impl("masked_conv2d_forward", &masked_conv2d_forward_cpu);
  m.impl("masked_conv2d_backward", &masked_conv2d_backward_cpu);
}

}  // namespace cpu
}  // namespace pyvae
