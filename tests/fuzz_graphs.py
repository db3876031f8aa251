"""Random conv/gemm topologies with planted redundancy, for the fuzzing tests (``test_fuzz.py``).

A :class:`FuzzSpec` is a chain of blocks on an NCHW tensor followed by a head. Blocks: ``plain``
(conv, optional BatchNormalization), ``residual`` (``act(x + b(act(a(x))))``), ``se`` (squeeze-and-
excitation gate ``x·sigmoid(conv(relu(conv(gap(x)))))``), ``concat`` (two branches, or DenseNet-like
``Concat(x, branch)``), ``split`` (conv, Split, two convs joined by Add or Concat), ``depthwise``
(multiplier 1), ``depthwise2`` (multiplier 2), ``grouped`` (group 2), ``nhwc`` (Transpose to NHWC,
MatMul + Add, activation, per-channel Mul, Transpose back), ``shared`` (two convs reading one weight
initializer) and ``pool``. Heads: ``conv`` (1x1), ``gap_gemm`` (GlobalAveragePool, Flatten, Gemm,
Gemm), ``flatten_gemm`` (Flatten, Gemm, Gemm) and ``reshape_matmul`` (Reshape to [N, F], [0, -1] or
[-1, F], then MatMul + Add twice).

Every producer gets its block's plants: ``identical`` / ``scaled`` (row j = λ·row i, λ a power of
two), ``near`` (the same plus relative noise ``NEAR_NOISE``) and ``zero`` (a constant channel); a few
consumers ignore one input channel (``dead_inputs``).
Identical and scaled pairs are tracked on the block's output tensor (:class:`Pair`) and copied into
every later producer or per-channel parameter of the same channels (the residual branch, the SE gate,
the depthwise kernels, BatchNorm, PRelu slopes, the NHWC Mul), so that multi-producer groups hold real
redundancy too; a pair is dropped where an activation that is not positively homogeneous breaks a
scaled pair. The tracked pairs become :class:`graphs.Plant` facts that ``graphs.check_planted`` checks.
"""

from __future__ import annotations

import dataclasses

import numpy as np
from graphs import BuiltGraph, Net, Plant
from onnx import helper

BLOCK_KINDS = (
    "plain", "residual", "se", "concat", "split", "depthwise", "depthwise2", "grouped", "nhwc", "shared",
    "pool",
)  # fmt: skip
HEADS = ("conv", "gap_gemm", "flatten_gemm", "reshape_matmul")
ACTS = ("Relu", "LeakyRelu", "PRelu", "Sigmoid", "HardSwish", "Clip", "Tanh", "SiLU", "None")
#: Activations through which a scaled pair (λ > 0) stays a scaled pair.
HOMOGENEOUS = frozenset({"Relu", "LeakyRelu", "PRelu", "None"})
PLANT_KINDS = ("identical", "scaled", "near", "zero")
#: Relative size of the noise added to a near-duplicate row.
NEAR_NOISE = 0.02


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """One block: its kind, output (or inner) width, activation, kernel, BatchNorm, plants, variant."""

    kind: str
    width: int
    act: str = "Relu"
    k: int = 3
    bn: bool = False
    plants: tuple[str, ...] = ()
    variant: int = 0


@dataclasses.dataclass(frozen=True)
class FuzzSpec:
    """A random net: input [batch, in_width, size, size], blocks, head; weights from ``seed``.

    ``dead_inputs`` consumers (group-1 Conv, Gemm or MatMul, chosen at random) get one input slice
    zeroed, so that the channel they read may be unused.
    """

    in_width: int
    size: int
    blocks: tuple[BlockSpec, ...]
    head: str
    head_width: int
    out_width: int
    batch: int = 1
    seed: int = 0
    head_plants: tuple[str, ...] = ()
    dead_inputs: int = 0


@dataclasses.dataclass(frozen=True)
class Pair:
    """Channel j of a tensor equals scale · channel i."""

    j: int
    i: int
    scale: float = 1.0


@dataclasses.dataclass
class Flow:
    """The current tensor: name, channels, spatial size, and the pairs planted on it."""

    x: str
    c: int
    size: int
    pairs: list[Pair] = dataclasses.field(default_factory=list)


