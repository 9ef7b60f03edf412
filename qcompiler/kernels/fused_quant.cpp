// Fused fake quantization for QAT on CPU, float32.
//
// Each quantizer is one pass forward and one pass backward over its tensor
// (the eager formulation in qcompiler/quantizers/ is ~7 passes for uniform and
// ~16 for power grids). The numerics are those of the eager code, bit for bit in
// the forward pass; tests/kernels/ checks that against the eager reference.
//
// Layout: x is viewed as (rows, inner) with one step (or alpha) per row; rows is 1
// for a per-tensor step, the batch for ASQ's per-sample step, the output channels
// for a per-channel weight step. Work is split into (row, chunk) tasks so that both
// shapes parallelise, and per-row gradient sums are reduced from per-task partials
// in a fixed order, so results do not depend on the thread count.
#include <torch/extension.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace {

constexpr int64_t kChunk = 1 << 14;

struct Tiling {
  int64_t rows, inner, chunks;
  Tiling(int64_t rows_, int64_t inner_)
      : rows(rows_), inner(inner_), chunks(std::max<int64_t>(1, (inner_ + kChunk - 1) / kChunk)) {}
  int64_t tasks() const { return rows * chunks; }
};

template <typename F>
void for_each_chunk(const Tiling& t, F f) {
  at::parallel_for(0, t.tasks(), 1, [&](int64_t begin, int64_t end) {
    for (int64_t task = begin; task < end; ++task) {
      const int64_t row = task / t.chunks, lo = (task % t.chunks) * kChunk;
      const int64_t hi = std::min(t.inner, lo + kChunk);
      f(task, row, row * t.inner + lo, row * t.inner + hi);
    }
  });
}

