"""The global U-Net computed tile by tile: the domain-parallel U-Net's layers. No MPI (the
halo exchange and the sum over every subdomain are handed in).

A U-Net built for one tile, made tile-wise with `tile_wise(model, tiles)`, takes a batch that
holds this rank's S subdomains one after the other (S*B samples: subdomain k's at [k*B, (k+1)*B))
and computes what the U-Net on whole images computes, cut into tiles:
- every convolution runs subdomain by subdomain, the 3x3 ones on the tile padded with the
  neighbouring tiles' layers (`tiles.pad`, mpidd.parallel.HaloExchange of width 1) instead of
  zeros; pooling and the stride-2 upsampling need no halo where every level's tile is even;
- BatchNorm normalises with the statistics of every tile of every rank;
- in a training step each subdomain's part of every parameter's gradient stays apart (each
  subdomain computes with its own copy of the parameters), and `tiles.sum_gradients` adds the
  parts.
Every sum over subdomains (BatchNorm's statistics, its backward's two sums, the gradients) is
`tiles.sum_rows`: one row per subdomain, added in subdomain order. Invariant (what makes the
results the same bits at every rank count): every floating-point operation either acts on one
subdomain's tiles, with the same shapes whatever S is, or is such an ordered sum.
"""

from __future__ import annotations

import torch
from torch import nn

from .models import GroupBatchNorm


def ordered_sum(rows: torch.Tensor) -> torch.Tensor:
    """rows[0] + rows[1] + ... in that order (element-wise adds: the same bits for the same rows,
    however they were computed or gathered)."""
    total = rows[0].clone()
    for row in rows[1:]:
        total += row
    return total


class Tiles:
    """What the tile-wise layers of one rank share: `count` = S, its subdomains (in the batch one
    after the other); `pad`, the halo exchange ((S, B, C, *tile) -> (S, B, C, *(tile + 2)));
    `sum_rows`, (S, ...) this rank's subdomains' rows -> (...) the sum over every subdomain in
    subdomain order (ordered_sum where one process holds them all); and the per-subdomain copies of
    the parameters a training step computes with."""

    def __init__(self, count: int, pad=None, sum_rows=ordered_sum):
        self.count, self.pad, self.sum_rows = count, pad, sum_rows
        self._copies = {}  # parameter -> (its version when copied, S copies)

    def copies(self, p: torch.Tensor | None) -> list:
        """The S copies of parameter p that the subdomains compute with while gradients are
        recorded (made again after p changes), else p itself S times."""
        if p is None or not (p.requires_grad and torch.is_grad_enabled()):
            return [p] * self.count
        version, copies = self._copies.get(p, (None, None))
        if version != p._version:
            copies = [p.detach().clone().requires_grad_(True) for _ in range(self.count)]
            self._copies[p] = (p._version, copies)
        return copies

    def sum_gradients(self, model: nn.Module, extra: torch.Tensor | None = None):
        """Collective (sum_rows): every parameter's gradient = its subdomains' parts (the copies'
        gradients; zeros where a copy got none) added in subdomain order, in one sum_rows call
        with `extra` (S, k) values per subdomain (a loss, a score), whose sums (k,) it returns
        (in the parameters' dtype). The copies are dropped: the next step makes new ones."""
        params = [p for p in model.parameters() if p.requires_grad]
        dtype = params[0].dtype if params else torch.float32
        rows = []
        for p in params:
            _, copies = self._copies.get(p, (None, [None] * self.count))
            rows.append(torch.stack([p.new_zeros(p.numel()) if c is None or c.grad is None else c.grad.reshape(-1)
                                     for c in copies]).to(dtype))
        extra = torch.zeros(self.count, 0) if extra is None else extra.detach().reshape(self.count, -1)
        extra = extra.to(dtype)
        total = self.sum_rows(torch.cat(rows + [extra], 1))
        offset = 0
        for p in params:
            p.grad = torch.empty_like(p).copy_(total[offset:offset + p.numel()].view(p.shape))
            offset += p.numel()
        self._copies.clear()
        return total[offset:]


class TileConv(nn.Module):
    """A convolution (or transposed convolution) run subdomain by subdomain, each with its copy of
    the weights (Tiles.copies); `halo`: its input padded by tiles.pad first (the convolution's own
    padding set to 0). The same parameters, under the same names, as the convolution it wraps."""

    def __init__(self, conv: nn.modules.conv._ConvNd, tiles: Tiles, halo: bool):
        super().__init__()
        self.weight, self.bias = conv.weight, conv.bias
        if halo:
            conv.padding = (0,) * len(conv.kernel_size)
        self._conv, self.tiles, self.halo = (conv,), tiles, halo  # a tuple: not a second owner of the weights

    def _one(self, x, weight, bias):
        conv = self._conv[0]
        if not conv.transposed:
            return conv._conv_forward(x, weight, bias)
        f = nn.functional.conv_transpose2d if x.dim() == 4 else nn.functional.conv_transpose3d
        return f(x, weight, bias, conv.stride, conv.padding, conv.output_padding, conv.groups, conv.dilation)

    def forward(self, x):
        xs = x.unflatten(0, (self.tiles.count, -1))
        if self.halo:
            xs = self.tiles.pad(xs)
        weights, biases = self.tiles.copies(self.weight), self.tiles.copies(self.bias)
        return torch.cat([self._one(xs[k], weights[k], biases[k]) for k in range(self.tiles.count)])


