"""Exact, memory-frugal PyTorch backend of the local relation op (any device).

No K*K-times copy of x is ever made (an ``nn.Unfold`` implementation needs ~K*K times the
input). The work splits in two kinds:

- G-sized work (logits, softmax statistics, their gradients; one value per group, i.e. 1/m of
  x's size per offset) is vectorised over a *chunk* of window rows at once: a zero-copy
  ``as_strided`` view of the padded keys, shape (R, K, B, G, D, Ho, Wo), holds the keys read by
  the R*K offsets of window rows [a0, a0 + R), so one chunk's logits take a handful of torch
  ops. R is chosen so that a chunk holds at most ``max(numel(x) / 2, 2**20)`` elements (at
  least one window row): small images get the whole window in one chunk, large ones a row at a
  time, so the temporaries stay below the size of x.
- C-sized work (aggregation y += w_o x_o, and in backward gx_o += w_o gy and
  dw_o = sum_c gy_c x_{o,c}) runs offset by offset over strided views of the padded x, as
  overlapping in-place adds into one strided view are not allowed.

Forward is an online softmax over the chunks (the chunk holding the window centre first, so
the running max is finite everywhere: the centre is always inside the image): per chunk, the
running max, exp-sum and unnormalised output are rescaled to the new max. Out-of-image
neighbours get a logit of -inf (weight 0), folded into a per-chunk bias together with geo.
Forward saves x, q, k, geo, the output and a per-(b, g, position) log-sum-exp; backward
recomputes the weights chunk by chunk.

Gradients, for one group g, offset o and output position p (w = softmax weights):
    y      = sum_o w_o x_o
    dw_o   = sum_{c in g} gy_c x_{o,c}
    D      = sum_o w_o dw_o = sum_{c in g} gy_c y_c
    dlogit = w_o (dw_o - D)
then dx_o += w_o gy, dgeo[o] += sum dlogit, dq += sum_o dlogit_o dphi/dq and
dk_o += dlogit_o dphi/dk (dphi/dk = -dphi/dq for sqdiff and absdiff). Per chunk, dw_o and the
dx_o, dk_o scatters run offset by offset; dlogit, dgeo and dq are computed for the chunk at once.

All chunk temporaries are laid out offset-major, (R, K, B, G, Ho, Wo), so that one offset's
slice is a contiguous (B, G, Ho, Wo) block for the per-offset ops.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlr.ops.contract import LocalRelationShape

Tensor = torch.Tensor

# Elements of one chunk-sized temporary (logits, weights, ...) allowed whatever the input size.
_MIN_CHUNK_ELEMENTS = 1 << 20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, fp16, bf16) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _pad_spatial(t: Tensor, p: int) -> Tensor:
    return F.pad(t, (p, p, p, p)) if p else t


def _grouped(t: Tensor, groups: int, per_group: int) -> Tensor:
    """(B, C, H, W) -> (B, G, m, H, W), zero-padding the ragged last group's channels."""
    b, c, h, w = t.shape
    missing = groups * per_group - c
    if missing:
        t = torch.cat([t, t.new_zeros(b, missing, h, w)], dim=1)
    return t.reshape(b, groups, per_group, h, w)


