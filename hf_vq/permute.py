"""PQF's first step for any architecture: find the coupled layers, search permutations, apply them in place.

Two adjacent layers compute the same function when the output channels of the first (the *parents*:
conv / linear weight rows and bias, the norms and per-channel scales that follow) and the input
channels of the second (the *children*: weight columns) are permuted by the same permutation. A
*channel space* is everything that must share one permutation. hf_vq finds the spaces from the model
itself: it traces the model with `torch.export` on example inputs and propagates, through the ATen
graph, which tensor dimension carries which space:

* `linear` / `conv` / `addmm` (GPT-2's Conv1D) / `embedding` **create** a space (their output rows);
  what reads a tagged dimension through a weight is a **child**;
* per-channel operations pass a space through and their parameters follow it: BatchNorm (affine and
  running statistics), LayerNorm / RMSNorm over the channel dimension, depthwise convolutions,
  elementwise activations, per-channel scales and biases (layer scale, class token, position
  embeddings), pooling, padding and reductions over other dimensions;
* elementwise operations between two spaces **merge** them (residual additions, squeeze-excitation
  gates, gated MLPs); a contraction of two tagged dimensions (attention scores `q·k`) merges them too
  and gives an untagged result;
* reshapes keep a space when its channels stay contiguous; splitting it into heads (`[H*hd] -> [H, hd]`)
  restricts it to one permutation of `hd` shared by every head (so value rows and output-projection
  columns are permuted within each head, consistently, grouped-query attention included);
* anything else — an operation not understood, a concatenation or slice across channels, mixing with
  an unpermuted tensor, a parameter used in an unexpected way, an output returned to the user —
  **closes** the space: it is left in its original order (safe by default). The report says why.

The search ([`hf_vq.codec.permutation`]) then runs per open space on the matrices that will be
quantized, and the permutations are applied in place. The function is unchanged (up to float
rounding of reordered sums).

The objective is the paper's (log-det of the children's weight-subvector covariance) unless
`calibration` batches are given: then each child's weight columns are first scaled by the RMS of the
input channel they multiply ([`input_moments`]), so the search groups subvectors by how they act on
real inputs. [`hf_vq.quantize_`] with the same `calibration` then runs weighted k-means (each weight entry
weighted by its input channel's second moment). On EfficientNet-Lite0, whose channels carry activations of
very different scales, the paper's objective does not bring the outputs closer before fine-tuning; the
activation-aware one followed by weighted k-means does, at 2 and 4 bits (benchmarks/results/permute.md).
"""

from __future__ import annotations

import logging
import math
import operator
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
from torch import nn

from .codec.permutation import ObjectiveTerm, apply_index, search_permutation
from .config import LayerLayout, VQConfig

__all__ = ["permute_", "find_channel_spaces", "default_example_inputs", "input_moments", "shard_groups",
           "PermutationReport", "SpaceReport", "ChannelSpace"]

logger = logging.getLogger(__name__)

aten = torch.ops.aten


# ================================================================================================ report
@dataclass
class SpaceReport:
    """One channel space: who writes it, who reads it, and what the search did.

    Attributes:
        name (`str`): a short name (the first parent).
        size (`int`): channels permuted (`P`); `repeats` copies share the permutation (attention heads).
        repeats (`int`): how many times the permutation is repeated along the parents' dimension.
        parents / children / followers (`list[str]`): module or parameter names.
        status (`str`): `"permuted"`, `"unchanged"` (no permutation beat the identity), `"nothing to optimise"`
            (no quantized child whose subvectors span several channels) or `"refused"`.
        reasons (`list[str]`): why a space was refused (left in its original order).
        objective_identity / objective_greedy / objective (`float`, *optional*): the search's log-det objective.
        steps / accepted (`int`), seconds (`float`): search effort.
    """

    name: str
    size: int
    repeats: int
    parents: list[str]
    children: list[str]
    followers: list[str]
    status: str = "nothing to optimise"
    reasons: list[str] = field(default_factory=list)
    terms: int = 0
    objective_identity: float | None = None
    objective_greedy: float | None = None
    objective: float | None = None
    steps: int = 0
    accepted: int = 0
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass
class PermutationReport:
    """What [`permute_`] found and did: every channel space, permuted or refused, with reasons.

    `str(report)` is a readable summary (printed by `hf-vq compress`); `to_dict()` is JSON-ready.
    """

    spaces: list[SpaceReport] = field(default_factory=list)
    traced: bool = False
    reason: str | None = None
    device: str = "cpu"
    iters: int = 0
    seconds: float = 0.0
    objective: str = "weights"

    @property
    def permuted(self) -> list[SpaceReport]:
        return [s for s in self.spaces if s.status == "permuted"]

    @property
    def refused(self) -> list[SpaceReport]:
        return [s for s in self.spaces if s.status == "refused"]

    def to_dict(self) -> dict[str, Any]:
        return {"traced": self.traced, "reason": self.reason, "device": self.device, "iters": self.iters,
                "objective": self.objective,
                "seconds": round(self.seconds, 3), "spaces": [s.to_dict() for s in self.spaces]}

    def __str__(self) -> str:
        if not self.traced:
            return f"permutation: skipped ({self.reason})"
        lines = [f"permutation: {len(self.spaces)} channel spaces, {len(self.permuted)} permuted, "
                 f"{len(self.refused)} refused ({self.seconds:.1f} s on {self.device}, <= {self.iters} steps per space, "
                 f"{self.objective} objective)"]
        searched = [s for s in self.spaces if s.objective is not None]
        if searched:
            lines.append(f"  {'space':<44} {'P':>6} {'terms':>5} {'logdet before':>14} {'greedy':>10} {'after':>10} {'swaps':>6}")
            for s in searched:
                size = f"{s.size}" + (f"x{s.repeats}" if s.repeats > 1 else "")
                lines.append(f"  {_short(s.name, 44):<44} {size:>6} {s.terms:>5} {s.objective_identity:>14.4f} "
                             f"{s.objective_greedy:>10.4f} {s.objective:>10.4f} {s.accepted:>6}")
                lines.append(f"      parents: {_names(s.parents)}; children: {_names(s.children)}")
        quiet = [s for s in self.spaces if s.status == "nothing to optimise"]
        if quiet:
            lines.append(f"  nothing to optimise (no quantized reader whose subvectors span channels): "
                         f"{_names([s.name for s in quiet], 6)}")
        for s in self.refused:
            lines.append(f"  refused {_short(s.name, 40)} (P={s.size}, children: {_names(s.children, 3)}): "
                         f"{'; '.join(s.reasons[:2])}")
        return "\n".join(lines)


def _short(text: str, width: int) -> str:
    return text if len(text) <= width else "…" + text[-(width - 1):]


def _names(names: list[str], limit: int = 4) -> str:
    if not names:
        return "-"
    if len(names) <= limit:
        return ", ".join(names)
    return ", ".join(names[:limit]) + f", … (+{len(names) - limit})"


