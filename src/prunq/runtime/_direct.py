"""A direct sparse convolution kernel for CPUs (C++ / OpenMP, compiled on first use).

Why not ``unfold`` + CSR: a k×k conv's im2col writes ``C·k·k`` floats per output pixel, more memory
traffic than oneDNN's whole dense conv; at 95 % sparsity a StereoNet layer ran 5–10× *slower* that way.
This kernel does only the non-zero weights' work and reads the input in place:

* weights are stored CSR per output channel as ``(flat offset, value)``: weight ``(co, ci, ky, kx)``
  reads input plane ``ci`` shifted by ``(ky·d − p, kx·d − p)``;
* for each output row and a block of ``BW`` contiguous output columns, the accumulators stay in vector
  registers (``vector_size(64)``: 16 floats) while the non-zeros of that output channel stream past;
  bias and ReLU are applied in the same pass (BatchNorm folded by the caller);
* stride 1 (:class:`PlanS1`) runs straight on the unpadded input: interior columns vectorised, border
  columns scalar with bounds checks, out-of-range rows skipped; other strides (:class:`PlanStrided`) copy
  the zero-padded input once into ``s·s`` phase planes (space-to-depth), which turns the conv into a
  stride-1 one over ``s·s·C`` planes.

Row tiles × batch are spread over OpenMP threads (``torch.set_num_threads`` applies). Built with
``torch.utils.cpp_extension.load_inline`` (g++ and ninja — the ``sparse`` extra installs ninja —,
``-O3 -march=native -fopenmp``; about 25 s the first time, then cached by torch under its extensions
directory, keyed by the source and the CPU). :func:`available` says whether it could be built, and why not.
"""

from __future__ import annotations

import hashlib
from typing import Any

import torch

__all__ = ["available", "make_plan", "PlanS1", "PlanStrided"]

