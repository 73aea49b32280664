"""FP32 ONNX graph -> FP16 graph with the overflow-prone parts kept in FP32.

FP16 tops out at 65,504. On anomalous patches ``0.5·Σz²``, the log-det sums and the LayerNorm
variance exceed that, so these stay FP32: every ReduceSum and everything computed from a
reduction's result (the log-det chain and the NLL), the square feeding a reduction, and the
LayerNorm with the whitening in front of it. Everything else (convolutions, GEMMs, couplings)
runs in FP16 with Casts at the borders. Inputs and outputs stay FP32. (Also FP32: a chain of
additions feeding a reduction, e.g. the couplings' log-scales summed before the log-det.)

The precision lives in the graph itself, so ONNX Runtime on a CPU runs exactly what a strongly
typed TensorRT network is built from.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

FLOAT, HALF = TensorProto.FLOAT, TensorProto.FLOAT16
# Inputs that the ONNX spec fixes to float32 whatever the data type (Resize: roi, scales).
FIXED_FP32_INPUTS = {"Resize": {1, 2}}
# Ops whose float output type is given by an attribute, not by their inputs.
TYPED_OPS = {"Cast", "CastLike", "Constant", "ConstantOfShape", "RandomNormal", "RandomUniform",
             "EyeLike", "Shape", "Size"}


def fp32_nodes(graph: onnx.GraphProto) -> set[str]:
    """Names of the nodes that must compute in FP32 (see the module docstring)."""
    nodes = list(graph.node)
    producer = {o: n for n in nodes for o in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for n in nodes:
        for i in n.input:
            consumers.setdefault(i, []).append(n)
    keep: set[str] = set()

    def walk(start: onnx.NodeProto, down: bool) -> None:
        stack = [start]
        while stack:
            node = stack.pop()
            nexts = ([c for o in node.output for c in consumers.get(o, [])] if down else
                     [producer[i] for i in node.input if i in producer])
            for nxt in nexts:
                if nxt.name not in keep:
                    keep.add(nxt.name)
                    stack.append(nxt)

    for n in nodes:
        if n.op_type == "LayerNormalization":
            keep.add(n.name)
            walk(n, down=False)
        elif n.op_type in ("ReduceSum", "ReduceSumSquare", "ReduceL2"):
            keep.add(n.name)
            walk(n, down=True)
            stack = [producer.get(n.input[0])]
            while stack:  # the square, or the chain of additions, that feeds the reduction
                src = stack.pop()
                if src is None or src.name in keep:
                    continue
                if src.op_type in ("Mul", "Pow") and src.input[0] == src.input[-1]:
                    keep.add(src.name)
                elif src.op_type == "Add":
                    keep.add(src.name)
                    stack += [producer.get(i) for i in src.input]
    return keep


def _float_tensors(model: onnx.ModelProto) -> set[str]:
    """Names of every float32 tensor (inputs, outputs, intermediates, initializers)."""
    inferred = onnx.shape_inference.infer_shapes(model)
    g = inferred.graph
    out = {vi.name for vi in list(g.value_info) + list(g.input) + list(g.output)
           if vi.type.tensor_type.elem_type == FLOAT}
    out |= {t.name for t in g.initializer if t.data_type == FLOAT}
    return out


def convert_to_fp16(model: onnx.ModelProto, keep: set[str] | None = None) -> onnx.ModelProto:
    """A copy of ``model`` computing in FP16 except the nodes in ``keep`` (default: fp32_nodes)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    keep = fp32_nodes(g) if keep is None else keep
    floats = _float_tensors(model)
    inits = {t.name: t for t in g.initializer}
    dtype: dict[str, int] = {name: FLOAT for name in floats}   # current type of each tensor
    half_inits: dict[str, str] = {}
    casts: dict[tuple[str, int], str] = {}
    new_nodes: list[onnx.NodeProto] = []

    def as_type(name: str, to: int) -> str:
        if dtype.get(name) == to:
            return name
        if name in inits and to == HALF:  # convert the weight once instead of casting it
            if name not in half_inits:
                arr = numpy_helper.to_array(inits[name]).astype(np.float16)
                half = numpy_helper.from_array(arr, f"{name}__fp16")
                g.initializer.append(half)
                half_inits[name] = half.name
                dtype[half.name] = HALF
            return half_inits[name]
        key = (name, to)
        if key not in casts:
            out = f"{name}__to_{'fp16' if to == HALF else 'fp32'}"
            new_nodes.append(helper.make_node("Cast", [name], [out], to=to,
                                              name=f"{out}__cast"))
            casts[key] = out
            dtype[out] = to
        return casts[key]

    for node in list(g.node):
        want = FLOAT if node.name in keep else HALF
        fixed = FIXED_FP32_INPUTS.get(node.op_type, set())
        for idx, name in enumerate(node.input):
            if name and name in dtype and dtype[name] in (FLOAT, HALF):
                node.input[idx] = as_type(name, FLOAT if idx in fixed else want)
        if node.op_type not in TYPED_OPS:
            for name in node.output:
                if name in floats:
                    dtype[name] = want
        new_nodes.append(node)

    outputs = {o.name for o in g.output}
    for name in outputs:  # outputs stay FP32: rename the producer's tensor and cast back
        if dtype.get(name) == HALF:
            inner = f"{name}__fp16"
            for node in new_nodes:
                node.output[:] = [inner if o == name else o for o in node.output]
                node.input[:] = [inner if i == name else i for i in node.input]
            new_nodes.append(helper.make_node("Cast", [inner], [name], to=FLOAT,
                                              name=f"{name}__output_cast"))
    del g.node[:]
    g.node.extend(new_nodes)
    used = {i for n in g.node for i in n.input}
    kept_inits = [t for t in g.initializer if t.name in used]
    del g.initializer[:]
    g.initializer.extend(kept_inits)
    del g.value_info[:]  # stale float32 annotations; runtimes infer the new ones
    onnx.checker.check_model(model)
    return model