def _sums(grad, x, mean):
    """(sum of grad, sum of grad * (x - mean)) per channel in one pass: torch's BatchNorm backward
    kernel in its eval form, with a unit variance, gives them as the bias and weight gradients."""
    ones = torch.ones_like(mean)
    _, sum_dy_xmu, sum_dy = torch.ops.aten.native_batch_norm_backward(grad, x, ones, mean, ones, None, None, False,
                                                                      0.0, [False, True, True])
    return sum_dy, sum_dy_xmu


class _TileBatchNorm(torch.autograd.Function):
    """BatchNorm's training step over every tile of every rank: forward, each subdomain's
    per-channel sums (one var_mean pass) added over every subdomain (tiles.sum_rows, float64),
    then torch's fused normalisation with the global mean and variance; backward, the two
    per-channel sums the input gradient needs added the same way, each subdomain's parameter
    gradients onto its copies."""

    @staticmethod
    def forward(ctx, x, module, *params):  # params: S weight copies then S bias copies (none without affine)
        S, C = module.tiles.count, x.shape[1]
        xs = x.unflatten(0, (S, -1))
        dims = [0, *range(2, x.dim())]
        n = xs[0].numel() // C
        rows = []
        for k in range(S):  # two passes: var_mean's running updates took 5x longer on these maps
            mean = xs[k].mean(dims, keepdim=True)
            xmu = xs[k] - mean
            var, mean = (xmu * xmu).mean(dims).double(), mean.flatten().double()
            rows.append(torch.cat([mean * n, (var + mean * mean) * n, mean.new_full((1,), n)]))
        total = module.tiles.sum_rows(torch.stack(rows))
        mean, var = (v.to(x.dtype) for v in module.global_statistics(total, C))
        weight, bias = (params[0], params[S]) if params else (None, None)
        ctx.save_for_backward(x, weight, mean, torch.rsqrt(var + module.eps))
        ctx.module, ctx.count, ctx.affine = module, float(total[-1]), bool(params)
        return nn.functional.batch_norm(x, mean, var, weight, bias, False, 0.0, module.eps)

    @staticmethod
    def backward(ctx, grad):
        x, weight, mean, invstd = ctx.saved_tensors
        S, C = ctx.module.tiles.count, x.shape[1]
        shape = [1, C] + [1] * (x.dim() - 2)
        gs, xs = grad.unflatten(0, (S, -1)), x.unflatten(0, (S, -1))
        sum_dy, sum_dy_xmu = zip(*[_sums(gs[k], xs[k], mean) for k in range(S)])
        rows = torch.stack([torch.cat([a, b]) for a, b in zip(sum_dy, sum_dy_xmu)]).double()
        total = ctx.module.tiles.sum_rows(rows).to(x.dtype)
        scale = invstd if weight is None else weight * invstd
        # dx = (grad - sum_dy / count - (x - mean) invstd^2 sum_dy_xmu / count) * weight * invstd
        dx = torch.addcmul((-total[:C] / ctx.count * scale).view(shape), grad, scale.view(shape))
        dx.addcmul_(x - mean.view(shape), (-invstd * invstd * total[C:] / ctx.count * scale).view(shape))
        if not ctx.affine:
            return dx, None
        return dx, None, *[s * invstd for s in sum_dy_xmu], *sum_dy


class TileBatchNorm(GroupBatchNorm):
    """BatchNorm whose batch statistics cover every tile of every rank (sums through `tiles`):
    nn.BatchNorm's parameters, buffers and eval mode (models.GroupBatchNorm's), torch's fused
    normalisation forward and a hand-written backward."""

    def __init__(self, bn: nn.modules.batchnorm._BatchNorm, tiles: Tiles):
        super().__init__(bn, allreduce=None)
        self.tiles = tiles

    def forward(self, x):
        if not self.training:
            return super().forward(x)
        params = [*self.tiles.copies(self.weight), *self.tiles.copies(self.bias)] if self.affine else []
        return _TileBatchNorm.apply(x, self, *params)


def tile_wise(model: nn.Module, tiles: Tiles) -> nn.Module:
    """In place: every convolution of `model` a TileConv (the 3x3 ones with the halo, where
    tiles.pad is given), every BatchNorm a TileBatchNorm, all sharing `tiles`; see the module
    docstring."""
    for name, child in model.named_children():
        if isinstance(child, nn.modules.conv._ConvNd):
            setattr(model, name, TileConv(child, tiles, halo=tiles.pad is not None and child.kernel_size[0] == 3))
        elif isinstance(child, nn.modules.batchnorm._BatchNorm):
            setattr(model, name, TileBatchNorm(child, tiles))
        else:
            tile_wise(child, tiles)
    return model
