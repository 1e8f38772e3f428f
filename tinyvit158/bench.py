"""Speed and memory, measured: ``python -m tinyvit158.bench``.

One run times, on the same architecture, the same random ternary weights and the same
inputs:

- ``engine``: tinyvit158 (ternary weights, Numba int8 x ternary kernels), on the kernel
  path this CPU selects, weights kept 2 bits each; ``engine-bytes``: the same with one byte
  per weight; ``engine-generic``: the portable kernel, for comparison; ``engine-avx2``: the
  AVX2 kernel (``vpmaddubsw``), where the CPU has it; ``engine-int8attn``:
  the same weights with fully quantized attention (``attention="int8"``, 8-bit q, k, v and
  probabilities: ``kernels/qattn.py``) in place of the float64 one; ``engine-attn4``: with
  4-bit q, k, v and probabilities (clipped at 1/4: ``weights/cifar10-tiny-attn4``'s numerics);
  ``engine-int``: the same weights in integer numerics (every value an integer:
  ``weights/cifar10-tiny-int``'s numerics, ``kernels/intops.py``); ``engine-bitlinear``:
  ViT-1.58b's BitLinear blocks (``bitlinear_norm``: a LayerNorm on every ternary layer's
  input), the same weights with identity norms (timed only: no agreement reported);
- ``numpy-fp32``: the same model in NumPy float32: weights dequantized (codes x gamma),
  BLAS matmuls, no activation quantization, every op vectorized over the batch;
- ``torch-fp32``: the same in PyTorch float32 on the CPU as a PyTorch user writes it
  (``nn.Linear``, ``nn.LayerNorm``, ``nn.GELU``, ``scaled_dot_product_attention``, under
  ``inference_mode``; not the engine's exact twin, whose float64 LayerNorm and attention
  are 2-3x slower), when torch is installed;
- ``torch-int8``: that model with ``torch.ao.quantization.quantize_dynamic`` (FBGEMM
  int8 linears), the int8 CPU path a PyTorch user would reach for.

- ``ort-fp32``, ``ort-int8``, ``openvino``, ``openvino-int8``: ONNX Runtime and OpenVINO,
  float and with their own int8 quantizers (``peers.py``; the ``bench`` extra), each
  skipped with a message when its packages are missing.

For ``cifar10-tiny`` the weights are the shipped ones (else random, or ``--weights``), and
when CIFAR-10 is at hand (``--data`` or ``TINYVIT158_DATA``) every variant's top-1
agreement with the engine on 256 test images is reported, and OpenVINO's int8 model is
calibrated on 300 training images.

Each variant runs in its own subprocess, so its peak resident memory is its own and no
library's idle threads (OpenBLAS spins its threads after every call) slow another. Times
are medians of repeated calls after warm-up; images/s = batch / median.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tinyvit158.cli import prog
from tinyvit158.config import get_preset
from tinyvit158.errors import TinyViTError
from tinyvit158.peers import PEERS
from tinyvit158.weights import Checkpoint, default_weights_path, load_weights, random_checkpoint

VARIANTS = (
    "engine", "engine-int8attn", "engine-attn4", "engine-int", "engine-bitlinear", "engine-bytes", "engine-generic",
    "engine-avx2", "numpy-fp32", "torch-fp32", "torch-int8", *PEERS,
)  # fmt: skip
FORCED_PATH = {"engine-generic": "generic", "engine-avx2": "avx2"}  # variant -> the kernel path it forces


def runnable_variants() -> list[str]:
    """Every variant but those forcing a kernel path this CPU lacks."""
    from tinyvit158.kernels import cpu_has

    return [v for v in VARIANTS if v not in FORCED_PATH or cpu_has(FORCED_PATH[v])]


QUANTIZED_ATTENTION = {  # the engine variants with quantized attention: their config changes
    "engine-int8attn": {"attention": "int8"},
    "engine-attn4": {"attention": "int8", "attention_bits": 4, "attention_prob_bits": 4, "attention_prob_clip": 0.25},
    "engine-int": {"attention": "int8", "numerics": "integer"},
}


# -- the NumPy float32 baseline -----------------------------------------------------------
def erf32(x: np.ndarray) -> np.ndarray:
    """Vectorized erf, Abramowitz & Stegun 7.1.26 (|error| <= 1.5e-7; 4.8e-7 measured once
    evaluated in float32, i.e. ~4 ulps near 1), float32 in and out."""
    a = np.abs(x)
    t = np.float32(1.0) / (np.float32(1.0) + np.float32(0.3275911) * a)
    poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027 + t * 1.061405429))))
    y = np.float32(1.0) - poly.astype(np.float32) * np.exp(-a * a)
    return np.copysign(y, x).astype(np.float32)


class NumpyFloatViT:
    """The model in float32 NumPy with dequantized weights: what the ternary engine replaces."""

    def __init__(self, ckpt: Checkpoint):
        self.cfg = cfg = ckpt.config
        self.p = {k: v for k, v in ckpt.tensors.items() if v.dtype == np.float32}
        self.w = {}  # layer -> (weight (in, out) float32, bias)
        for layer in cfg.linear_shapes():
            w = ckpt.dequantized(layer) if cfg.is_ternary(layer) else ckpt.float_weight(layer)
            self.w[layer] = (np.ascontiguousarray(w.T), ckpt.tensors.get(f"{layer}.bias"))

    def linear(self, x, layer):
        w, b = self.w[layer]
        return x @ w + b if b is not None else x @ w

    def ln(self, x, name):
        mean = x.mean(-1, keepdims=True)
        var = ((x - mean) ** 2).mean(-1, keepdims=True)
        return (x - mean) / np.sqrt(var + np.float32(self.cfg.norm_eps)) * self.p[f"{name}.weight"] + self.p[
            f"{name}.bias"
        ]

    def __call__(self, images: np.ndarray) -> np.ndarray:
        from tinyvit158.oracle import patchify

        cfg = self.cfg
        B, N1, D, H = images.shape[0], cfg.num_tokens, cfg.dim, cfg.heads
        x = self.linear(patchify(images, cfg.patch_size), "patch_embed.proj")  # (B, N, D)
        x = np.concatenate([np.broadcast_to(self.p["cls_token"], (B, 1, D)), x], 1) + self.p["pos_embed"]
        for i in range(cfg.depth):
            qkv = self.linear(self.ln(x, f"blocks.{i}.norm1"), f"blocks.{i}.attn.qkv")
            q, k, v = qkv.reshape(B, N1, 3, H, D // H).transpose(2, 0, 3, 1, 4)
            s = q @ k.transpose(0, 1, 3, 2) * np.float32((D // H) ** -0.5)
            s = np.exp(s - s.max(-1, keepdims=True))
            o = ((s / s.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(B, N1, D)
            x = x + self.linear(o, f"blocks.{i}.attn.proj")
            h = self.linear(self.ln(x, f"blocks.{i}.norm2"), f"blocks.{i}.mlp.fc1")
            h = np.float32(0.5) * h * (np.float32(1.0) + erf32(h * np.float32(math.sqrt(0.5))))
            x = x + self.linear(h, f"blocks.{i}.mlp.fc2")
        return self.linear(self.ln(x[:, 0], "norm"), "head")


# -- one variant, measured in a child process --------------------------------------------
def build(variant: str, ckpt: Checkpoint, args=None):
    """(callable on float32 images, resident weight bytes, description)."""
    if variant in PEERS:
        import tempfile

        import numba

        from tinyvit158 import peers

        calib = np.load(args.calib) if args.calib else None
        if calib is None and variant == "openvino-int8":
            shape = (peers.CALIBRATION_IMAGES, ckpt.config.in_chans, ckpt.config.image_size, ckpt.config.image_size)
            calib = np.random.default_rng(2).standard_normal(shape).astype(np.float32)
        run, desc = peers.build(variant, Path(args.onnx), numba.get_num_threads(), Path(tempfile.mkdtemp()), calib,
                                args.batch)  # fmt: skip
        if variant == "openvino-int8":
            desc += f", calibrated on {'300 CIFAR-10 training images' if args.calib else '300 random inputs'}"
        return run, Path(args.onnx).stat().st_size, desc
    if variant.startswith("engine"):
        if variant in FORCED_PATH:
            os.environ["TINYVIT158_KERNEL"] = FORCED_PATH[variant]
        from tinyvit158.engine import Engine
        from tinyvit158.kernels import kernel_path

        if variant in QUANTIZED_ATTENTION:
            ckpt = Checkpoint(ckpt.config.replace(**QUANTIZED_ATTENTION[variant]), ckpt.tensors, ckpt.source)
        if variant == "engine-bitlinear":
            ckpt = with_identity_bitlinear_norms(ckpt)
        engine = Engine(ckpt, packed=variant != "engine-bytes")
        path = kernel_path()
        tiled = path in ("vnni", "avx2")  # the paths with a 2-bit layout
        layout = ", 2-bit weights" if tiled and engine.packed else ", 1-byte weights" if tiled else ""
        cfg = ckpt.config
        attn = f", {cfg.attention_bits}-bit attention" if cfg.attention == "int8" else ""
        attn += ", integer numerics" if cfg.numerics == "integer" else ""
        attn += ", BitLinear norms" if cfg.bitlinear_norm else ""
        return engine, engine.weight_bytes, f"{path} kernels{layout}{attn}"
    if variant == "numpy-fp32":
        model = NumpyFloatViT(ckpt)
        nbytes = sum(w.nbytes for w, _ in model.w.values()) + sum(a.nbytes for a in model.p.values())
        return model, nbytes, "BLAS sgemm"
    import torch

    from tinyvit158.train.model import QATViT

    model = QATViT.float_twin(ckpt)
    desc = "fp32"
    if variant == "torch-int8":
        model = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
        desc = f"dynamic int8 ({torch.backends.quantized.engine})"
    nbytes = 0
    for v in model.state_dict().values():
        if isinstance(v, torch.Tensor):
            nbytes += v.numel() * v.element_size()
        elif isinstance(v, tuple):  # packed int8 params: (weight, bias)
            nbytes += sum(t.numel() * t.element_size() for t in v if isinstance(t, torch.Tensor))

    def run(x):
        with torch.inference_mode():
            return model(torch.from_numpy(x)).numpy()

    return run, nbytes, desc


def with_identity_bitlinear_norms(ckpt: Checkpoint) -> Checkpoint:
    """``ckpt`` as a BitLinear model (``bitlinear_norm``) whose new norms are the identity:
    another function, the same cost."""
    cfg = ckpt.config.replace(bitlinear_norm=True)
    tensors = dict(ckpt.tensors)
    for layer, (_, k) in cfg.linear_shapes().items():
        if cfg.is_ternary(layer):
            tensors[f"{layer}.norm.weight"], tensors[f"{layer}.norm.bias"] = (
                np.ones(k, np.float32),
                np.zeros(k, np.float32),
            )
    return Checkpoint(cfg, tensors, ckpt.source)


def bench_weights(model: str, weights: str | None) -> str:
    """``weights`` (a file, or "random"), by default the shipped file for ``cifar10-tiny``
    and random weights of the preset's shapes otherwise."""
    if weights is not None:
        return weights
    shipped = default_weights_path()
    return str(shipped) if model == "cifar10-tiny" and shipped is not None else "random"


