// CUDA kernels of the masked (PixelCNN) 2-D convolution and its backward; the op and the mask
// are defined in ops/masked_conv2d.h.
//
// Every kernel is a direct implicit GEMM whose reduction runs only over the allowed (tap,
// channel) pairs, so masked weights are never read and type A does about half the arithmetic
// of conv2d(x, weight * mask). In raster order the allowed taps are a prefix: the taps
// t < T = c * k + c (the rows above the centre and the left half of the centre row) take every
// channel, and the centre tap t = T takes only the channel range that the group rule allows for
// the block's tile (an empty range for type A with G = 1). With P = N * H * W pixels:
//
//   forward  y  (P x C_out)           = patches(x)  (P x (t, i))  @ W   ((t, i) x C_out)
//   grad_x   gx (P x C_in)            = patches(gy) (P x (t, o))  @ W^T ((t, o) x C_in),
//                                       the patches of grad_y taken at the flipped offsets
//   grad_w   gW (C_out x (t, i))      = gy^T (C_out x P) @ patches(x) (P x (t, i)), pixels split
//                                       over blocks that add their partials atomically
//   grad_b   gb (C_out)               = sum of gy over the pixels, atomically per block
//
// Each block computes a 64 x 64 output tile. The reduction is walked in chunks that all share
// one tap: kBK channels of a tap for the convolutions, kBK pixels of one tap's column block for
// grad_w. The tap's spatial offset is then uniform over the block and the padding test is one
// comparison per thread and chunk, so the per-element work of the gathers is a multiply-add of
// a channel stride. The price is the unused tail of a tap's last chunk when the channel count
// is not a multiple of kBK (the 1- or 3-channel first layer of a PixelCNN, whose cost is small
// anyway). A chunk is staged through shared memory while the next one is already being loaded
// into registers.
//
// Inner products: float32 and float64 run a 4 x 4 register tile of FMAs per thread (256
// threads) in acc_t. float16 and bfloat16 run on the tensor cores when the kernel was compiled
// for sm_80 or newer: 4 warps of 32 x 32, built from wmma 16 x 16 x 16 fragments with float32
// accumulators; code built for older targets takes the FMA kernels with float32 accumulation.
// The weights are gathered straight from global memory (no workspace to repack them into); a
// tile's weights are re-read by every pixel tile and stay in L1/L2.
//
// Results do not depend on the launch for forward and grad_x (fixed summation order); grad_w and
// grad_b add block partials with atomics, so their last bits can vary from run to run.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <mma.h>

#include <algorithm>
#include <climits>
#include <cstdint>
#include <type_traits>

#include "ops/cuda/device_math.cuh"
#include "ops/cuda/masked_conv2d.h"

namespace pyvae {
namespace cuda {
namespace {

constexpr int kTile = 64;  // output rows and columns of a block tile
constexpr int kWarpSize = 32;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
constexpr bool kIsHalf =
    std::is_same<T, __half>::value || std::is_same<T, __nv_bfloat16>::value;

// Launch shape of the two inner-product flavours.
template <typename T, bool kWmma>
struct Cfg;

template <typename T>
struct Cfg<T, false> {
  static constexpr int kThreads = 256;
  static constexpr int kBK = 16;
  // Two resident blocks cap the registers at 128 per thread, which every FMA kernel fits.
  static constexpr int kMinBlocks = 2;
};

template <typename T>
struct Cfg<T, true> {
  static constexpr int kThreads = 128;
  static constexpr int kBK = 32;
  // Three resident blocks leave 168 registers per thread: the fragments, the float32
  // accumulators and the prefetched chunk spill at the 128 that four blocks would leave.
  static constexpr int kMinBlocks = 3;
};

// Row length of the float32 tile the wmma accumulators are parked in for the epilogue; it
// aliases the staged tiles.
constexpr int kLdC = kTile + 4;

// Shared-memory layout of one staged tile: 64 rows (m of A, n of B) by kBK reduction steps,
// stored k-major (tile[k][mn]: column-major A / row-major B in wmma terms) or mn-major
// (tile[mn][k]: row-major A / column-major B). Each loader picks, per tile, the one whose
// contiguous direction is its lanes' direction, so the stores of a warp hit consecutive
// elements. The FMA rows get one element of padding, which keeps the column reads of the
// mn-major tiles apart; wmma wants row lengths that are multiples of 16 bytes.
template <typename T, bool kWmma, bool kKMajor>
struct TileLayout {
  static constexpr int kBK = Cfg<T, kWmma>::kBK;
  static constexpr int kLd = (kKMajor ? kTile : kBK) + (kWmma ? 8 : 1);
  static constexpr int kElems = (kKMajor ? kBK : kTile) * kLd;