def rows_per_chunk_for(shape: LocalRelationShape, numel_x: int) -> int:
    """Window rows per chunk: one chunk-sized temporary (R, K, B, G, D, Ho, Wo) holds at most
    ``max(numel_x // 2, _MIN_CHUNK_ELEMENTS)`` elements, and a chunk is at least one row."""
    per_row = shape.batch * shape.groups * shape.qk_dim * shape.kernel_size
    per_row *= shape.out_height * shape.out_width
    budget = max(numel_x // 2, _MIN_CHUNK_ELEMENTS)
    return max(1, min(shape.kernel_size, budget // max(per_row, 1)))


class _Window:
    """Chunks of window rows, strided views of the padded inputs, and per-chunk logit biases."""

    def __init__(self, shape: LocalRelationShape, device: torch.device, numel_x: int) -> None:
        self.shape = shape
        K, s, p = shape.kernel_size, shape.stride, shape.padding
        self.span_h = s * (shape.out_height - 1) + 1
        self.span_w = s * (shape.out_width - 1) + 1
        # validity of each offset at each output position: input row i*s - P + a in [0, H)
        out_r = torch.arange(shape.out_height, device=device) * s - p
        out_c = torch.arange(shape.out_width, device=device) * s - p
        k = torch.arange(K, device=device)
        rows = out_r[None, :] + k[:, None]
        cols = out_c[None, :] + k[:, None]
        self.row_ok = (rows >= 0) & (rows < shape.height)  # (K, Ho)
        self.col_ok = (cols >= 0) & (cols < shape.width)  # (K, Wo)

        rows_per_chunk = rows_per_chunk_for(shape, numel_x)
        chunks = [(a0, min(a0 + rows_per_chunk, K)) for a0 in range(0, K, rows_per_chunk)]
        # the chunk holding the centre row first: its max logit is finite at every position
        centre = next(c for c in chunks if c[0] <= p < c[1])
        self.chunks = [centre] + [c for c in chunks if c != centre]

    def view(self, padded: Tensor, a: int, b: int) -> Tensor:
        """Values read by offset (a, b) at every output position: a strided view, no copy."""
        s = self.shape.stride
        return padded[..., a : a + self.span_h : s, b : b + self.span_w : s]

    def chunk_view(self, padded: Tensor, a0: int, a1: int) -> Tensor:
        """Values read by the offsets of window rows [a0, a1), offset-major, no copy.

        Shape: padded (*lead, Hp, Wp) -> (a1 - a0, K, *lead, Ho, Wo).
        """
        s, K = self.shape.stride, self.shape.kernel_size
        *lead, sh, sw = padded.stride()
        return padded.as_strided(
            (a1 - a0, K, *padded.shape[:-2], self.shape.out_height, self.shape.out_width),
            (sh, sw, *lead, s * sh, s * sw),
            padded.storage_offset() + a0 * sh,
        )

    def bias(self, geo: Tensor, a0: int, a1: int) -> Tensor:
        """geo logits of rows [a0, a1), -inf where the neighbour is outside the image.

        Shape: geo (G, K, K) -> (R, K, 1, G, Ho, Wo), to broadcast over the batch.
        """
        ok = (
            self.row_ok[a0:a1, None, None, None, :, None]
            & self.col_ok[None, :, None, None, None, :]
        )
        g = geo[:, a0:a1].permute(1, 2, 0)[:, :, None, :, None, None]
        return torch.where(ok, g, float("-inf"))


def _chunk_logits(qg: Tensor, k_chunk: Tensor, bias: Tensor, composability: str) -> Tensor:
    """phi(q, k) summed over qk_dim, plus the bias.

    Shape: qg (B, G, D, Ho, Wo), k_chunk (R, K, B, G, D, Ho, Wo) -> (R, K, B, G, Ho, Wo),
    contiguous, so that the slice of one offset is a contiguous (B, G, Ho, Wo) block.
    """
    # out=: a contiguous result, whatever layout the overlapping strides of k_chunk suggest
    phi = k_chunk.new_empty(k_chunk.shape)
    if composability == "mul":
        torch.mul(qg, k_chunk, out=phi)
    else:
        torch.sub(qg, k_chunk, out=phi)
        phi = phi.square_() if composability == "sqdiff" else phi.abs_()
    phi = phi[:, :, :, :, 0] if phi.shape[4] == 1 else phi.sum(4)
    if composability == "mul":
        return phi.add_(bias)
    return torch.sub(bias, phi, out=phi)  # phi = -(q - k)^2 or -|q - k|


class _LocalRelationReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, geo, shape: LocalRelationShape, composability: str):
        ct = compute_dtype(x.dtype)
        G, m, D = shape.groups, shape.channels_per_group, shape.qk_dim
        B, Ho, Wo = shape.batch, shape.out_height, shape.out_width
        win = _Window(shape, x.device, x.numel())
        with torch.no_grad():
            xg = _grouped(_pad_spatial(x.to(ct), shape.padding), G, m)
            qg = q.to(ct).reshape(B, G, D, Ho, Wo)
            kg = _pad_spatial(k.to(ct), shape.padding).reshape(B, G, D, *xg.shape[-2:])
            geo_c = geo.to(ct)

            # online softmax over the chunks; y holds sum_o exp(logit_o - peak) x_o
            peak = total = y = None
            for a0, a1 in win.chunks:
                e = _chunk_logits(
                    qg, win.chunk_view(kg, a0, a1), win.bias(geo_c, a0, a1), composability
                )
                chunk_peak = e.amax((0, 1))
                if peak is None:
                    peak = chunk_peak
                    total = torch.zeros_like(peak)
                    y = xg.new_zeros(B, G, m, Ho, Wo)
                else:
                    new_peak = torch.maximum(peak, chunk_peak)
                    scale = (peak - new_peak).exp_()
                    total *= scale
                    y *= scale.unsqueeze(2)
                    peak = new_peak
                e.sub_(peak).exp_()
                total += e.sum((0, 1))
                for r, a in enumerate(range(a0, a1)):
                    for b in range(shape.kernel_size):
                        y.addcmul_(win.view(xg, a, b), e[r, b].unsqueeze(2))
            y /= total.unsqueeze(2)
            lse = peak + total.log()
        ctx.save_for_backward(x, q, k, geo, y, lse)
        ctx.shape = shape
        ctx.composability = composability
        flat = y.reshape(B, G * m, Ho, Wo)
        return flat[:, : shape.channels].to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_y):
        x, q, k, geo, y, lse = ctx.saved_tensors
        shape: LocalRelationShape = ctx.shape
        composability = ctx.composability
        need_x, need_q, need_k, need_geo = ctx.needs_input_grad[:4]
        ct = y.dtype
        G, m, D, P = shape.groups, shape.channels_per_group, shape.qk_dim, shape.padding
        B, Ho, Wo, K = shape.batch, shape.out_height, shape.out_width, shape.kernel_size
        win = _Window(shape, x.device, x.numel())

        xg = _grouped(_pad_spatial(x.to(ct), P), G, m)
        qg = q.to(ct).reshape(B, G, D, Ho, Wo)
        kg = _pad_spatial(k.to(ct), P).reshape(B, G, D, *xg.shape[-2:])
        geo_c = geo.to(ct)
        gy = _grouped(grad_y.to(ct), G, m)
        dot = (gy * y).sum(2)  # D in the module docstring, (B, G, Ho, Wo)

        gx = torch.zeros_like(xg) if need_x else None
        gq = torch.zeros_like(qg) if need_q else None
        gk = torch.zeros_like(kg) if need_k else None
        ggeo = torch.zeros_like(geo_c) if need_geo else None
        need_logit_grad = need_q or need_k or need_geo
        gy_x = torch.empty_like(gy) if need_logit_grad else None  # reused gy * x_o buffer

        for a0, a1 in win.chunks:
            k_chunk = win.chunk_view(kg, a0, a1)  # (R, K, B, G, D, Ho, Wo)
            w = _chunk_logits(qg, k_chunk, win.bias(geo_c, a0, a1), composability)
            w.sub_(lse).exp_()  # (R, K, B, G, Ho, Wo)
            dlogit = torch.empty_like(w) if need_logit_grad else None
            for r, a in enumerate(range(a0, a1)):
                for b in range(K):
                    w_o = w[r, b].unsqueeze(2)
                    if gx is not None:
                        win.view(gx, a, b).addcmul_(gy, w_o)
                    if dlogit is not None:
                        torch.mul(gy, win.view(xg, a, b), out=gy_x)
                        torch.sum(gy_x, 2, out=dlogit[r, b])
            if dlogit is None:
                continue
            dlogit.sub_(dot).mul_(w)  # (R, K, B, G, Ho, Wo)
            if ggeo is not None:
                ggeo[:, a0:a1] = dlogit.sum((2, 4, 5)).permute(2, 0, 1)
            if gq is None and gk is None:
                continue
            # dphi/dk = -dphi/dq for sqdiff and absdiff: one term serves both
            dl = dlogit.unsqueeze(4)
            t_k = k_chunk.new_empty(k_chunk.shape)  # contiguous, see _chunk_logits
            t_q = None
            if composability == "sqdiff":
                torch.sub(qg, k_chunk, out=t_k).mul_(2).mul_(dl)
            elif composability == "absdiff":
                torch.sub(qg, k_chunk, out=t_k).sign_().mul_(dl)
            else:  # mul: dphi/dq = k, dphi/dk = q
                torch.mul(qg, dl, out=t_k)
                if gq is not None:
                    t_q = torch.mul(k_chunk, dl, out=torch.empty_like(t_k))
            if gq is not None:
                if t_q is None:
                    gq -= t_k.sum((0, 1))
                else:
                    gq += t_q.sum((0, 1))
            if gk is not None:
                # scatter dk_o back offset by offset (the offsets' views of gk overlap)
                for r, a in enumerate(range(a0, a1)):
                    for b in range(K):
                        win.view(gk, a, b).add_(t_k[r, b])

        def unpad(t: Tensor, channels: int) -> Tensor:
            h, w = t.shape[-2:]
            t = t.reshape(B, -1, h, w)[:, :channels]
            return t[..., P : h - P, P : w - P] if P else t

        grad_x = unpad(gx, shape.channels).to(x.dtype) if gx is not None else None
        grad_q = gq.reshape(B, G * D, Ho, Wo).to(q.dtype) if gq is not None else None
        grad_k = unpad(gk, G * D).to(k.dtype) if gk is not None else None
        grad_geo = ggeo.to(geo.dtype) if ggeo is not None else None
        return grad_x, grad_q, grad_k, grad_geo, None, None


def local_relation_reference(
    x: Tensor, q: Tensor, k: Tensor, geo: Tensor, shape: LocalRelationShape, composability: str
) -> Tensor:
    """Reference local relation (arguments already checked by ``contract.check_inputs``).

    Shape: x (B, C, H, W), q (B, G*D, Ho, Wo), k (B, G*D, H, W), geo (G, K, K) -> (B, C, Ho, Wo).
    """
    return _LocalRelationReference.apply(x, q, k, geo, shape, composability)