torch::Tensor row_sums(const std::vector<double>& partial, const Tiling& t, double scale) {
  auto out = torch::empty({t.rows}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  for (int64_t r = 0; r < t.rows; ++r) {
    double s = 0.0;
    for (int64_t c = 0; c < t.chunks; ++c) s += partial[r * t.chunks + c];
    o[r] = static_cast<float>(s * scale);
  }
  return out;
}

// Round half to even for |v| <= 2^22 (codes are at most 16 bits): adding and
// removing 1.5 * 2^23 leaves no fraction bits, and IEEE rounding is to even.
inline float round_even(float v) {
  const float magic = 12582912.0f;
  return (v + magic) - magic;
}

inline uint32_t bits_of(float f) { uint32_t b; std::memcpy(&b, &f, 4); return b; }
inline float float_of(uint32_t b) { float f; std::memcpy(&f, &b, 4); return f; }

// Selects as bit masks: GCC does not vectorise these loops for baseline x86-64
// (SSE2) when they are written as `c ? a : b` on floats, and runs them ~4x slower.
inline uint32_t mask_of(bool c) { return 0u - static_cast<uint32_t>(c); }
inline float select(bool c, float a, float b) {
  const uint32_t m = mask_of(c);
  return float_of((bits_of(a) & m) | (bits_of(b) & ~m));
}

void check(const torch::Tensor& x, const torch::Tensor& step) {
  TORCH_CHECK(x.is_contiguous() && step.is_contiguous(), "fused_quant: tensors must be contiguous");
  TORCH_CHECK(x.scalar_type() == torch::kFloat32 && step.scalar_type() == torch::kFloat32,
              "fused_quant: float32 only");
  TORCH_CHECK(step.numel() > 0 && x.numel() % step.numel() == 0, "fused_quant: one step per row");
}

// The sum of body(i) over [b, e), where body also writes its elementwise outputs: per
// block of kBlock the terms go to a buffer on the stack (L1-resident) in one plain
// elementwise loop, then to kLanes float partial sums in a fixed order (so results do not
// depend on threads) that the compiler keeps in vector registers without reassociation
// flags, and the blocks add up in double. Two loops, not one that sums as it goes: with
// AVX2's 16 vector registers GCC kept the one-loop form's partial sums on the stack, a
// store and reload per 16 terms; apart, each loop has the registers it needs (the LSQ
// gradient kernel ~15% faster on AVX2 and AVX-512 builds alike).
constexpr int64_t kBlock = 2048;
constexpr int kLanes = 16;
template <typename Body>
inline double sum_terms(int64_t b, int64_t e, Body body) {
  alignas(64) float terms[kBlock];
  double acc = 0.0;
  for (int64_t c = b; c < e; c += kBlock) {
    const int64_t n = std::min(kBlock, e - c);
    for (int64_t j = 0; j < n; ++j) terms[j] = body(c + j);
    float lanes[kLanes] = {0};
    int64_t j = 0;
    for (; j + kLanes <= n; j += kLanes)
      for (int l = 0; l < kLanes; ++l) lanes[l] += terms[j + l];
    double s = 0.0;
    for (; j < n; ++j) s += terms[j];
    for (int l = 0; l < kLanes; ++l) s += lanes[l];
    acc += s;
  }
  return acc;
}

// ---- learned steps kept positive ----------------------------------------------------

// positive(step) = |step| clamped at min_step, flattened to one value per row, and the
// gradient through it: grad * sign(step) where |step| >= min_step, else 0. The same
// elementwise results as qcompiler.quantizers.uniform.positive and autograd through it, in
// one call each instead of four or five dispatched ops per quantizer and QAT step.
torch::Tensor positive_rows(torch::Tensor step, double min_step) {
  TORCH_CHECK(step.scalar_type() == torch::kFloat32, "fused_quant: float32 only");
  auto src = step.contiguous();
  auto out = torch::empty({src.numel()}, torch::kFloat32);
  const float* s = src.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float lo = static_cast<float>(min_step);
  for (int64_t i = 0; i < src.numel(); ++i) o[i] = std::max(std::fabs(s[i]), lo);
  return out;
}

torch::Tensor positive_grad(torch::Tensor step, torch::Tensor grad_rows, double min_step) {
  auto src = step.contiguous();
  auto g = grad_rows.contiguous();
  TORCH_CHECK(g.numel() == src.numel(), "fused_quant: one gradient per step");
  auto out = torch::empty_like(src);
  const float* s = src.data_ptr<float>();
  const float* gp = g.data_ptr<float>();
  float* o = out.data_ptr<float>();
  const float lo = static_cast<float>(min_step);
  for (int64_t i = 0; i < src.numel(); ++i) {
    const float sign = s[i] > 0.0f ? 1.0f : (s[i] < 0.0f ? -1.0f : 0.0f);
    o[i] = std::fabs(s[i]) >= lo ? gp[i] * sign : 0.0f;
  }
  return out;
}

// ---- uniform (LSQ) -------------------------------------------------------------

torch::Tensor lsq_forward(torch::Tensor x, torch::Tensor step, int64_t qmin, int64_t qmax) {
  check(x, step);
  auto out = torch::empty_like(x);
  const Tiling t(step.numel(), x.numel() / step.numel());
  const float* xp = x.data_ptr<float>();
  const float* sp = step.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  for_each_chunk(t, [&](int64_t, int64_t row, int64_t b, int64_t e) {
    const float s = sp[row];
    for (int64_t i = b; i < e; ++i) {
      const float c = std::min(std::max(xp[i] / s, lo), hi);
      op[i] = round_even(c) * s;
    }
  });
  return out;
}

// Remake: the gradient goes back into grad (the caller's own buffer) and out gets the quantized
// values again, as lsq_forward computes them (see lsq_backward_remake); otherwise out gets the
// gradient. Reads and writes of grad go through one pointer, so the compiler sees the in-place
// update for what it is.
template <bool Remake>
std::vector<torch::Tensor> lsq_backward_into(torch::Tensor grad, torch::Tensor x, torch::Tensor step, int64_t qmin,
                                             int64_t qmax, double grad_scale) {
  check(x, step);
  if (!Remake) grad = grad.contiguous();
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == x.sizes() && grad.scalar_type() == torch::kFloat32,
              "fused_quant: the gradient must be a contiguous float32 tensor of the input's shape");
  torch::Tensor out = torch::empty_like(x);
  const Tiling t(step.numel(), x.numel() / step.numel());
  std::vector<double> partial(t.tasks());
  const float* xp = x.data_ptr<float>();
  float* gp = grad.data_ptr<float>();
  const float* sp = step.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const float lo = static_cast<float>(qmin), hi = static_cast<float>(qmax);
  for_each_chunk(t, [&](int64_t task, int64_t row, int64_t b, int64_t e) {
    const float s = sp[row];
    partial[task] = sum_terms(b, e, [&](int64_t i) {
      const float v = xp[i] / s;
      const float cl = std::min(std::max(v, lo), hi);
      const bool inside = cl == v;
      // d(x_hat)/ds: round(v) - v inside, the clamped code outside
      const float dstep = select(inside, round_even(cl) - v, cl);
      const float g = gp[i];
      if constexpr (Remake) {
        gp[i] = select(inside, g, 0.0f);
        op[i] = round_even(cl) * s;  // as lsq_forward computes it
      } else {
        op[i] = select(inside, g, 0.0f);
      }
      return dstep * g;
    });
  });
  return {out, row_sums(partial, t, grad_scale)};
}

