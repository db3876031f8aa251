"""Thin helpers over onnx-graphsurgeon: the one place that knows protobuf details.

A :class:`WorkingModel` is the model object that travels through the whole pipeline: an
onnx-graphsurgeon graph plus what the export needs to write a faithful model back (IR version,
metadata, initializers a caller may override).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues

from red_onnx.errors import InternalError

logger = logging.getLogger(__name__)
FLOAT = onnx.TensorProto.FLOAT

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

#: IR version from which an initializer listed as a graph input is only a default a caller may override.
OVERRIDABLE_IR_VERSION = 4

#: Ops that constant folding may evaluate during normalisation: cheap, shape-preserving ways exporters
#: write weights (Constant, ConstantOfShape fills, Unsqueeze/Reshape of BN parameters, casts).
FOLDABLE_OPS = frozenset(
    {
        "Constant",
        "ConstantOfShape",
        "Unsqueeze",
        "Squeeze",
        "Reshape",
        "Cast",
        "Identity",
        "Transpose",
        "Mul",
        "Add",
        "Sub",
        "Div",
        "Sqrt",
        "Pow",
        "Reciprocal",
        "Neg",
        "Concat",
        "Flatten",
        "Expand",
        "Range",
        "Shape",
        "Gather",
        "Slice",
    }
)


@dataclass(frozen=True)
class StoredAs:
    """How a float32 weight constant was stored in the input: ``source`` of ``dtype``, cast by ``cast``.

    Weights stored in float16 and cast to float32 before use are folded into float32 constants on
    import (analysis and rewrites compute in float32) and written back as ``dtype`` plus a Cast on export.
    """

    dtype: np.dtype
    source: str
    cast: str


#: Storage types of weights that a Cast widens to float32 (their widened values are exact in float32).
NARROW_STORAGE = frozenset({np.dtype(np.float16)})


@dataclass
class WorkingModel:
    """A model being rewritten: the graph and what is needed to export it faithfully.

    Attributes:
        graph: The onnx-graphsurgeon graph; passes edit it in place through ``red_onnx.rewrite.editor``.
        ir_version: IR version to write (raised to 4 when the input lists initializers as inputs
            below IR 4, since the graph-surgeon export drops them from the input list).
        opset_imports: Opset imports of the input model, kept as they were.
        metadata: ``metadata_props`` of the input model, in order.
        doc_string: The model's doc string.
        producer: ``(producer_name, producer_version)`` of the input model.
        domain: The model's domain.
        model_version: The model's version.
        overridable: Initializers listed as graph inputs from IR 4 on: frozen, a caller may override
            them. Kept as inputs on export.
        functions: Local functions of the model, copied through.
        overridable_inputs: The value infos of ``overridable``, as the input declares them.
        typed_values: Value infos whose type is not a plain tensor (optional, map, sparse, opaque, or
            a sequence of those), by name, from every graph of the model: graph surgeon cannot export
            them, so they are written back as the input declares them (no rewrite changes them).
        typed_attributes: Type attributes (``TYPE_PROTO``, e.g. ``Optional``'s ``type``) of nodes, by
            the node's first output: graph surgeon drops them on import; they are written back.
    """

    graph: gs.Graph
    ir_version: int
    opset_imports: list[onnx.OperatorSetIdProto]
    metadata: list[tuple[str, str]] = field(default_factory=list)
    doc_string: str = ""
    producer: tuple[str, str] = ("", "")
    domain: str = ""
    model_version: int = 0
    overridable: frozenset[str] = frozenset()
    functions: list[onnx.FunctionProto] = field(default_factory=list)
    overridable_inputs: list[onnx.ValueInfoProto] = field(default_factory=list)
    typed_values: dict[str, onnx.ValueInfoProto] = field(default_factory=dict)
    typed_attributes: dict[str, list[onnx.AttributeProto]] = field(default_factory=dict)

    @property
    def opset(self) -> int:
        """The default-domain opset version."""
        for imp in self.opset_imports:
            if imp.domain in ("", "ai.onnx"):
                return int(imp.version)
        return int(self.graph.opset)


def _overridable_initializers(model: onnx.ModelProto) -> tuple[frozenset[str], list]:
    init_names = {t.name for t in model.graph.initializer}
    listed = [vi for vi in model.graph.input if vi.name in init_names]
    if model.ir_version < OVERRIDABLE_IR_VERSION:
        return frozenset(), []
    return frozenset(vi.name for vi in listed), listed


def _name_unnamed_nodes(graph: gs.Graph) -> None:
    """Give every unnamed node of the main graph a unique name, ``{op}_{index}`` as the MAC counter does.

    Channel groups, their MACs and the report are keyed by node name: two unnamed producers would
    share the name "" (and their MACs would not be found). Names change nothing a model computes.
    """
    taken = {node.name for node in graph.nodes if node.name}
    for index, node in enumerate(graph.nodes):
        if node.name:
            continue
        name, suffix = f"{node.op}_{index}", 0
        while name in taken:
            suffix += 1
            name = f"{node.op}_{index}_{suffix}"
        node.name = name
        taken.add(name)


def import_model(model: onnx.ModelProto) -> WorkingModel:
    """Wrap an ONNX model for rewriting.

    Args:
        model: The loaded model (external data already loaded).

    Returns:
        The working model; the input proto is not modified.
    """
    overridable, overridable_inputs = _overridable_initializers(model)
    graph = gs.import_onnx(model)
    _name_unnamed_nodes(graph)
    if overridable:
        _unconstant_overridable(graph, overridable, overridable_inputs)
    _fold_stored_weights(graph)
    ir_version = max(int(model.ir_version), OVERRIDABLE_IR_VERSION)
    return WorkingModel(
        graph=graph,
        ir_version=ir_version,
        opset_imports=[copy.deepcopy(o) for o in model.opset_import],
        metadata=[(p.key, p.value) for p in model.metadata_props],
        doc_string=model.doc_string,
        producer=(model.producer_name, model.producer_version),
        domain=model.domain,
        model_version=int(model.model_version),
        overridable=overridable,
        functions=[copy.deepcopy(f) for f in model.functions],
        overridable_inputs=[copy.deepcopy(v) for v in overridable_inputs],
        typed_values=_typed_values(model.graph),
        typed_attributes=_typed_attributes(model.graph),
    )


def _proto_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every graph nested in its nodes' attributes."""
    yield graph
    for node in graph.node:
        for attribute in node.attribute:
            for sub in [attribute.g] if attribute.HasField("g") else list(attribute.graphs):
                yield from _proto_graphs(sub)


def _is_plain(type_proto: onnx.TypeProto) -> bool:
    """Whether graph surgeon exports a value of this type itself (a tensor, or a sequence of tensors)."""
    if type_proto.HasField("sequence_type"):
        return type_proto.sequence_type.elem_type.HasField("tensor_type")
    return type_proto.HasField("tensor_type") or not type_proto.WhichOneof("value")


def _typed_values(graph: onnx.GraphProto) -> dict[str, onnx.ValueInfoProto]:
    return {
        info.name: copy.deepcopy(info)
        for sub in _proto_graphs(graph)
        for info in [*sub.input, *sub.output, *sub.value_info]
        if not _is_plain(info.type)
    }


_TYPE_ATTRIBUTES = (onnx.AttributeProto.TYPE_PROTO, onnx.AttributeProto.TYPE_PROTOS)


def _typed_attributes(graph: onnx.GraphProto) -> dict[str, list[onnx.AttributeProto]]:
    return {
        node.output[0]: [copy.deepcopy(a) for a in node.attribute if a.type in _TYPE_ATTRIBUTES]
        for sub in _proto_graphs(graph)
        for node in sub.node
        if node.output and any(a.type in _TYPE_ATTRIBUTES for a in node.attribute)
    }


def _gs_graphs(graph: gs.Graph) -> Iterator[gs.Graph]:
    """``graph`` and every graph nested in its nodes' attributes."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            for sub in value if isinstance(value, list) else [value]:
                if isinstance(sub, gs.Graph):
                    yield from _gs_graphs(sub)


@contextlib.contextmanager
def _untyped(graph: gs.Graph, names: Mapping[str, onnx.ValueInfoProto]) -> Iterator[None]:
    """Within: the tensors named in ``names`` carry no type, so graph surgeon exports them untyped."""
    saved = []
    for sub in _gs_graphs(graph):
        for tensor in [*sub.inputs, *sub.outputs]:
            if tensor.name in names and isinstance(tensor, gs.Variable):
                saved.append((tensor, tensor.dtype, tensor.type))
                tensor.dtype, tensor.type = None, "tensor_type"
    try:
        yield
    finally:
        for tensor, dtype, kind in saved:
            tensor.dtype, tensor.type = dtype, kind


def _retype(model: onnx.ModelProto, working: WorkingModel) -> None:
    """Write the value infos and type attributes graph surgeon cannot export back, into every graph."""
    names, attributes = working.typed_values, working.typed_attributes
    for sub in _proto_graphs(model.graph):
        for infos in (sub.input, sub.output, sub.value_info):
            for info in infos:
                if info.name in names:
                    info.CopyFrom(names[info.name])
        for node in sub.node:
            missing = [a for a in attributes.get(node.output[0] if node.output else "", [])
                       if all(b.name != a.name for b in node.attribute)]  # fmt: skip
            node.attribute.extend(missing)


def _unconstant_overridable(graph: gs.Graph, names: frozenset[str], infos: list) -> None:
    """Make overridable initializers graph inputs (variables), so no pass treats them as weights."""
    tensors = graph.tensors()
    for info in infos:
        const = tensors.get(info.name)
        if not isinstance(const, gs.Constant):
            continue
        var = gs.Variable(info.name, dtype=const.dtype, shape=list(const.shape))
        for node in list(const.outputs):
            for index, tensor in enumerate(list(node.inputs)):
                if tensor is const:
                    node.inputs[index] = var
        graph.inputs.append(var)
        var.red_default = const  # keeps the default value for export


def _fold_stored_weights(graph: gs.Graph) -> None:
    """Replace ``Cast(to=FLOAT)`` of a float16 constant by a float32 constant that remembers its storage."""
    folded = False
    for node in graph.nodes:
        if node.op != "Cast" or int(node.attrs.get("to", 0)) != onnx.TensorProto.FLOAT:
            continue
        source, out = node.inputs[0], node.outputs[0]
        values = _narrow_values(source)
        if values is None or any(t is out for t in graph.outputs):
            continue
        const = gs.Constant(out.name, values.astype(np.float32))
        const.red_stored_as = StoredAs(values.dtype, source.name, node.name)
        for reader in list(out.outputs):
            for index, tensor in enumerate(list(reader.inputs)):
                if tensor is out:
                    reader.inputs[index] = const
        node.outputs.clear()
        folded = True
    if folded:
        graph.cleanup(remove_unused_graph_inputs=False)


def _narrow_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of a float16 constant (an initializer or a Constant node's output), else None."""
    values: np.ndarray | None
    if isinstance(tensor, gs.Constant):
        values = np.asarray(tensor.values)
    elif len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        values = np.asarray(value.values) if isinstance(value, gs.Constant) else None
    else:
        return None
    return values if values is not None and values.dtype in NARROW_STORAGE else None


def _restore_storage(model: onnx.ModelProto, graph: gs.Graph) -> None:
    """Write weights folded by :func:`_fold_stored_weights` back in their storage type, behind a Cast.

    A weight whose values overflow the storage type (a fold scaled it up) stays float32.
    """
    stored: dict[str, StoredAs] = {
        name: tensor.red_stored_as
        for name, tensor in graph.tensors().items()
        if isinstance(tensor, gs.Constant) and hasattr(tensor, "red_stored_as")
    }
    if not stored:
        return
    taken = {t.name for t in model.graph.initializer} | {n.name for n in model.graph.node}
    taken |= {name for n in model.graph.node for name in [*n.input, *n.output]}
    taken |= {v.name for v in [*model.graph.input, *model.graph.output]}
    casts = []
    for init in model.graph.initializer:
        storage = stored.get(init.name)
        if storage is None:
            continue
        narrow = onnx.numpy_helper.to_array(init).astype(storage.dtype)
        if not np.isfinite(narrow).all():
            continue
        source = _free_name(storage.source, f"{init.name}_{storage.dtype.name}", taken)
        cast = _free_name(storage.cast, f"{init.name}_cast", taken)
        casts.append(
            onnx.helper.make_node("Cast", [source], [init.name], name=cast, to=onnx.TensorProto.FLOAT)
        )
        init.CopyFrom(onnx.numpy_helper.from_array(narrow, source))
    nodes = [*casts, *model.graph.node]
    del model.graph.node[:]
    model.graph.node.extend(nodes)


def _free_name(wanted: str, fallback: str, taken: set[str]) -> str:
    """``wanted`` if no tensor or node uses it, else ``fallback`` made unique; the name is then taken."""
    name, count = (wanted, 0) if wanted not in taken else (fallback, 0)
    while name in taken:
        count += 1
        name = f"{fallback}_{count}"
    taken.add(name)
    return name


#: Float32 weights with more elements than this are exported as dims only by :func:`export_light`.
LIGHT_ELEMENTS = 1024


def export_light(working: WorkingModel) -> tuple[onnx.ModelProto, list[str]]:
    """``working`` exported with its large float32 weights as dims-only tensors, and their names.

    A copy of the graph (sharing the weights' arrays) gets dims-only tensors, so no weight is copied or
    serialized: 0.02 s instead of 0.2 s for a full export of a 25M-parameter net. Enough for shape
    inference and MAC counts; :func:`red_onnx.search.simulate.MergeSimulator.of_working` feeds the weights.
    """
    graph = working.graph.copy()
    # the copy drops the overridable initializers' defaults: their shapes are the layers' weights (a
    # model exported with initializers as inputs counted 0 MACs without them)
    defaults = {t.name: t.red_default for t in working.graph.inputs if hasattr(t, "red_default")}
    overridable = []
    for tensor in graph.inputs:
        if tensor.name in defaults:
            tensor.red_default = defaults[tensor.name].copy()
            overridable.append(tensor.red_default)
    light = []
    for tensor in [*graph.tensors().values(), *overridable]:
        heavy = isinstance(tensor, gs.Constant) and math.prod(tensor.shape) > LIGHT_ELEMENTS
        if heavy and tensor.export_dtype == np.float32:
            dims = [int(d) for d in tensor.shape]
            tensor.values = LazyValues(onnx.TensorProto(name=tensor.name, data_type=FLOAT, dims=dims))
            light.append(tensor.name)
    return export_model(replace(working, graph=graph)), light


def export_model(working: WorkingModel, metadata: Mapping[str, str] | None = None) -> onnx.ModelProto:
    """Export the working model to an ONNX proto.

    Args:
        working: The working model.
        metadata: Extra ``metadata_props`` entries to add (provenance), after the original ones.

    Returns:
        A new ModelProto with the original IR/opset/metadata and, from IR 4 on, overridable
        initializers kept as inputs with their defaults.
    """
    graph = working.graph
    defaults = {t.name: t.red_default for t in graph.inputs if hasattr(t, "red_default")}
    with _untyped(graph, working.typed_values):
        model = gs.export_onnx(graph, do_type_check=False, opset_imports=working.opset_imports)
    _retype(model, working)
    _restore_storage(model, graph)
    if defaults:
        existing = {t.name for t in model.graph.initializer}
        for name, const in defaults.items():
            if name in existing:
                continue
            stored = const._values  # gs has no public test for "not loaded yet"
            if isinstance(stored, LazyValues) and isinstance(stored.tensor, onnx.TensorProto):
                model.graph.initializer.append(stored.tensor)  # as stored (export_light: dims only)
            else:
                model.graph.initializer.append(onnx.numpy_helper.from_array(np.asarray(const.values), name))
    model.ir_version = working.ir_version
    model.producer_name, model.producer_version = working.producer
    model.doc_string = working.doc_string
    model.domain = working.domain
    model.model_version = working.model_version
    for func in working.functions:
        if all(f.name != func.name or f.domain != func.domain for f in model.functions):
            model.functions.append(copy.deepcopy(func))
    set_metadata(model, working.metadata, metadata)
    return model


def set_metadata(
    model: onnx.ModelProto, metadata: Sequence[tuple[str, str]], extra: Mapping[str, str] | None
) -> None:
    """Write the input's ``metadata_props``, then ``extra`` (provenance) over them, into ``model``.

    ``metadata`` is the input's entries as ``WorkingModel.metadata`` keeps them.
    """
    del model.metadata_props[:]
    merged = dict(metadata)
    merged.update(extra or {})
    onnx.helper.set_model_props(model, merged)


def constant_values(tensor: gs.Tensor) -> np.ndarray | None:
    """The values of a constant tensor, or None if the tensor is not a constant."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    return None


def expect_constant(tensor: gs.Tensor) -> np.ndarray:
    """The values of a tensor the caller has already established is a constant.

    Raises:
        InternalError: ``tensor`` is not a constant: the caller's check is missing or wrong.
    """
    values = constant_values(tensor)
    if values is None:
        raise InternalError(f"tensor {tensor.name!r} is not a constant where one was established")
    return values


def node_constant_input(node: gs.Node, index: int) -> np.ndarray | None:
    """The values of ``node.inputs[index]`` when it exists and is a constant."""
    if index >= len(node.inputs):
        return None
    tensor = node.inputs[index]
    if tensor is None or (isinstance(tensor, gs.Variable) and not tensor.name):
        return None
    return constant_values(tensor)


def is_empty_input(node: gs.Node, index: int) -> bool:
    """Whether an optional input is absent (missing or the empty-name placeholder)."""
    return index >= len(node.inputs) or not node.inputs[index].name


def set_constant_input(node: gs.Node, index: int, values: np.ndarray, *, suffix: str) -> None:
    """Replace ``node.inputs[index]`` by a constant with ``values``.

    A constant read by this node alone is updated in place (its name kept); a shared one is copied
    under a new deterministic name, so the other readers keep their values.

    Args:
        node: The node whose input changes.
        index: Input position; ``len(node.inputs)`` appends (optional inputs such as a bias).
        values: The new values (dtype kept by the caller).
        suffix: Name suffix for a copied constant, e.g. ``"red"``.
    """
    while len(node.inputs) < index:
        node.inputs.append(gs.Variable.empty())
    if index == len(node.inputs):
        node.inputs.append(gs.Constant(f"{node.name}_{suffix}_{index}", np.ascontiguousarray(values)))
        return
    old = node.inputs[index]
    if isinstance(old, gs.Constant) and len(old.outputs) == 1:
        old.values = np.ascontiguousarray(values)
        return
    base = old.name if old.name else f"{node.name}_{index}"
    node.inputs[index] = gs.Constant(f"{base}_{suffix}_{node.name}", np.ascontiguousarray(values))
    if hasattr(old, "red_stored_as"):  # a copy of a float16-stored weight is stored in float16 too
        node.inputs[index].red_stored_as = old.red_stored_as


#: onnx types whose values numpy holds exactly (a weight of another type keeps its TensorProto).
NUMPY_EXACT_TYPES = frozenset(
    getattr(onnx.TensorProto, name)
    for name in (
        "FLOAT", "DOUBLE", "FLOAT16", "INT8", "INT16", "INT32", "INT64",
        "UINT8", "UINT16", "UINT32", "UINT64", "BOOL",
    )
)  # fmt: skip


def detach_from_input(working: WorkingModel) -> int:
    """Give every weight still read lazily from the input proto its own storage; return how many.

    onnx-graphsurgeon imports a weight as ``LazyValues`` over the input's TensorProto, and one such
    reference keeps the whole input alive (upb keeps a parsed message and all its parts in one arena),
    as does the input's ``opset_import`` container, which gs keeps as the graphs' ``import_domains``:
    detached, the caller can free the input (conv25m: 97 MB). Weights numpy holds exactly are loaded
    (what a pass does on first access); others (bfloat16, float8, int4, sparse) keep a copy of their
    TensorProto, exported as they came.
    """
    count = 0
    pending = [working.graph, *working.graph.functions]
    while pending:
        graph = pending.pop()
        if graph.import_domains is not None:  # gs keeps the input's opset_import container itself
            graph.import_domains = [copy.deepcopy(domain) for domain in graph.import_domains]
        constants = [t for t in graph.tensors().values() if isinstance(t, gs.Constant)]
        for node in graph.nodes:
            for value in node.attrs.values():
                items = value if isinstance(value, list) else [value]
                pending.extend(item for item in items if isinstance(item, gs.Graph))
                constants.extend(item for item in items if isinstance(item, gs.Constant))
        for constant in constants:
            count += _detach(constant)
    return count


def _detach(constant: gs.Constant) -> int:
    """Load or copy one lazily imported weight (1), or leave a loaded one (0)."""
    lazy = constant._values  # gs has no public test for "not loaded yet"
    if not isinstance(lazy, LazyValues):
        return 0
    if isinstance(lazy.tensor, onnx.TensorProto) and lazy.tensor.data_type in NUMPY_EXACT_TYPES:
        constant.values = lazy.load()
    else:
        own = type(lazy.tensor)()
        own.CopyFrom(lazy.tensor)
        lazy.tensor = own
    return 1


def normalise_constants(working: WorkingModel) -> int:
    """Fold weights written as Constant/ConstantOfShape nodes (and casts/unsqueezes of them) into constants.

    Returns:
        The number of nodes removed.
    """
    graph = working.graph
    before = len(graph.nodes)
    graph.fold_constants(
        fold_shapes=False,
        recurse_subgraphs=False,
        flatten_subgraphs=False,
        should_exclude_node=lambda node: node.op not in FOLDABLE_OPS,
        error_ok=True,
    )
    graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return before - len(graph.nodes)


def subgraph_outer_references(graph: gs.Graph) -> set[str]:
    """Names of top-level tensors read implicitly from inside If/Loop/Scan bodies."""
    names: set[str] = set()
    for node in graph.nodes:
        for value in node.attrs.values():
            subgraphs = value if isinstance(value, list) else [value]
            for sub in subgraphs:
                if isinstance(sub, gs.Graph):
                    names |= _outer_names(sub)
    return names


def _outer_names(sub: gs.Graph) -> set[str]:
    defined = {t.name for t in sub.inputs}
    used: set[str] = set()
    for node in sub.nodes:
        defined |= {t.name for t in node.outputs}
        used |= {t.name for t in node.inputs if isinstance(t, gs.Variable) and t.name}
        for value in node.attrs.values():
            subgraphs = value if isinstance(value, list) else [value]
            for inner in subgraphs:
                if isinstance(inner, gs.Graph):
                    used |= _outer_names(inner)
    return used - defined


def clear_intermediate_shapes(working: WorkingModel) -> None:
    """Forget shapes of intermediate tensors (stale after channels change); I/O shapes are kept."""
    keep = {t.name for t in working.graph.inputs} | {t.name for t in working.graph.outputs}
    for tensor in working.graph.tensors().values():
        if isinstance(tensor, gs.Variable) and tensor.name not in keep:
            tensor.shape = None
