"""The few CPU kernels the model's step calls (float32 and bfloat16), compiled on first use.

- Decode attention that reads each sequence's KV blocks where they lie
  (`cpu_attention.py`).
- LoRA for steps of few rows per adapter (`cpu_lora.py`).
- Projections from weights kept as column panels (`cpu_linear.py`), fetching
  the next panels while multiplying these (`model/linear.py`): fp32, and bf16
  where the CPU has bf16 dot products.
- The glue between a layer's matmuls, each one pass over its rows
  (`model/ops.py` calls them): the residual add with the RMSNorm after it,
  RoPE in place, and SiLU(gate) * up. As torch ops they are 2-7 small ops
  each, and on a 2-core CPU each small op pays for waking the other core's
  worker (~5-30 µs): at batch 1 that glue was a fifth of the step. Here rows
  are split over threads only when there are enough of them
  (`at::parallel_for`'s grain), so a decode's glue runs on the calling thread.

All are a few lines of C++ built with the compiler the machine has
(`torch.utils.cpp_extension.load_inline`, cached under torch's extensions
directory, per CPU: it is compiled for this one). Each takes float32 or
bfloat16 tensors (the projections bf16 only with bf16 dot products) and sums
in float32; the glue rounds where torch's bf16 ops round. Where they cannot be
built, or with `LORASERVE_CPU_KERNELS=0`, `kernels()` is None and the model
runs torch's ops (projections on oneDNN's packed weights on AVX-512).
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
from loraserve.model.cpu_attention import SOURCE as ATTENTION_SOURCE
from loraserve.model.cpu_linear import SOURCE as LINEAR_SOURCE
from loraserve.model.cpu_lora import SOURCE as LORA_SOURCE

log = logging.getLogger(__name__)

SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <initializer_list>
#include <type_traits>
#include <vector>
#if defined(__FMA__) || defined(__AVX512F__)
#include <immintrin.h>
#endif

// Rows per task: a task gets at least ~16K elements, so a decode's few rows run on the calling thread
// rather than wake the pool's workers for microseconds of work.
static int64_t grain(int64_t width) { return std::max<int64_t>(1, 16384 / std::max<int64_t>(1, width)); }

// Every tensor a kernel reads through data_ptr must be in host memory: a CUDA pointer would be read as one.
static void on_cpu(std::initializer_list<torch::Tensor> ts) {
  for (const auto& t : ts) TORCH_CHECK(!t.defined() || t.device().is_cpu(), "CPU tensors only");
}

#if defined(__AVX512F__)
constexpr int VL = 16;  // floats in one vector register: the width the attention and LoRA kernels tile by
#else
constexpr int VL = 8;
#endif

// L floats as one vector of GCC's (the same source builds for AVX-512, AVX2 or NEON: a 16-float vector is then
// two or four registers), loaded and stored unaligned.
template <int L> struct Vec { typedef float type __attribute__((vector_size(L * 4), aligned(4))); };
template <int L> static inline typename Vec<L>::type vload(const float* p) {
  return *reinterpret_cast<const typename Vec<L>::type*>(p);
}
template <int L> static inline void vstore(float* p, typename Vec<L>::type v) {
  *reinterpret_cast<typename Vec<L>::type*>(p) = v;
}
// bf16 values (their bits, as uint16) widen exactly to float: the bits shifted into the high half
template <int L> struct Bits {
  typedef uint16_t half __attribute__((vector_size(L * 2)));
  typedef uint32_t word __attribute__((vector_size(L * 4)));
};
template <int L> static inline typename Vec<L>::type vload(const uint16_t* p) {
#if defined(__AVX512F__)
  if constexpr (L == 16)
    return (typename Vec<L>::type)_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256((const __m256i*)p)), 16);
#endif
  typename Bits<L>::half h;
  std::memcpy(&h, p, sizeof h);  // an unaligned load
  return (typename Vec<L>::type)(__builtin_convertvector(h, typename Bits<L>::word) << 16);
}
template <int L> static inline typename Vec<L>::type vload(const c10::BFloat16* p) {
  return vload<L>(reinterpret_cast<const uint16_t*>(p));
}
// ... and narrow to bf16 rounded to nearest even, NaN kept a NaN: what torch's float -> bf16 conversion does
template <int L> static inline void vstore(uint16_t* p, typename Vec<L>::type v) {
#if defined(__AVX512BF16__)  // one instruction (it reads denormal floats as zeros: a difference below 1e-38)
  if constexpr (L == 16) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), (__m256i)_mm512_cvtneps_pbh((__m512)v));
    return;
  }
#endif
  typename Bits<L>::word u;
  std::memcpy(&u, &v, sizeof u);
  const typename Bits<L>::word nan = (u & 0x7fffffffu) > 0x7f800000u;  // not v != v: -ffast-math assumes no NaN
  const typename Bits<L>::word r = nan ? 0x7fc0u : (u + 0x7fffu + ((u >> 16) & 1u)) >> 16;
  const typename Bits<L>::half h = __builtin_convertvector(r, typename Bits<L>::half);
  std::memcpy(p, &h, sizeof h);
}
template <int L> static inline void vstore(c10::BFloat16* p, typename Vec<L>::type v) {
  vstore<L>(reinterpret_cast<uint16_t*>(p), v);
}
template <int L> static inline float hsum(typename Vec<L>::type v) {
  float s = 0.f;
  for (int i = 0; i < L; ++i) s += v[i];
  return s;
}
// acc + a b, fused in every lane. Written as `acc += a * b` the compiler fuses some tiles' products and not
// others' (on an AMD Zen 4 a row's 4- and 8-float tiles were left unfused): a row's sums would then depend on the
// tile it fell in, and so on its batch. x86's FMA instructions fuse every time; elsewhere (NEON) the compiler's
// contraction stands.
template <typename V> static inline V madd(V acc, V a, V b) {
#if defined(__AVX512F__)
  if constexpr (sizeof(V) == 64) return (V)_mm512_fmadd_ps((__m512)a, (__m512)b, (__m512)acc);
#elif defined(__FMA__)
  if constexpr (sizeof(V) == 64) {  // two registers
    __m256 x[2], y[2], z[2];
    std::memcpy(x, &a, 64); std::memcpy(y, &b, 64); std::memcpy(z, &acc, 64);
    for (int h = 0; h < 2; ++h) z[h] = _mm256_fmadd_ps(x[h], y[h], z[h]);
    std::memcpy(&acc, z, 64);
    return acc;
  }
#endif
#if defined(__FMA__)
  if constexpr (sizeof(V) == 32) return (V)_mm256_fmadd_ps((__m256)a, (__m256)b, (__m256)acc);
  if constexpr (sizeof(V) == 16) return (V)_mm_fmadd_ps((__m128)a, (__m128)b, (__m128)acc);
#endif
  return acc + a * b;
}

// Weights fetched ahead of their use: `lines` cache lines per step of a kernel's inner loop, through the `bytes`
// from `base` (the next task's weights). The hardware's prefetcher follows a stream only once its reads have
// begun, and at a task's start waits out the memory's latency: fetched during the task before, SmolLM2's
// batch-1 matmuls read their weights at 28 GB/s where they read 22 (19.7 against 24.9 ms, panel kernel).
struct Ahead {
  const char* base = nullptr;
  int64_t bytes = 0, done = 0, lines = 0;
  Ahead() = default;
  Ahead(const void* begin, int64_t n, int64_t steps)
      : base(static_cast<const char*>(begin)), bytes(n), lines(n / 64 / std::max<int64_t>(1, steps) + 1) {}
  inline void step() {
    for (int64_t l = 0; l < lines && done < bytes; ++l, done += 64) __builtin_prefetch(base + done, 0, 2);
  }
};

// The kernels below take float32 or bfloat16 tensors and compute in float32. The glue rounds where torch's bf16
// ops round (each op's result), so bf16 gives what the torch path gives, up to the order of a sum.
template <typename T> static inline float f32(T v) { return static_cast<float>(v); }
template <typename T> static inline T rnd(float v) { return static_cast<T>(v); }  // bf16: round to nearest even

#define GLUE_DISPATCH(dtype, ...)                                                          \
  if ((dtype) == at::kFloat) { using scalar_t = float; __VA_ARGS__(); }                   \
  else if ((dtype) == at::kBFloat16) { using scalar_t = c10::BFloat16; __VA_ARGS__(); }   \
  else TORCH_CHECK(false, "float32 or bfloat16 only");

// x [T, H] (the residual stream) += d in place (d may be None); returns rms_norm(x) * w, as HF's RMSNorm
// rounds it: the norm in float32 (the mean accumulated in double), rounded, then scaled by w.
torch::Tensor add_rms_norm(torch::Tensor x, c10::optional<torch::Tensor> d, torch::Tensor w, double eps) {
  on_cpu({x, w, d.has_value() ? *d : torch::Tensor()});
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && w.scalar_type() == x.scalar_type());
  const int64_t T = x.size(0), H = x.size(1);
  TORCH_CHECK(w.numel() == H && w.is_contiguous(), "norm weight does not match");
  torch::Tensor dc;
  if (d.has_value()) {
    dc = d->contiguous();
    TORCH_CHECK(dc.scalar_type() == x.scalar_type() && dc.dim() == 2 && dc.size(0) == T && dc.size(1) == H);
  }
  auto out = torch::empty_like(x);
  const float e = static_cast<float>(eps);
  GLUE_DISPATCH(x.scalar_type(), [&] {
    scalar_t* xp = x.data_ptr<scalar_t>(); const scalar_t* wp = w.data_ptr<scalar_t>();
    const scalar_t* dp = dc.defined() ? dc.data_ptr<scalar_t>() : nullptr;
    scalar_t* op = out.data_ptr<scalar_t>();
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, T, grain(H), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        scalar_t* xr = xp + t * H; scalar_t* o = op + t * H;
        if (dp) { const scalar_t* dr = dp + t * H; for (int64_t i = 0; i < H; ++i) xr[i] = rnd<scalar_t>(f32(xr[i]) + f32(dr[i])); }
        double ss = 0.0;
        for (int64_t i = 0; i < H; ++i) ss += static_cast<double>(f32(xr[i])) * f32(xr[i]);
        const float r = 1.f / std::sqrt(static_cast<float>(ss / H) + e);
        for (int64_t i = 0; i < H; ++i) o[i] = rnd<scalar_t>(f32(wp[i]) * f32(rnd<scalar_t>(f32(xr[i]) * r)));
      }
    });
  });
  return out;
}

// HF's rotate-half RoPE in place on qk [T, heads, D] (D contiguous), with float32 cos, sin [T, D/2] (the step's
// rows), computed in float32 and rounded once.
void rope_(torch::Tensor qk, torch::Tensor cos, torch::Tensor sin) {
  on_cpu({qk, cos, sin});
  TORCH_CHECK(cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat);
  TORCH_CHECK(qk.dim() == 3 && qk.stride(2) == 1 && qk.size(2) % 2 == 0);
  const int64_t T = qk.size(0), NH = qk.size(1), half = qk.size(2) / 2;
  cos = cos.contiguous(); sin = sin.contiguous();
  TORCH_CHECK(cos.dim() == 2 && cos.size(0) == T && cos.size(1) == half && sin.sizes() == cos.sizes());
  const float* cp = cos.data_ptr<float>(); const float* sp = sin.data_ptr<float>();
  const int64_t s0 = qk.stride(0), s1 = qk.stride(1);
  GLUE_DISPATCH(qk.scalar_type(), [&] {
    scalar_t* xp = qk.data_ptr<scalar_t>();
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, T, grain(NH * 2 * half), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const float* c = cp + t * half; const float* s = sp + t * half;
        for (int64_t h = 0; h < NH; ++h) {
          scalar_t* x = xp + t * s0 + h * s1;
          for (int64_t i = 0; i < half; ++i) {
            const float x1 = f32(x[i]), x2 = f32(x[i + half]);
            x[i] = rnd<scalar_t>(x1 * c[i] - x2 * s[i]);
            x[i + half] = rnd<scalar_t>(x2 * c[i] + x1 * s[i]);
          }
        }
      }
    });
  });
}

// gate_up [T, 2I] (gate, then up) -> silu(gate) * up [T, I]; silu's result is rounded before the product, as
// torch's two ops round.
torch::Tensor silu_mul(torch::Tensor gu) {
  on_cpu({gu});
  TORCH_CHECK(gu.dim() == 2 && gu.is_contiguous() && gu.size(1) % 2 == 0);
  const int64_t T = gu.size(0), I = gu.size(1) / 2;
  auto out = torch::empty({T, I}, gu.options());
  GLUE_DISPATCH(gu.scalar_type(), [&] {
    const scalar_t* gp = gu.data_ptr<scalar_t>(); scalar_t* op = out.data_ptr<scalar_t>();
    pybind11::gil_scoped_release no_gil;
    at::parallel_for(0, T, grain(2 * I), [&](int64_t begin, int64_t end) {
      for (int64_t t = begin; t < end; ++t) {
        const scalar_t* g = gp + t * 2 * I; const scalar_t* u = g + I; scalar_t* o = op + t * I;
        // torch's g / (1 + exp(-g)); the exponent capped below exp's overflow, which -ffast-math turns into NaN
        for (int64_t i = 0; i < I; ++i) {
          const float gv = f32(g[i]);
          o[i] = rnd<scalar_t>(f32(rnd<scalar_t>(gv / (1.f + std::exp(std::min(-gv, 88.f))))) * f32(u[i]));
        }
      }
    });
  });
  return out;
}
"""