// Returns (grad_x, grad_step per row).
std::vector<torch::Tensor> lsq_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor step, int64_t qmin,
                                        int64_t qmax, double grad_scale) {
  return lsq_backward_into<false>(grad, x, step, qmin, qmax, grad_scale);
}

// lsq_backward for a layer that owns grad (a quantized weight's gradient, which it made and
// nothing else holds): grad becomes the weight's gradient in place, and the quantized weight is
// made again in the same pass. Returns (quantized weight, grad_step per row).
std::vector<torch::Tensor> lsq_backward_remake(torch::Tensor grad, torch::Tensor x, torch::Tensor step, int64_t qmin,
                                               int64_t qmax, double grad_scale) {
  return lsq_backward_into<true>(grad, x, step, qmin, qmax, grad_scale);
}

// ---- ASQ: the adapter's forward pass ---------------------------------------------

// positive(step) of a per-tensor step, as positive_rows computes it.
float positive_scalar(const torch::Tensor& step, double min_step) {
  TORCH_CHECK(step.numel() == 1 && step.scalar_type() == torch::kFloat32, "fused_quant: one float32 step");
  return std::max(std::fabs(step.item<float>()), static_cast<float>(min_step));
}

// Returns (out, beta, bounded, hidden, pooled, sample_step): the same ATen ops, in the same
// order, as qcompiler.quantizers.asq.pool / adapter_forward (so the same bits), issued from
// here instead of Python; then s * beta, one float32 product per sample as torch's mul makes
// it, and the per-sample LSQ kernel.
std::vector<torch::Tensor> asq_forward(torch::Tensor x, torch::Tensor step, torch::Tensor w1, torch::Tensor b1,
                                       torch::Tensor w2, torch::Tensor b2, int64_t qmin, int64_t qmax,
                                       int64_t feature_axis, double min_step, double beta_bound) {
  x = x.contiguous();
  torch::Tensor pooled = x;
  if (x.dim() > 2)
    pooled = feature_axis == 1 ? x.flatten(2).mean(-1) : x.reshape({x.size(0), -1, x.size(-1)}).mean(1);
  auto hidden = at::relu(at::linear(pooled, w1, b1));
  auto bounded = at::tanh(at::linear(hidden, w2, b2).squeeze(-1) / beta_bound);
  auto beta = at::exp(bounded * beta_bound).contiguous();
  const float s = positive_scalar(step, min_step);
  auto sample_step = torch::empty_like(beta);
  const float* bp = beta.data_ptr<float>();
  float* sp = sample_step.data_ptr<float>();
  for (int64_t i = 0; i < beta.numel(); ++i) sp[i] = s * bp[i];
  return {lsq_forward(x, sample_step, qmin, qmax), beta, bounded, hidden, pooled, sample_step};
}

// ---- ASQ: the adapter's backward pass -------------------------------------------

// Returns (grad_x or an empty tensor, grad_step, grad_w1, grad_b1, grad_w2, grad_b2), for
// beta = exp(L tanh(z / L)), z = w2 relu(w1 pooled + b1) + b2 and a per-sample step
// s * beta (qcompiler.quantizers.asq._ASQ has the formulas). The adapter is tiny
// ((N, C) pooled features, C / 4 hidden units), so its gradients are plain loops here:
// as ATen calls they were ~20 dispatches per layer each costing more than its arithmetic.
// Past kLoopMacs multiply-adds per product (large batches of wide layers) at::mm's blocked
// kernels win and the products go there. Buffers are zeroed here, not by
// torch::zeros, whose threaded fill costs more than these sizes' arithmetic.
torch::Tensor zeroed(at::IntArrayRef shape) {
  auto t = torch::empty(shape, torch::kFloat32);
  std::fill_n(t.data_ptr<float>(), t.numel(), 0.0f);
  return t;
}

constexpr int64_t kLoopMacs = int64_t{1} << 23;

