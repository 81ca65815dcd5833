"""The rules of channel-space analysis, one per ATen op family, as a dispatch table ([`RULES`]).

Each rule takes the [`Analysis`] and one call node and returns the node's value: a [`Tag`] (this tensor
dimension carries a channel space), a [`ParamView`] (a parameter seen through views), a list of them (ops
with several outputs) or None (nothing permutable). A rule *creates* spaces (linear, conv, embedding),
*passes* them through (elementwise, views, norms), *merges* them (residual additions, q·k) or *closes* them
(anything it cannot prove safe). An op without a rule closes every space it touches.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch

from .ops import attention, cat, channel_op, conv, elementwise, linear, matmul, norm_like, param_view, reshape, slice_, split
from .tags import (CONVS, ELEMENTWISE, IGNORE, PARAM_VIEWS, PASS_UNARY, POOL, POOL_TUPLE, REDUCE, VIEWS, ParamView,
                   Ref, Tag, aten, norm_dim, shape_of, squeezed)

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["RULES", "apply_rule"]

Rule = Callable[["Analysis", torch.fx.Node], Any]
#: ATen op -> its rule. Filled by `@_rule(...)` below; the first rule registered for an op wins.
RULES: dict[Any, Rule] = {}


def _rule(*ops: Any) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            RULES.setdefault(op, fn)
        return fn

    return register


def apply_rule(a: Analysis, node: torch.fx.Node) -> Any:
    """The value of `node` by the rule of its op; an op without a rule closes the spaces it touches."""
    x = a.val(node.args[0]) if node.args else None
    if isinstance(x, ParamView) and node.target in PARAM_VIEWS:  # a parameter seen through a view
        return param_view(a, node, x)
    rule = RULES.get(node.target)
    if rule is not None:
        return rule(a, node)
    everything = list(node.args) + list(node.kwargs.values())
    a.close(a.val(everything), f"{node.target} is not understood")
    a.opaque_use(node, everything)
    return None


def _tagged_input(a: Analysis, node: torch.fx.Node) -> Tag | None:
    x = a.val(node.args[0]) if node.args else None
    return x if isinstance(x, Tag) else None


# ================================================================================================ pass-through
@_rule(*IGNORE)

def _ignore(a: Analysis, node) -> None:
    a.consumed |= {pv.fqn for pv in a._params_in(a.val(list(node.args)))}


@_rule(operator.getitem)

def _getitem(a: Analysis, node) -> Any:
    v = a.val(node.args[0])
    return v[node.args[1]] if isinstance(v, (tuple, list)) and node.args[1] < len(v) else None


@_rule(*PASS_UNARY)

def _pass_unary(a: Analysis, node) -> Tag | None:
    a.close(a.val(node.args[1:]), f"{node.target} with a tensor argument")
    return _tagged_input(a, node)


@_rule(*ELEMENTWISE)

def _elementwise(a: Analysis, node) -> Tag | None:
    operands = [x for x in list(node.args) + list(node.kwargs.values()) if isinstance(x, torch.fx.Node)]
    return elementwise(a, node, operands)


# ================================================================================================ views
@_rule(*VIEWS)

def _view(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    return reshape(a, x, shape_of(node.args[0]), shape_of(node), str(node.target)) if x is not None else None


@_rule(aten.permute.default)

def _permute(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    dims = [norm_dim(d, len(shape_of(node))) for d in node.args[1]]
    return x._replace(dim=dims.index(x.dim))


@_rule(aten.transpose.int, aten.t.default, aten.swapaxes.default)

def _transpose(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    nd, args = len(shape_of(node)), node.args
    i, j = (0, 1) if node.target is aten.t.default else (norm_dim(args[1], nd), norm_dim(args[2], nd))
    return x._replace(dim=j if x.dim == i else i if x.dim == j else x.dim)


@_rule(aten.unsqueeze.default)

def _unsqueeze(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    d = norm_dim(node.args[1], len(shape_of(node)))
    return x._replace(dim=x.dim + 1 if d <= x.dim else x.dim)


@_rule(aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default)

def _squeeze(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    in_shape = shape_of(node.args[0])
    keep = [i for i in range(len(in_shape)) if not squeezed(node.target, node.args, in_shape, i)]
    return x._replace(dim=keep.index(x.dim)) if x.dim in keep else None


@_rule(aten.expand.default)

def _expand(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    return x._replace(dim=x.dim + len(shape_of(node)) - len(shape_of(node.args[0])))


@_rule(aten.slice.Tensor)

def _slice(a: Analysis, node) -> Any:
    return slice_(a, node, a.val(node.args[0]))


@_rule(aten.select.int)

def _select(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    d = norm_dim(node.args[1], len(shape_of(node.args[0])))
    if d == x.dim:
        a.close(x, "one channel selected (select)")
        return None
    return x._replace(dim=x.dim - 1 if d < x.dim else x.dim)


@_rule(aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int)

def _split(a: Analysis, node) -> Any:
    return split(a, node, a.val(node.args[0]))


# ================================================================================================ reductions, pooling
@_rule(*REDUCE, aten.mean.default, aten.sum.default)

def _reduce(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    t, args, kw = node.target, node.args, node.kwargs
    in_shape = shape_of(args[0])
    dims = args[1] if len(args) > 1 and t not in (aten.mean.default, aten.sum.default) else None
    keepdim = bool(kw.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
    if t in (aten.var.correction, aten.std.correction):
        dims, keepdim = (args[1] if len(args) > 1 else kw.get("dim")), bool(kw.get("keepdim", False))
    if dims is None or dims == []:
        return None
    dims = [norm_dim(d, len(in_shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    if x.dim in dims:
        return None  # a symmetric function of the channels: invariant
    return x if keepdim else x._replace(dim=x.dim - sum(d < x.dim for d in dims))


@_rule(*POOL, *POOL_TUPLE)

def _pool(a: Analysis, node) -> Any:
    x = _tagged_input(a, node)
    if x is None:
        return None
    spatial = 2 if "2d" in str(node.target) else 1
    if x.dim >= len(shape_of(node.args[0])) - spatial:
        a.close(x, f"{node.target} over the channel dimension")
        return None
    return (x, None) if node.target in POOL_TUPLE else x


@_rule(aten.pad.default, aten.constant_pad_nd.default)

def _pad(a: Analysis, node) -> Tag | None:
    x = _tagged_input(a, node)
    if x is None:
        return None
    pad, nd = list(node.args[1]), len(shape_of(node.args[0]))
    k = nd - 1 - x.dim
    if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
        a.close(x, "padding along the channel dimension")
        return None
    return x


# ================================================================================================ layers
@_rule(aten.linear.default)

def _linear(a: Analysis, node) -> Any:
    args = node.args
    return linear(a, node, args[0], args[1], args[2] if len(args) > 2 else node.kwargs.get("bias"))


@_rule(aten.addmm.default)

def _addmm(a: Analysis, node) -> Any:
    return linear(a, node, node.args[1], node.args[2], node.args[0], transposed=True)


@_rule(aten.mm.default)

def _mm(a: Analysis, node) -> Any:
    return linear(a, node, node.args[0], node.args[1], None, transposed=True)


@_rule(*CONVS, aten.convolution.default)

def _conv(a: Analysis, node) -> Any:
    return conv(a, node)


@_rule(aten.embedding.default)

def _embedding(a: Analysis, node) -> Tag | None:
    fqn = a.plain_param(node.args[0])
    if fqn is None:
        a.opaque_use(node, node.args)
        return None
    s = a.new_space(shape_of(node.args[0])[1], f"embedding {fqn}")
    a.add_ref(s, Ref(fqn, 1, 1, "parent"))
    return Tag(s, len(shape_of(node)) - 1, 1)


@_rule(aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default)

def _layer_norm(a: Analysis, node) -> Any:
    t, args, kw = node.target, node.args, node.kwargs
    w = args[2] if len(args) > 2 else kw.get("weight")
    b = (args[3] if len(args) > 3 else kw.get("bias")) if t is not aten.rms_norm.default else None
    out = norm_like(a, node, a.val(args[0]), len(list(args[1])), [w, b])
    return (out, None, None) if t is aten.native_layer_norm.default else out


@_rule(aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default, aten.instance_norm.default)

def _batch_norm(a: Analysis, node) -> Any:
    t, args = node.target, node.args
    if t is aten.instance_norm.default:
        affine, stats = [args[1], args[2]], ([args[3], args[4]] if not args[5] else [])
    else:
        affine, stats = [args[1], args[2]], [args[3], args[4]]
    out = channel_op(a, node, a.val(args[0]), affine + stats)
    return (out, None, None) if t is aten._native_batch_norm_legit_no_training.default else out


@_rule(aten.scaled_dot_product_attention.default)

def _attention(a: Analysis, node) -> Any:
    return attention(a, node)


@_rule(aten.matmul.default, aten.bmm.default)

def _matmul(a: Analysis, node) -> Any:
    return matmul(a, node)


@_rule(aten.cat.default)

def _cat(a: Analysis, node) -> Any:
    return cat(a, node)