  // Offset of element (m or n, k).
  static __device__ __forceinline__ int at(int mn, int k) {
    return kKMajor ? k * kLd + mn : mn * kLd + k;
  }
};

template <typename T, bool kWmma, bool kAKMajor, bool kBKMajor>
struct Layout {
  using A = TileLayout<T, kWmma, kAKMajor>;
  using B = TileLayout<T, kWmma, kBKMajor>;
  static constexpr int kStagingBytes = (A::kElems + B::kElems) * static_cast<int>(sizeof(T));
  static constexpr int kSmemBytes =
      kWmma ? std::max(kStagingBytes, kTile * kLdC * static_cast<int>(sizeof(float)))
            : kStagingBytes;
};

// Elements of the A (and of the B) tile that each thread loads per chunk.
template <typename T, bool kWmma>
constexpr int kRows = Cfg<T, kWmma>::kBK * kTile / Cfg<T, kWmma>::kThreads;

template <typename T>
__device__ __forceinline__ T zero() {
  return from_acc<T>(acc_t<T>(0));
}

// The channel-group rule of the centre tap.
struct MaskRule {
  int in_per_group;   // C_in / G
  int out_per_group;  // C_out / G
  int type_b;         // 1 for type B: a group also sees its own group

  __device__ __forceinline__ bool allowed(int o, int i) const {
    return i / in_per_group < o / out_per_group + type_b;
  }
  // End of the input channels that output channel o may read at the centre (a prefix).
  __device__ __forceinline__ int in_end(int o) const {
    return (o / out_per_group + type_b) * in_per_group;
  }
  // First output channel that may read input channel i at the centre (a suffix starts there).
  __device__ __forceinline__ int out_begin(int i) const {
    return (i / in_per_group + 1 - type_b) * out_per_group;
  }
};

// One output row of a tile as the epilogue sees it.
struct Row {
  int64_t offset;  // of the row's first element
  int index;       // the row's output channel in grad_w, where the centre mask needs it
  bool ok;         // inside the tensor
};

// Runs the chunked reduction of one 64 x 64 tile and hands every result to epi.store.
// loader.load(q, ra, rb) reads chunk q into registers and loader.stage writes them to the
// tiles; the store of chunk q + 1 waits until chunk q's maths is done, so one buffer suffices.
template <typename T, bool kWmma, bool kAKMajor, bool kBKMajor, typename Loader,
          typename Epilogue>
__device__ __forceinline__ void tile_gemm(const Loader& loader, int64_t chunks,
                                          unsigned char* smem, const Epilogue& epi) {
  using C = Cfg<T, kWmma>;
  using L = Layout<T, kWmma, kAKMajor, kBKMajor>;
  T* As = reinterpret_cast<T*>(smem);
  T* Bs = As + L::A::kElems;
  T ra[kRows<T, kWmma>];
  T rb[kRows<T, kWmma>];
  if (chunks > 0) loader.load(0, ra, rb);

  if constexpr (kWmma) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ < 800
    // The host launches the wmma kernels only when they were compiled for sm_80 or newer.
    __trap();
#else
    namespace wmma = nvcuda::wmma;
    using ALayout = std::conditional_t<kAKMajor, wmma::col_major, wmma::row_major>;
    using BLayout = std::conditional_t<kBKMajor, wmma::row_major, wmma::col_major>;
    const int warp = threadIdx.x / kWarpSize;
    const int wm = warp % 2;
    const int wn = warp / 2;
    wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.0f);
    }
    for (int64_t q = 0; q < chunks; ++q) {
      loader.stage(As, Bs, ra, rb);
      __syncthreads();
      if (q + 1 < chunks) loader.load(q + 1, ra, rb);
#pragma unroll
      for (int ks = 0; ks < C::kBK; ks += 16) {
        wmma::fragment<wmma::matrix_a, 16, 16, 16, T, ALayout> fa[2];
        wmma::fragment<wmma::matrix_b, 16, 16, 16, T, BLayout> fb[2];
#pragma unroll
        for (int i = 0; i < 2; ++i) {
          wmma::load_matrix_sync(fa[i], As + L::A::at(wm * 32 + i * 16, ks), L::A::kLd);
          wmma::load_matrix_sync(fb[i], Bs + L::B::at(wn * 32 + i * 16, ks), L::B::kLd);
        }
#pragma unroll
        for (int i = 0; i < 2; ++i) {
#pragma unroll
          for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], fa[i], fb[j], acc[i][j]);
        }
      }
      __syncthreads();
    }
    // Through shared memory so that each thread ends up owning one row (a pixel of the
    // convolutions) and the stores of a warp run along consecutive rows.
    float* Cs = reinterpret_cast<float*>(smem);
