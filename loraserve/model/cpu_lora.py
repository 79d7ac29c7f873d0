"""The CPU's LoRA kernel for steps of few rows per adapter (decode), part of `cpu_kernels`' build.

A decode step of 32 sequences over 8 adapters has 4 rows per adapter: its
LoRA is two small matmuls per adapter and projection, bound by reading the
adapter's weights (for SmolLM2 at rank 16, 156 MB a step against 538 MB of
base weights). As torch's batched matmuls each projection cost two to four
calls, each waking the other core's worker; and a fused projection's slices
(q, k, v; gate, up) would be one more call each. `lora_segments` does a
projection's whole update in one call: per adapter, the
shrink of its rows into registers, then each output slice's expand from the
slice's own rank columns, adding into the output in place, reading each of
A and B once per 4 rows (per 8 of a long segment on AVX-512, whose 32 registers hold
8 rows' accumulators) and only the adapter's own rank (`LoraBank.ranks`).
Rows are cut into tasks of up to 64 rows of one adapter, and the tasks into
one run per thread of about equal cost, so a prefill's long segments are
shared by the threads. On AVX-512 this beats torch's products at every size
measured, 1 to 1024 rows per adapter (`lora/batch.py`).

The sums are float32. The weights are float32 or bf16 (`--lora-dtype`, or a
bf16 model): bf16 ones widen exactly as they are read (a long segment's once,
into a float copy), so a bf16 copy halves the bytes that bound a decode step's
LoRA. The rows (x and out) have the model's dtype, float32 or bf16: a bf16
model's rows widen as they are read, and out is rounded once, after the
update is added to it in float32. The vector types are GCC's, so the same
source builds for AVX-512, AVX2 or NEON (a 16-float vector is then two or four
registers).
"""

