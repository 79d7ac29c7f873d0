"""Decode attention on CPU that reads each sequence's KV blocks where they lie.

The plain path (`attention.py`) gathers every decoding sequence's blocks into
a padded copy, then runs SDPA over it: at a batch of 32 that copy and the
second read of it were a quarter of a decode step (the gather alone 15%). This
kernel walks each sequence's block table instead and reads every key and
value once, in place: per (sequence, KV head) it scores the head's query
group against the keys, takes a softmax, and sums the values.

It is a few lines of C++ built on first use with the compiler the machine has
(`torch.utils.cpp_extension.load_inline`, cached under torch's extensions
directory, per CPU: it is compiled for this one), float32 only. Where it
cannot be built, `kernel()` is None and decode attention gathers as before.
"""

from __future__ import annotations

import hashlib
import logging
import os
import platform
import threading
import time

import torch

from loraserve.dtypes import cpu_flags

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

// q [B, Hq, D]; kv [2, NB, BS, Hkv, D] (one layer's cache); tables [B, MB]; lens [B]: keys per sequence.
// Query head j*G + g attends with KV head j (G = Hq / Hkv), as SDPA's enable_gqa.
torch::Tensor paged_decode(torch::Tensor q, torch::Tensor kv, torch::Tensor tables, torch::Tensor lens,
                           double scale, int64_t window) {
  TORCH_CHECK(q.scalar_type() == at::kFloat && kv.scalar_type() == at::kFloat, "float32 only");
  TORCH_CHECK(kv.is_contiguous() && tables.scalar_type() == at::kLong && lens.scalar_type() == at::kLong);
  q = q.contiguous(); tables = tables.contiguous(); lens = lens.contiguous();
  const int64_t B = q.size(0), Hq = q.size(1), D = q.size(2);
  const int64_t NB = kv.size(1), BS = kv.size(2), Hkv = kv.size(3), MB = tables.size(1), G = Hq / Hkv;
  TORCH_CHECK(kv.size(0) == 2 && kv.size(4) == D && Hq % Hkv == 0 && tables.size(0) == B && lens.size(0) == B);
  TORCH_CHECK(B == 0 || (tables.min().item<int64_t>() >= 0 && tables.max().item<int64_t>() < NB
                         && lens.min().item<int64_t>() >= 1 && lens.max().item<int64_t>() <= MB * BS),
              "block table or length out of range");
  auto out = torch::empty_like(q);
  const float* qp = q.data_ptr<float>();
  const float* kp = kv.data_ptr<float>();
  const float* vp = kp + NB * BS * Hkv * D;
  const int64_t* tp = tables.data_ptr<int64_t>();
  const int64_t* lp = lens.data_ptr<int64_t>();
  float* op = out.data_ptr<float>();
  const float sc = static_cast<float>(scale);
  pybind11::gil_scoped_release no_gil;  // the server's other threads run meanwhile, as during torch's own ops
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s, acc(G * D);
    std::vector<const float*> rows;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv, len = lp[b];
      const int64_t first = window > 0 ? std::max<int64_t>(0, len - window) : 0, n = len - first;
      rows.resize(n);
      for (int64_t t = 0; t < n; ++t) {
        const int64_t pos = first + t;
        rows[t] = kp + ((tp[b * MB + pos / BS] * BS + pos % BS) * Hkv + h) * D;
      }
      s.resize(G * n);
      const float* qh = qp + (b * Hq + h * G) * D;
      for (int64_t g = 0; g < G; ++g) {
        const float* qg = qh + g * D;
        float* sg = s.data() + g * n;
        for (int64_t t = 0; t < n; ++t) {
          const float* k = rows[t];
          float dot = 0.f;
          for (int64_t d = 0; d < D; ++d) dot += qg[d] * k[d];
          sg[t] = dot * sc;
        }
        float m = sg[0];
        for (int64_t t = 1; t < n; ++t) m = std::max(m, sg[t]);
        float sum = 0.f;
        for (int64_t t = 0; t < n; ++t) { sg[t] = expf(sg[t] - m); sum += sg[t]; }
        const float inv = 1.f / sum;
        for (int64_t t = 0; t < n; ++t) sg[t] *= inv;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      const int64_t shift = vp - kp;
      for (int64_t t = 0; t < n; ++t) {
        const float* v = rows[t] + shift;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * n + t];
          float* a = acc.data() + g * D;
          for (int64_t d = 0; d < D; ++d) a[d] += p * v[d];
        }
      }
      std::copy(acc.begin(), acc.end(), op + (b * Hq + h * G) * D);
    }
  });
  return out;
}
"""

_lock = threading.Lock()
_built: list = []
"""[the op or None] once a build was tried."""


def kernel():
    """The paged decode op (q, kv, tables, lens, scale, window) -> out, or None where it cannot be built."""
    if not _built:
        with _lock:
            if not _built:
                _built.append(_build())
    return _built[0]


def _name() -> str:
    """The build's name. It is compiled with -march=native where the CPU's flags are known (x86),
    so it is named by them; elsewhere for the compiler's default target, named by the architecture."""
    tag = hashlib.sha1(" ".join([SOURCE, platform.machine(), *sorted(cpu_flags())]).encode()).hexdigest()[:12]
    return f"loraserve_paged_decode_{tag}"


STALE_LOCK_S = 600
"""A build lock older than this was left by a build that was killed: torch would wait on it forever."""


def _build():
    if os.environ.get("LORASERVE_CPU_ATTENTION", "1") == "0":
        return None
    path = os.environ.get("PATH")
    try:
        from torch.utils.cpp_extension import _get_build_directory, load_inline

        try:  # torch runs `ninja` from PATH, which lacks an unactivated virtualenv's bin
            import ninja

            os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, path) if p)
        except ImportError:
            pass
        name = _name()
        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
        start = time.perf_counter()
        module = load_inline(name, cpp_sources=SOURCE, functions=["paged_decode"],
                             extra_cflags=["-O3", "-ffast-math", "-fopenmp"] + (["-march=native"] if cpu_flags() else []),
                             extra_ldflags=["-lm", "-fopenmp"], verbose=False)
        log.info("CPU paged decode kernel ready (%.1f s; built once per machine, then cached)",
                 time.perf_counter() - start)
        return module.paged_decode
    except Exception as e:  # no compiler, no ninja, a read-only cache: gather instead
        log.warning("the CPU paged decode kernel could not be built (%s); decode attention gathers KV blocks",
                    str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def available(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether this decode group can take the kernel."""
    return (q.device.type == "cpu" and q.dtype == torch.float32 and kv.dtype == torch.float32
            and kv.is_contiguous() and kernel() is not None)