#pragma unroll
    for (int i = 0; i < 2; ++i) {
#pragma unroll
      for (int j = 0; j < 2; ++j) {
        wmma::store_matrix_sync(Cs + (wn * 32 + j * 16) * kLdC + wm * 32 + i * 16, acc[i][j],
                                kLdC, wmma::mem_col_major);
      }
    }
    __syncthreads();
    const int m = threadIdx.x % kTile;
    const Row row = epi.row(m);
    for (int n = threadIdx.x / kTile; n < kTile; n += C::kThreads / kTile) {
      epi.store(row, n, Cs[n * kLdC + m]);
    }
#endif
  } else {
    using A = acc_t<T>;
    // Thread (tx, ty) owns rows tx + 16 i and columns ty + 16 j: the A reads of a warp hit 16
    // distinct banks in either layout, the B reads are broadcasts of 2 addresses, and the
    // stores of a warp are 16 rows wide.
    const int tx = threadIdx.x % 16;
    const int ty = threadIdx.x / 16;
    A acc[4][4] = {};
    for (int64_t q = 0; q < chunks; ++q) {
      loader.stage(As, Bs, ra, rb);
      __syncthreads();
      if (q + 1 < chunks) loader.load(q + 1, ra, rb);
#pragma unroll
      for (int k = 0; k < C::kBK; ++k) {
        A a[4], b[4];
#pragma unroll
        for (int i = 0; i < 4; ++i) a[i] = to_acc(As[L::A::at(tx + 16 * i, k)]);
#pragma unroll
        for (int j = 0; j < 4; ++j) b[j] = to_acc(Bs[L::B::at(ty + 16 * j, k)]);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
#pragma unroll
          for (int j = 0; j < 4; ++j) acc[i][j] += a[i] * b[j];
        }
      }
      __syncthreads();
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const Row row = epi.row(tx + 16 * i);
#pragma unroll
      for (int j = 0; j < 4; ++j) epi.store(row, ty + 16 * j, acc[i][j]);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// forward and grad_x: out (P x c_out) = patches(in) (P x allowed (t, r)) @ weight.
// The reduced channel r is the input channel in the forward and the output channel in grad_x;
// the produced channel is the other one.

template <typename T>
struct ConvParams {
  const T* in;      // (N, c_red, H, W): x, or grad_y for grad_x
  const T* weight;  // (C_out, C_in, k, k)
  const T* bias;    // (c_out,) or nullptr
  T* out;           // (N, c_out, H, W)
  int64_t pixels;   // N * H * W
  int64_t hw;
  int height;
  int width;
  int c_red;
  int c_out;
  int64_t w_stride_out;  // weight stride of a produced channel
  int64_t w_stride_red;  // weight stride of a reduced channel
  int k;
  int centre;  // k / 2
  int taps;    // T = centre * k + centre: the taps before the centre, all channels allowed
  int step;    // tap spacing: dilation, negated for grad_x (it reads at the flipped offsets)
  MaskRule rule;
};

// kTransposed: grad_x (reduces over output channels, produces input channels).
//
// The A tile (pixels x reduced channels) is read with the lanes along the pixels, which are
// contiguous in memory. The weights are contiguous only along the taps and a chunk has a single
// tap, so the B tile is read with the lanes along the weight's input channel, whose elements
// are the closest (k * k apart): along the reduced channels in the forward and along the
// produced channels in grad_x. The tile layouts follow those lanes.
template <typename T, bool kWmma, bool kTransposed>
struct ConvLoader {
  using C = Cfg<T, kWmma>;
  using L = Layout<T, kWmma, true, kTransposed>;
  static constexpr int kRowStep = C::kThreads / kTile;  // A, and B in grad_x

  const ConvParams<T>& p;
  // A: pixel m0 + lane, reduced channels row0 + kRowStep * j of the chunk.
  // B, forward: reduced channel red_lane of the chunk, produced channels
  // n0 + col0 + (threads / kBK) * j. B, grad_x: produced channel n0 + lane, reduced channels
  // as A.
  int lane;
  int row0;
  int red_lane;
  int col0;
  int n0;
  bool pixel_ok;
  int h;
  int w;
  const T* in_image;  // in + image * c_red * hw
  int64_t chunks_per_tap;
  int64_t full_chunks;  // chunks of the taps before the centre
  int centre_begin;     // channel range of the centre tap for this tile
  int centre_end;

  __device__ ConvLoader(const ConvParams<T>& params, int64_t m0, int tile_n0) : p(params) {
    lane = threadIdx.x % kTile;
    row0 = threadIdx.x / kTile;
    red_lane = threadIdx.x % C::kBK;
    col0 = threadIdx.x / C::kBK;
    n0 = tile_n0;
    const int64_t pixel = m0 + lane;
    pixel_ok = pixel < p.pixels;
    const int64_t image = pixel_ok ? pixel / p.hw : 0;
    const int64_t spatial = pixel_ok ? pixel - image * p.hw : 0;
    h = static_cast<int>(spatial / p.width);
    w = static_cast<int>(spatial - static_cast<int64_t>(h) * p.width);
    in_image = p.in + image * p.c_red * p.hw;
    chunks_per_tap = (p.c_red + C::kBK - 1) / C::kBK;
    full_chunks = p.taps * chunks_per_tap;
    // The centre channels any column of the tile may use; the rest of the rule is applied per
    // element when the weights are read.
    if (kTransposed) {
      centre_begin = min(p.rule.out_begin(n0), p.c_red);
      centre_end = p.c_red;
    } else {
      centre_begin = 0;
      centre_end = min(p.rule.in_end(min(n0 + kTile, p.c_out) - 1), p.c_red);
    }
  }

  __device__ int64_t chunks() const {
    return full_chunks + (centre_end - centre_begin + C::kBK - 1) / C::kBK;
  }

  __device__ __forceinline__ void load(int64_t q, T (&ra)[kRows<T, kWmma>],
                                       T (&rb)[kRows<T, kWmma>]) const {
    int tap;
    int c0;
    int c_end;
    if (q < full_chunks) {
      tap = static_cast<int>(q / chunks_per_tap);
      c0 = static_cast<int>(q - tap * chunks_per_tap) * C::kBK;
      c_end = p.c_red;
    } else {
      tap = p.taps;
      c0 = centre_begin + static_cast<int>(q - full_chunks) * C::kBK;
      c_end = centre_end;
    }
    const bool centre = tap == p.taps;
    const int hh = h + (tap / p.k - p.centre) * p.step;
    const int ww = w + (tap % p.k - p.centre) * p.step;
    const bool in_ok = pixel_ok && hh >= 0 && hh < p.height && ww >= 0 && ww < p.width;
    const T* src = in_image + (in_ok ? static_cast<int64_t>(hh) * p.width + ww : 0);
#pragma unroll
    for (int j = 0; j < kRows<T, kWmma>; ++j) {
      const int red = c0 + row0 + kRowStep * j;
      ra[j] = in_ok && red < c_end ? src[red * p.hw] : zero<T>();
    }
    if constexpr (kTransposed) {
      const int col = n0 + lane;
      const T* wsrc = p.weight + (col < p.c_out ? col : 0) * p.w_stride_out + tap;
#pragma unroll
      for (int j = 0; j < kRows<T, kWmma>; ++j) {
        const int red = c0 + row0 + kRowStep * j;
        const bool ok = col < p.c_out && red < c_end && (!centre || p.rule.allowed(red, col));
        rb[j] = ok ? wsrc[red * p.w_stride_red] : zero<T>();
      }
    } else {
      constexpr int kColStep = C::kThreads / C::kBK;
      const int red = c0 + red_lane;
      const bool red_ok = red < c_end;
      const T* wsrc = p.weight + (red_ok ? red : 0) * p.w_stride_red + tap;
#pragma unroll
      for (int j = 0; j < kRows<T, kWmma>; ++j) {
        const int col = n0 + col0 + kColStep * j;
        const bool ok = red_ok && col < p.c_out && (!centre || p.rule.allowed(col, red));
        rb[j] = ok ? wsrc[col * p.w_stride_out] : zero<T>();
      }
    }
  }

  __device__ __forceinline__ void stage(T* As, T* Bs, const T (&ra)[kRows<T, kWmma>],
                                        const T (&rb)[kRows<T, kWmma>]) const {
#pragma unroll
    for (int j = 0; j < kRows<T, kWmma>; ++j) As[L::A::at(lane, row0 + kRowStep * j)] = ra[j];
    if constexpr (kTransposed) {
#pragma unroll
      for (int j = 0; j < kRows<T, kWmma>; ++j) Bs[L::B::at(lane, row0 + kRowStep * j)] = rb[j];
    } else {
      constexpr int kColStep = C::kThreads / C::kBK;
#pragma unroll
      for (int j = 0; j < kRows<T, kWmma>; ++j) Bs[L::B::at(col0 + kColStep * j, red_lane)] = rb[j];
    }
  }
};

template <typename T>
struct ConvEpilogue {
  T* out;
  const T* bias;
  int64_t pixels;
  int64_t hw;
  int c_out;
  int64_t m0;
  int n0;

  __device__ __forceinline__ Row row(int m) const {
    const int64_t pixel = m0 + m;
    if (pixel >= pixels) return {0, 0, false};
    const int64_t image = pixel / hw;
    return {image * c_out * hw + (pixel - image * hw), m, true};
  }

  __device__ __forceinline__ void store(const Row& row, int n, acc_t<T> v) const {
    const int o = n0 + n;
    if (!row.ok || o >= c_out) return;
    if (bias != nullptr) v += to_acc(bias[o]);
    out[row.offset + o * hw] = from_acc<T>(v);
  }
};

template <typename T, bool kWmma, bool kTransposed>
__global__ void __launch_bounds__(Cfg<T, kWmma>::kThreads, Cfg<T, kWmma>::kMinBlocks)
    masked_conv2d_kernel(const ConvParams<T> p) {
  // wmma fragment pointers must be 32-byte aligned.
  __shared__ __align__(128) unsigned char smem[Layout<T, kWmma, true, kTransposed>::kSmemBytes];
  const int64_t m0 = static_cast<int64_t>(blockIdx.x) * kTile;
  const int n0 = static_cast<int>(blockIdx.y) * kTile;
  const ConvLoader<T, kWmma, kTransposed> loader(p, m0, n0);
  const ConvEpilogue<T> epi{p.out, p.bias, p.pixels, p.hw, p.c_out, m0, n0};
  tile_gemm<T, kWmma, true, kTransposed>(loader, loader.chunks(), smem, epi);
}

// ---------------------------------------------------------------------------------------------
// grad_w: for one tap t, gW[o, i, t] (C_out x C_in) = gy^T (C_out x P) @ shifted x (P x C_in).
// Block (x, y, z) owns tap x / in_tiles, input channels 64 * (x % in_tiles) on, output channels
// 64 * y on, and the z-th of `splits` contiguous ranges of pixel chunks.

template <typename T>
struct WeightGradParams {
  const T* grad_y;  // (N, C_out, H, W)
  const T* x;       // (N, C_in, H, W)
  acc_t<T>* grad_weight;
  int64_t pixels;
  int64_t hw;
  int height;
  int width;
  int c_in;
  int c_out;
  int k;
  int centre;
  int taps;
  int dilation;
  int in_tiles;
  int splits;
  MaskRule rule;
};

template <typename T, bool kWmma>
struct WeightGradLoader {
  using C = Cfg<T, kWmma>;
  using L = Layout<T, kWmma, false, false>;
  static constexpr int kRowStep = C::kThreads / C::kBK;

  const WeightGradParams<T>& p;
  // Thread roles: pixel kcol of each chunk (a warp reads consecutive pixels), rows
  // row0 + kRowStep * j of both tiles (output channels in A, input channels in B).
  int kcol;
  int row0;
  int o0;
  int i0;
  int i_end;
  int dr;
  int ds;
  int64_t chunk0;

  __device__ __forceinline__ void load(int64_t q, T (&ra)[kRows<T, kWmma>],
                                       T (&rb)[kRows<T, kWmma>]) const {
    const int64_t pixel = (chunk0 + q) * C::kBK + kcol;
    const bool pixel_ok = pixel < p.pixels;
    const int64_t image = pixel_ok ? pixel / p.hw : 0;
    const int64_t spatial = pixel_ok ? pixel - image * p.hw : 0;
    const int h = static_cast<int>(spatial / p.width);
    const int w = static_cast<int>(spatial - static_cast<int64_t>(h) * p.width);
    const int hh = h + dr;
    const int ww = w + ds;
    const bool x_ok = pixel_ok && hh >= 0 && hh < p.height && ww >= 0 && ww < p.width;
    const T* gy = p.grad_y + image * p.c_out * p.hw + spatial;
    const T* x = p.x + image * p.c_in * p.hw +
                 (x_ok ? static_cast<int64_t>(hh) * p.width + ww : 0);
#pragma unroll
    for (int j = 0; j < kRows<T, kWmma>; ++j) {
      const int r = row0 + kRowStep * j;
      ra[j] = pixel_ok && o0 + r < p.c_out ? gy[(o0 + r) * p.hw] : zero<T>();
      rb[j] = x_ok && i0 + r < i_end ? x[(i0 + r) * p.hw] : zero<T>();
    }
  }

  __device__ __forceinline__ void stage(T* As, T* Bs, const T (&ra)[kRows<T, kWmma>],
                                        const T (&rb)[kRows<T, kWmma>]) const {
#pragma unroll
    for (int j = 0; j < kRows<T, kWmma>; ++j) {
      const int r = row0 + kRowStep * j;
      As[L::A::at(r, kcol)] = ra[j];
      Bs[L::B::at(r, kcol)] = rb[j];
    }
  }
};

template <typename T>
struct WeightGradEpilogue {
  acc_t<T>* grad_weight;
  int c_in;
  int c_out;
  int o0;
  int i0;
  int tap;
  bool centre;
  int kk;  // k * k
  MaskRule rule;

  __device__ __forceinline__ Row row(int m) const {
    const int o = o0 + m;
    return {(static_cast<int64_t>(o) * c_in + i0) * kk + tap, o, o < c_out};
  }

  // Centre entries outside the group rule stay exactly 0.
  __device__ __forceinline__ void store(const Row& row, int n, acc_t<T> v) const {
    const int i = i0 + n;
    if (!row.ok || i >= c_in || (centre && !rule.allowed(row.index, i))) return;
    atomicAdd(grad_weight + row.offset + static_cast<int64_t>(n) * kk, v);
  }
};

template <typename T, bool kWmma>
__global__ void __launch_bounds__(Cfg<T, kWmma>::kThreads, Cfg<T, kWmma>::kMinBlocks)
    masked_conv2d_grad_weight_kernel(const WeightGradParams<T> p) {
  using C = Cfg<T, kWmma>;
  __shared__ __align__(128) unsigned char smem[Layout<T, kWmma, false, false>::kSmemBytes];
  const int tap = static_cast<int>(blockIdx.x) / p.in_tiles;
  const int i0 = (static_cast<int>(blockIdx.x) - tap * p.in_tiles) * kTile;
  const int o0 = static_cast<int>(blockIdx.y) * kTile;
  const bool centre = tap == p.taps;
  // At the centre only a prefix of the input channels is used by any output channel here;
  // blocks wholly past it have nothing to add (a block-uniform exit, before any barrier).
  const int i_end = centre ? min(p.rule.in_end(min(o0 + kTile, p.c_out) - 1), p.c_in) : p.c_in;
  if (i0 >= i_end) return;

  const int64_t total = (p.pixels + C::kBK - 1) / C::kBK;
  const int64_t begin = total * blockIdx.z / p.splits;
  const int64_t end = total * (blockIdx.z + 1) / p.splits;
  const WeightGradLoader<T, kWmma> loader{p,
                                          static_cast<int>(threadIdx.x) % C::kBK,
                                          static_cast<int>(threadIdx.x) / C::kBK,
                                          o0,
                                          i0,
                                          i_end,
                                          (tap / p.k - p.centre) * p.dilation,
                                          (tap % p.k - p.centre) * p.dilation,
                                          begin};
  const WeightGradEpilogue<T> epi{p.grad_weight, p.c_in, p.c_out, o0,
                                  i0,            tap,    centre,  p.k * p.k,
                                  p.rule};
  tile_gemm<T, kWmma, false, false>(loader, end - begin, smem, epi);
}

// ---------------------------------------------------------------------------------------------
// grad_b: block (o, z) sums grad_y[:, o] over a grid-strided share of the N * H * W pixels
// (flattened, so tiny images with huge batches still fill the block) and adds it atomically.

constexpr int kBiasThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kBiasThreads)
    masked_conv2d_grad_bias_kernel(const T* grad_y, acc_t<T>* grad_bias, int64_t pixels,
                                   int64_t hw, int c_out) {
  using A = acc_t<T>;
  __shared__ A partial[kBiasThreads / kWarpSize];
  const int o = blockIdx.x;
  A sum = 0;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * kBiasThreads;
  for (int64_t q = static_cast<int64_t>(blockIdx.y) * kBiasThreads + threadIdx.x; q < pixels;
       q += stride) {
    const int64_t image = q / hw;
    sum += to_acc(grad_y[(image * c_out + o) * hw + (q - image * hw)]);
  }
  for (int mask = kWarpSize / 2; mask > 0; mask >>= 1) sum += __shfl_xor_sync(kFullMask, sum, mask);
  const int warp = threadIdx.x / kWarpSize;
  if (threadIdx.x % kWarpSize == 0) partial[warp] = sum;
  __syncthreads();
  if (threadIdx.x == 0) {
    A total = 0;
    for (int i = 0; i < kBiasThreads / kWarpSize; ++i) total += partial[i];
    atomicAdd(grad_bias + o, total);
  }
}

