"""The vocabulary of channel-space analysis: tags carried by tensor dimensions, parameter views, references, and
the ATen op families the rules in [`hf_vq.graph.rules`] know."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = ["Tag", "ParamView", "Ref", "ChannelSpace", "shape_of", "norm_dim", "squeezed"]

aten = torch.ops.aten


class Tag(NamedTuple):
    """Tensor dimension `dim` carries space `space`, laid out as `(r, p, i)`: index `(r*P + p)*inner + i`."""

    space: int
    dim: int
    inner: int


class ParamView(NamedTuple):
    """A parameter (or buffer) seen through views that only add / drop / reorder / broadcast size-1 dims.

    `dims[k]` is the parameter dimension of tensor dimension `k` (None: an added or broadcast dim).
    """

    fqn: str
    dims: tuple[int | None, ...]


class Ref(NamedTuple):
    fqn: str
    dim: int
    inner: int
    role: str  # "parent" | "child" | "follower"


@dataclass
class ChannelSpace:
    """A channel space found by [`find_channel_spaces`]: parameters to permute along a dimension.

    Attributes:
        size (`int`): channels `P` of the permutation.
        refs (`list`): `(parameter name, dim, inner, role)`; the dimension is laid out as `(r, p, i)`, index
            `(r*P + p)*inner + i`, and `p` is permuted.
        reasons (`list[str]`): why the space must keep its order (empty when it may be permuted).
    """

    size: int
    refs: list[Ref]
    reasons: list[str]
    origin: str

    @property
    def open(self) -> bool:
        return not self.reasons

    def names(self, role: str) -> list[str]:
        out: list[str] = []
        for ref in self.refs:
            if ref.role == role:
                name = ref.fqn[: -len(".weight")] if role != "follower" and ref.fqn.endswith(".weight") else ref.fqn
                if name not in out:
                    out.append(name)
        return out


PASS_UNARY = {
    aten.relu.default, aten.relu_.default, aten.gelu.default, aten.gelu_.default, aten.silu.default,
    aten.silu_.default, aten.sigmoid.default, aten.sigmoid_.default, aten.tanh.default, aten.tanh_.default,
    aten.hardtanh.default, aten.hardtanh_.default, aten.hardswish.default, aten.hardswish_.default,
    aten.hardsigmoid.default, aten.hardsigmoid_.default, aten.elu.default, aten.elu_.default,
    aten.leaky_relu.default, aten.leaky_relu_.default, aten.mish.default, aten.mish_.default, aten.relu6.default,
    aten.neg.default, aten.rsqrt.default, aten.sqrt.default, aten.exp.default, aten.log.default, aten.abs.default,
    aten.erf.default, aten.softplus.default, aten.square.default, aten.reciprocal.default,
    aten.pow.Tensor_Scalar, aten.clamp.default, aten.clamp_min.default, aten.clamp_max.default,
    aten.dropout.default, aten.dropout_.default, aten.clone.default, aten.contiguous.default, aten.alias.default,
    aten.detach.default, aten.detach_.default, aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten.to.other,
    aten._to_copy.default, aten.lift_fresh_copy.default, aten.type_as.default,
    aten.mul.Scalar, aten.add.Scalar, aten.sub.Scalar, aten.div.Scalar, aten.mul_.Scalar, aten.add_.Scalar,
    aten.div_.Scalar, aten.gelu.default, aten.logit.default, aten.sin.default, aten.cos.default,
    aten._softmax.default, aten.softmax.int, aten._log_softmax.default, aten.log_softmax.int,  # equivariant
}
ELEMENTWISE = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.div_.Tensor, aten.maximum.default, aten.minimum.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.pow.Tensor_Tensor, aten.rsub.Tensor, aten.rsub.Scalar,
    aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor,
}
VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
           aten.std.correction, aten.var.dim, aten.std.dim, aten.logsumexp.default, aten.linalg_vector_norm.default}
POOL = {aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.avg_pool2d.default,
         aten.max_pool2d.default, aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default, aten.max_pool1d.default,
         aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.default,
         aten.upsample_bilinear2d.default}
POOL_TUPLE = {aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default}
CONVS = {aten.conv2d.default, aten.conv1d.default, aten.conv3d.default}
PARAM_VIEWS = {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.unsqueeze.default, aten.expand.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, *VIEWS,
}
IGNORE = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
           aten._assert_async.msg}


def shape_of(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def squeezed(t, args, in_shape, i) -> bool:
    if in_shape[i] != 1:
        return False
    if t is aten.squeeze.default:
        return True
    dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    return i in [norm_dim(d, len(in_shape)) for d in dims]


