"""Exact, memory-frugal PyTorch backend of the local relation op (any device).

The window is walked offset by offset over strided views of a padded copy of the inputs, so no
K*K-times copy of x is ever made (an ``nn.Unfold`` implementation needs ~K*K times the input).
Forward runs a two-pass softmax (max, then exp-sum and aggregation) and saves only the output
and a per-(b, g, position) log-sum-exp; backward recomputes the weights offset by offset.

Gradients, for one group g, offset o and output position p (w = softmax weights):
    y      = sum_o w_o x_o
    dw_o   = sum_{c in g} gy_c x_{o,c}
    D      = sum_o w_o dw_o = sum_{c in g} gy_c y_c
    dlogit = w_o (dw_o - D)
then dx_o += w_o gy, dgeo[o] += sum dlogit, and dq, dk_o from dlogit and dphi.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from robustlr.ops.contract import LocalRelationShape

Tensor = torch.Tensor


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp64 stays fp64; everything else (fp32, fp16, bf16) is computed in fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _phi(q: Tensor, k: Tensor, composability: str) -> Tensor:
    """Appearance composability summed over the qk dimension (dim 2). Shape: (B, G, Ho, Wo)."""
    if composability == "sqdiff":
        return -(q - k).square().sum(2)
    if composability == "absdiff":
        return -(q - k).abs().sum(2)
    return (q * k).sum(2)


def _phi_grads(q: Tensor, k: Tensor, composability: str) -> tuple[Tensor, Tensor]:
    """d phi / d q and d phi / d k, elementwise. Shape: (B, G, D, Ho, Wo) each."""
    if composability == "sqdiff":
        diff = q - k
        return -2 * diff, 2 * diff
    if composability == "absdiff":
        sign = torch.sign(q - k)
        return -sign, sign
    return k, q


class _Window:
    """Padded inputs and the strided view of each window offset."""

    def __init__(self, shape: LocalRelationShape, device: torch.device) -> None:
        self.shape = shape
        s, p = shape.stride, shape.padding
        self.span_h = s * (shape.out_height - 1) + 1
        self.span_w = s * (shape.out_width - 1) + 1
        # validity of each offset at each output position: input row i*s - P + a in [0, H)
        out_r = torch.arange(shape.out_height, device=device) * s - p
        out_c = torch.arange(shape.out_width, device=device) * s - p
        k = torch.arange(shape.kernel_size, device=device)
        self.row_ok = ((out_r[None, :] + k[:, None]) >= 0) & (
            (out_r[None, :] + k[:, None]) < shape.height
        )  # (K, Ho)
        self.col_ok = ((out_c[None, :] + k[:, None]) >= 0) & (
            (out_c[None, :] + k[:, None]) < shape.width
        )  # (K, Wo)

    def offsets(self):
        K = self.shape.kernel_size
        for a in range(K):
            for b in range(K):
                yield a, b

    def view(self, padded: Tensor, a: int, b: int) -> Tensor:
        """Values read by offset (a, b) at every output position: a strided view, no copy."""
        s = self.shape.stride
        return padded[..., a : a + self.span_h : s, b : b + self.span_w : s]

    def invalid(self, a: int, b: int) -> Tensor | None:
        """Mask (Ho, Wo) of output positions whose neighbour (a, b) is outside the image."""
        ok = self.row_ok[a][:, None] & self.col_ok[b][None, :]
        return None if bool(ok.all()) else ~ok


def _pad_spatial(t: Tensor, p: int) -> Tensor:
    return F.pad(t, (p, p, p, p)) if p else t


def _grouped(t: Tensor, groups: int, per_group: int) -> Tensor:
    """(B, C, H, W) -> (B, G, m, H, W), zero-padding the ragged last group's channels."""
    b, c, h, w = t.shape
    missing = groups * per_group - c
    if missing:
        t = torch.cat([t, t.new_zeros(b, missing, h, w)], dim=1)
    return t.reshape(b, groups, per_group, h, w)


class _LocalRelationReference(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, q, k, geo, shape: LocalRelationShape, composability: str):
        ct = compute_dtype(x.dtype)
        G, m, D = shape.groups, shape.channels_per_group, shape.qk_dim
        win = _Window(shape, x.device)
        with torch.no_grad():
            xg = _grouped(_pad_spatial(x.to(ct), shape.padding), G, m)
            qg = q.to(ct).reshape(shape.batch, G, D, shape.out_height, shape.out_width)
            kg = _pad_spatial(k.to(ct), shape.padding).reshape(shape.batch, G, D, *xg.shape[-2:])
            geo_c = geo.to(ct)

            def logit(a: int, b: int) -> Tensor:
                out = _phi(qg, win.view(kg, a, b), composability)
                out += geo_c[:, a, b].view(1, G, 1, 1)
                invalid = win.invalid(a, b)
                if invalid is not None:
                    out.masked_fill_(invalid, float("-inf"))
                return out

            # pass 1: max logit over the window (the centre is always inside the image)
            peak = None
            for a, b in win.offsets():
                lg = logit(a, b)
                peak = lg if peak is None else torch.maximum(peak, lg, out=peak)
            # pass 2: exp-sum and aggregation
            total = torch.zeros_like(peak)
            y = xg.new_zeros(shape.batch, G, m, shape.out_height, shape.out_width)
            for a, b in win.offsets():
                e = (logit(a, b) - peak).exp_()
                total += e
                y.addcmul_(win.view(xg, a, b), e.unsqueeze(2))
            y /= total.unsqueeze(2)
            lse = peak + total.log()
        ctx.save_for_backward(x, q, k, geo, y, lse)
        ctx.shape = shape
        ctx.composability = composability
        flat = y.reshape(shape.batch, G * m, shape.out_height, shape.out_width)
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
        B, Ho, Wo = shape.batch, shape.out_height, shape.out_width
        win = _Window(shape, x.device)

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

        for a, b in win.offsets():
            k_o = win.view(kg, a, b)
            lg = _phi(qg, k_o, composability)
            lg += geo_c[:, a, b].view(1, G, 1, 1)
            invalid = win.invalid(a, b)
            if invalid is not None:
                lg.masked_fill_(invalid, float("-inf"))
            w = (lg - lse).exp_()
            x_o = win.view(xg, a, b)
            if gx is not None:
                win.view(gx, a, b).addcmul_(gy, w.unsqueeze(2))
            if gq is None and gk is None and ggeo is None:
                continue
            dlogit = w * ((gy * x_o).sum(2) - dot)
            if ggeo is not None:
                ggeo[:, a, b] = dlogit.sum((0, 2, 3))
            if gq is not None or gk is not None:
                dq, dk = _phi_grads(qg, k_o, composability)
                if gq is not None:
                    gq.addcmul_(dq, dlogit.unsqueeze(2))
                if gk is not None:
                    win.view(gk, a, b).addcmul_(dk, dlogit.unsqueeze(2))

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