// out[r, :] = sum_t coef(r, t) * src[t, :] for a (rows, c) result: each output row is
// accumulated in L1 over the terms, rows split over threads; a zero coefficient (a hidden
// unit the ReLU turned off) skips its term. Fused multiply-adds: these are gradients.
template <typename Coef>
torch::Tensor sum_of_rows(int64_t rows, int64_t terms, int64_t c, const float* src, Coef coef, int64_t grain) {
  auto out = zeroed({rows, c});
  float* op = out.data_ptr<float>();
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      float* row = op + r * c;
      for (int64_t t = 0; t < terms; ++t) {
        const float d = coef(r, t);
        if (d == 0.0f) continue;
        const float* s = src + t * c;
        for (int64_t k = 0; k < c; ++k) row[k] = std::fma(d, s[k], row[k]);
      }
    }
  });
  return out;
}


std::vector<torch::Tensor> asq_backward(torch::Tensor grad, torch::Tensor x, torch::Tensor sample_step,
                                        torch::Tensor step, torch::Tensor beta, torch::Tensor bounded,
                                        torch::Tensor hidden, torch::Tensor pooled, torch::Tensor w1,
                                        torch::Tensor w2, int64_t qmin, int64_t qmax, double grad_scale,
                                        int64_t feature_axis, bool need_x, double min_step) {
  const float s = positive_scalar(step, min_step);
  auto lsq = lsq_backward(grad, x, sample_step, qmin, qmax, grad_scale);
  torch::Tensor grad_x = lsq[0];
  const float* g = lsq[1].data_ptr<float>();  // per-sample step gradient (times the gradient scale)
  beta = beta.contiguous(); bounded = bounded.contiguous(); hidden = hidden.contiguous();
  pooled = pooled.contiguous(); w1 = w1.contiguous(); w2 = w2.contiguous();
  const int64_t n = pooled.size(0), c = pooled.size(1), h = hidden.size(1);
  const float* bp = beta.data_ptr<float>();
  const float* tp = bounded.data_ptr<float>();
  const float* hp = hidden.data_ptr<float>();
  const float* w2p = w2.data_ptr<float>();

  // d(step): sum_n beta_n g_n through positive() = |step| clamped at min_step
  double dstep = 0.0;
  for (int64_t i = 0; i < n; ++i) dstep += static_cast<double>(g[i]) * bp[i];
  auto grad_step = positive_grad(step, torch::full_like(step, static_cast<float>(dstep)), min_step);

  // dz_n = s g_n beta_n (1 - tanh^2), then fc2 and the ReLU
  std::vector<float> dz(n);
  for (int64_t i = 0; i < n; ++i) dz[i] = s * g[i] * bp[i] * (1.0f - tp[i] * tp[i]);
  auto grad_w2 = zeroed({1, h});
  auto grad_b2 = zeroed({1});
  auto dhidden = torch::empty({n, h}, torch::kFloat32);
  float* gw2 = grad_w2.data_ptr<float>();
  float* dh = dhidden.data_ptr<float>();
  double db2 = 0.0;
  for (int64_t i = 0; i < n; ++i) {
    db2 += dz[i];
    for (int64_t j = 0; j < h; ++j) {
      gw2[j] += dz[i] * hp[i * h + j];
      dh[i * h + j] = hp[i * h + j] > 0.0f ? dz[i] * w2p[j] : 0.0f;
    }
  }
  grad_b2.data_ptr<float>()[0] = static_cast<float>(db2);

  // fc1: grad_w1 = dhidden^T pooled, grad_b1 = column sums, dpooled = dhidden w1
  const bool small = n * h * c <= kLoopMacs;
  const float* pp = pooled.data_ptr<float>();
  auto grad_w1 = small ? sum_of_rows(h, n, c, pp, [&](int64_t j, int64_t i) { return dh[i * h + j]; }, 8)
                       : at::mm(dhidden.t(), pooled);
  auto grad_b1 = zeroed({h});
  float* gb1 = grad_b1.data_ptr<float>();
  for (int64_t i = 0; i < n; ++i)
    for (int64_t j = 0; j < h; ++j) gb1[j] += dh[i * h + j];
  if (!need_x) return {torch::Tensor(), grad_step, grad_w1, grad_b1, grad_w2, grad_b2};
  const float* w1p = w1.data_ptr<float>();
  auto dpooled = small ? sum_of_rows(n, h, c, w1p, [&](int64_t i, int64_t j) { return dh[i * h + j]; }, 1)
                       : at::mm(dhidden, w1);
  // the pooled gradient, spread evenly over each sample's positions, onto the straight-through dx
  const int64_t positions = x[0].numel() / c;
  const float* dp = dpooled.data_ptr<float>();
  float* gx = grad_x.data_ptr<float>();
  at::parallel_for(0, n, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> spread(c);
    for (int64_t i = begin; i < end; ++i) {
      for (int64_t k = 0; k < c; ++k) spread[k] = dp[i * c + k] / static_cast<float>(positions);
      float* row = gx + i * positions * c;
      if (feature_axis == 1) {  // (N, C, positions)
        for (int64_t k = 0; k < c; ++k)
          for (int64_t p = 0; p < positions; ++p) row[k * positions + p] += spread[k];
      } else {  // (N, positions, C)
        for (int64_t p = 0; p < positions; ++p)
          for (int64_t k = 0; k < c; ++k) row[p * c + k] += spread[k];
      }
    }
  });
  return {grad_x, grad_step, grad_w1, grad_b1, grad_w2, grad_b2};
}

