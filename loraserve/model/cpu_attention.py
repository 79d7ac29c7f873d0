"""Decode attention that reads the KV cache where it lies; part of `cpu_kernels`' build.

The plain path (`attention.py`) gathers every decoding sequence's blocks into a
padded copy, then runs SDPA over it: at a batch of 32 that copy and the second
read of it were a quarter of a decode step (the gather alone 15%), and in bf16
torch's SDPA took 2.6 ms a layer at batch 32 (77 ms of a 180 ms step, on an
AMD Zen 4). `paged_decode` walks each sequence's block table instead and
reads every key and value once, in place: per (sequence, KV head) it scores
the head's query group against the keys, takes a softmax, and sums the
values. A pass holds a few query heads' queries (then their sums) in vector
registers over all the keys, loading (and widening, bf16) each key and value
row once for them, the rows 8 ahead asked for before their use. At SmolLM2's
shapes on an AMD Zen 4 that took a batch-32 decode layer (200 keys each) from
348 to 155 us in bf16 and 312 to 142 in fp32, with the same bits, against
scoring one head at a time with its sums in memory. fp32 or bf16 caches,
summed in fp32; a bf16 output is rounded once. `write_kv` puts a step's new
keys and values into their slots.
"""

SOURCE = r"""
// Rows ahead of their use that a key's (or value's) row is asked for: the rows of a sequence lie in blocks
// scattered over the cache, where the hardware's prefetcher cannot follow them.
constexpr int64_t AHEAD = 8;
template <typename T> static inline void ask_row(const T* row, int64_t D) {
  const char* p = reinterpret_cast<const char*>(row);
  for (int64_t b = 0; b < D * int64_t(sizeof(T)); b += 64) __builtin_prefetch(p + b, 0, 3);
}

// softmax over each of the G heads' n scores, in place
static inline void softmax_rows(float* s, int64_t G, int64_t n) {
  for (int64_t g = 0; g < G; ++g) {
    float* sg = s + g * n;
    float m = sg[0];
    for (int64_t t = 1; t < n; ++t) m = std::max(m, sg[t]);
    for (int64_t t = 0; t < n; ++t) sg[t] = expf(sg[t] - m);
    float sum = 0.f;
    for (int64_t t = 0; t < n; ++t) sum += sg[t];
    const float inv = 1.f / sum;
    for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
  }
}

// GC of a (sequence, KV head)'s query heads (qf [GC, D], float) against the n keys at rows[t]: their scores into
// s (head g's at s + g n). D = VL DV: the heads' queries stay in registers over all n keys, and a key's row is
// loaded, and a bf16 one widened, once for the GC heads.
template <int DV, int GC, typename T>
static void score_heads(const float* qf, int64_t n, const T* const* rows, float sc, float* s, bool ask) {
  typedef Vec<VL>::type V;
  V qv[GC][DV];
  for (int g = 0; g < GC; ++g) for (int i = 0; i < DV; ++i) qv[g][i] = vload<VL>(qf + (g * DV + i) * VL);
  for (int64_t t = 0; t < n; ++t) {
    if (ask && t + AHEAD < n) ask_row(rows[t + AHEAD], VL * DV);
    V k[DV];
    for (int i = 0; i < DV; ++i) k[i] = vload<VL>(rows[t] + VL * i);
    for (int g = 0; g < GC; ++g) {
      V part = madd(V{}, qv[g][0], k[0]);
      for (int i = 1; i < DV; ++i) part = madd(part, qv[g][i], k[i]);
      s[g * n + t] = hsum<VL>(part) * sc;
    }
  }
}

// ... and once softmax_rows has made the scores weights, the GC heads' sums of the values (`shift` past their
// keys) into acc [GC, D], held in registers likewise
template <int DV, int GC, typename T>
static void sum_heads(const float* s, int64_t n, const T* const* rows, int64_t shift, float* acc, bool ask) {
  typedef Vec<VL>::type V;
  V a[GC][DV];
  for (int g = 0; g < GC; ++g) for (int i = 0; i < DV; ++i) a[g][i] = V{};
  for (int64_t t = 0; t < n; ++t) {
    if (ask && t + AHEAD < n) ask_row(rows[t + AHEAD] + shift, VL * DV);
    V v[DV];
    for (int i = 0; i < DV; ++i) v[i] = vload<VL>(rows[t] + shift + VL * i);
    for (int g = 0; g < GC; ++g) {
      const V p = V{} + s[g * n + t];
      for (int i = 0; i < DV; ++i) a[g][i] = madd(a[g][i], p, v[i]);
    }
  }
  for (int g = 0; g < GC; ++g) for (int i = 0; i < DV; ++i) vstore<VL>(acc + (g * DV + i) * VL, a[g][i]);
}

// One (sequence, KV head): its G query heads (qf [G, D]) against its n keys, into acc [G, D]; the heads in
// passes of up to 4 (2 at D = 128), which keep 16-24 of AVX-512's 32 vector registers busy (AVX2 has 16 of half
// the width: passes of 1-2 heads)
template <int DV, typename T>
static void attend_head(const float* qf, int64_t G, int64_t n, const T* const* rows, int64_t shift, float sc,
                        float* s, float* acc) {
#if defined(__AVX512F__)
  constexpr int64_t MAXG = DV >= 8 ? 2 : 4;
#else
  constexpr int64_t MAXG = DV >= 8 ? 1 : 2;
#endif
  constexpr int64_t D = VL * DV;
  auto passes = [&](auto pass) {
    for (int64_t g = 0; g < G;) {
      const int64_t c = std::min(G - g, MAXG);
      switch (c) {
        case 1: pass(std::integral_constant<int, 1>{}, g); break;
        case 2: pass(std::integral_constant<int, 2>{}, g); break;
        case 3: pass(std::integral_constant<int, (MAXG >= 3 ? 3 : 1)>{}, g); break;
        default: pass(std::integral_constant<int, (MAXG >= 4 ? 4 : 1)>{}, g);
      }
      g += c;
    }
  };
  passes([&](auto gc, int64_t g) { score_heads<DV, gc.value>(qf + g * D, n, rows, sc, s + g * n, g == 0); });
  softmax_rows(s, G, n);
  passes([&](auto gc, int64_t g) { sum_heads<DV, gc.value>(s + g * n, n, rows, shift, acc + g * D, g == 0); });
}

// ... and for any D, a value at a time
template <typename T>
static void attend_head_any(const float* qf, int64_t G, int64_t D, int64_t n, const T* const* rows, int64_t shift,
                            float sc, float* s, float* acc) {
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; ++g) {
      float dot = 0.f;
      for (int64_t d = 0; d < D; ++d) dot += qf[g * D + d] * f32(rows[t][d]);
      s[g * n + t] = dot * sc;
    }
  softmax_rows(s, G, n);
  std::fill(acc, acc + G * D, 0.f);
  for (int64_t t = 0; t < n; ++t)
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += s[g * n + t] * f32(rows[t][shift + d]);
}

// q [B, Hq, D]; kv [2, NB, BS, Hkv, D] (one layer's cache), both float32 or both bfloat16 (computed in float32,
// the output rounded once); tables [B, MB]; lens [B]: keys per sequence.
// Query head j*G + g attends with KV head j (G = Hq / Hkv), as SDPA's enable_gqa.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv, torch::Tensor tables, torch::Tensor lens,
                           double scale, int64_t window) {
  on_cpu({q, kv, tables, lens});
  TORCH_CHECK(q.scalar_type() == kv.scalar_type(), "q and kv must have one dtype");
  TORCH_CHECK(kv.is_contiguous() && tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong);
  TORCH_CHECK(q.dim() == 3 && kv.dim() == 5 && tables.dim() == 2 && lens.dim() == 1 && kv.size(3) > 0);
  q = q.contiguous(); tables = tables.contiguous(); lens = lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = kv.size(1), BS = kv.size(2), Hkv = kv.size(3), MB = tables.size(1), G = Hq / Hkv;
  TORCH_CHECK(kv.size(0) == 2 && kv.size(4) == D && Hq % Hkv == 0 && tables.size(0) == B && lens.size(0) == B);
  auto out = torch::empty_like(q);
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  const float sc = static_cast<float>(scale);
  std::atomic<bool> bad{false};
  GLUE_DISPATCH(q.scalar_type(), [&] {
  const scalar_t* qp = q.data_ptr<scalar_t>();
  const scalar_t* kp = kv.data_ptr<scalar_t>();
  const int64_t shift = NB * BS * Hkv * D;  // a key's value, that far into the V half
  scalar_t* op = out.data_ptr<scalar_t>();
  pybind11::gil_scoped_release no_gil;  // the server's other threads run meanwhile, as during torch's own ops
  // (sequence, KV head) items per task: at least ~2048 (key, query head) pairs, so that a short batch-1 decode
  // runs on the calling thread (waking the other core's worker cost more than the half it would take: SmolLM2,
  // one sequence of 144 keys, 8.7 us a layer on two threads, 8.1 on one)
  int64_t keys = 0;
  for (int64_t b = 0; b < B; ++b) keys += window > 0 ? std::min<int64_t>(lp[b], window) : lp[b];
  const int64_t per_item = std::max<int64_t>(1, keys * G / std::max<int64_t>(1, B));
  at::parallel_for(0, B * Hkv, std::max<int64_t>(1, 2048 / per_item), [&](int64_t begin, int64_t end) {
    std::vector<float> s, acc(G * D), qf(G * D);
    std::vector<const scalar_t*> rows;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, len = lp[b];
      // checked here, not by reductions over the tables first: those were 4 more ops per layer
      if (len < 1 || len > MB * BS) { bad = true; continue; }
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - first;
      rows.resize(n);
      bool ok = true;
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = first + t, block = tp[b * MB + pos / BS];
        if (block < 0 || block >= NB) { ok = false; break; }
        rows[t] = kp + ((block * BS + pos % BS) * Hkv + h) * D;
      }
      if (!ok) { bad = true; continue; }
      s.resize(G * n);
      const scalar_t* qh = qp + (b * Hq + h * G) * D;
      for (int64_t j = 0; j < G * D; ++j) qf[j] = f32(qh[j]);
      switch (D % VL ? 0 : D / VL) {  // the head's D in registers where it is a few vectors
        case 1: attend_head<1>(qf.data(), G, n, rows.data(), shift, sc, s.data(), acc.data()); break;
        case 2: attend_head<2>(qf.data(), G, n, rows.data(), shift, sc, s.data(), acc.data()); break;
        case 4: attend_head<4>(qf.data(), G, n, rows.data(), shift, sc, s.data(), acc.data()); break;
        case 8: attend_head<8>(qf.data(), G, n, rows.data(), shift, sc, s.data(), acc.data()); break;
        case 16: attend_head<16>(qf.data(), G, n, rows.data(), shift, sc, s.data(), acc.data()); break;
        default: attend_head_any(qf.data(), G, D, n, rows.data(), shift, sc, s.data(), acc.data());
      }
      scalar_t* o = op + (b * Hq + h * G) * D;
      for (int64_t j = 0; j < G * D; ++j) o[j] = rnd<scalar_t>(acc[j]);
    }
  });
  });
  TORCH_CHECK(!bad, "block table or length out of range");
  return out;
}

// kv [2, NB, BS, Hkv, D] (one layer's cache): row t of k and v ([T, Hkv, D], D contiguous; kv's dtype) into slot
// slots[t].
void write_kv(torch::Tensor kv, torch::Tensor slots, torch::Tensor k, torch::Tensor v) {
  on_cpu({kv, slots, k, v});
  TORCH_CHECK(k.scalar_type() == kv.scalar_type() && v.scalar_type() == kv.scalar_type(), "k, v and kv: one dtype");
  TORCH_CHECK(kv.is_contiguous() && kv.dim() == 5 && kv.size(0) == 2, "kv must be one layer's [2, NB, BS, H, D]");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.dim() == 1 && k.dim() == 3 && v.dim() == 3);
  slots = slots.contiguous();
  const int64_t T = k.size(0), H = kv.size(3), D = kv.size(4), capacity = kv.size(1) * kv.size(2);
  TORCH_CHECK(slots.size(0) == T && v.size(0) == T && k.size(1) == H && v.size(1) == H && k.size(2) == D
              && v.size(2) == D && k.stride(2) == 1 && v.stride(2) == 1, "k, v and slots do not match the cache");
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t t = 0; t < T; ++t) TORCH_CHECK(sp[t] >= 0 && sp[t] < capacity, "slot out of range");
  const int64_t k0 = k.stride(0), k1 = k.stride(1), v0 = v.stride(0), v1 = v.stride(1);
  GLUE_DISPATCH(kv.scalar_type(), [&] {
    scalar_t* kc = kv.data_ptr<scalar_t>();
    scalar_t* vc = kc + capacity * H * D;
    const scalar_t* kp = k.data_ptr<scalar_t>(); const scalar_t* vp = v.data_ptr<scalar_t>();
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, T, grain(2 * H * D), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t)
        for (int64_t h = 0; h < H; ++h) {
          std::copy(kp + t * k0 + h * k1, kp + t * k0 + h * k1 + D, kc + (sp[t] * H + h) * D);
          std::copy(vp + t * v0 + h * v1, vp + t * v0 + h * v1 + D, vc + (sp[t] * H + h) * D);
        }
    });
  });
}

"""
