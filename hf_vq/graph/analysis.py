"""Channel-space analysis of an exported ATen graph: a union-find of spaces, fed by the rules of
[`hf_vq.graph.rules`] one node at a time (see [`hf_vq.graph.find_channel_spaces`])."""

from __future__ import annotations

import math
from typing import Any

import torch

from .rules import apply_rule
from .tags import ChannelSpace, ParamView, Ref, Tag, shape_of

__all__ = ["Analysis"]


class Analysis:
    """Propagates channel-space tags through an exported ATen graph (see the module docstring)."""

    def __init__(self, ep) -> None:
        self.ep = ep
        self.uf: list[int] = []
        self.size: list[int] = []  # P of each root
        self.refs: list[list[Ref]] = []
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

    def add_ref(self, s: int, ref: Ref) -> None:
        self.refs[self.find(s)].append(ref)

    @staticmethod
    def _found(value: Any, kind: type):
        """Every `kind` (`Tag` or `ParamView`) in `value`, looking inside nested tuples and lists."""
        if isinstance(value, kind):
            yield value
        elif isinstance(value, (tuple, list)):
            for v in value:
                yield from Analysis._found(v, kind)

    def _tags_in(self, value: Any):
        return self._found(value, Tag)

    def _params_in(self, value: Any):
        return self._found(value, ParamView)

    # ---------------------------------------------------------------- helpers
    def val(self, arg: Any) -> Any:
        if isinstance(arg, torch.fx.Node):
            return self.env.get(arg.name)
        if isinstance(arg, (tuple, list)):
            return [self.val(a) for a in arg]
        return None

    def merge(self, tags: list[Tag], what: str) -> Tag | None:
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
        return Tag(self.find(root), first.dim, first.inner)

    def opaque_use(self, node, args: Any) -> None:
        for pv in self._params_in(self.val(args)):
            self.opaque.setdefault(pv.fqn, str(node.target))

    def plain_param(self, arg) -> str | None:
        v = self.val(arg)
        if isinstance(v, ParamView) and v.dims == tuple(range(len(v.dims))):
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
                shape = shape_of(node)
                self.env[node.name] = ParamView(fqn, tuple(range(len(shape)))) if fqn and shape is not None else None
            elif node.op == "call_function":
                everything = list(node.args) + list(node.kwargs.values())
                self.consumed = set()
                try:
                    out = apply_rule(self, node)
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