// ---- power-of-r grids (POT r = 2, POST r = sqrt 2) -------------------------------

// The projection of a = |w / alpha| onto {0} u {r^-k : k = 0..kmax}, as in
// qcompiler.quantizers.power_grid.GridThresholds: from the float's exponent e and
// mantissa m in [1, 2), k = -(e + [m > mid_low]) for r = 2 and
// k = -(2e + [m > mid_low] + [m > mid_high]) for r = sqrt 2, clamped to [0, kmax];
// a <= zero_at is zero. The midpoints come rounded down to float32, which makes
// "m > mid" exact. Level values are built from bits: r^-k is a power of two, or for
// odd k with r = sqrt 2 the float32 sqrt 2 times one, which is exactly the float32
// rounding of r^-k that qcompiler.quantizers.power_grid.power_levels tabulates.
struct PowerGrid {
  uint32_t carry_low, carry_high;  // 2^23 - 1 - (a midpoint's mantissa bits): see level()
  uint32_t smallest, largest;  // bits of r^-kmax and of r^0 = 1: the clamp of k, as a clamp of level bits
  float zero_at;

  // The level straight from a's bits. Adding carry_low to them carries into the exponent
  // field exactly when the mantissa exceeds mid_low, so masking the sum to its exponent
  // gives 2^e (m <= mid_low) or the next octave's 2^(e+1): the r = 2 level. For r = sqrt 2
  // the same with mid_high gives 2^e or 2^(e+1), and where the two sums disagree
  // (mid_low < m <= mid_high) the level is 2^e sqrt 2, the exponent with sqrt 2's
  // mantissa. Two additions and masks in place of mantissa comparisons, which AVX2 has
  // only for signed integers (GCC emulates the unsigned ones in three instructions).
  // Positive floats order like their bits, so clamping k to [0, kmax] is clamping the
  // bits to [r^-kmax, 1]; infinities go past 1, subnormals below r^-kmax, and NaNs are
  // zeroed by the last mask. tests/kernels compares every float32 of the octaves where
  // the decisions change with the eager mantissa comparisons.
  template <bool Sqrt2>
  inline float level(float a) const {
    const uint32_t ab = bits_of(a);  // a >= 0: no sign bit
    uint32_t lb = (ab + carry_low) & 0x7F800000u;
    if constexpr (Sqrt2) {
      const uint32_t high = (ab + carry_high) & 0x7F800000u;
      lb = high | (mask_of(lb != high) & 0x3504F3u);
    }
    lb = std::min(std::max(lb, smallest), largest);
    return float_of(lb & mask_of(a > zero_at));
  }
};