def bench_checkpoint(model: str, weights: str | None) -> Checkpoint:
    """The weights every variant runs (:func:`bench_weights`)."""
    weights = bench_weights(model, weights)
    if weights == "random":
        return random_checkpoint(get_preset(model), seed=0)
    return load_weights(weights)


def child(args) -> dict:
    cfg = get_preset(args.model)
    ckpt = bench_checkpoint(args.model, args.weights)
    x = np.random.default_rng(1).standard_normal((args.batch, 3, cfg.image_size, cfg.image_size)).astype(np.float32)
    t0 = time.perf_counter()
    model, nbytes, desc = build(args.child, ckpt, args)
    model(x)  # first call: JIT compile or cache load
    load_s = time.perf_counter() - t0
    for _ in range(args.warmup):
        model(x)
    times = []
    deadline = time.perf_counter() + args.max_seconds
    for _ in range(args.repeats):
        t = time.perf_counter()
        model(x)
        times.append(time.perf_counter() - t)
        if time.perf_counter() > deadline and len(times) >= 3:
            break
    result = {
        "variant": args.child, "model": args.model, "batch": args.batch, "desc": desc,
        "median_s": float(np.median(times)), "min_s": float(min(times)), "max_s": float(max(times)),
        "repeats": len(times), "weight_bytes": int(nbytes), "load_s": load_s,
        "peak_rss_bytes": peak_rss_bytes(),
    }  # fmt: skip
    if args.agree and args.child != "engine-bitlinear":  # top-1 on test images, compared by the parent
        images = np.load(args.agree)
        result["predictions"] = np.concatenate(
            [np.asarray(model(images[i : i + args.batch])).argmax(1) for i in range(0, len(images), args.batch)]
        ).tolist()
    if args.child.startswith("engine"):
        import numba

        result["threads"] = numba.get_num_threads()
        if args.layers:
            model.timings = {}
            reps = max(1, len(times))
            total = 0.0
            for _ in range(reps):
                t = time.perf_counter()
                model(x)
                total += time.perf_counter() - t
            parts = {k: v / reps for k, v in model.timings.items()}
            parts["other"] = total / reps - sum(parts.values())
            result["layers_s"] = parts
    elif args.child in PEERS:
        import numba

        result["threads"] = numba.get_num_threads()
    elif args.child.startswith("torch"):
        import torch

        result["threads"] = torch.get_num_threads()
    else:
        result["threads"] = blas_threads()
    return result


