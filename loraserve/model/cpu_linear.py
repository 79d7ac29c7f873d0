"""The CPU's projection y = x W^T (+ bias) from weights kept as column panels, fp32 or bf16; part of `cpu_kernels`.

A decode step's matmuls have few rows (32 at most at batch 32) and stream
their weights from DRAM: at 32 rows each weight float feeds 32 FMAs, so the
product is bound by compute and by memory about equally, and runs near the
sum of the two unless the weight's next lines arrive while the current ones
are multiplied. oneDNN's packed fp32 product ran SmolLM2's decode matmuls at
about that sum (gate|up at 32 rows: 10.7 GB/s and ~170 GFLOP/s, against the
~22 GB/s and ~340 GFLOP/s this machine class has; 1.6x as fast with the
weight in the cache). `panel_linear` fetches ahead instead: each task's
weights are 3 panels (48 output columns: one 8-row x 48-column register
tile, 24 of AVX-512's 32 registers), and while it multiplies one task's
panels it asks for the next task's, a few cache lines per step over k
(`benchmarks/linear_forms.py` over SmolLM2's layers, fp32: 1.3-1.5x oneDNN's
packed product at 1-32 rows, 1.15x at 128, level at 512, 3% slower at 4096).

The weight is stored once, as panels of 16 output columns (`to_panels`;
zeros past N): a panel's step over k is one vector, so the tile is
broadcast-and-FMA with no horizontal sums. fp32 steps one k at a time. bf16,
on CPUs with bf16 dot products (`avx512_bf16`), steps two: a panel's step
holds the 16 columns' weights for k and k + 1 interleaved, and vdpbf16ps
adds both products (exact in fp32) to each column's fp32 sum; the output is
rounded to bf16 once. Over SmolLM2's layers that ran 1.25-1.96x oneDNN's
packed bf16 product at 1-32 rows, 1.07x at 128, 4-9% slower from 512 rows
(linear_forms-avx512-native-bf16.txt, an AMD Zen 4). Either way each output
is one sum over k in order, so a row's result does not depend on the batch
it came in. Long prefills take row blocks whose x stays in L2 while the
panels stream past it.
"""

from __future__ import annotations

import torch

PANEL = 16
"""Output columns per panel: one AVX-512 vector of floats."""

