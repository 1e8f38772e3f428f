"""The runtimes a user would pick instead of the engine, for ``bench`` (the ``bench`` extra:
``pip install -e ".[bench]"``: onnx, onnxscript, onnxruntime, openvino, nncf).

Each starts from the same model as PyTorch's plain baseline (``QATViT.float_twin``: the
ternary weights dequantized, standard modules), exported once to ONNX (opset 18, dynamic
batch, ``torch.onnx.export(dynamo=True)``), then:

- ``ort-fp32``: ONNX Runtime, float32, CPU execution provider;
- ``ort-int8``: ``onnxruntime.quantization.quantize_dynamic`` (int8 weights, QInt8;
  activations quantized per call), what ONNX Runtime's documentation suggests for
  transformers on a CPU; on a CPU without VNNI (AVX-512 or AVX-VNNI) with
  ``reduce_range=True`` (7-bit weights), as that documentation advises: its 8-bit
  products there add in pairs to int16 and saturate;
- ``openvino``: OpenVINO on the CPU at its default inference precision (bf16 where the
  CPU has it), with the faster of the LATENCY and THROUGHPUT hints (measured on the first
  calls; the report says which);
- ``openvino-int8``: the same after NNCF's post-training quantization
  (``nncf.quantize``, ``ModelType.TRANSFORMER``), calibrated on 300 CIFAR-10 training
  images when the data is at hand, else on random inputs (the report says which).

Each runs with as many threads as the engine. The engine never imports this module.
"""

from __future__ import annotations

import importlib.util
import time
from pathlib import Path

import numpy as np
from llvmlite import binding

from tinyvit158.errors import TinyViTError
from tinyvit158.weights import Checkpoint

PEERS = ("ort-fp32", "ort-int8", "openvino", "openvino-int8")
CALIBRATION_IMAGES = 300


def missing(variant: str) -> str | None:
    """Why ``variant`` cannot run here (a package to install), or None."""
    need = {"ort": ("onnx", "onnxruntime"), "openvino": ("onnx", "openvino")}[variant.split("-")[0]]
    if variant == "openvino-int8":
        need = (*need, "nncf")
    absent = [m for m in ("torch", *need) if importlib.util.find_spec(m) is None]
    return f"not installed: {', '.join(absent)} (pip install -e '.[bench,train]')" if absent else None


def export_onnx(ckpt: Checkpoint, path: Path) -> Path:
    """The plain float32 PyTorch model of ``ckpt`` as ONNX with a dynamic batch axis."""
    import torch

    from tinyvit158.train.model import QATViT

    cfg = ckpt.config
    model = QATViT.float_twin(ckpt)
    x = torch.zeros(2, cfg.in_chans, cfg.image_size, cfg.image_size)
    with torch.inference_mode():
        program = torch.onnx.export(
            model, (x,), dynamo=True, opset_version=18, input_names=["images"], output_names=["logits"],
            dynamic_shapes={"x": {0: torch.export.Dim("batch", min=1, max=4096)}}, verbose=False,
        )  # fmt: skip
    program.save(str(path))
    return path


def build(variant: str, onnx_path: Path, threads: int, workdir: Path, calibration: np.ndarray | None, batch: int):
    """(callable on float32 images -> logits, description) for a peer variant."""
    if variant.startswith("ort"):
        return _ort(variant, onnx_path, threads, workdir)
    return _openvino(variant, onnx_path, threads, calibration, batch)


def cpu_has_int8_dot() -> bool:
    """Whether this CPU has a VNNI int8 dot product (AVX-512 VNNI or AVX-VNNI), as llvmlite sees it."""
    features = binding.get_host_cpu_features()
    return bool(features.get("avx512vnni") or features.get("avxvnni"))


def _ort(variant, onnx_path, threads, workdir):
    import onnxruntime as ort

    path, desc = onnx_path, f"ONNX Runtime {ort.__version__} fp32"
    if variant == "ort-int8":
        from onnxruntime.quantization import QuantType, quantize_dynamic

        path = workdir / "model-int8.onnx"
        reduce = not cpu_has_int8_dot()
        quantize_dynamic(str(onnx_path), str(path), weight_type=QuantType.QInt8, reduce_range=reduce)
        desc = (f"ONNX Runtime {ort.__version__} quantize_dynamic: int8 weights (QInt8"
                f"{', reduce_range: no VNNI on this CPU' if reduce else ''}), dynamic int8 activations")  # fmt: skip
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    opts.inter_op_num_threads = 1
    session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return (lambda x: session.run(None, {name: x})[0]), desc


def _openvino(variant, onnx_path, threads, calibration, batch):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(str(onnx_path))
    desc = f"OpenVINO {ov.__version__.split('-')[0]}"
    if variant == "openvino-int8":
        import nncf

        if calibration is None:
            raise TinyViTError("openvino-int8 needs calibration images")
        items = [calibration[i : i + 1] for i in range(len(calibration))]
        model = nncf.quantize(model, nncf.Dataset(items), model_type=nncf.ModelType.TRANSFORMER, subset_size=len(items))
        desc += f" + NNCF {nncf.__version__} int8"
    best = None
    for hint in ("LATENCY", "THROUGHPUT"):
        compiled = core.compile_model(model, "CPU", {"PERFORMANCE_HINT": hint, "INFERENCE_NUM_THREADS": threads})
        request = compiled.create_infer_request()
        shape = (batch, *[d.get_length() for d in list(model.inputs[0].get_partial_shape())[1:]])
        x = np.zeros(shape, np.float32)
        request.infer({0: x})
        t = time.perf_counter()
        for _ in range(3):
            request.infer({0: x})
        dt = time.perf_counter() - t
        if best is None or dt < best[0]:
            p = compiled.get_property("INFERENCE_PRECISION_HINT")
            precision = p.to_string() if hasattr(p, "to_string") else str(p)
            best = (dt, request, hint, precision)
    _, request, hint, precision = best

    def run(images):
        return request.infer({0: images})[0].copy()

    return run, f"{desc}, {precision}, {hint} hint (faster than {'THROUGHPUT' if hint == 'LATENCY' else 'LATENCY'})"