// ---------------------------------------------------------------------------------------------
// Host side.

cudaError_t sm_count(int* count) {
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err == cudaSuccess) {
    err = cudaDeviceGetAttribute(count, cudaDevAttrMultiProcessorCount, device);
  }
  return err;
}

// Whether the wmma kernel that will run on this device was compiled for sm_80 or newer: the
// image's PTX version, not the device, is what decides which branch of tile_gemm it contains.
template <typename Kernel>
cudaError_t wmma_usable(Kernel kernel, bool* usable) {
  cudaFuncAttributes attr;
  const cudaError_t err = cudaFuncGetAttributes(&attr, kernel);
  if (err != cudaSuccess) return err;
  *usable = attr.ptxVersion >= 80;
  return cudaSuccess;
}

bool shape_ok(const MaskedConv2dShape& s) {
  const int64_t g = s.color_channels;
  return s.batch >= 0 && s.in_channels >= 0 && s.out_channels >= 0 && s.height >= 0 &&
         s.width >= 0 && s.kernel_size >= 1 && s.kernel_size % 2 == 1 &&
         s.kernel_size <= 4096 && s.dilation >= 1 &&
         (s.mask_type == 0 || s.mask_type == 1) && g >= 1 && s.in_channels % g == 0 &&
         s.out_channels % g == 0 && s.in_channels <= INT_MAX && s.out_channels <= INT_MAX &&
         s.height <= INT_MAX && s.width <= INT_MAX &&
         static_cast<int64_t>(s.kernel_size / 2) * s.dilation <= INT_MAX / 4;
}