SOURCE = r"""
static inline float wval(float v) { return v; }
static inline float wval(uint16_t v) {
  const uint32_t u = uint32_t(v) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}
// x and out have the model's dtype, float or bf16 (bits): bf16 rows are read widened, and out's sums rounded to
// nearest even once (the update is added to out in float32)
static inline void put(float* p, float v) { *p = v; }
static inline void put(uint16_t* p, float v) { *p = c10::BFloat16(v).x; }

// s[p, c0 : c0 + C L] = x[p, :] @ A[:, c0 : c0 + C L] for M rows (A [K, WR] row-major)
template <int M, int C, int L, typename T, typename X>
static void shrink_tile(const X* x, int64_t xs, const T* A, int64_t K, int64_t WR, int64_t c0, float* s,
                        Ahead& next) {
  typedef typename Vec<L>::type V;
  V acc[M][C];
  for (int p = 0; p < M; ++p) for (int c = 0; c < C; ++c) acc[p][c] = V{};
  for (int64_t k = 0; k < K; ++k) {
    next.step();
    V av[C];
    for (int c = 0; c < C; ++c) av[c] = vload<L>(A + k * WR + c0 + c * L);
    for (int p = 0; p < M; ++p) {
      const V xv = V{} + wval(x[p * xs + k]);
      for (int c = 0; c < C; ++c) acc[p][c] = madd(acc[p][c], xv, av[c]);
    }
  }
  for (int p = 0; p < M; ++p) for (int c = 0; c < C; ++c) vstore<L>(s + p * WR + c0 + c * L, acc[p][c]);
}

// out[p, n0 : n0 + C L] += s[p, so : so + r] @ B[0 : r, n0 : n0 + C L] for M rows (B [R, N] row-major)
template <int M, int C, int L, typename T, typename X>
static void expand_tile(const float* s, int64_t WR, int64_t so, const T* B, int64_t N, int64_t r, int64_t n0,
                        X* out, int64_t os, Ahead& next) {
  typedef typename Vec<L>::type V;
  V acc[M][C];
  for (int p = 0; p < M; ++p) for (int c = 0; c < C; ++c) acc[p][c] = vload<L>(out + p * os + n0 + c * L);
  for (int64_t k = 0; k < r; ++k) {
    next.step();
    V bv[C];
    for (int c = 0; c < C; ++c) bv[c] = vload<L>(B + k * N + n0 + c * L);
    for (int p = 0; p < M; ++p) {
      const V sv = V{} + s[p * WR + so + k];
      for (int c = 0; c < C; ++c) acc[p][c] = madd(acc[p][c], sv, bv[c]);
    }
  }
  for (int p = 0; p < M; ++p) for (int c = 0; c < C; ++c) vstore<L>(out + p * os + n0 + c * L, acc[p][c]);
}

// Tiles are SHRINK_C (EXPAND_C) vectors of VL floats wide, for M rows: M x C accumulators, C weight vectors and a
// broadcast within the registers (AVX-512: 32 of 16 floats; AVX2: 16 of 8)
#ifdef __AVX512F__
constexpr int SHRINK_C = 4, EXPAND_C = 4;
constexpr int MAX_ROWS = 8;  // a long segment's rows 8 at a time: half the weight reads from L2 of 4 at a time
#else
constexpr int SHRINK_C = 2, EXPAND_C = 2;
constexpr int MAX_ROWS = 4;
#endif

// The shrink's columns of A for an adapter of rank r in a bank of rank R over W slices: up to the last
// slice's rank columns, rounded up to 4 (the bank's padding columns are zeros).
static inline int64_t shrink_span(int64_t W, int64_t R, int64_t r) { return (W - 1) * R + (r + 3) / 4 * 4; }

// One adapter's M (<= MAX_ROWS) rows: the shrink of columns [0, (W - 1) R + r4) of A in passes of up to
// 16 SC columns (3 at 8 rows: 24 accumulators), each streaming A's rows once (r4 = r rounded up to 4: the
// bank's rank is a multiple of 4 and its padding columns are zeros; slice j's columns are [j R, j R + r)),
// then each slice's expand from its own shrink columns and B's first r rows.
template <int M, typename T, typename X>
static void lora_rows(const X* x, int64_t xs, const T* A, int64_t K, int64_t WR, const T* B, int64_t R,
                      int64_t N, int64_t r, const std::vector<int64_t>& edges, X* out, int64_t os, float* s,
                      Ahead& na, Ahead& nb) {
  const int64_t W = edges.size() - 1, span = shrink_span(W, R, r);
  constexpr int SC = M > 4 ? 3 : SHRINK_C;
  // bf16 rows widened once, for all of the shrink's passes: its broadcasts then read floats (a narrow A, as o's
  // and down's rank-16 ones, ran at half the bytes a second reading bf16 rows)
  const float* xf;
  int64_t xfs;
  if constexpr (std::is_same<X, float>::value) {
    xf = x;
    xfs = xs;
  } else {
    float* w = s + MAX_ROWS * WR;
    for (int p = 0; p < M; ++p) for (int64_t k = 0; k < K; ++k) w[p * K + k] = wval(x[p * xs + k]);
    xf = w;
    xfs = K;
  }
  for (int64_t c = 0; c < span;) {
    const int64_t left = span - c;
    if (SC >= 4 && left >= 4 * VL) { shrink_tile<M, SC >= 4 ? 4 : 1, VL>(xf, xfs, A, K, WR, c, s, na); c += 4 * VL; }
    else if (SC >= 3 && left >= 3 * VL) {
      shrink_tile<M, SC >= 3 ? 3 : 1, VL>(xf, xfs, A, K, WR, c, s, na); c += 3 * VL;
    }
    else if (left >= 2 * VL) { shrink_tile<M, 2, VL>(xf, xfs, A, K, WR, c, s, na); c += 2 * VL; }
    else if (left >= VL) { shrink_tile<M, 1, VL>(xf, xfs, A, K, WR, c, s, na); c += VL; }
    else if (left >= 8) { shrink_tile<M, 1, 8>(xf, xfs, A, K, WR, c, s, na); c += 8; }
    else { shrink_tile<M, 1, 4>(xf, xfs, A, K, WR, c, s, na); c += 4; }
  }
  for (int64_t j = 0; j < W; ++j) {
    int64_t n = edges[j];
    const int64_t n1 = edges[j + 1];
    if (M > 4) for (; n + 48 <= n1; n += 48) expand_tile<M, (M > 4 ? 3 : 1), 16>(s, WR, j * R, B, N, r, n, out, os, nb);
    else for (; n + EXPAND_C * VL <= n1; n += EXPAND_C * VL)
      expand_tile<M, EXPAND_C, VL>(s, WR, j * R, B, N, r, n, out, os, nb);
    for (; n + VL <= n1; n += VL) expand_tile<M, 1, VL>(s, WR, j * R, B, N, r, n, out, os, nb);
    for (; n + 4 <= n1; n += 4) expand_tile<M, 1, 4>(s, WR, j * R, B, N, r, n, out, os, nb);
    for (; n < n1; ++n)
      for (int p = 0; p < M; ++p) {
        float acc = 0.f;
        for (int64_t k = 0; k < r; ++k) acc = __builtin_fmaf(s[p * WR + j * R + k], wval(B[k * N + n]), acc);
        put(out + p * os + n, wval(out[p * os + n]) + acc);
      }
  }
}

// The groups' rows in tasks of up to TASK_ROWS rows of one group, the tasks cut into one contiguous run per
// thread of about equal cost (rows, plus TASK_COST for reading the group's weights): a prefill's long segments
// beside a decode's short ones would otherwise leave one thread all the work. A and B of type T (float, or
// bf16 bits: a task of more than WIDEN_ROWS rows reads its group's weights from a float copy, widened once per
// thread).
constexpr int64_t TASK_ROWS = 64, TASK_COST = 16, WIDEN_ROWS = 8, AHEAD_ROWS = 4;

template <typename T, typename X>
static void task_rows(const X* xp, int64_t xs, const T* A, int64_t K, int64_t WR, const T* B, int64_t R, int64_t N,
                      int64_t r, const std::vector<int64_t>& edges, X* outp, int64_t os, int64_t r0, int64_t end,
                      float* s, Ahead& na, Ahead& nb) {
  for (; r0 < end;) {
    const X* xr = xp + r0 * xs; X* orow = outp + r0 * os;
    if (MAX_ROWS > 4 && end - r0 >= 8) {
      lora_rows<(MAX_ROWS > 4 ? 8 : 4)>(xr, xs, A, K, WR, B, R, N, r, edges, orow, os, s, na, nb);
      r0 += 8;
      continue;
    }
    const int64_t m = std::min<int64_t>(4, end - r0);
    r0 += m;
    switch (m) {
      case 4: lora_rows<4>(xr, xs, A, K, WR, B, R, N, r, edges, orow, os, s, na, nb); break;
      case 3: lora_rows<3>(xr, xs, A, K, WR, B, R, N, r, edges, orow, os, s, na, nb); break;
      case 2: lora_rows<2>(xr, xs, A, K, WR, B, R, N, r, edges, orow, os, s, na, nb); break;
      default: lora_rows<1>(xr, xs, A, K, WR, B, R, N, r, edges, orow, os, s, na, nb);
    }
  }
}

template <typename T, typename X>
static void lora_groups(const X* xp, int64_t xs, const T* ap, const T* bp, const int* op, const int* rp,
                        int64_t G, int64_t K, int64_t WR, int64_t R, int64_t N, const std::vector<int64_t>& edges,
                        X* outp, int64_t os) {
  struct Task { int64_t g, r0, r1; };
  std::vector<Task> tasks;
  int64_t total = 0;
  for (int64_t g = 0; g < G; ++g) {
    const int64_t start = g ? op[g - 1] : 0, end = op[g];
    if (end <= start || rp[g] == 0) continue;
    for (int64_t r0 = start; r0 < end; r0 += TASK_ROWS) {
      tasks.push_back({g, r0, std::min(end, r0 + TASK_ROWS)});
      total += tasks.back().r1 - r0 + TASK_COST;
    }
  }
  const int64_t n = std::min<int64_t>(at::get_num_threads(), tasks.size());
  std::vector<size_t> cut(n + 1, tasks.size());
  cut[0] = 0;
  int64_t done = 0;
  for (size_t i = 0, t = 1; i < tasks.size(); ++i) {
    const int64_t cost = tasks[i].r1 - tasks[i].r0 + TASK_COST;
    done += cost;
    // thread t starts with the first task whose middle lies past the t/n-th share of the cost
    for (; t < (size_t)n && (2 * done - cost) * n >= 2 * total * (int64_t)t; ++t) cut[t] = i;
  }
  at::parallel_for(0, n, 1, [&](int64_t t0, int64_t t1) {
    // the shrink's sums, then (bf16 rows) a task's rows widened
    std::vector<float> s(MAX_ROWS * (WR + (std::is_same<X, float>::value ? 0 : K))), wide;
    int64_t widened = -1;  // the group whose weights `wide` holds: a thread's tasks of one group come in a row
    for (size_t i = cut[t0]; i < cut[t1]; ++i) {
      const int64_t g = tasks[i].g, r = rp[g];
      const T* A = ap + g * K * WR; const T* B = bp + g * R * N;
      // the next task's adapter, if another: its A fetched during this one's shrink, its B during the expand.
      // Not behind a task of 1-3 rows: that one's own reads already keep the memory busy (1-2 rows per adapter
      // ran 10-13% slower with it, 4 and 8 rows 5-12% faster)
      Ahead na, nb;
      if (i + 1 < cut[t1] && tasks[i + 1].g != g && tasks[i].r1 - tasks[i].r0 >= AHEAD_ROWS) {
        const int64_t h = tasks[i + 1].g;
        na = Ahead(ap + h * K * WR, K * WR * sizeof(T), K);
        nb = Ahead(bp + h * R * N, rp[h] * N * sizeof(T), r * std::max<int64_t>(1, N / 64));
      }
      if (std::is_same<T, float>::value || (widened != g && tasks[i].r1 - tasks[i].r0 <= WIDEN_ROWS)) {
        task_rows(xp, xs, A, K, WR, B, R, N, r, edges, outp, os, tasks[i].r0, tasks[i].r1, s.data(), na, nb);
        continue;
      }
      if (widened != g) {  // a long segment's bf16 weights, widened once rather than once per few rows
        // only what lora_rows reads: A's shrink columns, B's first r rows
        const int64_t span = shrink_span(edges.size() - 1, R, r);
        wide.resize(K * WR + R * N);
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = 0; c < span; ++c) wide[k * WR + c] = wval(A[k * WR + c]);
        for (int64_t j = 0; j < r * N; ++j) wide[K * WR + j] = wval(B[j]);
        widened = g;
      }
      task_rows(xp, xs, wide.data(), K, WR, wide.data() + K * WR, R, N, r, edges, outp, os, tasks[i].r0, tasks[i].r1,
                s.data(), na, nb);
    }
  });
}

// out[rows of g, slice j] += x[rows of g] @ a[g][:, j R : j R + r_g] @ b[g][:r_g, slice j], in place, for each
// group g (rows [offs[g-1], offs[g]) of x and out), r_g = ranks[g]. a [G, K, W R], b [G, R, N] (the bank's
// layout, targets.out_edges); edges: the W + 1 slice edges of N. x and out both float32 or both bfloat16 (out
// rounded once, after the update is added in float32); a and b both float32 or both bfloat16 (widened to float32
// as they are read: the math is float32 either way).
void lora_segments(torch::Tensor x, torch::Tensor a, torch::Tensor b, torch::Tensor offs, torch::Tensor ranks,
                   std::vector<int64_t> edges, torch::Tensor out) {
  on_cpu({x, a, b, offs, ranks, out});
  TORCH_CHECK(x.scalar_type() == out.scalar_type() && (x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16),
              "x and out must be both float32 or both bfloat16");
  TORCH_CHECK(a.scalar_type() == b.scalar_type() && (a.scalar_type() == at::kFloat || a.scalar_type() == at::kBFloat16),
              "a and b must be both float32 or both bfloat16");
  TORCH_CHECK(offs.scalar_type() == at::kInt && ranks.scalar_type() == at::kInt && offs.dim() == 1 && ranks.dim() == 1);
  TORCH_CHECK(a.dim() == 3 && b.dim() == 3 && x.dim() == 2 && out.dim() == 2 && edges.size() >= 2);
  a = a.contiguous(); b = b.contiguous(); offs = offs.contiguous(); ranks = ranks.contiguous();
  const int64_t G = a.size(0), K = a.size(1), WR = a.size(2), R = b.size(1), N = b.size(2), W = edges.size() - 1;
  TORCH_CHECK(b.size(0) == G && offs.size(0) == G && ranks.size(0) == G && x.size(1) == K && WR == W * R
              && R % 4 == 0 && out.size(1) == N && edges.front() == 0 && edges.back() == N, "shapes do not match");
  TORCH_CHECK(x.stride(1) == 1 && out.stride(1) == 1, "rows must be contiguous");
  for (int64_t j = 0; j < W; ++j) TORCH_CHECK(edges[j] <= edges[j + 1], "slice edges must not decrease");
  const int* op = offs.data_ptr<int>();
  const int* rp = ranks.data_ptr<int>();
  for (int64_t g = 0; g < G; ++g)
    TORCH_CHECK(op[g] >= (g ? op[g - 1] : 0) && op[g] <= std::min(x.size(0), out.size(0)) && rp[g] >= 0
                && rp[g] <= R, "segment ends or ranks out of range");
  const int64_t xs = x.stride(0), os = out.stride(0);
  pybind11::gil_scoped_release no_gil;
  auto run = [&](auto* xp, auto* outp) {
    if (a.scalar_type() == at::kFloat)
      lora_groups(xp, xs, a.data_ptr<float>(), b.data_ptr<float>(), op, rp, G, K, WR, R, N, edges, outp, os);
    else
      lora_groups(xp, xs, reinterpret_cast<const uint16_t*>(a.data_ptr<at::BFloat16>()),
                  reinterpret_cast<const uint16_t*>(b.data_ptr<at::BFloat16>()), op, rp, G, K, WR, R, N, edges, outp,
                  os);
  };
  if (x.scalar_type() == at::kFloat)
    run(static_cast<const float*>(x.data_ptr<float>()), out.data_ptr<float>());
  else
    run(reinterpret_cast<const uint16_t*>(x.data_ptr<at::BFloat16>()),
        reinterpret_cast<uint16_t*>(out.data_ptr<at::BFloat16>()));
}
"""