PowerGrid make_grid(bool sqrt2, int64_t kmax, double mid_low, double mid_high, double zero_at) {
  TORCH_CHECK(kmax >= 0 && kmax <= 126, "fused_quant: power grids up to 8 bits");
  TORCH_CHECK(mid_low >= 1.0 && mid_low <= mid_high && mid_high <= 2.0, "fused_quant: midpoints within [1, 2]");
  // midpoints are rounded down to float32 (so "m > mid" is exact); 2.0 means "no second
  // midpoint" (r = 2): no mantissa exceeds 0x7FFFFF, and a carry of 0 never carries
  auto mantissa = [](double t) { return t >= 2.0 ? uint32_t{0x7FFFFF} : bits_of(static_cast<float>(t)) & 0x7FFFFF; };
  auto carry = [&](double t) { return uint32_t{0x7FFFFF} - mantissa(t); };
  const int32_t k = static_cast<int32_t>(kmax), odd = k & 1;  // r^-k = 2^-(k+1)/2 sqrt 2 for odd k, r = sqrt 2
  const uint32_t smallest = sqrt2 ? (static_cast<uint32_t>(127 - (k >> 1) - odd) << 23) | (odd ? 0x3504F3u : 0u)
                                 : static_cast<uint32_t>(127 - k) << 23;
  return PowerGrid{carry(mid_low), carry(mid_high), smallest, 0x3F800000u, static_cast<float>(zero_at)};
}

template <bool Sqrt2>
void power_forward_rows(const PowerGrid& grid, const Tiling& t, const float* wp, const float* ap, float* op) {
  for_each_chunk(t, [&](int64_t, int64_t row, int64_t b, int64_t e) {
    const float al = ap[row];
    for (int64_t i = b; i < e; ++i) {
      const float u = wp[i] / al;
      op[i] = std::copysign(grid.level<Sqrt2>(std::fabs(u)), u) * al;
    }
  });
}

torch::Tensor power_forward(torch::Tensor w, torch::Tensor alpha, bool sqrt2, int64_t kmax, double mid_low,
                            double mid_high, double zero_at) {
  check(w, alpha);
  const PowerGrid grid = make_grid(sqrt2, kmax, mid_low, mid_high, zero_at);
  auto out = torch::empty_like(w);
  const Tiling t(alpha.numel(), w.numel() / alpha.numel());
  auto run = sqrt2 ? power_forward_rows<true> : power_forward_rows<false>;
  run(grid, t, w.data_ptr<float>(), alpha.data_ptr<float>(), out.data_ptr<float>());
  return out;
}

// Remake: the gradient goes back into gp (the caller's own buffer) and out gets the quantized
// weight again, for a convolution's backward-data pass that runs after this one (see
// power_backward_remake); otherwise out gets the gradient. Reads and writes of gp go through the
// one pointer, so the compiler sees the in-place update for what it is.
template <bool Sqrt2, bool Remake>
void power_backward_rows(const PowerGrid& grid, const Tiling& t, const float* wp, float* gp, const float* ap,
                         float* out, std::vector<double>& partial) {
  for_each_chunk(t, [&](int64_t task, int64_t row, int64_t b, int64_t e) {
    const float al = ap[row];
    partial[task] = sum_terms(b, e, [&](int64_t i) {
      const float u = wp[i] / al;
      const float au = std::fabs(u);
      const float q = std::copysign(grid.level<Sqrt2>(au), u);
      const bool inside = au <= 1.0f;
      // d(q * alpha)/d alpha: q - u inside; outside q is the clip sign(u)
      const float g = gp[i];
      if constexpr (Remake) {
        gp[i] = select(inside, g, 0.0f);
        out[i] = q * al;  // as power_forward_rows computes it
      } else {
        out[i] = select(inside, g, 0.0f);
      }
      return (q - select(inside, u, 0.0f)) * g;
    });
  });
}

template <bool Remake>
std::vector<torch::Tensor> power_backward_into(torch::Tensor grad, torch::Tensor w, torch::Tensor alpha, bool sqrt2,
                                               int64_t kmax, double mid_low, double mid_high, double zero_at,
                                               double grad_scale) {
  check(w, alpha);
  const PowerGrid grid = make_grid(sqrt2, kmax, mid_low, mid_high, zero_at);
  if (!Remake) grad = grad.contiguous();
  TORCH_CHECK(grad.is_contiguous() && grad.sizes() == w.sizes() && grad.scalar_type() == torch::kFloat32,
              "fused_quant: the gradient must be a contiguous float32 tensor of the weight's shape");
  auto out = torch::empty_like(w);
  const Tiling t(alpha.numel(), w.numel() / alpha.numel());
  std::vector<double> partial(t.tasks());
  auto run = sqrt2 ? power_backward_rows<true, Remake> : power_backward_rows<false, Remake>;
  run(grid, t, w.data_ptr<float>(), grad.data_ptr<float>(), alpha.data_ptr<float>(), out.data_ptr<float>(), partial);
  return {out, row_sums(partial, t, grad_scale)};
}