def reference_evaluator(model: onnx.ModelProto):
    """onnx's reference evaluator for an FP16 graph, faithful to FP16 storage.

    ONNX Runtime on a CPU cannot check FP16 numerics: where it lacks an FP16 kernel it inserts
    Casts and computes in FP32, so an overflow never shows. The reference evaluator keeps every
    tensor in the type the graph declares. GEMMs and convolutions accumulate in FP32 and round
    their result to FP16, as GPU FP16 kernels do, which also makes them fast enough for whole
    test sets.
    """
    from onnx.reference import ReferenceEvaluator
    from onnx.reference.op_run import OpRun

    class Gemm(OpRun):
        def _run(self, a, b, c=None, alpha=None, beta=None, transA=None, transB=None):
            a32, b32 = a.astype(np.float32), b.astype(np.float32)
            y = (a32.T if transA else a32) @ (b32.T if transB else b32)
            y = (1.0 if alpha is None else alpha) * y
            if c is not None:
                y = y + (1.0 if beta is None else beta) * c.astype(np.float32)
            return (y.astype(a.dtype),)

    class MatMul(OpRun):
        def _run(self, a, b):
            return ((a.astype(np.float32) @ b.astype(np.float32)).astype(a.dtype),)

    class Conv(OpRun):
        def _run(self, x, w, b=None, auto_pad=None, dilations=None, group=None,
                 kernel_shape=None, pads=None, strides=None):
            depthwise = group == x.shape[1] == w.shape[0] and w.shape[1] == 1
            plain = (not dilations or set(dilations) == {1}) and \
                (not strides or set(strides) == {1}) and auto_pad in (None, "NOTSET")
            if not (depthwise and plain):
                raise NotImplementedError("the FP16 reference handles stride-1 depthwise "
                                          "convolutions (the experts' context kernels)")
            kh, kw = w.shape[2:]
            p = pads or [0, 0, 0, 0]
            xp = np.pad(x.astype(np.float32), ((0, 0), (0, 0), (p[0], p[2]), (p[1], p[3])))
            h, wd = xp.shape[2] - kh + 1, xp.shape[3] - kw + 1
            w32 = w.astype(np.float32)
            y = np.zeros((x.shape[0], x.shape[1], h, wd), np.float32)
            for i in range(kh):
                for j in range(kw):
                    y += xp[:, :, i:i + h, j:j + wd] * w32[None, :, 0, i, j, None, None]
            if b is not None:
                y += b.astype(np.float32)[None, :, None, None]
            return (y.astype(x.dtype),)

    return ReferenceEvaluator(model, new_ops=[Gemm, MatMul, Conv])
