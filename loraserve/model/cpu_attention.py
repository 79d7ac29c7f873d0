"""Decode attention that reads the KV cache where it lies; part of `cpu_kernels`' build.

The plain path (`attention.py`) gathers every decoding sequence's blocks into a
padded copy, then runs SDPA over it: at a batch of 32 that copy and the second
read of it were a quarter of a decode step (the gather alone 15%), and in bf16
torch's SDPA took 2.6 ms a layer at batch 32 (77 ms of a 180 ms step, on an
AMD Zen 4). `paged_decode` walks each sequence's block table instead and
reads every key and value once, in place: per (sequence, KV head) it scores
the head's query group against the keys (a key read once for the group's
heads, 16 of its values at a time, the rows 8 ahead asked for before their
use), takes a softmax, and sums the values. fp32 or bf16 caches, summed in
fp32; a bf16 output is rounded once. `write_kv` puts a step's new keys and
values into their slots.
"""

SOURCE = r"""
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
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
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
      // a key (and a value) read once for the group's G heads, 16 of its D at a time where D allows
      const bool vec = D % 16 == 0;
      constexpr int64_t AHEAD = 8;  // rows: each key and value row is asked for this many rows before its use
      auto ask = [&](const scalar_t* row) {
        const char* p = reinterpret_cast<const char*>(row);
        for (int64_t b0 = 0; b0 < D * int64_t(sizeof(scalar_t)); b0 += 64) __builtin_prefetch(p + b0, 0, 3);
      };
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* k = rows[t];
        if (t + AHEAD < n) ask(rows[t + AHEAD]);
        for (int64_t g = 0; g < G; ++g) {
          const float* qg = qf.data() + g * D;
          float dot = 0.f;
          if (vec) {
            Vec<16>::type part{};
            for (int64_t d = 0; d < D; d += 16) part = madd(part, vload<16>(qg + d), vload<16>(k + d));
            dot = hsum<16>(part);
          } else {
            for (int64_t d = 0; d < D; ++d) dot += qg[d] * f32(k[d]);
          }
          s[g * n + t] = dot * sc;
        }
      }
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * n;
        float m = sg[0];
        for (int64_t t = 1; t < n; ++t) m = std::max(m, sg[t]);
        for (int64_t t = 0; t < n; ++t) sg[t] = expf(sg[t] - m);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) sum += sg[t];
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < n; ++t) {
        const scalar_t* v = rows[t] + shift;
        if (t + AHEAD < n) ask(rows[t + AHEAD] + shift);
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * n + t];
          float* a = acc.data() + g * D;
          if (vec) {
            const Vec<16>::type pv = Vec<16>::type{} + p;
            for (int64_t d = 0; d < D; d += 16) vstore<16>(a + d, madd(vload<16>(a + d), pv, vload<16>(v + d)));
          } else {
            for (int64_t d = 0; d < D; ++d) a[d] += p * f32(v[d]);
          }
        }
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
