"""Convert a model to a weight file: ``python -m tinyvit158.convert SRC --out F.safetensors``.

Sources:

- a float ViT with timm's ``VisionTransformer`` names (``patch_embed.proj``, ``cls_token``,
  ``pos_embed``, ``blocks.N.norm1``, ``attn.qkv``, ``attn.proj``, ``norm2``, ``mlp.fc1``,
  ``mlp.fc2``, ``norm``, ``head``) as ``.safetensors`` or as a PyTorch ``.pth``/``.bin``
  (read with ``torch.load(weights_only=True)``: the train extra), or wrapped in a dict under
  ``model`` or ``state_dict`` as DeiT's checkpoints are; or a tinyvit158 trainer checkpoint.
  Post-training ternarization (``ptq.py``): the shapes set the config, ``--preset`` and
  ``--set`` the rest (heads, eps, mean/std, class names); ``--granularity`` per tensor or
  per output channel; a weight already ternary keeps its codes and scale exactly;
  ``--scale lsq`` takes the least-squares scale of the absmean codes instead of mean |W|;
  ViT-1.58b checkpoints (BitLinear ``.norm`` tensors, ``quant_weight`` and ``weight_scale``
  buffers) convert to ``bitlinear_norm`` models, biases kept (ViT-1.58b's own inference
  path drops them, its training keeps them); ``--compensate`` fits each layer's output to the float layer's on
  ``--calib-images`` CIFAR-10 training images (``--calib DATA``) and folds the fit into
  gamma and the bias. Anything else (a distillation token, other norms, LayerScale, a
  missing or misshapen tensor, a NaN, an integer tensor) is refused in one line naming it.
- a tinyvit158 weight file, with ``--set KEY=VALUE`` changes to the numerics that leave
  its tensors as they are: the attention mode and code widths (``attention``,
  ``attention_bits``, ``attention_prob_bits``, ``attention_prob_clip``: post-training
  quantized attention), ``numerics`` (``integer``: integer-only numerics, with
  ``attention=int8``), the packing (the codes are re-packed), the name and class names.
  Anything that changes shapes or needs new tensors (``qk_norm``) is refused in one line: that needs training
  (``python -m tinyvit158.train --init FILE ...``).

The result is validated and written atomically, and its ``source`` metadata records the
file it came from and the changes; with ``--data`` also the engine's accuracy on the
CIFAR-10 test split (``engine_test_acc``).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import safetensors
import safetensors.numpy

from tinyvit158 import ptq
from tinyvit158.cli import prog
from tinyvit158.config import ViTConfig, get_preset, parse_set
from tinyvit158.data import load_cifar10
from tinyvit158.errors import TinyViTError
from tinyvit158.files import check_input, check_output
from tinyvit158.image import load_image
from tinyvit158.packing import pack
from tinyvit158.pipeline import make_model, run_engine
from tinyvit158.weights import FORMAT_NAME, Checkpoint, load_weights, save_weights

# config fields a weight file can change without new or reshaped tensors
NUMERICS = (
    "name",
    "class_names",
    "attention",
    "attention_bits",
    "attention_prob_bits",
    "attention_prob_clip",
    "numerics",
    "packing",
)


def change_numerics(ckpt: Checkpoint, changes: dict, source_name: str = "") -> Checkpoint:
    """``ckpt`` with the config fields in ``changes`` (only :data:`NUMERICS`) changed."""
    fixed = sorted(set(changes) - set(NUMERICS))
    if fixed:
        raise TinyViTError(
            f"--set {', '.join(fixed)}: a weight file's {'field' if len(fixed) == 1 else 'fields'} cannot change "
            f"without training (only {', '.join(NUMERICS)} can); train with --init {source_name or 'FILE'} instead"
        )
    cfg = ckpt.config.replace(**changes)
    tensors = dict(ckpt.tensors)
    if cfg.packing != ckpt.config.packing:
        for layer in cfg.linear_shapes():
            if cfg.is_ternary(layer):
                tensors[f"{layer}.weight_packed"] = pack(ckpt.ternary(layer)[0], cfg.packing)
    source = {"converted_from": {"file": source_name, "changes": changes, "source": ckpt.source}}
    return Checkpoint(cfg, tensors, source)


def is_weight_file(path: Path) -> bool:
    """A tinyvit158 weight file (its metadata says so), not a float safetensors state dict."""
    if path.suffix != ".safetensors":
        return False
    try:
        with safetensors.safe_open(str(path), framework="numpy") as f:
            return (f.metadata() or {}).get("format") == FORMAT_NAME
    except (safetensors.SafetensorError, OSError) as e:
        raise TinyViTError(f"{path}: not a readable safetensors file ({str(e).splitlines()[0]})") from None


def read_float_model(path: Path) -> tuple[dict[str, np.ndarray], ViTConfig | None]:
    """A float state dict as float arrays, and the config when the file is a trainer checkpoint."""
    check_input(path)
    if path.suffix == ".safetensors":
        try:
            return dict(safetensors.numpy.load_file(str(path))), None
        except Exception as e:  # noqa: BLE001 (bfloat16 and other dtypes numpy lacks, corrupt files)
            raise TinyViTError(f"{path}: cannot read its tensors as NumPy arrays ({str(e).splitlines()[0]})") from None
    try:
        import torch
    except ImportError:
        raise TinyViTError(f"{path}: a PyTorch file needs the train extra: pip install -e '.[train]'") from None
    from tinyvit158.train.state import load_checkpoint

    state = load_checkpoint(path)  # weights_only: no file can run code
    cfg = None
    if "config" in state and "model" in state:  # a trainer checkpoint
        cfg, state = ViTConfig.from_dict(state["config"]), state["model"]
    else:
        for key in ("model", "state_dict"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    sd = {}
    for name, t in state.items():
        if not isinstance(t, torch.Tensor):
            raise TinyViTError(f"{path}: entry {name!r} is a {type(t).__name__}, not a tensor")
        sd[name] = t.detach().float().numpy() if t.is_floating_point() else t.numpy()
    return sd, cfg


def calibration_images(data: str, cfg: ViTConfig, n: int) -> np.ndarray:
    """``n`` CIFAR-10 training images spread over the classes, as the model takes them."""
    train = load_cifar10(data, "train", progress=False)
    idx = np.linspace(0, len(train) - 1, n).astype(int)
    return np.stack([load_image(train.images[i], cfg) for i in idx])


ROUTES = {"buffers": "from quant_weight and weight_scale", "ternary": "already ternary (codes and scale exact)",
          "absmean": "absmean", "lsq": "absmean codes, least-squares scale"}  # fmt: skip


def from_float(args, changes: dict) -> Checkpoint:
    """The ``convert`` route for a float model (module docstring)."""
    src = Path(args.source)
    sd, cfg = read_float_model(src)
    from_trainer = cfg is not None  # latent weights trained with absmean: no exact-ternary route
    ptq.check_state_dict(sd)
    if cfg is None:
        fields = dict(changes)
        heads = fields.pop("heads", None)
        base = get_preset(args.preset or "cifar10-tiny")
        cfg = ptq.config_from_shapes(sd, base, heads if heads is not None or not args.preset else base.heads)
        cfg = cfg.replace(**fields)
    else:
        cfg = cfg.replace(**changes)
    cfg = cfg.replace(scale_granularity=args.granularity or cfg.scale_granularity)
    source = {"converted_from": {"file": src.name, "route": "post-training ternarization",
                                 "granularity": cfg.scale_granularity, "scale": args.scale,
                                 "changes": changes}}  # fmt: skip
    ckpt, routes = ptq.ternarize_state(sd, cfg, source, args.scale, exact=not from_trainer)
    source["converted_from"]["scales"] = routes
    print(f"ternary layers: {', '.join(f'{n} {ROUTES[r]}' for r, n in routes.items())}", file=sys.stderr)
    if args.compensate:
        if not args.calib:
            raise TinyViTError("--compensate needs calibration images: --calib DATA (the CIFAR-10 folder)")
        images = calibration_images(args.calib, cfg, args.calib_images)
        ckpt, report = ptq.compensate(ckpt, sd, images)
        source["converted_from"]["compensated_on"] = f"{len(images)} CIFAR-10 training images"
        before = sum(b for b, _ in report.values())
        after = sum(a for _, a in report.values())
        print(f"compensation: summed layer-output MSE {before:.4g} -> {after:.4g}", file=sys.stderr)
    return ckpt


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog=prog("tinyvit158.convert"), description=__doc__.splitlines()[0],
        epilog="ViT-1.58b checkpoints (BitLinear .norm tensors, quant_weight and weight_scale buffers) convert to a "
        "bitlinear_norm model with their biases, the model as trained; ViT-1.58b's own inference code drops them.",
    )  # fmt: skip
    p.add_argument(
        "source", help="a float ViT state dict (timm names; .safetensors, .pth, .bin), a trainer checkpoint (.pt) "
        "or a tinyvit158 weight file"
    )  # fmt: skip
    p.add_argument("--preset", help="what the shapes do not say (heads, eps, mean/std, classes): e.g. deit-tiny")
    p.add_argument("--granularity", choices=("tensor", "channel"), help="one weight scale per tensor or channel")
    p.add_argument("--scale", choices=ptq.SCALES, default="absmean",
                   help="post-training scale of the absmean codes: mean |W| (absmean) or their least-squares "
                   "scale, mean |W| over the non-zero codes (lsq)")  # fmt: skip
    p.add_argument("--compensate", action="store_true", help="fit each layer to the float one (needs --calib)")
    p.add_argument("--calib", metavar="DATA", help="CIFAR-10 location: calibration images for --compensate")
    p.add_argument("--calib-images", type=int, default=64, metavar="N", help="calibration images (default 64)")
    p.add_argument("--out", required=True, type=Path, help="the weight file to write")
    p.add_argument(
        "--set", action="append", default=[], metavar="KEY=VALUE",
        help="change a config field (JSON value or plain string), e.g. --set attention=int8 --set attention_bits=4",
    )  # fmt: skip
    p.add_argument("--data", help="CIFAR-10 location: record the engine's test accuracy in the file")
    args = p.parse_args(argv)
    if args.calib_images < 1:
        p.error(f"--calib-images must be at least 1, got {args.calib_images}")
    try:
        changes = parse_set(args.set)
        check_input(args.source)
        check_output(args.out, [args.source])
        if is_weight_file(Path(args.source)):
            ckpt = change_numerics(load_weights(args.source), changes, Path(args.source).name)
        else:
            ckpt = from_float(args, changes)
        if args.data:
            test = load_cifar10(args.data, "test", progress=True)
            logits, _ = run_engine(make_model(ckpt), test.images, ckpt.config, 500, "engine")
            ckpt.source.update(engine_test_acc=float((logits.argmax(1) == test.labels).mean()), test_images=len(test))
        save_weights(args.out, ckpt)
    except TinyViTError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    cfg = ckpt.config
    print(f"wrote {args.out} ({args.out.stat().st_size:,} bytes): {cfg.name}, attention {cfg.attention}")
    if "engine_test_acc" in ckpt.source:
        print(f"engine test accuracy: {ckpt.source['engine_test_acc']:.4f} on {ckpt.source['test_images']} images")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