# ================================================================================================ analysis
class _Tag(NamedTuple):
    """Tensor dimension `dim` carries space `space`, laid out as `(r, p, i)`: index `(r*P + p)*inner + i`."""

    space: int
    dim: int
    inner: int


class _ParamView(NamedTuple):
    """A parameter (or buffer) seen through views that only add / drop / reorder / broadcast size-1 dims.

    `dims[k]` is the parameter dimension of tensor dimension `k` (None: an added or broadcast dim).
    """

    fqn: str
    dims: tuple[int | None, ...]


class _Ref(NamedTuple):
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
    refs: list[_Ref]
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


_PASS_UNARY = {
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
_ELEMENTWISE = {
    aten.add.Tensor, aten.add_.Tensor, aten.sub.Tensor, aten.sub_.Tensor, aten.mul.Tensor, aten.mul_.Tensor,
    aten.div.Tensor, aten.div_.Tensor, aten.maximum.default, aten.minimum.default, aten.where.self,
    aten.masked_fill.Scalar, aten.masked_fill.Tensor, aten.pow.Tensor_Tensor, aten.rsub.Tensor, aten.rsub.Scalar,
    aten.eq.Tensor, aten.ne.Tensor, aten.lt.Tensor, aten.le.Tensor, aten.gt.Tensor, aten.ge.Tensor,
}
_VIEWS = {aten.view.default, aten.reshape.default, aten._unsafe_view.default, aten.flatten.using_ints}
_REDUCE = {aten.mean.dim, aten.sum.dim_IntList, aten.amax.default, aten.amin.default, aten.var.correction,
           aten.std.correction, aten.var.dim, aten.std.dim, aten.logsumexp.default, aten.linalg_vector_norm.default}
_POOL = {aten.adaptive_avg_pool2d.default, aten._adaptive_avg_pool2d.default, aten.avg_pool2d.default,
         aten.max_pool2d.default, aten.adaptive_avg_pool1d.default, aten.avg_pool1d.default, aten.max_pool1d.default,
         aten.upsample_nearest2d.vec, aten.upsample_bilinear2d.vec, aten.upsample_nearest2d.default,
         aten.upsample_bilinear2d.default}
_POOL_TUPLE = {aten.max_pool2d_with_indices.default, aten.adaptive_max_pool2d.default}
_CONVS = {aten.conv2d.default, aten.conv1d.default, aten.conv3d.default}
_PARAM_VIEWS = {
    aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
    aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default,
    aten.unsqueeze.default, aten.expand.default, aten.permute.default, aten.transpose.int, aten.t.default,
    aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default, *_VIEWS,
}
_IGNORE = {aten._assert_tensor_metadata.default, aten._assert_scalar.default, aten.sym_constrain_range_for_size.default,
           aten._assert_async.msg}


def _shape(node) -> tuple[int, ...] | None:
    val = node.meta.get("val") if isinstance(node, torch.fx.Node) else None
    return tuple(int(s) for s in val.shape) if isinstance(val, torch.Tensor) else None


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


class _Analysis:
    """Propagates channel-space tags through an exported ATen graph (see the module docstring)."""

    def __init__(self, ep) -> None:
        self.ep = ep
        self.uf: list[int] = []
        self.size: list[int] = []  # P of each root
        self.refs: list[list[_Ref]] = []
        self.reasons: list[list[str]] = []
        self.origin: list[str] = []
        self.opaque: dict[str, str] = {}  # parameter -> the op that used it in a way not understood
        self.env: dict[str, Any] = {}

    # ---------------------------------------------------------------- union-find
    def new_space(self, size: int, origin: str) -> int:
        self.uf.append(len(self.uf))
        self.size.append(size)
        self.refs.append([])
        self.reasons.append([])
        self.origin.append(origin)
        return len(self.uf) - 1

    def find(self, s: int) -> int:
        while self.uf[s] != s:
            self.uf[s] = self.uf[self.uf[s]]
            s = self.uf[s]
        return s

    def P(self, s: int) -> int:
        return self.size[self.find(s)]

    def refactor(self, s: int, new_p: int) -> None:
        """Restrict space `s` to a permutation of `new_p` channels repeated `P/new_p` times (always valid)."""
        r = self.find(s)
        if self.size[r] % new_p:
            raise AssertionError("refactor to a non-divisor")
        self.size[r] = new_p

    def union(self, a: int, b: int) -> int:
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return ra
        if ra > rb:
            ra, rb = rb, ra
        self.uf[rb] = ra
        self.refs[ra] += self.refs[rb]
        self.reasons[ra] += self.reasons[rb]
        return ra

    def close(self, value: Any, reason: str) -> None:
        for tag in self._tags_in(value):
            r = self.find(tag.space)
            if reason not in self.reasons[r]:
                self.reasons[r].append(reason)

    def add_ref(self, s: int, ref: _Ref) -> None:
        self.refs[self.find(s)].append(ref)

    @staticmethod
    def _found(value: Any, kind: type):
        """Every `kind` (`_Tag` or `_ParamView`) in `value`, looking inside nested tuples and lists."""
        if isinstance(value, kind):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from _Analysis._found(v, kind)

    def _tags_in(self, value: Any):
        return self._found(value, _Tag)

    def _params_in(self, value: Any):
        return self._found(value, _ParamView)

    # ---------------------------------------------------------------- helpers
    def val(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.env.get(arg.name)
        if isinstance(arg, (tuple, list)):
            return [self.val(a) for a in arg]
        return None

    def merge(self, tags: list[_Tag], what: str) -> _Tag | None:
        """Merge tags that meet on one output dimension; closes them and returns None if incompatible."""
        if not tags:
            return None
        first = tags[0]
        if any(t.dim != first.dim or t.inner != first.inner for t in tags):
            for t in tags:
                self.close(t, f"{what} combines channel dimensions laid out differently")
            return None
        g = 0
        for t in tags:
            g = math.gcd(g, self.P(t.space))
        for t in tags:
            if self.P(t.space) != g:
                self.refactor(t.space, g)
        root = first.space
        for t in tags[1:]:
            root = self.union(root, t.space)
        return _Tag(self.find(root), first.dim, first.inner)

    def opaque_use(self, node, args: Any) -> None:
        for pv in self._params_in(self.val(args)):
            self.opaque.setdefault(pv.fqn, str(node.target))

    def plain_param(self, arg) -> str | None:
        v = self.val(arg)
        if isinstance(v, _ParamView) and v.dims == tuple(range(len(v.dims))):
            self.consumed.add(v.fqn)
            return v.fqn
        return None

    # ---------------------------------------------------------------- run
    def run(self) -> None:
        sig = self.ep.graph_signature
        params = {**sig.inputs_to_parameters, **sig.inputs_to_buffers}
        for node in self.ep.graph.nodes:
            if node.op == "placeholder":
                fqn = params.get(node.name)
                shape = _shape(node)
                self.env[node.name] = _ParamView(fqn, tuple(range(len(shape)))) if fqn and shape is not None else None
            elif node.op == "call_function":
                everything = list(node.args) + list(node.kwargs.values())
                self.consumed = set()
                try:
                    out = self.step(node)
                except Exception as err:  # an op the rules did not expect: safe by default
                    self.close(self.val(everything), f"{node.target}: {type(err).__name__}: {err}")
                    self.consumed = set()
                    out = None
                # a parameter used by an op in a way no rule accounted for must keep its order
                for pv in self._params_in(self.val(everything)):
                    if pv.fqn not in self.consumed:
                        self.opaque.setdefault(pv.fqn, str(node.target))
                self.env[node.name] = out
            elif node.op == "output":
                outs = node.args[0]
                for i, (spec, arg) in enumerate(zip(sig.output_specs, outs)):
                    name = getattr(spec.arg, "name", f"#{i}")
                    self.close(self.val(arg), f"returned to the user (output {i}: {name})"
                               if spec.kind.name == "USER_OUTPUT" else f"written back to a buffer ({spec.target})")
            else:
                self.env[node.name] = None

    def step(self, node) -> Any:  # noqa: C901 - one rule per op family
        t, args, kw = node.target, node.args, node.kwargs
        out_shape = _shape(node)
        x = self.val(args[0]) if args else None

        if t in _IGNORE:
            self.consumed |= {pv.fqn for pv in self._params_in(self.val(list(args)))}
            return None
        if t is operator.getitem:
            v = self.val(args[0])
            return v[args[1]] if isinstance(v, (tuple, list)) and args[1] < len(v) else None

        # ---------------------------------------------------------------- parameters seen through views
        if isinstance(x, _ParamView) and t in _PARAM_VIEWS:
            return self.param_view(node, x)

        if t in _PASS_UNARY:
            self.close(self.val(args[1:]), f"{t} with a tensor argument")
            return x if isinstance(x, _Tag) else None

        if t in _ELEMENTWISE:
            return self.elementwise(node, [a for a in list(args) + list(kw.values()) if isinstance(a, torch.fx.Node)])

        if t in _VIEWS:
            return self.reshape(x, _shape(args[0]), out_shape, str(t)) if isinstance(x, _Tag) else None
        if t is aten.permute.default:
            if not isinstance(x, _Tag):
                return None
            dims = [_norm_dim(d, len(out_shape)) for d in args[1]]
            return x._replace(dim=dims.index(x.dim))
        if t in (aten.transpose.int, aten.t.default, aten.swapaxes.default):
            if not isinstance(x, _Tag):
                return None
            nd = len(out_shape)
            a, b = (0, 1) if t is aten.t.default else (_norm_dim(args[1], nd), _norm_dim(args[2], nd))
            return x._replace(dim=b if x.dim == a else a if x.dim == b else x.dim)
        if t is aten.unsqueeze.default:
            if not isinstance(x, _Tag):
                return None
            d = _norm_dim(args[1], len(out_shape))
            return x._replace(dim=x.dim + 1 if d <= x.dim else x.dim)
        if t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            if not isinstance(x, _Tag):
                return None
            in_shape = _shape(args[0])
            keep = [i for i in range(len(in_shape)) if not _squeezed(t, args, in_shape, i)]
            return x._replace(dim=keep.index(x.dim)) if x.dim in keep else None
        if t is aten.expand.default:
            if not isinstance(x, _Tag):
                return None
            return x._replace(dim=x.dim + len(out_shape) - len(_shape(args[0])))
        if t is aten.slice.Tensor:
            return self.slice(node, x)
        if t is aten.select.int:
            if not isinstance(x, _Tag):
                return None
            d = _norm_dim(args[1], len(_shape(args[0])))
            if d == x.dim:
                self.close(x, "one channel selected (select)")
                return None
            return x._replace(dim=x.dim - 1 if d < x.dim else x.dim)
        if t in (aten.split.Tensor, aten.split_with_sizes.default, aten.chunk.default, aten.unbind.int):
            return self.split(node, x)
        if t in _REDUCE or t is aten.mean.default or t is aten.sum.default:
            if not isinstance(x, _Tag):
                return None
            in_shape = _shape(args[0])
            dims = args[1] if len(args) > 1 and t not in (aten.mean.default, aten.sum.default) else None
            if t in (aten.var.correction, aten.std.correction):
                dims = args[1] if len(args) > 1 else kw.get("dim")
            keepdim = bool(kw.get("keepdim", args[2] if len(args) > 2 and isinstance(args[2], bool) else False))
            if t in (aten.var.correction, aten.std.correction):
                keepdim = bool(kw.get("keepdim", False))
            if dims is None or dims == []:
                return None
            dims = [_norm_dim(d, len(in_shape)) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
            if x.dim in dims:
                return None  # a symmetric function of the channels: invariant
            return x if keepdim else x._replace(dim=x.dim - sum(d < x.dim for d in dims))
        if t in _POOL or t in _POOL_TUPLE:
            if not isinstance(x, _Tag):
                return None
            spatial = 2 if "2d" in str(t) else 1
            if x.dim >= len(_shape(args[0])) - spatial:
                self.close(x, f"{t} over the channel dimension")
                return None
            return (x, None) if t in _POOL_TUPLE else x
        if t in (aten.pad.default, aten.constant_pad_nd.default):
            if not isinstance(x, _Tag):
                return None
            pad, nd = list(args[1]), len(_shape(args[0]))
            k = nd - 1 - x.dim
            if 2 * k + 1 < len(pad) and (pad[2 * k] or pad[2 * k + 1]):
                self.close(x, "padding along the channel dimension")
                return None
            return x
        if t in (aten._softmax.default, aten.softmax.int):
            return x if isinstance(x, _Tag) else None

        # ---------------------------------------------------------------- layers
        if t is aten.linear.default:
            return self.linear(node, args[0], args[1], args[2] if len(args) > 2 else kw.get("bias"))
        if t in (aten.addmm.default, aten.mm.default):
            if t is aten.addmm.default:
                return self.linear(node, args[1], args[2], args[0], transposed=True)
            return self.linear(node, args[0], args[1], None, transposed=True)
        if t in _CONVS or t is aten.convolution.default:
            return self.conv(node)
        if t is aten.embedding.default:
            fqn = self.plain_param(args[0])
            if fqn is None:
                self.opaque_use(node, args)
                return None
            s = self.new_space(_shape(args[0])[1], f"embedding {fqn}")
            self.add_ref(s, _Ref(fqn, 1, 1, "parent"))
            return _Tag(s, len(out_shape) - 1, 1)
        if t in (aten.layer_norm.default, aten.rms_norm.default, aten.native_layer_norm.default):
            normalized = list(args[1])
            w = args[2] if len(args) > 2 else kw.get("weight")
            b = (args[3] if len(args) > 3 else kw.get("bias")) if t is not aten.rms_norm.default else None
            out = self.norm_like(node, x, len(normalized), [w, b])
            return (out, None, None) if t is aten.native_layer_norm.default else out
        if t in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default,
                 aten.instance_norm.default):
            if t is aten.instance_norm.default:
                affine = [args[1], args[2]]
                stats = [args[3], args[4]] if not args[5] else []
            else:
                affine, stats = [args[1], args[2]], [args[3], args[4]]
            out = self.channel_op(node, x, affine + stats)
            return (out, None, None) if t is aten._native_batch_norm_legit_no_training.default else out
        if t is aten.scaled_dot_product_attention.default:
            return self.attention(node)
        if t in (aten.matmul.default, aten.bmm.default):
            return self.matmul(node)
        if t is aten.cat.default:
            return self.cat(node)

        # ---------------------------------------------------------------- anything else closes
        everything = list(args) + list(kw.values())
        self.close(self.val(everything), f"{t} is not understood")
        self.opaque_use(node, everything)
        return None

    # ---------------------------------------------------------------- rules
    def param_view(self, node, pv: _ParamView) -> Any:
        t, args = node.target, node.args
        out_shape = _shape(node)
        in_shape = _shape(args[0])
        self.consumed.add(pv.fqn)
        if t in (aten.to.dtype, aten.to.device, aten.to.dtype_layout, aten._to_copy.default, aten.clone.default,
                 aten.contiguous.default, aten.alias.default, aten.detach.default, aten.lift_fresh_copy.default):
            return pv
        if t is aten.unsqueeze.default:
            d = _norm_dim(args[1], len(out_shape))
            return pv._replace(dims=pv.dims[:d] + (None,) + pv.dims[d:])
        if t is aten.expand.default:
            extra = len(out_shape) - len(in_shape)
            dims = (None,) * extra + tuple(None if in_shape[i] == 1 and out_shape[i + extra] != 1 else d
                                           for i, d in enumerate(pv.dims))
            return pv._replace(dims=dims)
        if t is aten.permute.default:
            order = [_norm_dim(d, len(out_shape)) for d in args[1]]
            return pv._replace(dims=tuple(pv.dims[o] for o in order))
        if t in (aten.transpose.int, aten.t.default):
            nd = len(out_shape)
            a, b = (0, 1) if t is aten.t.default else (_norm_dim(args[1], nd), _norm_dim(args[2], nd))
            dims = list(pv.dims)
            dims[a], dims[b] = dims[b], dims[a]
            return pv._replace(dims=tuple(dims))
        if t in _VIEWS or t in (aten.squeeze.dim, aten.squeeze.dims, aten.squeeze.default):
            # only views that add or drop size-1 dims keep the parameter's dims intact
            if [s for s in in_shape if s != 1] == [s for s in out_shape if s != 1]:
                src = [d for d, s in zip(pv.dims, in_shape) if s != 1]
                it = iter(src)
                return pv._replace(dims=tuple(next(it) if s != 1 else None for s in out_shape))
        self.consumed.discard(pv.fqn)  # a reshape that merges or splits the parameter's dims
        return None

    def elementwise(self, node, operands: list) -> _Tag | None:
        out_shape = _shape(node)
        if out_shape is None:
            self.close(self.val(operands), f"{node.target} with an unexpected output")
            return None
        nd = len(out_shape)
        tags = []
        for a in operands:
            v = self.val(a)
            if isinstance(v, _Tag):
                tags.append(v._replace(dim=v.dim + nd - len(_shape(a))))
        if not tags:
            return None  # parameters combined with unpermuted tensors only: they must keep their order
        tag = self.merge(tags, str(node.target))
        if tag is None:
            return None
        for a in operands:
            v, sh = self.val(a), _shape(a)
            if isinstance(v, _Tag) or sh is None:
                continue
            k = tag.dim - (nd - len(sh))
            if k < 0 or sh[k] == 1:
                continue
            if isinstance(v, _ParamView) and v.dims[k] is not None:
                self.add_ref(tag.space, _Ref(v.fqn, v.dims[k], tag.inner, "follower"))
                self.consumed.add(v.fqn)
            elif isinstance(v, _ParamView):
                self.consumed.add(v.fqn)  # broadcast along the channels
            else:
                self.close(tag, f"{node.target} with a tensor indexed by channel that is not in the space")
                return None
        return _Tag(self.find(tag.space), tag.dim, tag.inner)

    def reshape(self, x: _Tag, in_shape, out_shape, what: str) -> _Tag | None:
        P = self.P(x.space)
        st = math.prod(in_shape[x.dim + 1:])
        u = st * x.inner
        for j, n in enumerate(out_shape):
            ost = math.prod(out_shape[j + 1:])
            if n > 1 and ost <= u < ost * n:
                break
        else:
            self.close(x, f"{what} loses the channel dimension")
            return None
        span = ost * n
        if u % ost or span % u:
            self.close(x, f"{what} mixes channels with another dimension")
            return None
        avail = span // u
        if avail >= P:
            if avail % P:
                self.close(x, f"{what} mixes channels with another dimension")
                return None
        elif P % avail:
            self.close(x, f"{what} splits channels unevenly")
            return None
        else:
            self.refactor(x.space, avail)  # e.g. [H*hd] -> [H, hd]: one permutation of hd shared by the heads
        return _Tag(self.find(x.space), j, u // ost)

    def _restrict(self, x: _Tag, bounds: list[int], what: str) -> bool:
        """Make chunk boundaries (in elements of the tagged dim) fall between permutation blocks."""
        g = self.P(x.space)
        for b in bounds:
            if b % x.inner:
                self.close(x, f"{what} cuts inside a channel")
                return False
            g = math.gcd(g, b // x.inner)
        if g < self.P(x.space):
            self.refactor(x.space, g)
        return True

    def slice(self, node, x) -> Any:
        if not isinstance(x, _Tag):
            return None
        args = node.args
        in_shape = _shape(args[0])
        d = _norm_dim(args[1] if len(args) > 1 else 0, len(in_shape))
        if d != x.dim:
            return x
        size = in_shape[d]
        start = args[2] if len(args) > 2 and args[2] is not None else 0
        end = args[3] if len(args) > 3 and args[3] is not None else size
        step = args[4] if len(args) > 4 else 1
        start, end = (start + size if start < 0 else start), (end + size if end < 0 else end)
        start, end = max(0, min(start, size)), max(0, min(end, size))
        if step != 1:
            self.close(x, "strided slice of channels")
            return None
        if start == 0 and end == size:
            return x
        return _Tag(self.find(x.space), x.dim, x.inner) if self._restrict(x, [start, end - start], "slice") else None

    def split(self, node, x) -> Any:
        t, args = node.target, node.args
        outs = node.meta.get("val")
        n_out = len(outs) if isinstance(outs, (tuple, list)) else 0
        if not isinstance(x, _Tag):
            return [None] * n_out
        in_shape = _shape(args[0])
        if t is aten.unbind.int:
            dim_arg = args[1] if len(args) > 1 else node.kwargs.get("dim", 0)
        else:
            dim_arg = args[2] if len(args) > 2 else node.kwargs.get("dim", 0)
        d = _norm_dim(dim_arg, len(in_shape))
        if d != x.dim:
            nx = x._replace(dim=x.dim - 1 if (t is aten.unbind.int and d < x.dim) else x.dim)
            return [nx] * n_out
        if t is aten.unbind.int:
            self.close(x, "channels unbound one by one")
            return [None] * n_out
        sizes = [int(o.shape[d]) for o in outs]
        bounds = sizes + [sum(sizes[:i]) for i in range(n_out)]
        if not self._restrict(x, bounds, "split"):
            return [None] * n_out
        return [_Tag(self.find(x.space), x.dim, x.inner)] * n_out

    def norm_like(self, node, x, n_norm: int, affine: list) -> Any:
        if not isinstance(x, _Tag):
            self.opaque_use(node, affine)  # affine parameters of an untagged tensor: never permuted
            return None
        nd = len(_shape(node.args[0]))
        if x.dim < nd - n_norm:
            return x  # normalised over other dims: the channels pass through, the affine does not index them
        if n_norm != 1:
            self.close(x, f"{node.target} over several dims including the channels")
            self.opaque_use(node, affine)
            return None
        return self.channel_op(node, x, affine, dim=0)

    def channel_op(self, node, x, params: list, dim: int = 0) -> Any:
        """A per-channel op: its parameters (1-D, indexed by channel) follow the space."""
        if not isinstance(x, _Tag):
            self.opaque_use(node, params)
            return None
        for a in params:
            if a is None:
                continue
            fqn = self.plain_param(a)
            if fqn is None:
                if self.val(a) is not None or isinstance(a, torch.fx.Node):
                    self.close(x, f"{node.target} with a computed per-channel tensor")
                    return None
                continue
            self.add_ref(x.space, _Ref(fqn, dim, x.inner, "follower"))
        if node.target in (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default) and x.dim != 1:
            self.close(x, "batch norm over a dimension that is not the channels")
            return None
        return _Tag(self.find(x.space), x.dim, x.inner)

    def linear(self, node, inp, weight, bias, *, transposed: bool = False) -> Any:
        """`inp @ W.T + b` (or `inp @ W + b` for mm / addmm, weight `[in, out]`)."""
        x = self.val(inp)
        fqn = self.plain_param(weight)
        bias_fqn = self.plain_param(bias) if bias is not None else None
        out_shape = _shape(node)
        if fqn is None or (bias is not None and bias_fqn is None):
            if isinstance(self.val(weight), _Tag) or not isinstance(self.val(weight), (_ParamView, type(None))):
                self.close(self.val(weight), f"{node.target} with a computed weight")
            self.close(x, f"{node.target} with a computed weight")
            self.opaque_use(node, [weight, bias])
            return None
        in_dim, out_dim = (0, 1) if transposed else (1, 0)
        if isinstance(x, _Tag):
            if x.dim != len(_shape(inp)) - 1:
                self.close(x, f"{node.target} applied along another dimension than the channels")
            else:
                self.add_ref(x.space, _Ref(fqn, in_dim, x.inner, "child"))
        s = self.new_space(out_shape[-1], f"{node.target} {fqn}")
        self.add_ref(s, _Ref(fqn, out_dim, 1, "parent"))
        if bias_fqn is not None:
            self.add_ref(s, _Ref(bias_fqn, 0, 1, "parent"))
        return _Tag(s, len(out_shape) - 1, 1)

    def conv(self, node) -> Any:
        t, args = node.target, node.args
        x = self.val(args[0])
        weight = args[1]
        bias = args[2] if len(args) > 2 else node.kwargs.get("bias")
        if t is aten.convolution.default:
            transposed, groups = args[6], args[8]
        else:
            transposed, groups = False, args[6] if len(args) > 6 else node.kwargs.get("groups", 1)
        fqn = self.plain_param(weight)
        bias_fqn = self.plain_param(bias) if bias is not None else None
        if transposed or fqn is None or (bias is not None and bias_fqn is None):
            self.close(x, f"{t} {'transposed' if transposed else 'with a computed weight'}")
            self.opaque_use(node, [weight, bias])
            return None
        w_shape = _shape(weight)
        c_in = _shape(args[0])[1]
        c_out = w_shape[0]
        if isinstance(x, _Tag) and x.dim != 1:
            self.close(x, f"{t} along a dimension that is not the channels")
            x = None
        if groups == 1:
            if isinstance(x, _Tag):
                self.add_ref(x.space, _Ref(fqn, 1, x.inner, "child"))
            s = self.new_space(c_out, f"conv {fqn}")
            self.add_ref(s, _Ref(fqn, 0, 1, "parent"))
            if bias_fqn is not None:
                self.add_ref(s, _Ref(bias_fqn, 0, 1, "parent"))
            return _Tag(s, 1, 1)
        if groups == c_in == c_out and w_shape[1] == 1:  # depthwise: channels pass through
            if not isinstance(x, _Tag):
                self.opaque_use(node, [weight, bias])
                return None
            self.add_ref(x.space, _Ref(fqn, 0, x.inner, "follower"))
            if bias_fqn is not None:
                self.add_ref(x.space, _Ref(bias_fqn, 0, x.inner, "follower"))
            return _Tag(self.find(x.space), 1, x.inner)
        self.close(x, f"grouped convolution ({groups} groups) {fqn}")
        self.opaque_use(node, [weight, bias])
        return None

    def attention(self, node) -> Any:
        args = node.args
        q, k, v = (self.val(a) for a in args[:3])
        rest = list(args[3:]) + list(node.kwargs.values())
        self.close(self.val(rest), "attention mask indexed by channel")
        nq, nk, nv = (len(_shape(a)) for a in args[:3])
        tq = q if isinstance(q, _Tag) and q.dim == nq - 1 else None
        tk = k if isinstance(k, _Tag) and k.dim == nk - 1 else None
        if tq is not None and tk is not None:
            self.merge([tq, tk], "q·k")  # a common permutation of q and k leaves q·kᵀ unchanged
        else:
            self.close([q, k], "attention scores from a permuted query or key alone")
        if isinstance(v, _Tag) and v.dim == nv - 1:
            return _Tag(self.find(v.space), len(_shape(node)) - 1, v.inner)
        self.close(v, "attention values permuted along another dimension than head_dim")
        return None

    def matmul(self, node) -> Any:
        a, b = node.args[0], node.args[1]
        va, vb = self.val(a), self.val(b)
        if isinstance(va, _ParamView) or isinstance(vb, _ParamView):
            self.opaque_use(node, [a, b])
            self.close([va, vb], f"{node.target} with a parameter")
            return None
        na, nb, no = len(_shape(a)), len(_shape(b)), len(_shape(node))
        if na < 2 or nb < 2:
            self.close([va, vb], f"{node.target} of vectors")
            return None
        out = None
        ta = va if isinstance(va, _Tag) else None
        tb = vb if isinstance(vb, _Tag) else None
        if ta is not None and ta.dim == na - 1 and tb is not None and tb.dim == nb - 2:
            self.merge([ta, tb], "contraction")  # Σ_c a_c b_c is invariant under a common permutation
            return None
        if ta is not None and ta.dim == na - 2 and tb is None:
            out = _Tag(self.find(ta.space), no - 2, ta.inner)
        elif tb is not None and tb.dim == nb - 1 and ta is None:
            out = _Tag(self.find(tb.space), no - 1, tb.inner)
        else:
            self.close([va, vb], f"{node.target} mixing channels")
        return out

    def cat(self, node) -> Any:
        tensors = node.args[0]
        nd = len(_shape(node))
        d = _norm_dim(node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0), nd)
        vals = [self.val(a) for a in tensors]
        tags = [v for v in vals if isinstance(v, _Tag)]
        if not tags:
            return None
        if any(t.dim == d for t in tags):
            self.close(vals, "concatenation along the channel dimension")
            return None
        tag = self.merge(tags, "cat")
        if tag is None:
            return None
        for a, v in zip(tensors, vals):
            if isinstance(v, _Tag):
                continue
            if isinstance(v, _ParamView) and v.dims[tag.dim] is not None:
                self.add_ref(tag.space, _Ref(v.fqn, v.dims[tag.dim], tag.inner, "follower"))
                self.consumed.add(v.fqn)
            elif isinstance(v, _ParamView):
                self.consumed.add(v.fqn)
            else:
                self.close(tag, "concatenated with a tensor that is not in the space")
                return None
        return _Tag(self.find(tag.space), tag.dim, tag.inner)

    # ---------------------------------------------------------------- result
    def spaces(self, tensors: dict[str, torch.Tensor]) -> list[ChannelSpace]:
        roots = sorted({self.find(s) for s in range(len(self.uf))})
        claims: dict[tuple[int, int], set[tuple[int, int]]] = {}  # (id(tensor), dim) -> {(root, inner)}
        for r in roots:
            for ref in self.refs[r]:
                ten = tensors.get(ref.fqn)
                if ten is None:
                    self.reasons[r].append(f"{ref.fqn} is not a parameter or buffer of the model")
                    continue
                claims.setdefault((id(ten), ref.dim), set()).add((r, ref.inner))
                if ref.fqn in self.opaque:
                    reason = f"{ref.fqn} is also used by {self.opaque[ref.fqn]}"
                    if reason not in self.reasons[r]:
                        self.reasons[r].append(reason)
        for owners in claims.values():
            if len(owners) > 1:
                for r, _ in owners:
                    self.reasons[r].append("a parameter dimension is shared with another channel space")
        out = []
        for r in roots:
            refs = list(dict.fromkeys(self.refs[r]))
            if not any(ref.role == "parent" for ref in refs):
                continue
            for ref in refs:
                ten = tensors.get(ref.fqn)
                if ten is not None and ten.shape[ref.dim] % (self.size[r] * ref.inner):
                    self.reasons[r].append(f"{ref.fqn} dim {ref.dim} does not repeat the channel layout")
            out.append(ChannelSpace(size=self.size[r], refs=refs, reasons=list(dict.fromkeys(self.reasons[r])),
                                    origin=self.origin[r]))
        return out


def _squeezed(t, args, in_shape, i) -> bool:
    if in_shape[i] != 1:
        return False
    if t is aten.squeeze.default:
        return True
    dims = args[1] if isinstance(args[1], (list, tuple)) else [args[1]]
    return i in [_norm_dim(d, len(in_shape)) for d in dims]


# ================================================================================================ tracing
def default_example_inputs(model: nn.Module) -> tuple[tuple, dict] | None:
    """Example inputs to trace `model`: timm's `pretrained_cfg['input_size']`, transformers' main input.

    Transformers models are traced with `output_hidden_states=True` (the hidden states a user may ask for
    must keep their order) and `use_cache=False` (the key/value cache is internal state).

    Returns:
        `(args, kwargs)` or None when the inputs cannot be guessed (pass `example_inputs=`).
    """
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None)
    if isinstance(cfg, dict) and cfg.get("input_size"):
        return (torch.randn(2, *cfg["input_size"], device=device),), {}
    config = getattr(model, "config", None)
    main = getattr(model, "main_input_name", None)
    if config is None or main is None:
        return None
    import inspect

    params = inspect.signature(model.forward).parameters
    kwargs: dict[str, Any] = {}
    if main == "input_ids":
        vocab = getattr(config, "vocab_size", None) or 2
        ids = torch.randint(0, min(int(vocab), 1000), (2, 8), generator=torch.Generator().manual_seed(0)).to(device)
        kwargs["input_ids"] = ids
        if "attention_mask" in params:
            kwargs["attention_mask"] = torch.ones_like(ids)
        if getattr(config, "is_encoder_decoder", False) and "decoder_input_ids" in params:
            kwargs["decoder_input_ids"] = ids
    elif main == "pixel_values":
        size = getattr(config, "image_size", 224)
        size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
        kwargs["pixel_values"] = torch.randn(2, getattr(config, "num_channels", 3), *size, device=device)
    else:
        return None
    open_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if "use_cache" in params or (open_kwargs and hasattr(config, "use_cache")):
        kwargs["use_cache"] = False
    if "output_hidden_states" in params or (open_kwargs and hasattr(config, "output_hidden_states")):
        kwargs["output_hidden_states"] = True
    return (), kwargs


def _as_args_kwargs(example_inputs: Any) -> tuple[tuple, dict]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    if isinstance(example_inputs, Mapping):  # a dict or transformers' BatchEncoding
        return (), dict(example_inputs)
    if (isinstance(example_inputs, tuple) and len(example_inputs) == 2 and isinstance(example_inputs[0], tuple)
            and isinstance(example_inputs[1], dict)):
        return example_inputs
    if isinstance(example_inputs, (tuple, list)):
        return tuple(example_inputs), {}
    raise TypeError(f"model inputs must be a tensor, a tuple of positional inputs, a dict of keyword inputs, "
                    f"or (args, kwargs); got {type(example_inputs).__name__}.")


def find_channel_spaces(model: nn.Module, example_inputs: Any = None) -> list[ChannelSpace]:
    """Trace `model` with `torch.export` and find every channel space (open or refused).

    Args:
        model (`nn.Module`): the dense model.
        example_inputs (*optional*): a tensor, a tuple of positional inputs, a dict of keyword inputs or
            `(args, kwargs)`; by default [`default_example_inputs`].

    Returns:
        `list[ChannelSpace]`: in graph order; `space.open` is False for refused ones (`space.reasons`).

    Raises:
        `ValueError`: if no example inputs are given and none can be guessed.
        `RuntimeError`: if `torch.export` cannot trace the model.
    """
    if example_inputs is None:
        inputs = default_example_inputs(model)
        if inputs is None:
            raise ValueError("no example inputs: pass example_inputs= (a tensor, a tuple or a dict of model inputs).")
    else:
        inputs = _as_args_kwargs(example_inputs)
    args, kwargs = inputs
    was_training = model.training
    model.eval()
    try:
        ep = torch.export.export(model, args, kwargs, strict=False)
    except Exception as err:  # noqa: BLE001 - any tracing failure means: do not permute
        raise RuntimeError(f"torch.export could not trace the model: {type(err).__name__}: {str(err)[:300]}") from err
    finally:
        model.train(was_training)
    analysis = _Analysis(ep)
    analysis.run()
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    return analysis.spaces(tensors)


# ================================================================================================ search
def _objective_terms(space: ChannelSpace, tensors: dict[str, torch.Tensor], layouts: dict[str, LayerLayout],
                     owners: dict[int, str], moments: dict[str, torch.Tensor] | None = None,
                     ) -> tuple[list[ObjectiveTerm], list[str]]:
    """The matrices of `space` that will be quantized with subvectors spanning several channels.

    With `moments` (module -> `E[x_c^2]` of its input channels, see [`input_moments`]) each matrix column is
    scaled by the RMS of the input channel it multiplies, so the objective measures the subvectors as they
    act on the data (`‖ΔW x‖` rather than `‖ΔW‖`).
    """
    terms, seen, notes = [], set(), []
    P = space.size
    for ref in space.refs:
        ten = tensors[ref.fqn]
        module = owners.get(id(ten))
        if module is None or not ref.fqn.endswith("weight") or (id(ten), ref.dim) in seen:
            continue
        layout = layouts[module]
        seen.add((id(ten), ref.dim))
        w = ten.detach()
        if layout.kind == "conv1d":
            if ref.dim != 0:
                continue
            mat, pre, stride = w.t(), 1, 1  # [out, in]
        else:
            if ref.dim == 0:
                continue  # rows: permuting them leaves the set of subvectors unchanged
            mat = w.reshape(w.shape[0], -1)
            pre, stride = math.prod(w.shape[1:ref.dim]), math.prod(w.shape[ref.dim + 1:])
        g = ref.inner * stride
        reps = w.shape[ref.dim] // (P * ref.inner)
        d = layout.d
        entry = _entry_moments(ten, layout.kind, moments.get(module)) if moments else None  # like the weight
        if entry is not None:
            entry = entry.t() if layout.kind == "conv1d" else entry.reshape(mat.shape)  # like mat
            mat = mat.float() * entry.to(mat.device, torch.float32).clamp_min(0).sqrt()  # columns x input RMS
        if d % g == 0 and d // g >= 2 and P % (d // g) == 0:
            x = mat.reshape(mat.shape[0] * pre * reps, P, g)  # [N, P, g]
            terms.append(ObjectiveTerm(x.float(), d // g))
        elif not (g % d == 0 or d == g):
            notes.append(f"{module}: subvectors of {d} do not align with channels of {g} columns")
    return terms, notes


def _calibration_batches(calibration: Any) -> list[tuple[tuple, dict]]:
    """`(args, kwargs)` per batch: one tensor or mapping is one batch; a list or tuple holds several."""
    if isinstance(calibration, (torch.Tensor, Mapping)):
        return [_as_args_kwargs(calibration)]
    if isinstance(calibration, (list, tuple)) and calibration:
        return [_as_args_kwargs(batch) for batch in calibration]
    raise TypeError("calibration must be a batch (a tensor or a dict of model inputs) or a non-empty list of batches.")


def _to(value: Any, device: torch.device) -> Any:
    return value.to(device) if isinstance(value, torch.Tensor) else value


@torch.no_grad()
def input_moments(model: nn.Module, names: list[str], calibration: Any) -> dict[str, torch.Tensor]:
    """Second moment `E[x_c^2]` of every input channel of the named modules, over calibration batches.

    Args:
        model (`nn.Module`): the dense model (run in eval mode, restored afterwards).
        names (`list[str]`): modules whose inputs to measure (linear: last dim; conv: dim 1; GPT-2's
            `Conv1D`: last dim).
        calibration: one batch (a tensor or a dict of model inputs, e.g. a tokenizer's output) or a list
            of batches; tensors are moved to the model's device.

    Returns:
        `dict[str, torch.Tensor]`: float64 `[in_channels]` per module that saw an input.
    """
    batches = _calibration_batches(calibration)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    modules = dict(model.named_modules(remove_duplicate=False))
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}

    def hook(name: str, module: nn.Module, inputs: tuple) -> None:
        x = inputs[0] if inputs else None
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.dim() < 2:
            return
        channel_dim = 1 if isinstance(module, nn.modules.conv._ConvNd) else -1
        x = x.detach().double().movedim(channel_dim, -1)  # [..., C]
        flat = x.reshape(-1, x.shape[-1])  # [n, C]
        sums[name] = sums.get(name, 0) + flat.pow(2).sum(0)  # [C]
        counts[name] = counts.get(name, 0) + flat.shape[0]

    handles = [modules[n].register_forward_pre_hook(lambda m, i, n=n: hook(n, m, i)) for n in names if n in modules]
    was_training = model.training
    model.eval()
    try:
        for args, kwargs in batches:
            model(*[_to(a, device) for a in args], **{k: _to(v, device) for k, v in kwargs.items()})
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    return {name: total / counts[name] for name, total in sums.items()}


def _entry_moments(weight: torch.Tensor, kind: str, second: torch.Tensor | None) -> torch.Tensor | None:
    """`E[x_c^2]` of the input channel every entry of `weight` multiplies, in the weight's own layout.

    `second` `[in_channels]` comes from [`input_moments`]; linear weights are `[out, in]`, GPT-2's `Conv1D`
    `[in, out]`, convolutions `[out, in/groups, *kernel]` (groups inferred from `second`). None for
    embeddings (their input is an index) or when `second` does not fit the weight.
    """
    if second is None or kind == "embedding":
        return None
    second = second.to(weight.device)  # [in_channels]
    if kind == "conv1d":
        return second[:, None].expand(weight.shape) if second.numel() == weight.shape[0] else None
    if weight.dim() == 2:
        return second.expand(weight.shape) if second.numel() == weight.shape[1] else None
    out, per_group = weight.shape[:2]
    groups = second.numel() // per_group
    if groups * per_group != second.numel() or out % groups:
        return None
    group = torch.arange(out, device=weight.device) // (out // groups)  # [out]
    channel = group[:, None] * per_group + torch.arange(per_group, device=weight.device)  # [out, in/groups]
    return second[channel].reshape(out, per_group, *[1] * (weight.dim() - 2)).expand(weight.shape)


def shard_groups(n_groups: int, process_index: int = 0, num_processes: int = 1) -> list[int]:
    """The groups one process searches when the search is spread over `num_processes` (round robin)."""
    if not 0 <= process_index < num_processes:
        raise ValueError(f"process_index={process_index} must be in [0, num_processes={num_processes}).")
    return list(range(process_index, n_groups, num_processes))


@torch.no_grad()
def permute_(
    model: nn.Module,
    config: VQConfig | None = None,
    *,
    example_inputs: Any = None,
    layouts: dict[str, LayerLayout] | None = None,
    device: torch.device | str | None = None,
    accelerator: Any = None,
    calibration: Any = None,
) -> PermutationReport:
    """PQF's permutation step: permute coupled channels of `model` in place so that it quantizes better.

    The function of the model is unchanged. Channel spaces are found by tracing (see the module
    docstring); each open space whose quantized readers have subvectors spanning several channels gets
    a greedy start plus a stochastic local search on the log-determinant objective, and the
    permutation is kept only if it lowers the objective. With `calibration` data the objective is
    activation-aware: each child's weight columns are scaled by the RMS of the input channel they multiply
    (measured on the calibration batches), so subvectors are grouped by how they act on real inputs; without
    it, the paper's weight-only objective is used. Spaces are independent and can be spread over
    processes: pass an `accelerate.Accelerator` (or `PartialState`) and each process searches its share
    (see [`shard_groups`]); results are gathered and every process applies all of them.

    Args:
        model (`nn.Module`): a dense model (weights materialised).
        config (`VQConfig`, *optional*): block sizes (which layers are quantized, with which `d`),
            `permute_iters` (search steps per space) and `seed`. Defaults to `VQConfig()`.
        example_inputs (*optional*): inputs to trace with (a tensor, tuple, dict or `(args, kwargs)`); by
            default [`default_example_inputs`]. Outputs of this call keep their order exactly.
        layouts (`dict[str, LayerLayout]`, *optional*): the quantization plan; by default `hf_vq.plan(model, config)`.
        device (`torch.device` or `str`, *optional*): where the search runs; CUDA when available by default.
        accelerator (*optional*): an `accelerate` state with `process_index` / `num_processes` to spread the search.
        calibration (*optional*): real inputs for the activation-aware objective: one batch (a tensor or a dict
            of model inputs) or a list of batches (see [`input_moments`]). A few batches suffice: only one
            second moment per input channel is measured. Use data disjoint from any evaluation set.

    Returns:
        [`PermutationReport`]: the spaces found, refused (with reasons) and permuted (objective before / after).
        When the model cannot be traced the report says why and nothing is changed.

    Example:
        ```python
        >>> import timm, hf_vq
        >>> model = timm.create_model("resnet18")
        >>> report = hf_vq.permute_(model, hf_vq.VQConfig(permute_iters=200))
        >>> print(report)  # doctest: +SKIP
        ```
    """
    from .quantize import plan

    start = time.perf_counter()
    config = VQConfig() if config is None else config
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    report = PermutationReport(device=str(dev), iters=config.permute_iters,
                               objective="weights" if calibration is None else "activation-aware")
    try:
        spaces = find_channel_spaces(model, example_inputs)
    except (ValueError, RuntimeError, TypeError) as err:
        report.reason = str(err)
        report.seconds = time.perf_counter() - start
        logger.info("hf_vq: channels not permuted: %s", err)
        return report
    report.traced = True
    layouts = plan(model, config) if layouts is None else layouts
    tensors = dict(model.named_parameters(remove_duplicate=False))
    tensors.update(dict(model.named_buffers(remove_duplicate=False)))
    modules = dict(model.named_modules(remove_duplicate=False))
    owners: dict[int, str] = {}
    for name, layout in layouts.items():
        w = modules[name]._parameters.get("weight") if name in modules else None
        if w is not None and layout.tied_to is None:
            owners.setdefault(id(w), name)
    moments = input_moments(model, sorted(set(owners.values())), calibration) if calibration is not None else None

    work: list[tuple[int, list[ObjectiveTerm]]] = []
    for i, space in enumerate(spaces):
        sample = next(r for r in space.refs if r.role == "parent")
        entry = SpaceReport(name=space.names("parent")[0] if space.names("parent") else space.origin,
                            size=space.size, repeats=tensors[sample.fqn].shape[sample.dim] // (space.size * sample.inner),
                            parents=space.names("parent"), children=space.names("child"),
                            followers=space.names("follower"))
        report.spaces.append(entry)
        if not space.open:
            entry.status, entry.reasons = "refused", space.reasons
            continue
        terms, notes = _objective_terms(space, tensors, layouts, owners, moments)
        entry.reasons = notes
        entry.terms = len(terms)
        if terms and space.size > 1:
            work.append((i, terms))

    index, count = (accelerator.process_index, accelerator.num_processes) if accelerator is not None else (0, 1)
    results: dict[int, Any] = {}
    for j in shard_groups(len(work), index, count):
        i, terms = work[j]
        results[i] = search_permutation(terms, iters=config.permute_iters, seed=config.seed + i, device=dev)
    if count > 1:
        from accelerate.utils import gather_object

        gathered = gather_object([(i, r.perm.tolist(), r.objective_identity, r.objective_greedy, r.objective,
                                   r.steps, r.accepted, r.seconds) for i, r in results.items()])
        results = {g[0]: g for g in gathered}
    else:
        results = {i: (i, r.perm.tolist(), r.objective_identity, r.objective_greedy, r.objective, r.steps,
                       r.accepted, r.seconds) for i, r in results.items()}

    for i, (_, perm, before, greedy, after, steps, accepted, seconds) in sorted(results.items()):
        entry, space = report.spaces[i], spaces[i]
        entry.objective_identity, entry.objective_greedy, entry.objective = before, greedy, after
        entry.steps, entry.accepted, entry.seconds = steps, accepted, seconds
        perm = torch.tensor(perm, dtype=torch.long)
        if after < before and not torch.equal(perm, torch.arange(space.size)):
            _apply(space, perm, tensors)
            entry.status = "permuted"
        else:
            entry.status = "unchanged"
    report.seconds = time.perf_counter() - start
    logger.info("hf_vq: %s", report)
    return report


def _apply(space: ChannelSpace, perm: torch.Tensor, tensors: dict[str, torch.Tensor]) -> None:
    """Permute every parameter of `space` along its dimension, in place (tied tensors once)."""
    done = set()
    for ref in space.refs:
        ten = tensors[ref.fqn]
        key = (id(ten), ref.dim, ref.inner)
        if key in done:
            continue
        done.add(key)
        idx = apply_index(ten.shape[ref.dim], perm, ref.inner).to(ten.device)
        ten.data.copy_(ten.data.index_select(ref.dim, idx))
