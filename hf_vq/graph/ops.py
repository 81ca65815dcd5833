"""The shared logic of the channel-space rules: how parameters seen through views, elementwise ops, reshapes,
slices, norms and layers create, pass, merge or close channel spaces (called by [`hf_vq.graph.rules`])."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import torch

from .tags import VIEWS, ParamView, Ref, Tag, aten, norm_dim, shape_of

if TYPE_CHECKING:
    from .analysis import Analysis

__all__ = ["param_view", "elementwise", "reshape", "restrict", "slice_", "split", "norm_like", "channel_op", "linear",
           "conv", "attention", "matmul", "cat"]


def param_view(a: Analysis, node, pv: ParamView) -> Any:
    t, args = node.target, node.args
    out_shape = shape_of(node)
    in_shape = shape_of(args[0])
    a.consumed.add(pv.fqn)
    if t in (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
             aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default):
        return pv
    if t is aten.unsqueeze.default:
        d = norm_dim(args[1], len(out_shape))
        return pv._replace(dims=pv.dims[:d] + (None,) + pv.dims[d:])
    if t is aten.expand.default:
        extra = len(out_shape) - len(in_shape)
        dims = (None,) * extra + tuple(None if in_shape[i] == 1 and out_shape[i + extra] != 1 else d
                                       for i, d in enumerate(pv.dims))
        return pv._replace(dims=dims)
    if t is aten.permute.default:
        order = [norm_dim(d, len(out_shape)) for d in args[1]]
        return pv._replace(dims=tuple(pv.dims[o] for o in order))
    if t in (aten.transpose.int, aten.t.default):
        nd = len(out_shape)
        i, j = (0, 1) if t is aten.t.default else (norm_dim(args[1], nd), norm_dim(args[2], nd))
        dims = list(pv.dims)
        dims[i], dims[j] = dims[j], dims[i]
        return pv._replace(dims=tuple(dims))
    if t in VIEWS or t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
        # only views that add or drop size-1 dims keep the parameter's dims intact
        if [s for s in in_shape if s != 1] == [s for s in out_shape if s != 1]:
            src = [d for d, s in zip(pv.dims, in_shape) if s != 1]
            it = iter(src)
            return pv._replace(dims=tuple(next(it) if s != 1 else None for s in out_shape))
    a.consumed.discard(pv.fqn)  # a reshape that merges or splits the parameter's dims
    return None


def elementwise(a: Analysis, node, operands: list) -> Tag | None:
    out_shape = shape_of(node)
    if out_shape is None:
        a.close(a.val(operands), f"{node.target} with an unexpected output")
        return None
    nd = len(out_shape)
    tags = []
    for arg in operands:
        v = a.val(arg)
        if isinstance(v, Tag):
            tags.append(v._replace(dim=v.dim + nd - len(shape_of(arg))))
    if not tags:
        return None  # parameters combined with unpermuted tensors only: they must keep their order
    tag = a.merge(tags, str(node.target))
    if tag is None:
        return None
    for arg in operands:
        v, sh = a.val(arg), shape_of(arg)
        if isinstance(v, Tag) or sh is None:
            continue
        k = tag.dim - (nd - len(sh))
        if k < 0 or sh[k] == 1:
            continue
        if isinstance(v, ParamView) and v.dims[k] is not None:
            a.add_ref(tag.space, Ref(v.fqn, v.dims[k], tag.inner, "follower"))
            a.consumed.add(v.fqn)
        elif isinstance(v, ParamView):
            a.consumed.add(v.fqn)  # broadcast along the channels
        else:
            a.close(tag, f"{node.target} with a tensor indexed by channel that is not in the space")
            return None
    return Tag(a.find(tag.space), tag.dim, tag.inner)


def reshape(a: Analysis, x: Tag, in_shape, out_shape, what: str) -> Tag | None:
    P = a.P(x.space)
    st = math.prod(in_shape[x.dim + 1:])
    u = st * x.inner
    for j, n in enumerate(out_shape):
        ost = math.prod(out_shape[j + 1:])
        if n > 1 and ost <= u < ost * n:
            break
    else:
        a.close(x, f"{what} loses the channel dimension")
        return None
    span = ost * n
    if u % ost or span % u:
        a.close(x, f"{what} mixes channels with another dimension")
        return None
    avail = span // u
    if avail >= P:
        if avail % P:
            a.close(x, f"{what} mixes channels with another dimension")
            return None
    elif P % avail:
        a.close(x, f"{what} splits channels unevenly")
        return None
    else:
        a.refactor(x.space, avail)  # e.g. [H*hd] -> [H, hd]: one permutation of hd shared by the heads
    return Tag(a.find(x.space), j, u // ost)


def restrict(a: Analysis, x: Tag, bounds: list[int], what: str) -> bool:
    """Make chunk boundaries (in elements of the tagged dim) fall between permutation blocks."""
    g = a.P(x.space)
    for b in bounds:
        if b % x.inner:
            a.close(x, f"{what} cuts inside a channel")
            return False
        g = math.gcd(g, b // x.inner)
    if g < a.P(x.space):
        a.refactor(x.space, g)
    return True


def slice_(a: Analysis, node, x) -> Any:
    if not isinstance(x, Tag):
        return None
    args = node.args
    in_shape = shape_of(args[0])
    d = norm_dim(args[1] if len(args) > 1 else 0, len(in_shape))
    if d != x.dim:
        return x
    size = in_shape[d]
    start = args[2] if len(args) > 2 and args[2] is not None else 0
    end = args[3] if len(args) > 3 and args[3] is not None else size
    step = args[4] if len(args) > 4 else 1
    start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
    start, end = max(0, min(start, size)), max(0, min(end, size))
    if step != 1:
        a.close(x, "strided slice of channels")
        return None
    if start == 0 and end == size:
        return x
    return Tag(a.find(x.space), x.dim, x.inner) if restrict(a, x, [start, end - start], "slice") else None


def split(a: Analysis, node, x) -> Any:
    t, args = node.target, node.args
    outs = node.meta.get("val")
    n_out = len(outs) if isinstance(outs, (tuple, list)) else 0
    if not isinstance(x, Tag):
        return [None] * n_out
    in_shape = shape_of(args[0])
    if t is aten.unbind.int:
        dim_arg = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
    else:
        dim_arg = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
    d = norm_dim(dim_arg, len(in_shape))
    if d != x.dim:
        nx = x._replace(dim=x.dim - 1 if (t is aten.unbind.int and d < x.dim) else x.dim)
        return [nx] * n_out
    if t is aten.unbind.int:
        a.close(x, "channels unbound one by one")
        return [None] * n_out
    sizes = [int(o.shape[d]) for o in outs]
    bounds = sizes + [sum(sizes[:i]) for i in range(n_out)]
    if not restrict(a, x, bounds, "split"):
        return [None] * n_out
    return [Tag(a.find(x.space), x.dim, x.inner)] * n_out


def norm_like(a: Analysis, node, x, n_norm: int, affine: list) -> Any:
    if not isinstance(x, Tag):
        a.opaque_use(node, affine)  # affine parameters of an untagged tensor: never permuted
        return None
    nd = len(shape_of(node.args[0]))
    if x.dim < nd - n_norm:
        return x  # normalised over other dims: the channels pass through, the affine does not index them
    if n_norm != 1:
        a.close(x, f"{node.target} over several dims including the channels")
        a.opaque_use(node, affine)
        return None
    return channel_op(a, node, x, affine, dim=0)


def channel_op(a: Analysis, node, x, params: list, dim: int = 0) -> Any:
    """A per-channel op: its parameters (1-D, indexed by channel) follow the space."""
    if not isinstance(x, Tag):
        a.opaque_use(node, params)
        return None
    for arg in params:
        if arg is None:
            continue
        fqn = a.plain_param(arg)
        if fqn is None:
            if a.val(arg) is not None or isinstance(arg, torch.fx.Node):
                a.close(x, f"{node.target} with a computed per-channel tensor")
                return None
            continue
        a.add_ref(x.space, Ref(fqn, dim, x.inner, "follower"))
    if node.target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default) and x.dim != 1:
        a.close(x, "batch norm over a dimension that is not the channels")
        return None
    return Tag(a.find(x.space), x.dim, x.inner)


def linear(a: Analysis, node, inp, weight, bias, *, transposed: bool = False) -> Any:
    """`inp @ W.T + b` (or `inp @ W + b` for mm / addmm, weight `[in, out]`)."""
    x = a.val(inp)
    fqn = a.plain_param(weight)
    bias_fqn = a.plain_param(bias) if bias is not None else None
    out_shape = shape_of(node)
    if fqn is None or (bias is not None and bias_fqn is None):
        if isinstance(a.val(weight), Tag) or not isinstance(a.val(weight), (ParamView, type(None))):
            a.close(a.val(weight), f"{node.target} with a computed weight")
        a.close(x, f"{node.target} with a computed weight")
        a.opaque_use(node, [weight, bias])
        return None
    in_dim, out_dim = (0, 1) if transposed else (1, 0)
    if isinstance(x, Tag):
        if x.dim != len(shape_of(inp)) - 1:
            a.close(x, f"{node.target} applied along another dimension than the channels")
        else:
            a.add_ref(x.space, Ref(fqn, in_dim, x.inner, "child"))
    s = a.new_space(out_shape[-1], f"{node.target} {fqn}")
    a.add_ref(s, Ref(fqn, out_dim, 1, "parent"))
    if bias_fqn is not None:
        a.add_ref(s, Ref(bias_fqn, 0, 1, "parent"))
    return Tag(s, len(out_shape) - 1, 1)


def conv(a: Analysis, node) -> Any:
    t, args = node.target, node.args
    x = a.val(args[0])
    weight = args[1]
    bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
    if t is aten.convolution.default:
        transposed, groups = args[6], args[8]
    else:
        transposed, groups = False, args[6] if len(args) > 6 else node.kwargs.get("groups", 1)
    fqn = a.plain_param(weight)
    bias_fqn = a.plain_param(bias) if bias is not None else None
    if transposed or fqn is None or (bias is not None and bias_fqn is None):
        a.close(x, f"{t} {'transposed' if transposed else 'with a computed weight'}")
        a.opaque_use(node, [weight, bias])
        return None
    w_shape = shape_of(weight)
    c_in = shape_of(args[0])[1]
    c_out = w_shape[0]
    if isinstance(x, Tag) and x.dim != 1:
        a.close(x, f"{t} along a dimension that is not the channels")
        x = None
    if groups == 1:
        if isinstance(x, Tag):
            a.add_ref(x.space, Ref(fqn, 1, x.inner, "child"))
        s = a.new_space(c_out, f"conv {fqn}")
        a.add_ref(s, Ref(fqn, 0, 1, "parent"))
        if bias_fqn is not None:
            a.add_ref(s, Ref(bias_fqn, 0, 1, "parent"))
        return Tag(s, 1, 1)
    if groups == c_in == c_out and w_shape[1] == 1:  # depthwise: channels pass through
        if not isinstance(x, Tag):
            a.opaque_use(node, [weight, bias])
            return None
        a.add_ref(x.space, Ref(fqn, 0, x.inner, "follower"))
        if bias_fqn is not None:
            a.add_ref(x.space, Ref(bias_fqn, 0, x.inner, "follower"))
        return Tag(a.find(x.space), 1, x.inner)
    a.close(x, f"grouped convolution ({groups} groups) {fqn}")
    a.opaque_use(node, [weight, bias])
    return None


def attention(a: Analysis, node) -> Any:
    args = node.args
    q, k, v = (a.val(arg) for arg in args[:3])
    rest = list(args[3:]) + list(node.kwargs.values())
    a.close(a.val(rest), "attention mask indexed by channel")
    nq, nk, nv = (len(shape_of(arg)) for arg in args[:3])
    tq = q if isinstance(q, Tag) and q.dim == nq - 1 else None
    tk = k if isinstance(k, Tag) and k.dim == nk - 1 else None
    if tq is not None and tk is not None:
        a.merge([tq, tk], "q·k")  # a common permutation of q and k leaves q·kᵀ unchanged
    else:
        a.close([q, k], "attention scores from a permuted query or key alone")
    if isinstance(v, Tag) and v.dim == nv - 1:
        return Tag(a.find(v.space), len(shape_of(node)) - 1, v.inner)
    a.close(v, "attention values permuted along another dimension than head_dim")
    return None


def matmul(a: Analysis, node) -> Any:
    left, right = node.args[0], node.args[1]
    va, vb = a.val(left), a.val(right)
    if isinstance(va, ParamView) or isinstance(vb, ParamView):
        a.opaque_use(node, [left, right])
        a.close([va, vb], f"{node.target} with a parameter")
        return None
    na, nb, no = len(shape_of(left)), len(shape_of(right)), len(shape_of(node))
    if na < 2 or nb < 2:
        a.close([va, vb], f"{node.target} of vectors")
        return None
    out = None
    ta = va if isinstance(va, Tag) else None
    tb = vb if isinstance(vb, Tag) else None
    if ta is not None and ta.dim == na - 1 and tb is not None and tb.dim == nb - 2:
        a.merge([ta, tb], "contraction")  # Σ_c a_c b_c is invariant under a common permutation
        return None
    if ta is not None and ta.dim == na - 2 and tb is None:
        out = Tag(a.find(ta.space), no - 2, ta.inner)
    elif tb is not None and tb.dim == nb - 1 and ta is None:
        out = Tag(a.find(tb.space), no - 1, tb.inner)
    else:
        a.close([va, vb], f"{node.target} mixing channels")
    return out


def cat(a: Analysis, node) -> Any:
    tensors = node.args[0]
    nd = len(shape_of(node))
    d = norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
    vals = [a.val(arg) for arg in tensors]
    tags = [v for v in vals if isinstance(v, Tag)]
    if not tags:
        return None
    if any(t.dim == d for t in tags):
        a.close(vals, "concatenation along the channel dimension")
        return None
    tag = a.merge(tags, "cat")
    if tag is None:
        return None
    for arg, v in zip(tensors, vals):
        if isinstance(v, Tag):
            continue
        if isinstance(v, ParamView) and v.dims[tag.dim] is not None:
            a.add_ref(tag.space, Ref(v.fqn, v.dims[tag.dim], tag.inner, "follower"))
            a.consumed.add(v.fqn)
        elif isinstance(v, ParamView):
            a.consumed.add(v.fqn)
        else:
            a.close(tag, "concatenated with a tensor that is not in the space")
            return None
    return Tag(a.find(tag.space), tag.dim, tag.inner)