SOURCE += ATTENTION_SOURCE + LORA_SOURCE + LINEAR_SOURCE

FUNCTIONS = ["paged_decode", "write_kv", "add_rms_norm", "rope_", "silu_mul", "lora_segments", "panel_linear",
             "bf16_panels"]

_lock = threading.Lock()
_built: list = []
"""[the module or None] once a build was tried."""


def kernels():
    """The compiled module (its ops are FUNCTIONS), or None where it cannot be built."""
    if not _built:
        with _lock:
            if not _built:
                _built.append(_build())
    return _built[0]


def _name() -> str:
    """The build's name. It is compiled with -march=native where the CPU's flags are known (x86),
    so it is named by them; elsewhere for the compiler's default target, named by the architecture."""
    tag = hashlib.sha1(" ".join([SOURCE, platform.machine(), *sorted(cpu_flags())]).encode()).hexdigest()[:12]
    return f"loraserve_cpu_kernels_{tag}"


STALE_LOCK_S = 600
"""A build lock older than this was left by a build that was killed: torch would wait on it forever."""


def _build():
    if "0" in (os.environ.get("LORASERVE_CPU_KERNELS"), os.environ.get("LORASERVE_CPU_ATTENTION")):  # the old name too
        return None
    try:
        start = time.perf_counter()
        module = build(_name(), SOURCE)
        log.info("CPU kernels ready (%.1f s; built once per machine, then cached)", time.perf_counter() - start)
        return module
    except Exception as e:  # no compiler, no ninja, a read-only cache: torch's ops instead
        log.warning("the CPU kernels could not be built (%s); the model runs torch's ops (decode attention "
                    "gathers KV blocks)", str(e).splitlines()[0] if str(e) else type(e).__name__)
        return None