class FuzzNet(Net):
    """:class:`graphs.Net` plus the plants of the fuzzing generator."""

    def plant_rows(self, node: str, n: int, kinds: tuple[str, ...], groups: int = 1) -> list[Pair]:
        """Apply ``kinds`` to producer ``node`` (``n`` rows in ``groups`` blocks); returns exact pairs."""
        block = n // groups
        free = [int(r) for r in self.rng.permutation(n)]
        pairs: list[Pair] = []
        for kind in kinds:
            need = 1 if kind == "zero" else 2
            if len(free) <= need:
                break  # one untouched row stays
            j = free.pop()
            if kind == "zero":
                self.zero_row(node, j, float(self.rng.choice([0.0, 0.3, -0.4])))
                continue
            same = [r for r in free if r // block == j // block]
            if not same:
                continue
            i = same[0]
            free.remove(i)
            scale = 1.0 if kind == "identical" else float(self.rng.choice([0.5, 2.0]))
            self.plant(node, j, i, scale)
            if kind == "near":
                self.perturb_row(node, j)
            else:
                pairs.append(Pair(j, i, scale))
        return pairs

    def perturb_row(self, node: str, j: int) -> None:
        """Add ``NEAR_NOISE`` relative noise to row j of ``node`` (weights and bias)."""
        w_name, axis, b_name, b_axis = self.layout[node]
        for name, ax in ((w_name, axis), (b_name, b_axis)):
            if name:
                rows = np.moveaxis(self.arrays[name], ax, 0)
                scale = NEAR_NOISE * (float(np.abs(rows[j]).mean()) + 1e-3)
                rows[j] += self.small(rows[j].shape, scale)

    def copy_pairs(self, node: str, pairs: list[Pair]) -> None:
        """Make ``node``'s rows hold ``pairs`` too (its output joins a tensor that has them)."""
        for p in pairs:
            self.plant(node, p.j, p.i, p.scale)

    def copy_params(self, names: list[str], pairs: list[Pair], scaled: tuple[str, ...] = ()) -> None:
        """Per-channel parameters: entry j = entry i (times the pair's scale for ``scaled`` names)."""
        for name in names:
            flat = self.arrays[name].reshape(self.arrays[name].shape[0], -1)
            for p in pairs:
                flat[p.j] = flat[p.i] * (np.float32(p.scale) if name in scaled else 1)

    def kill_inputs(self, count: int) -> None:
        """Zero one random input slice of ``count`` random group-1 consumers (unused channels)."""
        dense = [
            n.name
            for n in self.nodes
            if n.name in self.layout and all(a.name != "group" or a.i == 1 for a in n.attribute)
        ]
        for name in self.rng.permutation(dense)[:count]:
            arr = self.arrays[self.layout[str(name)][0]]
            in_axis = 1 if arr.ndim == 4 else (1 - self.layout[str(name)][1]) % 2
            self.zero_input(str(name), int(self.rng.integers(arr.shape[in_axis])))

    def activation(self, kind: str, flow: Flow, name: str) -> None:
        """Apply activation ``kind`` to ``flow`` in place; keeps the pairs it preserves."""
        if kind == "PRelu":
            shape = [flow.c, 1, 1] if flow.size else [flow.c]
            slope = self.const(f"{name}.slope", self.uniform(shape, 0.05, 0.3))
            self.copy_params([slope], flow.pairs)
            flow.x = self.op("PRelu", [flow.x, slope], name)
        else:
            flow.x = self.act(kind, flow.x, name)
        if kind not in HOMOGENEOUS:
            flow.pairs = [p for p in flow.pairs if p.scale == 1.0]

    def batchnorm(self, flow: Flow, name: str) -> None:
        """BatchNormalization whose parameters keep the pairs of ``flow``."""
        flow.x = self.bn(name, flow.x, flow.c)
        roles = [f"{name}.{r}" for r in ("scale", "bias", "mean", "var")]
        self.copy_params(roles, flow.pairs, scaled=(f"{name}.bias", f"{name}.mean"))


def _plain(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    f.x = net.conv(name, f.x, f.c, b.width, k=b.k)
    f.c, f.pairs = b.width, net.plant_rows(name, b.width, b.plants)
    if b.bn:
        net.batchnorm(f, f"{name}_bn")
    net.activation(b.act, f, f"{name}_act")


def _residual(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    inner = Flow(f.x, f.c, f.size)
    _plain(net, dataclasses.replace(b, bn=False), inner, f"{name}a")
    y = net.conv(f"{name}b", inner.x, b.width, f.c, k=b.k)
    net.copy_pairs(f"{name}b", f.pairs)
    f.x = net.op("Add", [f.x, y], f"{name}_add")
    net.activation(b.act, f, f"{name}_post")


def _se(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    g = net.op("GlobalAveragePool", [f.x], f"{name}_gap")
    s = net.act("Relu", net.conv(f"{name}1", g, f.c, b.width, k=1), f"{name}_relu")
    net.plant_rows(f"{name}1", b.width, b.plants)
    gate = net.conv(f"{name}2", s, b.width, f.c, k=1)
    net.copy_pairs(f"{name}2", [Pair(p.j, p.i) for p in f.pairs])
    f.x = net.op("Mul", [f.x, net.act("Sigmoid", gate, f"{name}_sigmoid")], f"{name}_gate")


def _concat(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    a = Flow(f.x, f.c, f.size)
    _plain(net, b, a, f"{name}A")
    if b.variant % 2:  # DenseNet-like: the block input itself is the first part
        first = f
    else:
        first = Flow(f.x, f.c, f.size)
        _plain(
            net, dataclasses.replace(b, width=max(2, b.width - 1), plants=b.plants[::-1]), first, f"{name}B"
        )
    f.x = net.op("Concat", [first.x, a.x], f"{name}_cat", axis=1)
    f.pairs = first.pairs + [Pair(p.j + first.c, p.i + first.c, p.scale) for p in a.pairs]
    f.c = first.c + a.c


def _split(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    width = max(b.width, 2)
    _plain(net, dataclasses.replace(b, width=width), f, name)
    head = 1 + b.variant % (width - 1)
    sizes = net.const(f"{name}_split.sizes", [head, width - head], np.int64)
    outs = [f"{name}_split_y0", f"{name}_split_y1"]
    net.nodes.append(helper.make_node("Split", [f.x, sizes], outs, name=f"{name}_split", axis=1))
    p = net.conv(f"{name}P", outs[0], head, b.width, k=b.k)
    q = net.conv(f"{name}Q", outs[1], width - head, b.width, k=1)
    pairs = net.plant_rows(f"{name}P", b.width, b.plants)
    if b.variant % 2:
        net.copy_pairs(f"{name}Q", pairs)
        f.x, f.c, f.pairs = net.op("Add", [p, q], f"{name}_add"), b.width, pairs
    else:
        f.x, f.c, f.pairs = net.op("Concat", [p, q], f"{name}_cat", axis=1), 2 * b.width, pairs
    net.activation(b.act, f, f"{name}_out_act")


def _depthwise(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    mult = 2 if b.kind == "depthwise2" else 1
    f.x = net.conv(name, f.x, f.c, f.c * mult, k=b.k, group=f.c)
    if mult == 1:  # the kernels of a pair must agree; the biases scale with it
        net.copy_params([f"{name}.W"], f.pairs)
        net.copy_params([f"{name}.B"], f.pairs, scaled=(f"{name}.B",))
    else:
        f.pairs = net.plant_rows(name, f.c * mult, b.plants, groups=f.c)
    f.c *= mult
    net.activation(b.act, f, f"{name}_act")


def _grouped(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    width = b.width + b.width % 2
    if f.c % 2:
        _plain(net, b, f, name)
        return
    f.x = net.conv(name, f.x, f.c, width, k=b.k, group=2)
    f.c, f.pairs = width, net.plant_rows(name, width, b.plants, groups=2)
    net.activation(b.act, f, f"{name}_act")


def _nhwc(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    t = net.op("Transpose", [f.x], f"{name}_nhwc", perm=[0, 2, 3, 1])
    f.x = net.matmul(name, t, f.c, b.width)
    f.c, f.pairs = b.width, net.plant_rows(name, b.width, b.plants)
    net.activation("Relu" if b.act == "PRelu" else b.act, f, f"{name}_act")
    mul = net.const(f"{name}_mul.c", net.uniform([f.c], 0.5, 1.5))
    net.copy_params([mul], f.pairs)
    m = net.op("Mul", [f.x, mul], f"{name}_mul")
    f.x = net.op("Transpose", [m], f"{name}_nchw", perm=[0, 3, 1, 2])


def _shared(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    f.x = net.conv(f"{name}1", f.x, f.c, f.c, k=b.k)
    f.pairs = net.plant_rows(f"{name}1", f.c, b.plants)
    net.activation(b.act, f, f"{name}1_act")
    y = net.conv(f"{name}2", f.x, f.c, f.c, k=b.k, weight=f"{name}1.W")
    f.x, f.pairs = net.act("Relu", y, f"{name}2_act"), []


def _pool(net: FuzzNet, b: BlockSpec, f: Flow, name: str) -> None:
    op = "MaxPool" if b.variant % 2 else "AveragePool"
    if f.size >= 4:  # both pools are per channel and positively homogeneous: the pairs stay
        f.x, f.size = net.op(op, [f.x], name, kernel_shape=[2, 2], strides=[2, 2]), f.size // 2


BLOCKS = {
    "plain": _plain, "residual": _residual, "se": _se, "concat": _concat, "split": _split,
    "depthwise": _depthwise, "depthwise2": _depthwise, "grouped": _grouped, "nhwc": _nhwc,
    "shared": _shared, "pool": _pool,
}  # fmt: skip


def _head(net: FuzzNet, spec: FuzzSpec, f: Flow) -> str:
    """The head; returns the graph output."""
    if spec.head == "conv":
        return net.conv("out", f.x, f.c, spec.out_width, k=1)
    if spec.head == "gap_gemm":
        flat, features = net.op("Flatten", [net.op("GlobalAveragePool", [f.x], "gap")], "flatten"), f.c
    elif spec.head == "flatten_gemm":
        flat, features = net.op("Flatten", [f.x], "flatten"), f.c * f.size * f.size
    else:
        features = f.c * f.size * f.size
        target = ([spec.batch, features], [0, -1], [-1, features])[spec.seed % 3]
        shape = net.const("reshape.shape", target, np.int64)
        flat = net.op("Reshape", [f.x, shape], "reshape")
    if spec.head == "reshape_matmul":
        h = net.matmul("fc1", flat, features, spec.head_width)
    else:
        trans_b = spec.seed % 2
        h = net.gemm("fc1", flat, features, spec.head_width, trans_b=trans_b, alpha=1.0 - 0.5 * trans_b)
    hidden = Flow(h, spec.head_width, 0, net.plant_rows("fc1", spec.head_width, spec.head_plants))
    net.activation("Relu", hidden, "fc1_act")
    if spec.head == "reshape_matmul":
        return net.matmul("out", hidden.x, spec.head_width, spec.out_width)
    return net.gemm("out", hidden.x, spec.head_width, spec.out_width, trans_b=1 - spec.seed % 2)


def fuzz_net(spec: FuzzSpec) -> BuiltGraph:
    """Build the net of ``spec``; ``planted`` lists the exact pairs on every block output.

    ``expected_removed`` is left empty: how much exact mode can prove here is not counted (the
    property tests of ``graphs.random_planted_net`` do that); the fuzzing tests check equivalence.
    """
    net = FuzzNet(spec.seed)
    flow = Flow(net.input("x", [spec.batch, spec.in_width, spec.size, spec.size]), spec.in_width, spec.size)
    facts: list[Plant] = []
    for k, block in enumerate(spec.blocks):
        BLOCKS[block.kind](net, block, flow, f"B{k}")
        facts += [Plant("scaled", flow.x, p.j, p.i, p.scale) for p in flow.pairs]
    y = _head(net, spec, flow)
    net.kill_inputs(spec.dead_inputs)
    return BuiltGraph(net.build([y]), {}, tuple(facts), f"fuzz {spec}")