CPP = r"""
#include <torch/extension.h>
#include <omp.h>

typedef float vf __attribute__((vector_size(64), aligned(4)));  // 16 floats, unaligned loads OK

template <int BW>
static void run(const float* __restrict X, int64_t B, int64_t planeN_total, const int64_t* __restrict rowptr,
                const int64_t* __restrict offs, const float* __restrict vals, const float* __restrict bias,
                float* __restrict Y, int64_t Cout, int64_t Ho, int64_t Wo, int64_t Wq, bool relu, int64_t rows_per_task) {
  constexpr int NV = BW / 16;
  const int64_t nxb = (Wo + BW - 1) / BW;
  const int64_t ntiles = (Ho + rows_per_task - 1) / rows_per_task;
  #pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < ntiles; ++t) {
      const float* Xb = X + b * planeN_total;
      const int64_t y0 = t * rows_per_task, y1 = std::min(Ho, y0 + rows_per_task);
      for (int64_t co = 0; co < Cout; ++co) {
        const int64_t e0 = rowptr[co], e1 = rowptr[co + 1];
        const float bv = bias ? bias[co] : 0.f;
        float* Yc = Y + (b * Cout + co) * Ho * Wo;
        for (int64_t y = y0; y < y1; ++y) {
          for (int64_t xb = 0; xb < nxb; ++xb) {
            const int64_t x0 = xb * BW;
            const float* Xr = Xb + y * Wq + x0;
            vf acc[NV];
            #pragma GCC unroll 16
            for (int k = 0; k < NV; ++k) acc[k] = vf{} + bv;
            for (int64_t e = e0; e < e1; ++e) {
              const vf w = vf{} + vals[e];
              const float* xp = Xr + offs[e];
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) acc[k] += w * *(const vf*)(xp + 16 * k);
            }
            if (relu) {
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) acc[k] = acc[k] > 0.f ? acc[k] : vf{};
            }
            float* yp = Yc + y * Wo + x0;
            const int64_t n = std::min<int64_t>(BW, Wo - x0);
            if (n == BW) {
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) *(vf*)(yp + 16 * k) = acc[k];
            } else {
              float tmp[BW];
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) *(vf*)(tmp + 16 * k) = acc[k];
              for (int64_t i = 0; i < n; ++i) yp[i] = tmp[i];
            }
          }
        }
      }
    }
  }
}

torch::Tensor spconv(torch::Tensor X, torch::Tensor rowptr, torch::Tensor offs, torch::Tensor vals,
                     c10::optional<torch::Tensor> bias, int64_t Cout, int64_t Ho, int64_t Wo, int64_t Wq,
                     bool relu, int64_t bw, int64_t rows_per_task) {
  TORCH_CHECK(X.is_contiguous() && X.dtype() == torch::kFloat32);
  const int64_t B = X.size(0);
  auto Y = torch::empty({B, Cout, Ho, Wo}, X.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  const int64_t pn = X.numel() / B;
  #define CALL(BWV) run<BWV>(X.data_ptr<float>(), B, pn, rowptr.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), \
      vals.data_ptr<float>(), bp, Y.data_ptr<float>(), Cout, Ho, Wo, Wq, relu, rows_per_task)
  if (bw == 16) CALL(16); else if (bw == 32) CALL(32); else if (bw == 64) CALL(64); else if (bw == 128) CALL(128);
  else TORCH_CHECK(false, "bw");
  return Y;
}

// Stride-1 direct sparse conv on the UNPADDED input (no fill copy). Entry e: flat offset offs[e] =
// ci*H*W + dy[e]*W + dx[e] with dy = ky*d - p, dx = kx*d - p. Columns [xa, xb) where every tap is in range
// use vector blocks (the last one overlapping, stores are idempotent); border columns scalar with checks;
// taps whose row y+dy is outside [0, H) are skipped.
template <int BW>
static void run_s1(const float* __restrict X, int64_t B, int64_t Cin, int64_t H, int64_t W,
                   const int64_t* __restrict rowptr, const int64_t* __restrict offs, const int64_t* __restrict dys,
                   const int64_t* __restrict dxs, const float* __restrict vals, const float* __restrict bias,
                   float* __restrict Y, int64_t Cout, int64_t Ho, int64_t Wo, int64_t xa, int64_t xb, bool relu,
                   int64_t rows_per_task, bool shuffle) {
  constexpr int NV = BW / 16;
  const int64_t ntiles = (Ho + rows_per_task - 1) / rows_per_task;
  // shuffle: pixel_shuffle(2) fused into the stores: channel co = 4c + 2py + px lands at (c, 2y + py, 2x + px)
  const int64_t es = shuffle ? 2 : 1, rs = shuffle ? 4 * Wo : Wo;
  #pragma omp parallel for schedule(dynamic, 1) collapse(2)
  for (int64_t b = 0; b < B; ++b) {
    for (int64_t t = 0; t < ntiles; ++t) {
      const float* Xb = X + b * Cin * H * W;
      const int64_t y0 = t * rows_per_task, y1 = std::min(Ho, y0 + rows_per_task);
      for (int64_t co = 0; co < Cout; ++co) {
        const int64_t e0 = rowptr[co], e1 = rowptr[co + 1];
        const float bv = bias ? bias[co] : 0.f;
        float* Yc = shuffle ? Y + ((b * (Cout / 4) + co / 4) * 2 * Ho + (co / 2) % 2) * 2 * Wo + co % 2
                            : Y + (b * Cout + co) * Ho * Wo;
        for (int64_t y = y0; y < y1; ++y) {
          float* yr = Yc + y * rs;
          const float* Xr = Xb + y * W;
          for (int64_t x0 = xa; x0 < xb; x0 += BW) {
            const int64_t xs = std::min(x0, xb - BW);
            vf acc[NV];
            #pragma GCC unroll 16
            for (int k = 0; k < NV; ++k) acc[k] = vf{} + bv;
            for (int64_t e = e0; e < e1; ++e) {
              const int64_t yy = y + dys[e];
              if (yy < 0 || yy >= H) continue;
              const vf w = vf{} + vals[e];
              const float* xp = Xr + offs[e] + xs;
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) acc[k] += w * *(const vf*)(xp + 16 * k);
            }
            if (relu) {
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) acc[k] = acc[k] > 0.f ? acc[k] : vf{};
            }
            if (!shuffle) {
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) *(vf*)(yr + xs + 16 * k) = acc[k];
            } else {
              float tmp[BW];
              #pragma GCC unroll 16
              for (int k = 0; k < NV; ++k) *(vf*)(tmp + 16 * k) = acc[k];
              float* yp = yr + 2 * xs;
              for (int i = 0; i < BW; ++i) yp[2 * i] = tmp[i];
            }
          }
          for (int64_t x = 0; x < Wo; ++x) {
            if (x == xa && xb > xa) { x = xb - 1; continue; }
            float a = bv;
            for (int64_t e = e0; e < e1; ++e) {
              const int64_t yy = y + dys[e], xx = x + dxs[e];
              if (yy < 0 || yy >= H || xx < 0 || xx >= W) continue;
              a += vals[e] * Xr[offs[e] + x];
            }
            yr[es * x] = relu && a < 0.f ? 0.f : a;
          }
        }
      }
    }
  }
}

torch::Tensor spconv_s1(torch::Tensor X, torch::Tensor rowptr, torch::Tensor offs, torch::Tensor dys,
                        torch::Tensor dxs, torch::Tensor vals, c10::optional<torch::Tensor> bias, int64_t Cout,
                        int64_t Ho, int64_t Wo, int64_t xa, int64_t xb, bool relu, int64_t bw, int64_t rows_per_task,
                        bool shuffle) {
  TORCH_CHECK(X.is_contiguous() && X.dtype() == torch::kFloat32 && X.dim() == 4);
  TORCH_CHECK(xb - xa >= bw || xb <= xa, "interior narrower than the block");
  TORCH_CHECK(!shuffle || Cout % 4 == 0, "pixel shuffle needs 4 channels per output channel");
  const int64_t B = X.size(0), Cin = X.size(1), H = X.size(2), W = X.size(3);
  auto Y = shuffle ? torch::empty({B, Cout / 4, 2 * Ho, 2 * Wo}, X.options()) : torch::empty({B, Cout, Ho, Wo}, X.options());
  const float* bp = bias.has_value() ? bias->data_ptr<float>() : nullptr;
  #define CALL1(BWV) run_s1<BWV>(X.data_ptr<float>(), B, Cin, H, W, rowptr.data_ptr<int64_t>(), offs.data_ptr<int64_t>(), \
      dys.data_ptr<int64_t>(), dxs.data_ptr<int64_t>(), vals.data_ptr<float>(), bp, Y.data_ptr<float>(), Cout, Ho, Wo, \
      xa, xb, relu, rows_per_task, shuffle)
  if (bw == 16) CALL1(16); else if (bw == 32) CALL1(32); else if (bw == 64) CALL1(64); else if (bw == 128) CALL1(128);
  else TORCH_CHECK(false, "bw");
  return Y;
}
"""