def peak_rss_bytes() -> int:
    """This process's peak resident memory (VmHWM, which exec resets; ru_maxrss may not)."""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def blas_threads():
    try:
        from threadpoolctl import threadpool_info

        return sum(p.get("num_threads", 0) for p in threadpool_info() if p.get("user_api") == "blas") or None
    except ImportError:
        return None


def blas_info() -> str:
    try:
        from threadpoolctl import threadpool_info

        infos = [p for p in threadpool_info() if p.get("user_api") == "blas"]
        return ", ".join(
            f"{p['internal_api']} {p.get('version')} ({p.get('architecture')}, {p['num_threads']} threads)"
            for p in infos
        )
    except ImportError:
        return "unknown (pip install threadpoolctl to show it)"


# -- kernels alone: GOP/s on the model's matmul shapes ----------------------------------
def kernel_table(model: str, tokens: list[int], seconds: float = 0.3) -> list[dict]:
    from tinyvit158.kernels import PATHS, PreparedTernary, cpu_has, linear

    cfg = get_preset(model)
    shapes = {}
    for layer, (n, k) in cfg.linear_shapes().items():
        if cfg.is_ternary(layer):
            kind = layer.rsplit(".", 1)[-1] if layer.startswith("blocks.") else layer.split(".")[0]
            shapes.setdefault((kind, n, k), layer)
    rng = np.random.default_rng(0)
    rows = []
    paths = [p for p in PATHS if cpu_has(p)]

    def rate(fn, ops):
        fn()
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds or n < 3:
            fn()
            n += 1
        return ops * n / (time.perf_counter() - t0) / 1e9

    for t in tokens:
        for kind, n, k in shapes:
            x = rng.integers(-127, 128, size=(t, k)).astype(np.int8)
            s_x, out = np.full(t, 0.01, np.float32), np.empty((t, n), np.float32)
            codes = rng.integers(-1, 2, size=(n, k)).astype(np.int8)
            w = PreparedTernary(codes, np.ones(n, np.float32), np.zeros(n, np.float32), packed=True)  # as the engine
            row = {"layer": kind, "T": t, "K": k, "N": n}
            for p in paths:  # the engine's call: int8 in, float32 (dequantized, + bias) out
                row[f"{p}_gops"] = rate(lambda p=p, x=x, w=w, s=s_x, o=out: linear(x, s, w, p, out=o), 2 * t * k * n)
            xf, wf = x.astype(np.float32), w.codes.astype(np.float32).T.copy()
            time.sleep(0.3)  # let the kernels' threads settle before BLAS (and vice versa below)
            row["sgemm_gops"] = rate(lambda xf=xf, wf=wf: xf @ wf, 2 * t * k * n)
            time.sleep(0.3)
            rows.append(row)
    return rows