def build(name: str, source: str, march: str | None = None):
    """`source` (SOURCE, or another revision's: benchmarks/kernel_builds.py) compiled as module `name`, for
    this CPU, or for `march` (e.g. "haswell": an AVX2 CPU's code). Raises where it cannot be built."""
    from torch.utils.cpp_extension import _get_build_directory, load_inline

    path = os.environ.get("PATH")
    try:
        try:  # torch runs `ninja` from PATH, which lacks an unactivated virtualenv's bin
            import ninja

            os.environ["PATH"] = os.pathsep.join(p for p in (ninja.BIN_DIR, path) if p)
        except ImportError:
            pass
        lock = os.path.join(_get_build_directory(name, verbose=False), "lock")
        if os.path.exists(lock) and time.time() - os.path.getmtime(lock) > STALE_LOCK_S:
            os.remove(lock)
        target = [f"-march={march}"] if march else ["-march=native"] if cpu_flags() else []
        return load_inline(name, cpp_sources=source, functions=FUNCTIONS, extra_cflags=["-O3", "-ffast-math", "-fopenmp"]
                           + target, extra_ldflags=["-lm", "-fopenmp"], verbose=False)
    finally:
        if path is None:
            os.environ.pop("PATH", None)
        else:
            os.environ["PATH"] = path


def attention_available(q: torch.Tensor, kv: torch.Tensor) -> bool:
    """Whether this decode group can take `paged_decode` (and the step's K/V `write_kv`)."""
    return (q.device.type == "cpu" and q.dtype in (torch.float32, torch.bfloat16) and kv.dtype == q.dtype
            and kv.is_contiguous() and kernels() is not None)


def fused_available(x: torch.Tensor) -> bool:
    """Whether the glue ops on `x` can take the compiled kernels."""
    return x.device.type == "cpu" and x.dtype in (torch.float32, torch.bfloat16) and kernels() is not None