// Returns (grad_w, grad_alpha per row).
std::vector<torch::Tensor> power_backward(torch::Tensor grad, torch::Tensor w, torch::Tensor alpha, bool sqrt2,
                                          int64_t kmax, double mid_low, double mid_high, double zero_at,
                                          double grad_scale) {
  return power_backward_into<false>(grad, w, alpha, sqrt2, kmax, mid_low, mid_high, zero_at, grad_scale);
}

// power_backward for a layer that owns grad (the quantized weight's gradient, which it made
// and nothing else holds): grad becomes the weight's gradient in place, and the quantized
// weight is made again in the same pass. Returns (quantized weight, grad_alpha per row).
// One read of the weight where recomputing it and then running power_backward took two.
std::vector<torch::Tensor> power_backward_remake(torch::Tensor grad, torch::Tensor w, torch::Tensor alpha, bool sqrt2,
                                                 int64_t kmax, double mid_low, double mid_high, double zero_at,
                                                 double grad_scale) {
  return power_backward_into<true>(grad, w, alpha, sqrt2, kmax, mid_low, mid_high, zero_at, grad_scale);
}

// A training batch norm's output from the batch statistics it saved (mean, 1/std per
// channel): out = x * alpha + beta with alpha = invstd * weight, beta = bias - mean * alpha,
// the formula of ATen's CPU kernel, so backward need not run the batch norm (and its two
// reductions) again to remake an output it did not keep. Whether ATen's build contracts
// beta and out into fused multiply-adds depends on the instruction set it was compiled for:
// `fused` says which, found once by comparing with ATen (qcompiler.kernels.batch_norm_form).
torch::Tensor batch_norm_output(torch::Tensor x, torch::Tensor mean, torch::Tensor invstd,
                                c10::optional<torch::Tensor> weight, c10::optional<torch::Tensor> bias, bool fused) {
  TORCH_CHECK(x.scalar_type() == at::kFloat && x.is_contiguous() && x.dim() >= 2, "x: contiguous float32, (N, C, ...)");
  const int64_t channels = x.size(1), inner = x.dim() > 2 ? x.numel() / (x.size(0) * channels) : 1;
  TORCH_CHECK(mean.numel() == channels && invstd.numel() == channels, "one mean and 1/std per channel");
  const auto per_channel = [&](const c10::optional<torch::Tensor>& t) -> const float* {
    if (!t.has_value() || !t->defined()) return nullptr;
    TORCH_CHECK(t->scalar_type() == at::kFloat && t->is_contiguous() && t->numel() == channels, "one value per channel");
    return t->data_ptr<float>();
  };
  const float *wp = per_channel(weight), *bp = per_channel(bias);
  mean = mean.contiguous(), invstd = invstd.contiguous();
  const float *mp = mean.data_ptr<float>(), *sp = invstd.data_ptr<float>();
  std::vector<float> alpha(channels), beta(channels);
  for (int64_t c = 0; c < channels; ++c) {
    const float w = wp ? wp[c] : 1.0f, b = bp ? bp[c] : 0.0f;
    alpha[c] = sp[c] * w;
    beta[c] = fused ? std::fma(-mp[c], alpha[c], b) : b - mp[c] * alpha[c];
  }
  auto out = torch::empty_like(x);
  const float* xp = x.data_ptr<float>();
  float* op = out.data_ptr<float>();
  const int64_t rows = x.numel() / inner;  // (sample, channel) pairs
  at::parallel_for(0, rows, std::max<int64_t>(1, kChunk / inner), [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const float a = alpha[r % channels], b = beta[r % channels];
      const float* xr = xp + r * inner;
      float* orow = op + r * inner;
      if (fused) {
        for (int64_t i = 0; i < inner; ++i) orow[i] = std::fma(xr[i], a, b);
      } else {
        for (int64_t i = 0; i < inner; ++i) orow[i] = xr[i] * a + b;
      }
    }
  });
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("positive_rows", &positive_rows);
  m.def("positive_grad", &positive_grad);
  m.def("lsq_forward", &lsq_forward);
  m.def("lsq_backward", &lsq_backward);
  m.def("lsq_backward_remake", &lsq_backward_remake);
  m.def("asq_forward", &asq_forward);
  m.def("asq_backward", &asq_backward);
  m.def("power_forward", &power_forward);
  m.def("power_backward", &power_backward);
  m.def("power_backward_remake", &power_backward_remake);
  m.def("batch_norm_output", &batch_norm_output);
}