MaskRule mask_rule(const MaskedConv2dShape& s) {
  return {static_cast<int>(s.in_channels / s.color_channels),
          static_cast<int>(s.out_channels / s.color_channels), s.mask_type == 1 ? 1 : 0};
}

template <typename T>
ConvParams<T> conv_params(const MaskedConv2dShape& s, const void* in, const void* weight,
                          const void* bias, void* out, bool transposed) {
  const int k = s.kernel_size;
  const int c = k / 2;
  const int64_t kk = static_cast<int64_t>(k) * k;
  ConvParams<T> p;
  p.in = static_cast<const T*>(in);
  p.weight = static_cast<const T*>(weight);
  p.bias = static_cast<const T*>(bias);
  p.out = static_cast<T*>(out);
  p.pixels = s.batch * s.height * s.width;
  p.hw = s.height * s.width;
  p.height = static_cast<int>(s.height);
  p.width = static_cast<int>(s.width);
  p.c_red = static_cast<int>(transposed ? s.out_channels : s.in_channels);
  p.c_out = static_cast<int>(transposed ? s.in_channels : s.out_channels);
  p.w_stride_out = transposed ? kk : s.in_channels * kk;
  p.w_stride_red = transposed ? s.in_channels * kk : kk;
  p.k = k;
  p.centre = c;
  p.taps = c * k + c;
  p.step = transposed ? -s.dilation : s.dilation;
  p.rule = mask_rule(s);
  return p;
}