SOURCE = r"""
typedef Vec<16>::type Panel;  // 16 fp32 columns: a tile's accumulators, and a step's weights for one panel

// A panel kernel's element type: float (one k a step: x[k] broadcast, an FMA) or, where the CPU has bf16 dot
// products, bf16 (two k a step: vdpbf16ps adds x[k] w[k] + x[k+1] w[k+1] to each column, the products exact in
// fp32, so a column is still one sum over k in order). Either way a panel's step is 64 bytes: one vector.
#if defined(__AVX512BF16__)  // (immintrin.h included by the kernels' common part)
constexpr bool BF16_PANELS = true;
#else
constexpr bool BF16_PANELS = false;
#endif
typedef c10::BFloat16 bf16;
template <typename T> constexpr int64_t KSTEP = sizeof(float) / sizeof(T);

static inline Panel broadcast(const float* x) { return Panel{} + *x; }
static inline Panel broadcast(const bf16* x) {  // the pair x[k], x[k+1] in every 32-bit lane, as bits: an fp32
  int32_t pair;                                  // add could flush the pair (a denormal when x[k+1] is 0)
  std::memcpy(&pair, x, 4);
  typedef int32_t Pairs __attribute__((vector_size(64)));
  return (Panel)(Pairs{} + pair);
}
template <typename T> static inline Panel dot(Panel acc, Panel x, Panel w);
template <> inline Panel dot<float>(Panel acc, Panel x, Panel w) { return madd(acc, x, w); }
template <> inline Panel dot<bf16>(Panel acc, Panel x, Panel w) {
#if defined(__AVX512BF16__)
  return (Panel)_mm512_dpbf16_ps((__m512)acc, (__m512bh)x, (__m512bh)w);
#else
  return acc;  // never called: panel_linear refuses bf16 without the instruction
#endif
}

// y[p, 16 (q0 + c) + i] = sum_k x[p, k] w[q0 + c][k][i] (+ bias) for M rows and C panels of q0.., storing
// only columns < N (y's rows are N apart); fetching the next task's panels as it steps over k.
template <typename T, int M, int C>
static void panel_tile(const T* x, int64_t xs, int64_t K, const T* w, const T* bias, T* y,
                       int64_t q0, int64_t N, Ahead& next) {
  Panel acc[M][C];
  for (int p = 0; p < M; ++p) for (int c = 0; c < C; ++c) acc[p][c] = Panel{};
  const T* wq = w + q0 * K * 16;
  for (int64_t k = 0; k < K; k += KSTEP<T>) {
    next.step();
    Panel wv[C];
    for (int c = 0; c < C; ++c) wv[c] = vload<16>(reinterpret_cast<const float*>(wq + (c * K + k) * 16));
    for (int p = 0; p < M; ++p) {
      const Panel xv = broadcast(x + p * xs + k);
      for (int c = 0; c < C; ++c) acc[p][c] = dot<T>(acc[p][c], xv, wv[c]);
    }
  }
  for (int c = 0; c < C; ++c) {
    const int64_t n0 = (q0 + c) * 16, width = std::min<int64_t>(16, N - n0);
    for (int p = 0; p < M; ++p) {
      T* out = y + p * N + n0;
      if (width == 16) {
        vstore<16>(out, bias ? acc[p][c] + vload<16>(bias + n0) : acc[p][c]);  // bf16: rounded as torch rounds
      } else {
        for (int64_t i = 0; i < width; ++i) out[i] = static_cast<T>(acc[p][c][i] + (bias ? float(bias[n0 + i]) : 0.f));
      }
    }
  }
}

template <typename T, int M>
static void panel_rows(const T* x, int64_t xs, int64_t K, const T* w, const T* bias, T* y,
                       int64_t q0, int64_t q1, int64_t N, Ahead& next) {
  switch (q1 - q0) {
    case 3: panel_tile<T, M, 3>(x, xs, K, w, bias, y, q0, N, next); break;
    case 2: panel_tile<T, M, 2>(x, xs, K, w, bias, y, q0, N, next); break;
    default: panel_tile<T, M, 1>(x, xs, K, w, bias, y, q0, N, next);
  }
}

constexpr int64_t TASK_PANELS = 3, X_BLOCK_BYTES = 262144;  // a row block's x, kept in L2

template <typename T>
static void panel_product(const T* xp, int64_t xs, int64_t M, int64_t K, const T* wp, int64_t Q, const T* bp, T* yp,
                          int64_t N) {
  const int64_t tasks = (Q + TASK_PANELS - 1) / TASK_PANELS;
  const int64_t block = std::max<int64_t>(8, X_BLOCK_BYTES / std::max<int64_t>(1, K * sizeof(T)) / 8 * 8);
  const int64_t blocks = (M + block - 1) / block;
  // Threads share the tasks (each its own columns); where there are fewer than ~4 tasks a thread (many cores, a
  // narrow projection, many rows), the row blocks too, in groups: item i is task i % tasks of group i / tasks.
  const int64_t groups = std::min(blocks, std::max<int64_t>(1, (4 * at::get_num_threads() + tasks - 1) / tasks));
  at::parallel_for(0, groups * tasks, 1, [&](int64_t i0, int64_t i1) {
    for (int64_t g = i0 / tasks; g * tasks < i1; ++g) {
      const int64_t t0 = std::max(i0, g * tasks) - g * tasks, t1 = std::min(i1, (g + 1) * tasks) - g * tasks;
      const int64_t b1 = blocks * (g + 1) / groups;  // the group's row blocks end here
      for (int64_t b = blocks * g / groups; b < b1; ++b) {
        const int64_t r0 = b * block, r1 = std::min(M, r0 + block), tiles = (r1 - r0 + 7) / 8;
        for (int64_t t = t0; t < t1; ++t) {
          const int64_t q0 = t * TASK_PANELS, q1 = std::min(Q, q0 + TASK_PANELS);
          // the next task this thread runs: its panels are fetched during this one's steps over k
          const int64_t n = t + 1 < t1 ? t + 1 : b + 1 < b1 ? t0 : -1, nq0 = n * TASK_PANELS;
          Ahead next = n < 0 ? Ahead() : Ahead(wp + nq0 * K * 16, (std::min(Q, nq0 + TASK_PANELS) - nq0) * K * 16
                                               * sizeof(T), tiles * K / KSTEP<T>);
          for (int64_t p = r0; p < r1;) {
            const T* xr = xp + p * xs; T* yr = yp + p * N;
            const int64_t m = r1 - p >= 8 ? 8 : r1 - p >= 4 ? 4 : r1 - p >= 2 ? 2 : 1;
            switch (m) {
              case 8: panel_rows<T, 8>(xr, xs, K, wp, bp, yr, q0, q1, N, next); break;
              case 4: panel_rows<T, 4>(xr, xs, K, wp, bp, yr, q0, q1, N, next); break;
              case 2: panel_rows<T, 2>(xr, xs, K, wp, bp, yr, q0, q1, N, next); break;
              default: panel_rows<T, 1>(xr, xs, K, wp, bp, yr, q0, q1, N, next);
            }
            p += m;
          }
        }
      }
    }
  });
}

bool bf16_panels() { return BF16_PANELS; }

// x [M, K] float32, or bfloat16 where bf16_panels(); w: to_panels of an [N, K] weight of x's dtype; bias [N] or
// None. Returns [M, N].
torch::Tensor panel_linear(torch::Tensor x, torch::Tensor w, c10::optional<torch::Tensor> bias, int64_t N) {
  on_cpu({x, w, bias.has_value() ? *bias : torch::Tensor()});
  const auto dtype = w.scalar_type();
  TORCH_CHECK(x.scalar_type() == dtype && (dtype == at::kFloat || (dtype == at::kBFloat16 && BF16_PANELS)),
              "float32, or bfloat16 on a CPU with bf16 dot products");
  const int64_t step = dtype == at::kFloat ? 1 : 2;
  TORCH_CHECK(x.dim() == 2 && w.dim() == 3 && w.size(2) == 16 * step && w.is_contiguous(), "w must be to_panels'");
  const int64_t M = x.size(0), K = x.size(1), Q = w.size(0);
  TORCH_CHECK(w.size(1) * step == K && N > 16 * (Q - 1) && N <= 16 * Q, "x, w and N do not match");
  if (x.stride(1) != 1) x = x.contiguous();
  if (bias.has_value()) {
    TORCH_CHECK(bias->scalar_type() == dtype && bias->dim() == 1 && bias->size(0) == N, "bias must be [N], x's dtype");
    bias = bias->contiguous();
  }
  auto y = torch::empty({M, N}, x.options());
  if (M == 0) return y;
  pybind11::gil_scoped_release no_gil;
  if (dtype == at::kFloat) {
    panel_product<float>(x.data_ptr<float>(), x.stride(0), M, K, w.data_ptr<float>(), Q,
                         bias.has_value() ? bias->data_ptr<float>() : nullptr, y.data_ptr<float>(), N);
  } else {
    panel_product<bf16>(x.data_ptr<bf16>(), x.stride(0), M, K, w.data_ptr<bf16>(), Q,
                        bias.has_value() ? bias->data_ptr<bf16>() : nullptr, y.data_ptr<bf16>(), N);
  }
  return y;
}
"""


def to_panels(weight: torch.Tensor) -> torch.Tensor:
    """[N, K] (nn.Linear's order) -> panels of 16 output columns of W^T (zeros past N): fp32 [ceil(N / 16), K, 16],
    a panel's row k one vector; bf16 [ceil(N / 16), K / 2, 32], its row k / 2 the 16 columns' pairs (k, k + 1)
    interleaved, as vdpbf16ps takes them (K even)."""
    n, k = weight.shape
    step = 4 // weight.element_size()
    if k % step:
        raise ValueError(f"a {weight.dtype} weight's panels need an even number of input features, not {k}")
    padded = torch.zeros(-(-n // PANEL) * PANEL, k, dtype=weight.dtype, device=weight.device)
    padded[:n] = weight
    return padded.view(-1, PANEL, k // step, step).permute(0, 2, 1, 3).reshape(-1, k // step, PANEL * step).contiguous()