def run_child(variant: str, args) -> dict:
    cmd = [sys.executable, "-m", "tinyvit158.bench", "--child", variant, "--preset", args.model]
    cmd += ["--batch", str(args.batch_now), "--repeats", str(args.repeats), "--warmup", str(args.warmup)]
    cmd += ["--max-seconds", str(args.max_seconds)] + (["--layers"] if args.layers else [])
    for flag in ("weights", "onnx", "calib", "agree"):
        if getattr(args, flag):
            cmd += [f"--{flag}", str(getattr(args, flag))]
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=args.child_timeout)
    except subprocess.TimeoutExpired:  # one crawling variant (e.g. BLAS threads on busy cores) must not hang the run
        return {"variant": variant, "batch": args.batch_now, "error": f"timed out after {args.child_timeout:g} s"}
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return {"variant": variant, "batch": args.batch_now, "error": last}
    return json.loads(out.stdout.strip().splitlines()[-1])


def _shown(path) -> str:
    """A weight file as the header names it: relative to the working folder when inside it."""
    rel = os.path.relpath(path)
    return str(path) if rel.startswith("..") else rel


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog=prog("tinyvit158.bench"), description=__doc__.splitlines()[0])
    p.add_argument(
        "--preset", "--model", dest="model", default="cifar10-tiny",
        help="model shapes: cifar10-tiny (the shipped weights), deit-tiny, deit-small, vit-base-16 (random weights)",
    )  # fmt: skip
    p.add_argument("--batch", type=int, nargs="+", default=[1, 64], help="batch sizes (default: 1 64)")
    p.add_argument("--variants", nargs="+", default=runnable_variants(), choices=VARIANTS, help="what to time")
    p.add_argument("--repeats", type=int, default=30, help="timed calls per variant (default 30)")
    p.add_argument("--warmup", type=int, default=3, help="untimed calls after the first (default 3)")
    p.add_argument("--max-seconds", type=float, default=20.0, help="stop repeating a variant after this long")
    p.add_argument(
        "--child-timeout", type=float, default=600.0,
        help="give up on a variant whose process (loading, calls, agreement) takes longer than this many seconds: "
        "it is reported as failed and the run goes on (default 600)",
    )  # fmt: skip
    p.add_argument(
        "--rounds", type=int, default=1,
        help="run every variant this many times, interleaved, and report the median of the rounds' medians "
        "(a shared machine drifts by 10-30%% over minutes; interleaving spreads that over all variants)",
    )  # fmt: skip
    p.add_argument("--layers", action="store_true", help="also time each part of the engine")
    p.add_argument("--kernels", action="store_true", help="also measure GOP/s of the int8 x ternary kernels vs sgemm")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument(
        "--weights", help="a weight file for every variant, or 'random' (default: the shipped file for cifar10-tiny)"
    )
    p.add_argument("--data", help="CIFAR-10 (default: TINYVIT158_DATA): top-1 agreement and int8 calibration")
    p.add_argument(
        "--contend", type=int, nargs="?", const=1, default=0, metavar="N",
        help="run N busy processes (default 1) beside every variant: speed under contention",
    )  # fmt: skip
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--onnx", help=argparse.SUPPRESS)
    p.add_argument("--calib", help=argparse.SUPPRESS)
    p.add_argument("--agree", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if any(b < 1 for b in args.batch) or args.repeats < 1 or args.rounds < 1 or args.warmup < 0:
        p.error("--batch, --repeats and --rounds must be at least 1, --warmup at least 0")
    if not args.child_timeout > 0:
        p.error("--child-timeout must be positive")
    try:
        get_preset(args.model)
    except TinyViTError as e:
        p.error(str(e))
    if args.child:
        args.batch = args.batch[0]
        print(json.dumps(child(args)))
        return 0
    if args.weights not in (None, "random"):
        try:  # a bad file is one line now, not an error row per variant after minutes of work
            load_weights(args.weights)
        except TinyViTError as e:
            print(f"error: {e}", file=sys.stderr)
            return 1

    from tqdm import tqdm

    try:
        import torch  # noqa: F401

        has_torch = True
    except ImportError:
        has_torch = False
    from tinyvit158 import peers

    why = {v: "PyTorch not installed: pip install -e '.[train]'" for v in args.variants if v.startswith("torch")}
    why = {v: w for v, w in why.items() if not has_torch}
    why.update({v: peers.missing(v) for v in args.variants if v in PEERS and peers.missing(v)})
    variants = [v for v in args.variants if v not in why]
    skipped = {v: why[v] for v in args.variants if v in why}
    work = _prepare_inputs(args, variants)
    from tinyvit158.kernels import kernel_path

    cfg = get_preset(args.model)
    info = {
        "model": args.model, "params": sum(n * k for n, k in cfg.linear_shapes().values()),
        "cpu": _cpu_name(), "cores": os.cpu_count(), "kernel_path": kernel_path(), "blas": blas_info(),
        "openblas_coretype": os.environ.get("OPENBLAS_CORETYPE"), "python": platform.python_version(),
        "rounds": args.rounds,
    }  # fmt: skip
    runs: dict[tuple[int, str], list[dict]] = {}
    jobs = [(b, v) for _ in range(args.rounds) for b in args.batch for v in variants]
    # busy loops that end with this process, even when it is killed before its finally runs
    spin = "import os\nparent = os.getppid()\nwhile os.getppid() == parent: pass"
    busy = [subprocess.Popen([sys.executable, "-c", spin]) for _ in range(args.contend)]
    try:
        for b, v in tqdm(jobs, desc="bench", unit="run", file=sys.stderr):
            args.batch_now = b
            runs.setdefault((b, v), []).append(run_child(v, args))
    finally:
        for proc in busy:
            proc.kill()
            proc.wait()
    info["contend"] = args.contend
    results = [merge_rounds(r) for r in runs.values()]
    add_agreement(results)
    info["weights"] = _shown(args.weights) if args.weights else "random"
    info["data"] = bool(args.agree)
    if work is not None:
        work.cleanup()
    kernels = kernel_table(args.model, [cfg.num_tokens, 64 * cfg.num_tokens]) if args.kernels else None
    if args.kernels:
        import numba

        from tinyvit158.peak import instruction_rates

        info["instructions_per_s"] = instruction_rates()
        info["threads"] = numba.get_num_threads()
    if args.json:
        print(json.dumps({"info": info, "results": results, "kernels": kernels, "skipped": skipped}))
        return 0
    print_report(info, results, kernels, skipped)
    return 0


def _prepare_inputs(args, variants: list[str]):
    """Once per run, for the children: the weights' path, the peers' ONNX model, and (with
    CIFAR-10) calibration and agreement images as .npy files. Returns the temporary folder."""
    import tempfile

    args.weights = bench_weights(args.model, args.weights)
    args.onnx = args.calib = args.agree = None
    cfg = get_preset(args.model)
    from tinyvit158.data import data_dir_from_env

    data = args.data or data_dir_from_env()
    if not any(v in PEERS for v in variants) and data is None:
        return None
    work = tempfile.TemporaryDirectory(prefix="tinyvit158-bench-")
    folder = Path(work.name)
    if any(v in PEERS for v in variants):
        from tinyvit158 import peers

        print("bench: exporting the float32 model to ONNX for the peers ...", file=sys.stderr)
        args.onnx = str(peers.export_onnx(bench_checkpoint(args.model, args.weights), folder / "model.onnx"))
    if data is not None and (cfg.image_size, cfg.num_classes) == (32, 10):
        from tinyvit158.data import load_cifar10
        from tinyvit158.image import normalize

        def pick(split, n):
            d = load_cifar10(data, split, progress=False)
            idx = np.linspace(0, len(d) - 1, n).astype(int)  # spread over the split: every class
            return np.stack([normalize(im, cfg) for im in d.images[idx]])

        args.agree = str(folder / "agree.npy")
        np.save(args.agree, pick("test", 256))
        if "openvino-int8" in variants:
            from tinyvit158.peers import CALIBRATION_IMAGES

            args.calib = str(folder / "calib.npy")
            np.save(args.calib, pick("train", CALIBRATION_IMAGES))
    return work


def add_agreement(results: list[dict]) -> None:
    """Each result's top-1 agreement with the engine's on the same images (batch by batch)."""
    engine = {r["batch"]: r["predictions"] for r in results if r.get("variant") == "engine" and "predictions" in r}
    for r in results:
        preds = r.pop("predictions", None)
        if preds is not None and r["batch"] in engine:
            r["agreement"] = float(np.mean(np.array(preds) == np.array(engine[r["batch"]])))


def merge_rounds(rounds: list[dict]) -> dict:
    """One result from the rounds of one (batch, variant): the median of their medians,
    the extremes of their extremes, the largest peak memory, per-part times as medians."""
    ok = [r for r in rounds if "error" not in r]
    if not ok:
        return rounds[-1]
    merged = dict(ok[len(ok) // 2])
    merged["median_s"] = float(np.median([r["median_s"] for r in ok]))
    merged["min_s"], merged["max_s"] = min(r["min_s"] for r in ok), max(r["max_s"] for r in ok)
    merged["repeats"] = sum(r["repeats"] for r in ok)
    merged["peak_rss_bytes"] = max(r["peak_rss_bytes"] for r in ok)
    merged["load_s"] = float(np.median([r["load_s"] for r in ok]))
    merged["rounds"] = len(ok)
    if "layers_s" in merged:
        merged["layers_s"] = {k: float(np.median([r["layers_s"].get(k, 0.0) for r in ok])) for k in merged["layers_s"]}
    return merged


def _cpu_name() -> str:
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def print_report(info, results, kernels, skipped) -> None:
    print(f"# {info['model']}: {info['params'] / 1e6:.2f} M weights in linear layers")
    print(f"# CPU: {info['cpu']}, {info['cores']} cores; engine kernel path: {info['kernel_path']}")
    print(
        f"# BLAS: {info['blas']}"
        + (f"; OPENBLAS_CORETYPE={info['openblas_coretype']}" if info["openblas_coretype"] else "")
    )
    if info.get("contend"):
        print(f"# contended: {info['contend']} busy process(es) ran beside every variant")
    if info.get("rounds", 1) > 1:
        print(f"# img/s: the median of {info['rounds']} interleaved rounds' medians; min and max over all calls")
    print(
        f"# weights: {info.get('weights', 'random')}"
        + ("; agree: top-1 agreement with the engine on 256 CIFAR-10 test images" if info.get("data") else "")
    )
    for v, why in skipped.items():
        print(f"# {v}: skipped ({why})")
    cols = ["variant", "batch", "img/s", "(min", "max)", "x numpy", "weights", "peak RSS", "load s", "threads", "agree"]
    widths = [-15, 5, 8, 7, 7, 8, 10, 9, 7, 7, 6]
    print(_row(cols, widths) + "  kind")
    numpy_runs = [r for r in results if r.get("variant") == "numpy-fp32" and "error" not in r]
    base = {r["batch"]: r["batch"] / r["median_s"] for r in numpy_runs}
    for r in results:
        if "error" in r:
            print(f"{r['variant']:<15} {r['batch']:>5}  failed: {r['error']}")
            continue
        b = r["batch"]
        cells = [
            r["variant"], b, f"{b / r['median_s']:.1f}", f"{b / r['max_s']:.1f}", f"{b / r['min_s']:.1f}",
            f"{b / r['median_s'] / base[b]:.2f}" if b in base else "-", _mb(r["weight_bytes"]),
            _mb(r["peak_rss_bytes"]), f"{r['load_s']:.2f}", str(r.get("threads")),
            f"{r['agreement']:.1%}" if "agreement" in r else "-",
        ]  # fmt: skip
        print(_row(cells, widths) + f"  {r['desc']}")
    for r in results:
        if "layers_s" in r:
            total = sum(r["layers_s"].values())
            parts = ", ".join(
                f"{k} {v * 1e3:.2f} ms ({v / total:.0%})"
                for k, v in sorted(r["layers_s"].items(), key=lambda kv: -kv[1])
            )
            print(f"\n{r['variant']} batch {r['batch']}, per call {total * 1e3:.2f} ms: {parts}")
    if kernels:
        rates, threads = info["instructions_per_s"], info["threads"]
        from tinyvit158.peak import OPS

        names = {"fma": "16-lane float32 FMA", "vpdpbusd": "vpdpbusd", "vpmaddubsw": "vpmaddubsw+vpaddw"}
        unit = {"fma": "GFLOP/s"}
        peaks = [
            f"{names[k]} {v / 1e9:.2f} G/s -> {v * OPS[k] * threads / 1e9:.0f} {unit.get(k, 'int8 GOP/s')}"
            for k, v in rates.items()
            if v
        ]
        print(f"\n# peak, measured on one core x {threads} threads: " + "; ".join(peaks))
        print(
            f"{'layer':<12} {'T':>6} {'K':>5} {'N':>5} "
            + " ".join(f"{k[:-5] + ' GOP/s':>14}" for k in kernels[0] if k.endswith("_gops"))
            + "   best/sgemm"
        )
        for row in kernels:
            rates = {k: v for k, v in row.items() if k.endswith("_gops")}
            best = max(v for k, v in rates.items() if k != "sgemm_gops")
            print(
                f"{row['layer']:<12} {row['T']:>6} {row['K']:>5} {row['N']:>5} "
                + " ".join(f"{v:14.0f}" for v in rates.values())
                + f"   {best / row['sgemm_gops']:.2f}x"
            )


def _row(cells, widths) -> str:
    """Cells padded to their widths: negative widths align left."""
    return " ".join(f"{c!s:{'<' if w < 0 else '>'}{abs(w)}}" for c, w in zip(cells, widths, strict=True))


def _mb(n: int) -> str:
    return f"{n / 2**20:.2f} MiB"


if __name__ == "__main__":
    raise SystemExit(main())