template <typename T, bool kWmma, bool kTransposed>
cudaError_t launch_conv(const ConvParams<T>& p, cudaStream_t stream) {
  const int64_t m_tiles = (p.pixels + kTile - 1) / kTile;
  const int64_t n_tiles = (p.c_out + kTile - 1) / kTile;
  if (m_tiles > INT_MAX || n_tiles > 65535) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(m_tiles), static_cast<unsigned>(n_tiles));
  const auto kernel = masked_conv2d_kernel<T, kWmma, kTransposed>;
  kernel<<<grid, Cfg<T, kWmma>::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

// 16-bit inputs take the tensor cores where the wmma kernel was built for them.
template <typename T, bool kTransposed>
cudaError_t conv_typed(const ConvParams<T>& p, cudaStream_t stream) {
  if constexpr (kIsHalf<T>) {
    bool usable = false;
    const cudaError_t err = wmma_usable(masked_conv2d_kernel<T, true, kTransposed>, &usable);
    if (err != cudaSuccess) return err;
    if (usable) return launch_conv<T, true, kTransposed>(p, stream);
  }
  return launch_conv<T, false, kTransposed>(p, stream);
}

template <typename T, bool kWmma>
cudaError_t launch_grad_weight(const MaskedConv2dBackward& a, cudaStream_t stream) {
  using C = Cfg<T, kWmma>;
  const MaskedConv2dShape& s = a.shape;
  const MaskRule rule = mask_rule(s);
  WeightGradParams<T> p;
  p.grad_y = static_cast<const T*>(a.grad_y);
  p.x = static_cast<const T*>(a.x);
  p.grad_weight = static_cast<acc_t<T>*>(a.grad_weight);
  p.pixels = s.batch * s.height * s.width;
  p.hw = s.height * s.width;
  p.height = static_cast<int>(s.height);
  p.width = static_cast<int>(s.width);
  p.c_in = static_cast<int>(s.in_channels);
  p.c_out = static_cast<int>(s.out_channels);
  p.k = s.kernel_size;
  p.centre = s.kernel_size / 2;
  p.taps = p.centre * p.k + p.centre;
  p.dilation = s.dilation;
  p.in_tiles = (p.c_in + kTile - 1) / kTile;
  p.rule = rule;
  // The last output group reads the most centre channels: (G - 1 + type_b) groups of them.
  const bool centre_used = (s.color_channels - 1 + rule.type_b) > 0;
  const int64_t x_tiles = static_cast<int64_t>(p.taps + (centre_used ? 1 : 0)) * p.in_tiles;
  const int64_t y_tiles = (p.c_out + kTile - 1) / kTile;
  if (x_tiles > INT_MAX || y_tiles > 65535) return cudaErrorInvalidValue;
  if (x_tiles == 0) return cudaSuccess;  // k = 1, type A, G = 1: every weight is masked

  // Split the pixels until the grid fills the device a few times over, keeping at least 8
  // chunks per block so the atomics stay a small share of the traffic.
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  const int64_t chunks = (p.pixels + C::kBK - 1) / C::kBK;
  const int64_t tiles = x_tiles * y_tiles;
  const int64_t wanted = (4 * static_cast<int64_t>(sms) * C::kMinBlocks + tiles - 1) / tiles;
  p.splits = static_cast<int>(std::max<int64_t>(
      1, std::min<int64_t>({wanted, chunks / 8, 65535})));

  const dim3 grid(static_cast<unsigned>(x_tiles), static_cast<unsigned>(y_tiles),
                  static_cast<unsigned>(p.splits));
  const auto kernel = masked_conv2d_grad_weight_kernel<T, kWmma>;
  kernel<<<grid, C::kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_grad_bias(const MaskedConv2dBackward& a, cudaStream_t stream) {
  const MaskedConv2dShape& s = a.shape;
  const int64_t pixels = s.batch * s.height * s.width;
  int sms = 0;
  const cudaError_t err = sm_count(&sms);
  if (err != cudaSuccess) return err;
  // Enough blocks per channel for a few waves in all, never more than the pixels need.
  const int64_t needed = (pixels + kBiasThreads - 1) / kBiasThreads;
  const int64_t wanted = (8 * static_cast<int64_t>(sms) + s.out_channels - 1) / s.out_channels;
  const int64_t per_channel = std::max<int64_t>(1, std::min<int64_t>({needed, wanted, 65535}));
  if (s.out_channels > INT_MAX) return cudaErrorInvalidValue;
  const dim3 grid(static_cast<unsigned>(s.out_channels), static_cast<unsigned>(per_channel));
  const auto kernel = masked_conv2d_grad_bias_kernel<T>;
  kernel<<<grid, kBiasThreads, 0, stream>>>(static_cast<const T*>(a.grad_y),
                                            static_cast<acc_t<T>*>(a.grad_bias), pixels,
                                            s.height * s.width, static_cast<int>(s.out_channels));
  return cudaGetLastError();
}

template <typename T>
cudaError_t forward_typed(const MaskedConv2dForward& a, cudaStream_t stream) {
  const ConvParams<T> p = conv_params<T>(a.shape, a.x, a.weight, a.bias, a.y, false);
  return conv_typed<T, false>(p, stream);
}

template <typename T>
cudaError_t backward_typed(const MaskedConv2dBackward& a, cudaStream_t stream) {
  const MaskedConv2dShape& s = a.shape;
  cudaError_t err = cudaSuccess;
  if (a.grad_x != nullptr && s.in_channels > 0) {
    const ConvParams<T> p = conv_params<T>(s, a.grad_y, a.weight, nullptr, a.grad_x, true);
    err = conv_typed<T, true>(p, stream);
    if (err != cudaSuccess) return err;
  }
  // Without input or output channels there is no weight, and without output channels no bias.
  if (a.grad_weight != nullptr && s.in_channels > 0 && s.out_channels > 0) {
    bool usable = false;
    if constexpr (kIsHalf<T>) {
      err = wmma_usable(masked_conv2d_grad_weight_kernel<T, true>, &usable);
      if (err != cudaSuccess) return err;
    }
    err = usable ? launch_grad_weight<T, kIsHalf<T>>(a, stream)
                 : launch_grad_weight<T, false>(a, stream);
    if (err != cudaSuccess) return err;
  }
  if (a.grad_bias != nullptr && s.out_channels > 0) err = launch_grad_bias<T>(a, stream);
  return err;
}

template <typename F>
cudaError_t dispatch_kind(ScalarKind kind, F&& f) {
  switch (kind) {
    case ScalarKind::kFloat32:
      return f(float{});
    case ScalarKind::kFloat64:
      return f(double{});
    case ScalarKind::kFloat16:
      return f(__half{});
    case ScalarKind::kBFloat16:
      return f(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace

cudaError_t masked_conv2d_forward(const MaskedConv2dForward& args, cudaStream_t stream) {
  const MaskedConv2dShape& s = args.shape;
  if (!shape_ok(s)) return cudaErrorInvalidValue;
  // Nothing to write; with C_in == 0 the reduction is empty and the kernel writes the bias.
  if (s.batch == 0 || s.height == 0 || s.width == 0 || s.out_channels == 0) return cudaSuccess;
  return dispatch_kind(s.kind, [&](auto tag) {
    return forward_typed<decltype(tag)>(args, stream);
  });
}

cudaError_t masked_conv2d_backward(const MaskedConv2dBackward& args, cudaStream_t stream) {
  const MaskedConv2dShape& s = args.shape;
  if (!shape_ok(s)) return cudaErrorInvalidValue;
  // With no pixels or no output channels every gradient is 0: grad_weight and grad_bias are
  // zero-filled by the caller, and grad_x (N * C_in * H * W elements) is empty unless
  // C_out == 0, where it is written as zeros by the (empty-reduction) grad_x kernel.
  if (s.batch == 0 || s.height == 0 || s.width == 0) return cudaSuccess;
  return dispatch_kind(s.kind, [&](auto tag) {
    return backward_typed<decltype(tag)>(args, stream);
  });
}

}  // namespace cuda
}  // namespace pyvae
