"""WN's dilated 3-tap convolutions by Winograd's minimal filtering F(4, 3), on time-major tensors (B, T, C).

Four outputs of a 3-tap filter need twelve products taken directly, six taken through Winograd's transforms
(Lavin and Gray 2016, "Fast algorithms for convolutional neural networks"). At dilation d the outputs
y(t + j d), j = 0..3, read the six inputs x(t + (i - 1) d), i = 0..5, and

    y = A^T [(G g) * (B^T x)]                                     (* elementwise over the six points)

    B^T = [[4,  0, -5,  0, 1, 0],      G = [[ 1/4,     0,    0],      A^T = [[1, 1,  1, 1,  1, 0],
           [0, -4, -4,  1, 1, 0],           [-1/6,  -1/6, -1/6],             [0, 1, -1, 2, -2, 0],
           [0,  4, -4, -1, 1, 0],           [-1/6,   1/6, -1/6],             [0, 1,  1, 4,  4, 0],
           [0, -2, -1,  2, 1, 0],           [1/24,  1/12,  1/6],             [0, 1, -1, 8, -8, 1]]
           [0,  2, -1, -2, 1, 0],           [1/24, -1/12,  1/6],
           [0,  4,  0, -5, 0, 1]]           [   0,     0,    1]]

With channels every point's product is a matrix product, (tiles x C_in)(C_in x C_out), so the convolution's
multiply-adds halve, forward and backward; the transforms are sums of whole rows (one time step's C channels
are contiguous in the time-major layout). The same math as F.conv1d up to rounding (float32: within ~2e-6 of
its largest output). Measured on config.json's layers (256 -> 512 channels, dilations 1-128, forward and
backward, two AVX2 cores): 1.32x F.conv1d at 1 x 1000 time steps, 1.48x at 2 x 2000. The point products go
through cpu_matmul (oneDNN's on CPUs where torch runs AVX-512).
"""
import torch
import torch.nn.functional as F

import cpu_matmul

# G: the filter transform, (6 points, 3 taps)
FILTER_TRANSFORM = ((1 / 4, 0, 0), (-1 / 6, -1 / 6, -1 / 6), (-1 / 6, 1 / 6, -1 / 6), (1 / 24, 1 / 12, 1 / 6),
                    (1 / 24, -1 / 12, 1 / 6), (0, 0, 1))


def dilated_conv3(x, weight, dilation):
    """F.conv1d(x^T, weight, padding=dilation, dilation=dilation)^T for a time-major x (B, T, C_in) and a 3-tap
    weight (C_out, C_in, 3): (B, T, C_out), no bias."""
    points = torch.einsum("pk,oik->pio", x.new_tensor(FILTER_TRANSFORM), weight)  # (6, C_in, C_out): G g
    return _WinogradF43.apply(x, points, dilation)


def _input_transform(d, out):
    """out[p] = sum_i B^T[p, i] d[i] for the six (B, blocks, dilation, C) inputs d; the rows share sums."""
    torch.add(d[4], d[0], alpha=4, out=out[0]).add_(d[2], alpha=-5)
    even, odd = torch.add(d[4], d[2], alpha=-4), torch.add(d[3], d[1], alpha=-4)  # rows 1, 2: even +- odd
    torch.add(even, odd, out=out[1])
    torch.sub(even, odd, out=out[2])
    even, odd = torch.sub(d[4], d[2]), torch.sub(d[3], d[1]).mul_(2)  # rows 3, 4
    torch.add(even, odd, out=out[3])
    torch.sub(even, odd, out=out[4])
    torch.add(d[5], d[1], alpha=4, out=out[5]).add_(d[3], alpha=-5)


def _output_transform(m, out):
    """out[j] = sum_p A^T[j, p] m[p] for the six point products m; the rows share sums."""
    sum12, diff12, sum34, diff34 = m[1] + m[2], m[1] - m[2], m[3] + m[4], m[3] - m[4]
    torch.add(sum12, sum34, out=out[0]).add_(m[0])
    torch.add(diff12, diff34, alpha=2, out=out[1])
    torch.add(sum12, sum34, alpha=4, out=out[2])
    torch.add(diff12, diff34, alpha=8, out=out[3]).add_(m[5])


