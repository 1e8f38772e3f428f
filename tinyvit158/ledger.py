"""The arithmetic ledger: what a forward pass costs, counted layer by layer.

For one image through a ternary ViT, and for the float32 ViT it replaces, it counts:

- ``f32_macs``: multiply-accumulates of the float32 model (one multiply and one add each);
- ``tern_addsub``: additions and subtractions of the ternary model's integer matmuls, one
  per non-zero weight per token (a zero weight is skipped; +1 adds, -1 subtracts), counted
  from the actual weights; with a recorded run, also ``tern_addsub_nonzero_x``, which
  skips zero activation codes too;
- ``tern_mults``: the multiplications that remain: quantizers (x / s, one per input),
  dequantization (acc * s_x * gamma: two per output), attention, norms, GELU, softmax, and
  any float layers (the head);
- ``int8_macs``, ``u8_macs``: with ``attention="int8"`` the attention's products are
  integer: q k^T as int8 x int8 and P v as unsigned x int8 multiply-accumulates into int32
  (what was float there is left: the softmax, the quantizers' divisions, the scales);
- weight bytes read: float32, ``ternary2`` (2 bits/weight) and ``ternary3`` (1.6 bits);
- energy of the arithmetic at 45 nm, from Horowitz, "Computing's energy problem (and what
  we can do about it)", ISSCC 2014, Figure 1.1.9, the figures BitNet b1.58 also cites:
  32-bit float add 0.9 pJ, multiply 3.7 pJ; 32-bit integer add 0.1 pJ; 8-bit integer
  multiply 0.2 pJ (an int8 multiply-accumulate into int32: 0.3 pJ).
  An int8 value added into an int32 accumulator is charged as a 32-bit integer add. Memory
  traffic is reported in bytes, not priced: its energy depends on where the weights live
  (Horowitz: 10 pJ per 64-bit read from an 8 KB SRAM, 1.3-2.6 nJ from DRAM).

With ``numerics="integer"`` nothing between the input codes and the logits is float: the
multiplications left are integer ones (``int_mults``, charged as 32-bit integer multiplies,
3.1 pJ), with integer divisions (``int_divs``) and square roots (``int_sqrts``, one a
LayerNorm row) counted but not priced (Horowitz gives no figure); a float head becomes
int8 x int8 multiply-accumulates. Shifts, comparisons and additions are not counted.

``python -m tinyvit158.predict IMAGE --explain`` prints the ledger of that run.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from tinyvit158.packing import packed_cols
from tinyvit158.weights import Checkpoint

# Horowitz, ISSCC 2014 (45 nm, 0.9 V), picojoules per operation
PJ_F32_ADD = 0.9
PJ_F32_MULT = 3.7
PJ_I32_ADD = 0.1
PJ_I8_MULT = 0.2
PJ_I32_MULT = 3.1
PJ_I8_MAC = PJ_I8_MULT + PJ_I32_ADD  # an 8-bit product added into an int32 accumulator
PJ_F32_MAC = PJ_F32_ADD + PJ_F32_MULT
# the same table's 8-bit integer add and 16-bit float add and multiply: BitNet b1.58's
# convention prices a ternary product as INT8 additions against an FP16 model's MACs
PJ_I8_ADD = 0.03
PJ_F16_ADD = 0.4
PJ_F16_MULT = 1.1

# float multiplications charged per element for the elementwise steps (see count())
LAYERNORM_MULTS = 3  # (x - mean) * rstd, * gamma, and the square in the variance
GELU_MULTS = 3  # 0.5 * x * (1 + erf(x / sqrt 2)): x / sqrt 2, * x, * 0.5 (erf counted apart)
SOFTMAX_MULTS = 2  # the scale of the scores and the division by the row sum
# integer numerics (integer.py's rules), per element unless said
INT_CODE = (1, 1)  # (multiplications, divisions) of a code: 2 qmax |v| + m, // 2m
INT_REQUANT = (2, 1)  # acc * R * g, then // (127 * 2**e)
INT_LN = 3  # multiplications: d**2, G d, B s (+ per row: 3 divisions, one square root)
INT_GELU = 4  # |h| / sqrt 2, A t t (two), h (1 + erf)
INT_SCORE = (7, 3)  # R_q R_k, acc R_qk, / qmax**2, * 1/sqrt(hd); i-exp: / ln 2, z ln 2, A (p + B)**2; L e, / sum


@dataclass
class Row:
    """One step of the forward pass, per image."""

    layer: str
    kind: str  # "ternary linear", "float linear", "attention", "layernorm", "gelu"
    f32_macs: int = 0
    f32_other_mults: int = 0  # multiplications outside MACs, same in both models
    tern_addsub: int = 0
    tern_addsub_nonzero_x: int | None = None
    tern_mults: int = 0
    tern_float_adds: int = 0  # float additions left in the ternary model (attention, float layers)
    transcendentals: int = 0  # exp and erf evaluations, same in both models
    int8_macs: int = 0  # int8 x int8 multiply-accumulates (int8 attention: q k^T)
    u8_macs: int = 0  # unsigned x int8 multiply-accumulates (int8 attention: P v)
    int_mults: int = 0  # integer numerics: integer multiplications
    int_divs: int = 0
    int_sqrts: int = 0
    bytes_f32: int = 0
    bytes_ternary2: int = 0
    bytes_ternary3: int = 0
    zero_fraction: float | None = None  # of the weights

    @property
    def energy_f32_pj(self) -> float:
        return self.f32_macs * PJ_F32_MAC + self.f32_other_mults * PJ_F32_MULT

    @property
    def energy_ternary_pj(self) -> float:
        ints = self.tern_addsub * PJ_I32_ADD + (self.int8_macs + self.u8_macs) * PJ_I8_MAC
        ints += self.int_mults * PJ_I32_MULT
        return ints + self.tern_mults * PJ_F32_MULT + self.tern_float_adds * PJ_F32_ADD


def count(ckpt: Checkpoint, record: dict[str, np.ndarray] | None = None) -> list[Row]:
    """The ledger of one image. ``record``: the engine's int8 input codes per layer (optional)."""
    cfg = ckpt.config
    T, D, H, hd = cfg.num_tokens, cfg.dim, cfg.heads, cfg.head_dim
    integer = cfg.numerics == "integer"
    rows: list[Row] = []

    def linear(layer: str, tokens: int) -> Row:
        n, k = cfg.linear_shapes()[layer]
        row = Row(layer, "ternary linear" if cfg.is_ternary(layer) else "float linear", f32_macs=tokens * k * n)
        row.bytes_f32 = 4 * n * k
        if cfg.is_ternary(layer):
            codes = ckpt.ternary(layer)[0]
            nonzero = codes != 0
            row.zero_fraction = float(1 - nonzero.mean())
            row.tern_addsub = int(tokens * nonzero.sum())
            row.tern_mults = tokens * k + 2 * tokens * n  # quantize inputs, dequantize outputs
            row.bytes_ternary2 = n * packed_cols(k, "ternary2") + 4 * n  # + float32 scales
            row.bytes_ternary3 = n * packed_cols(k, "ternary3") + 4 * n
            if record is not None and layer in record:
                x_q = record[layer][:tokens]  # this image's tokens
                per_input = nonzero.sum(axis=0)  # non-zero weights reading each input feature
                row.tern_addsub_nonzero_x = int(((x_q != 0) * per_input).sum())
        elif integer:  # a float layer becomes int8 codes, one scale per output channel
            row.kind, row.int8_macs = "int8 linear", tokens * k * n
            row.bytes_ternary2 = row.bytes_ternary3 = n * k + 4 * n
        else:  # a float layer stays float: its MACs are float multiplies and adds
            row.tern_mults = row.tern_float_adds = tokens * k * n
            row.bytes_ternary2 = row.bytes_ternary3 = row.bytes_f32
        if integer:  # the input's codes, then the requantization of every output to Q16
            row.tern_mults = 0
            row.int_mults = tokens * k * INT_CODE[0] + tokens * n * INT_REQUANT[0]
            row.int_divs = tokens * k * INT_CODE[1] + tokens * n * INT_REQUANT[1]
        return row

    def elementwise(layer: str, kind: str, n: int, mults: int, transcendental: int = 0) -> Row:
        row = Row(layer, kind, f32_other_mults=n * mults, tern_mults=n * mults, transcendentals=transcendental)
        if integer:
            row.tern_mults = 0
            row.int_mults = n * (INT_LN if kind == "layernorm" else INT_GELU)
            if kind == "layernorm":  # per row: the mean, the variance, R; the square root
                row.int_divs, row.int_sqrts = 3 * (n // D), n // D
        return row

    rows.append(linear("patch_embed.proj", cfg.num_patches))
    for i in range(cfg.depth):
        b = f"blocks.{i}"
        rows.append(elementwise(f"{b}.norm1", "layernorm", T * D, LAYERNORM_MULTS))
        rows.append(linear(f"{b}.attn.qkv", T))
        macs = 2 * H * T * T * hd  # q k^T and probabilities x v, float32 in both models
        soft = H * T * T
        att = Row(f"{b}.attn", "attention", f32_macs=macs, f32_other_mults=soft * SOFTMAX_MULTS, transcendentals=soft)
        if cfg.attention == "int8":  # integer products; left in float: quantizers, scales, softmax
            att.kind = "int8 attention"
            att.int8_macs = att.u8_macs = macs // 2
            # q, k, v: x / s; scores: acc * s_k, * s_q / sqrt(hd); probabilities: * 1 / sum, * L;
            # outputs: acc * s_v, / L
            att.tern_mults = 3 * T * D + 4 * soft + 2 * T * D
            att.tern_float_adds = soft  # the row sums (the max is a comparison)
        else:
            att.tern_mults = macs + soft * SOFTMAX_MULTS
            att.tern_float_adds = macs
        if integer:  # codes of q, k, v; every score; every output (acc R_v, / (L qmax 2**j))
            att.kind, att.tern_mults, att.tern_float_adds = "integer attention", 0, 0
            att.int_mults = 3 * T * D * INT_CODE[0] + soft * INT_SCORE[0] + T * D
            att.int_divs = 3 * T * D * INT_CODE[1] + soft * INT_SCORE[1] + T * D
        rows.append(att)
        rows.append(linear(f"{b}.attn.proj", T))
        rows.append(elementwise(f"{b}.norm2", "layernorm", T * D, LAYERNORM_MULTS))
        rows.append(linear(f"{b}.mlp.fc1", T))
        rows.append(elementwise(f"{b}.mlp.act", "gelu", T * cfg.hidden_dim, GELU_MULTS, T * cfg.hidden_dim))
        rows.append(linear(f"{b}.mlp.fc2", T))
    rows.append(elementwise("norm", "layernorm", D, LAYERNORM_MULTS))  # the cls token only
    rows.append(linear("head", 1))
    return rows


def totals(rows: list[Row]) -> dict[str, float]:
    t = {
        "f32_macs": sum(r.f32_macs for r in rows),
        "f32_mults": sum(r.f32_macs + r.f32_other_mults for r in rows),
        "f32_adds": sum(r.f32_macs for r in rows),
        "tern_addsub_int": sum(r.tern_addsub for r in rows),
        "tern_float_adds": sum(r.tern_float_adds for r in rows),
        "tern_mults": sum(r.tern_mults for r in rows),
        "transcendentals": sum(r.transcendentals for r in rows),
        "int8_macs": sum(r.int8_macs for r in rows),
        "u8_macs": sum(r.u8_macs for r in rows),
        "int_mults": sum(r.int_mults for r in rows),
        "int_divs": sum(r.int_divs for r in rows),
        "int_sqrts": sum(r.int_sqrts for r in rows),
        "bytes_f32": sum(r.bytes_f32 for r in rows),
        "bytes_ternary2": sum(r.bytes_ternary2 for r in rows),
        "bytes_ternary3": sum(r.bytes_ternary3 for r in rows),
    }
    t["energy_f32_uj"] = sum(r.energy_f32_pj for r in rows) / 1e6
    t["energy_ternary_uj"] = sum(r.energy_ternary_pj for r in rows) / 1e6
    with_x = [r.tern_addsub_nonzero_x for r in rows if r.tern_addsub_nonzero_x is not None]
    if with_x:
        t["tern_addsub_nonzero_x"] = sum(with_x)
    return t


def _n(v: float) -> str:
    for unit, div in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= div:
            return f"{v / div:.2f}{unit}"
    return f"{v:.0f}"


COLUMNS = ("layer", "f32 MACs", "ternary +/-", "int8 MACs", "tern. mults", "zeros", "f32 bytes", "t2 bytes",
           "t3 bytes", "f32 uJ", "tern uJ")  # fmt: skip
_WIDTHS = (-22, 9, 11, 9, 11, 6, 10, 9, 9, 7, 7)  # negative: left-aligned


def _table(rows: list[Row], per_block: bool) -> list[list[str]]:
    """The ledger's cells, a row a layer (blocks summed unless ``per_block`` is False), then the total."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        parts = r.layer.split(".")
        key = r.layer if not per_block or parts[0] != "blocks" else "blocks.*." + ".".join(parts[2:])
        groups.setdefault(key, []).append(r)
    cells = []
    for key, rs in groups.items():
        z = [r.zero_fraction for r in rs if r.zero_fraction is not None]
        cells.append([
            key, _n(sum(r.f32_macs for r in rs)), _n(sum(r.tern_addsub for r in rs)),
            _n(sum(r.int8_macs + r.u8_macs for r in rs)), _n(sum(r.tern_mults + r.int_mults for r in rs)),
            f"{np.mean(z):.0%}" if z else "-", _n(sum(r.bytes_f32 for r in rs)), _n(sum(r.bytes_ternary2 for r in rs)),
            _n(sum(r.bytes_ternary3 for r in rs)), f"{sum(r.energy_f32_pj for r in rs) / 1e6:.2f}",
            f"{sum(r.energy_ternary_pj for r in rs) / 1e6:.2f}",
        ])  # fmt: skip
    t = totals(rows)
    cells.append([
        "total", _n(t["f32_macs"]), _n(t["tern_addsub_int"]), _n(t["int8_macs"] + t["u8_macs"]),
        _n(t["tern_mults"] + t["int_mults"]), "", _n(t["bytes_f32"]), _n(t["bytes_ternary2"]), _n(t["bytes_ternary3"]),
        f"{t['energy_f32_uj']:.2f}", f"{t['energy_ternary_uj']:.2f}",
    ])  # fmt: skip
    return cells


def _notes(t: dict) -> list[str]:
    """The sentences under the table."""
    mults = t["tern_mults"] + t["int_mults"]  # float ones, or in integer numerics integer ones
    notes = [
        f"per image: the float32 model does {_n(t['f32_mults'])} multiplications; the ternary model "
        f"{_n(mults)} ({mults / t['f32_mults']:.1%}) and {_n(t['tern_addsub_int'])} integer "
        f"additions/subtractions; arithmetic energy {t['energy_f32_uj']:.2f} uJ -> {t['energy_ternary_uj']:.2f} uJ "
        f"({t['energy_f32_uj'] / t['energy_ternary_uj']:.1f}x less; Horowitz 2014, 45 nm)"
    ]
    if t["int8_macs"] or t["u8_macs"]:
        notes.append(
            f"int8 attention: {_n(t['int8_macs'])} int8 x int8 (q k^T) and {_n(t['u8_macs'])} unsigned x int8 (P v) "
            f"multiply-accumulates into int32 replace float ones ({PJ_I8_MAC:.1f} pJ each vs {PJ_F32_MAC:.1f})"
        )
    if t["int_mults"]:
        notes.append(
            f"integer numerics: no float operation from the input codes to the logits; {_n(t['int_mults'])} integer "
            f"multiplications ({PJ_I32_MULT:.1f} pJ each), {_n(t['int_divs'])} integer divisions and "
            f"{_n(t['int_sqrts'])} integer square roots (not priced)"
        )
    if "tern_addsub_nonzero_x" in t:
        notes.append(f"skipping zero activation codes too: {_n(t['tern_addsub_nonzero_x'])} additions/subtractions")
    return notes


def format_ledger(rows: list[Row], per_block: bool = True, markdown: bool = False) -> str:
    """A readable table: blocks summed unless ``per_block`` is False (then every layer); with
    ``markdown``, a Markdown table and its notes as a list (notebooks render it as HTML)."""
    cells, notes = _table(rows, per_block), _notes(totals(rows))
    if markdown:
        lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if w < 0 else "--:" for w in _WIDTHS) + "|"]
        lines += ["| " + " | ".join(row) + " |" for row in cells]
        return "\n".join(lines + [""] + [f"- {note}" for note in notes])

    def line(row) -> str:
        return " ".join(f"{c:<{-w}}" if w < 0 else f"{c:>{w}}" for c, w in zip(row, _WIDTHS, strict=True))

    return "\n".join([line(COLUMNS)] + [line(row) for row in cells] + notes)
