"""Float32 matrix products of time-major rows on CPUs, by the library that runs them at the CPU's width.

torch sends float32 products to MKL, which on AMD CPUs runs its AVX2 code even where the CPU has AVX-512, while
torch's convolutions (oneDNN) use AVX-512 on every vendor's CPU. So on such a CPU a matrix product ran at half a
convolution's speed, and the float32 paths of training (glow_fast.rearranged_wn_forward, winograd.py) and of
inference (glow_fast.frame_conditioned_wn_inference) saved multiply-adds only to spend them at half the rate.
Measured on two Zen 5 cores (torch capability AVX512), WN's products at 2 x 16000 samples (4000 x 256 @ 256 x 512
and its kin): torch.addmm 145-190 GFLOP/s, oneDNN's linear 300-410; weight gradients (both operands transposed)
190-280 against 150-180. On two Zen 4 cores, whose AVX-512 units are 256 bits wide, the gap is smaller but there:
the same products at 1000-4000 rows, torch.mm 92-157 GFLOP/s, oneDNN's linear 134-190 (one run, a noisy host).
So where torch's capability is AVX-512, these products go to oneDNN's linear; elsewhere they stay torch's own, to
the bit (on two AVX2 cores oneDNN's linear was no faster than addmm_ for the frame path's products: 69-110 GFLOP/s
against 96-148).
"""
import functools

import torch


@functools.cache
def uses_onednn():
    """Whether float32 products go to oneDNN: a CPU whose torch capability is AVX-512, a torch with oneDNN's linear."""
    if not torch.backends.mkldnn.is_available() or not hasattr(torch.ops.mkldnn, "_linear_pointwise"):
        return False
    return torch.backends.cpu.get_cpu_capability().startswith(("AVX512", "AMX"))


def _onednn(rows, weight, bias=None):
    """rows (..., K) @ weight (N, K)^T + bias (N) by oneDNN's linear (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "")


def routed(a, b):
    """Whether a @ b goes to oneDNN: float32 on a CPU where uses_onednn(), both of b's sides at least 64 wide. oneDNN's
    linear is very slow for a narrow operand: 1000 x 5 @ 5 x 512, WN's first dilated layer composed with the start
    layer, took 33-38 ms against well under a millisecond for torch.matmul, forward and backward alike."""
    return (a.dtype == torch.float32 and a.device.type == "cpu" and min(b.shape[-2:]) >= 64 and uses_onednn())


def matmul(a, b, bias=None):
    """a (..., K) @ b (K, N) + bias (N), with autograd. Where uses_onednn(), by oneDNN; else torch.addmm (a 2-D `a`
    with a bias) or torch.matmul and an addition, as the callers ran before this hook."""
    if routed(a, b):
        return _OneDnnMatmul.apply(a, b, bias)
    if bias is not None and a.dim() == 2:
        return torch.addmm(bias, a, b)
    product = torch.matmul(a, b)
    return product if bias is None else product + bias


def point_products(a, b, transpose_a=False, stacked=False):
    """a[p] @ b[p] (a[p]^T @ b[p] with transpose_a) for stacks a (P, M, K) and b (P, K, N), no autograd. Elsewhere
    one torch.bmm, (P, M, N). Where oneDNN is taken, a list of the P matrices, since its linear writes no output it
    is given; stacked into one tensor only if `stacked`."""
    a = a.transpose(1, 2) if transpose_a else a
    if not routed(a, b):
        return torch.bmm(a, b)
    products = [_onednn(a[p], b[p].t()) for p in range(a.size(0))]
    return torch.stack(products) if stacked else products


def accumulate(out, a, b):
    """out += a (M, K) @ b (K, N) in place, no autograd: torch's addmm_, or where a @ b goes to oneDNN, its linear
    with the addition fused, copied back. oneDNN takes b^T contiguous (a strided weight measured over 100x slower)."""
    if routed(a, b):
        return out.copy_(_onednn_plus(a, b.t().contiguous(), out))
    return out.addmm_(a, b)


def _onednn_plus(rows, weight, addend):
    """rows (M, K) @ weight (N, K)^T + addend (M, N) by oneDNN's linear, the addition fused (no autograd)."""
    return torch.ops.mkldnn._linear_pointwise.binary(rows, addend, weight, None, "add")


class _OneDnnMatmul(torch.autograd.Function):
    """a @ b + bias by oneDNN, forward and backward: grad_a = g b^T, grad_b = a^T g, grad_bias = sum of g's rows."""

    @staticmethod
    def forward(ctx, a, b, bias):
        ctx.save_for_backward(a, b)
        ctx.has_bias = bias is not None
        return _onednn(a, b.t(), bias)

    @staticmethod
    def backward(ctx, grad):
        a, b = ctx.saved_tensors
        grad_a = _onednn(grad, b) if ctx.needs_input_grad[0] else None
        grad_rows = grad.reshape(-1, grad.size(-1))  # (M, N)
        grad_b, rows = None, a.reshape(-1, a.size(-1))  # (M, K)
        if ctx.needs_input_grad[1] and b.t().is_contiguous():  # b = weight.t(): the weight's gradient in its layout
            grad_b = _onednn(grad_rows.t(), rows.t()).t()  # (N, K) -> (K, N); a copy back measured 4 ms per cond layer
        elif ctx.needs_input_grad[1]:
            grad_b = _onednn(rows.t(), grad_rows.t())  # (K, N)
        grad_bias = grad_rows.sum(0) if ctx.has_bias and ctx.needs_input_grad[2] else None
        return grad_a, grad_b, grad_bias