class PlanStrided:
    """Prepared sparse conv for a fixed input shape (B, Cin, H, W). weight (Cout, Cin, k, k), groups 1,
    zero padding. ``bias``/``relu`` give a fused epilogue (fold BN into weight/bias first)."""

    def __init__(self, weight, bias, stride, padding, dilation, in_shape, relu=False, bw=64, rows_per_task=4):
        B, Cin, H, W = in_shape
        Cout, _, kh, kw = weight.shape
        s, p, d = stride, padding, dilation
        self.B, self.Cin, self.H, self.W, self.s, self.p = B, Cin, H, W, s, p
        Hp, Wp = H + 2 * p, W + 2 * p
        self.Ho = (Hp - d * (kh - 1) - 1) // s + 1
        self.Wo = (Wp - d * (kw - 1) - 1) // s + 1
        Hq, Wq = -(-Hp // s), -(-Wp // s)
        self.Hq, self.Wq = Hq, Wq
        nz = weight.detach().nonzero(as_tuple=False)  # (nnz, 4) sorted by co, ci, ky, kx
        co, ci, ky, kx = nz.unbind(1)
        vals = weight.detach()[co, ci, ky, kx].float().contiguous()
        a, py = (ky * d) // s, (ky * d) % s
        b_, px = (kx * d) // s, (kx * d) % s
        plane = (py * s + px) * Cin + ci
        maxoff = int(((kh - 1) * d // s) * Wq + (kw - 1) * d // s)
        # slack: last row's last block may read up to bw-1 past Wo, plus maxoff
        self.N = Hq * Wq + maxoff + bw + Wq
        offs = plane * self.N + a * Wq + b_
        self.offs = offs.contiguous()
        self.vals = vals
        self.rowptr = torch.zeros(Cout + 1, dtype=torch.int64)
        self.rowptr[1:] = torch.bincount(co, minlength=Cout).cumsum(0)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        self.Cout, self.relu, self.bw, self.rpt = Cout, relu, bw, rows_per_task
        self.P = s * s * Cin
        self.buf = torch.zeros(B, self.P, self.N)  # borders stay zero; interior overwritten each call
        bview = self.buf[:, :, : Hq * Wq].view(B, s, s, Cin, Hq, Wq)
        # destination views for each phase: phase (py, px) gets xpad[:, :, py::s, px::s]
        self.dst = []
        for py_ in range(s):
            for px_ in range(s):
                # xpad row r = s*i + py_ ; input row = r - p  -> valid i range
                i0 = max(0, -(-(p - py_) // s)); i1 = min(Hq, (H - 1 + p - py_) // s + 1)
                j0 = max(0, -(-(p - px_) // s)); j1 = min(Wq, (W - 1 + p - px_) // s + 1)
                r0 = s * i0 + py_ - p; c0 = s * j0 + px_ - p
                self.dst.append((bview[:, py_, px_, :, i0:i1, j0:j1], r0, c0, i1 - i0, j1 - j0))

    def __call__(self, x):
        s = self.s
        for dst, r0, c0, ni, nj in self.dst:
            dst.copy_(x[:, :, r0: r0 + s * (ni - 1) + 1: s, c0: c0 + s * (nj - 1) + 1: s])
        return _kernel().spconv(self.buf, self.rowptr, self.offs, self.vals, self.bias, self.Cout, self.Ho, self.Wo,
                            self.Wq, self.relu, self.bw, self.rpt)


class PlanS1:
    """Stride-1 sparse conv straight on the unpadded input (no pad/fill copy). Falls back to
    SparseConvPlan when the interior is narrower than the vector block."""

    def __init__(self, weight, bias, padding, dilation, in_shape, relu=False, bw=64, rows_per_task=4, shuffle=False):
        B, Cin, H, W = in_shape
        self.shuffle = bool(shuffle)
        Cout, _, kh, kw = weight.shape
        p, d = padding, dilation
        self.Ho, self.Wo = H + 2 * p - d * (kh - 1), W + 2 * p - d * (kw - 1)
        nz = weight.detach().nonzero(as_tuple=False)
        co, ci, ky, kx = nz.unbind(1)
        self.vals = weight.detach()[co, ci, ky, kx].float().contiguous()
        dy, dx = ky * d - p, kx * d - p
        self.dys, self.dxs = dy.contiguous(), dx.contiguous()
        self.offs = (ci * H * W + dy * W + dx).contiguous()
        self.rowptr = torch.zeros(Cout + 1, dtype=torch.int64)
        self.rowptr[1:] = torch.bincount(co, minlength=Cout).cumsum(0)
        self.bias = None if bias is None else bias.detach().float().contiguous()
        # interior columns: every tap in range for x in [xa, xb)
        self.xa = max(0, p)
        self.xb = min(self.Wo, W - (d * (kw - 1) - p))
        self.Cout, self.relu, self.bw, self.rpt = Cout, relu, bw, rows_per_task
        self.fallback = None
        if self.xb - self.xa < bw:
            self.fallback = PlanStrided(weight, bias, 1, padding, dilation, in_shape, relu=relu, bw=16)

    def __call__(self, x):
        if self.fallback is not None:
            y = self.fallback(x)
            return torch.nn.functional.pixel_shuffle(y, 2) if self.shuffle else y
        return _kernel().spconv_s1(x.contiguous(), self.rowptr, self.offs, self.dys, self.dxs, self.vals, self.bias,
                                   self.Cout, self.Ho, self.Wo, self.xa, self.xb, self.relu, self.bw, self.rpt,
                                   self.shuffle)


def make_plan(weight, bias, stride, padding, dilation, in_shape, relu=False, bw=64, shuffle=False):
    """The best plan for a 3x3-style conv: unpadded stride-1 kernel, else the phase-split kernel.
    ``shuffle``: the output goes through ``pixel_shuffle(2)`` (fused into the stride-1 kernel's stores)."""
    if len(in_shape) != 4 or in_shape[1] != weight.shape[1] or weight.dtype != torch.float32 or weight.device.type != "cpu":
        raise ValueError(f"direct sparse conv: a float32 CPU weight {tuple(weight.shape)} cannot take input {tuple(in_shape)}")
    if stride == 1:
        return PlanS1(weight, bias, padding, dilation, in_shape, relu=relu, bw=bw, shuffle=shuffle)
    if shuffle:
        raise ValueError("direct sparse conv: the fused pixel shuffle is for stride-1 convs")
    return PlanStrided(weight, bias, stride, padding, dilation, in_shape, relu=relu, bw=bw)


_STATE: dict[str, Any] = {"kernel": None, "error": None}


def _cpu() -> str:
    """The CPU's model and feature flags: ``-march=native`` builds are cached per CPU, not shared."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            lines = [ln for ln in f if ln.startswith(("model name", "flags"))][:2]
    except OSError:
        lines = []
    return platform.machine() + "".join(lines)


def _kernel() -> Any:
    if _STATE["kernel"] is None and _STATE["error"] is None:
        try:
            import warnings

            from torch.utils.cpp_extension import load_inline

            name = "prunq_spconv_" + hashlib.sha256((CPP + _cpu()).encode()).hexdigest()[:12]
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                _STATE["kernel"] = load_inline(name, cpp_sources=CPP, functions=["spconv", "spconv_s1"],
                                               extra_cflags=["-O3", "-march=native", "-fopenmp"],
                                               extra_ldflags=["-fopenmp"], verbose=False)  # fmt: skip
        except Exception as e:  # no compiler, no ninja, a build error: the callers fall back
            _STATE["error"] = f"{type(e).__name__}: {str(e).strip().splitlines()[0] if str(e).strip() else ''}"
    if _STATE["kernel"] is None:
        raise RuntimeError(f"the direct sparse kernel is not available ({_STATE['error']})")
    return _STATE["kernel"]


def available() -> tuple[bool, str | None]:
    """``(True, None)`` once the kernel is built (building it now if needed), else ``(False, why)``."""
    try:
        _kernel()
    except RuntimeError:
        return False, _STATE["error"]
    return True, None