def _output_transform_backward(grad_y, out):
    """out[p] = sum_j A^T[j, p] grad_y[j]: the gradients of the six point products."""
    out[0].copy_(grad_y[0])
    even, odd = grad_y[0] + grad_y[2], grad_y[1] + grad_y[3]
    torch.add(even, odd, out=out[1])
    torch.sub(even, odd, out=out[2])
    even, odd = torch.add(grad_y[0], grad_y[2], alpha=4), torch.add(grad_y[1], grad_y[3], alpha=4).mul_(2)
    torch.add(even, odd, out=out[3])
    torch.sub(even, odd, out=out[4])
    out[5].copy_(grad_y[3])


def _input_transform_backward(u, out_block, out_next):
    """Gradients of the six inputs, sum_p B^T[p, i] u[p]: inputs 0-3 into out_block[0..3], inputs 4 and 5 (the next
    block's first two rows) added into out_next[0..1]."""
    sum12, diff21, sum34, diff43 = u[1] + u[2], u[2] - u[1], u[3] + u[4], u[4] - u[3]
    torch.mul(u[0], 4, out=out_block[0])
    torch.add(diff21, diff43, alpha=0.5, out=out_block[1]).add_(u[5]).mul_(4)
    torch.add(sum34, sum12, alpha=4, out=out_block[2]).add_(u[0], alpha=5).neg_()
    torch.add(diff21, diff43, alpha=2, out=out_block[3]).add_(u[5], alpha=5).neg_()
    out_next[0].add_(sum12).add_(sum34).add_(u[0])
    out_next[1].add_(u[5])


class _WinogradF43(torch.autograd.Function):
    """The tiled products and the transforms of x and of the gradients, with a backward that keeps the halved
    multiply-adds (the filter transform G g is tiny and left to autograd)."""

    @staticmethod
    def forward(ctx, x, points, dilation):
        batch, steps, channels = x.shape
        d, c_out = dilation, points.size(2)
        n_blocks = -(-steps // (4 * d))  # a block: 4 d steps, d tiles of 4 outputs each
        padded = F.pad(x, (0, 0, d, (n_blocks + 2) * 4 * d - d - steps))  # padded[s] = x[s - d], zero outside
        blocks = padded.view(batch, n_blocks + 2, 4, d, channels)
        inputs = [blocks[:, :n_blocks, i] for i in range(4)] + [blocks[:, 1:n_blocks + 1, i] for i in range(2)]
        transformed = x.new_empty(6, batch, n_blocks, d, channels)  # B^T x
        _input_transform(inputs, transformed)
        transformed = transformed.view(6, -1, channels)  # (6, tiles, C_in)
        products = [m.view(batch, n_blocks, d, c_out) for m in cpu_matmul.point_products(transformed, points)]
        y = x.new_empty(batch, n_blocks, 4, d, c_out)
        _output_transform(products, y.unbind(2))
        ctx.save_for_backward(transformed, points)
        ctx.shape = batch, steps, channels, n_blocks, d
        return y.view(batch, -1, c_out)[:, :steps]  # (B, T, C_out)

    @staticmethod
    def backward(ctx, grad_y):
        transformed, points = ctx.saved_tensors
        batch, steps, channels, n_blocks, d = ctx.shape
        c_out = points.size(2)
        if n_blocks * 4 * d == steps:
            grad_y = grad_y.contiguous()
        else:
            grad_y = torch.cat([grad_y, grad_y.new_zeros(batch, n_blocks * 4 * d - steps, c_out)], 1)
        grad_products = grad_y.new_empty(6, batch, n_blocks, d, c_out)
        _output_transform_backward(grad_y.view(batch, n_blocks, 4, d, c_out).unbind(2), grad_products)
        grad_products = grad_products.view(6, -1, c_out)  # (6, tiles, C_out)
        grad_points = None
        if ctx.needs_input_grad[1]:
            grad_points = cpu_matmul.point_products(transformed, grad_products, transpose_a=True, stacked=True)
        grad_x = None
        if ctx.needs_input_grad[0]:
            grad_transformed = [u.view(batch, n_blocks, d, channels)
                                for u in cpu_matmul.point_products(grad_products, points.transpose(1, 2))]
            grad_padded = grad_y.new_empty(batch, n_blocks + 2, 4, d, channels)
            grad_padded[:, n_blocks:].zero_()
            _input_transform_backward(grad_transformed, grad_padded[:, :n_blocks].unbind(2),
                                      grad_padded[:, 1:n_blocks + 1].unbind(2))
            grad_x = grad_padded.view(batch, -1, channels)[:, d:d + steps]
        return grad_x, grad_points, None
