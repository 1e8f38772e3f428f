"""The ledger on a hand-built model whose counts are worked out by hand below."""

import numpy as np
import pytest

from tinyvit158.config import ViTConfig
from tinyvit158.ledger import PJ_F32_ADD, PJ_F32_MULT, PJ_I32_ADD, count, format_ledger, totals
from tinyvit158.packing import pack
from tinyvit158.weights import random_checkpoint

# 8x8 images, 4x4 patches: 4 patches, T = 5 tokens; dim 4, 1 head (hd 4), hidden 8, depth 1
CFG = ViTConfig(
    name="hand", image_size=8, patch_size=4, dim=4, depth=1, heads=1, mlp_ratio=2.0, num_classes=2,
    class_names=("a", "b"),
)  # fmt: skip


@pytest.fixture(scope="module")
def model():
    ck = random_checkpoint(CFG)
    # chosen weights: patch embedding (4 x 48) with row 0 all zero and the rest +1 (144 non-zeros);
    # qkv (12 x 4) all -1 (48); proj (4 x 4) the identity (4); fc1 (8 x 4) and fc2 (4 x 8) half zero (16 each)
    codes = {
        "patch_embed.proj": np.vstack([np.zeros((1, 48)), np.ones((3, 48))]),
        "blocks.0.attn.qkv": -np.ones((12, 4)),
        "blocks.0.attn.proj": np.eye(4),
        "blocks.0.mlp.fc1": np.tile([1, 0, -1, 0], (8, 1)),
        "blocks.0.mlp.fc2": np.tile([0, 1, 0, -1], (4, 2)),
    }
    for layer, c in codes.items():
        ck.tensors[f"{layer}.weight_packed"] = pack(c.astype(np.int8), CFG.packing)
    return ck


def test_counts_by_hand(model):
    rows = {r.layer: r for r in count(model)}
    pe, qkv, att, proj = (
        rows["patch_embed.proj"],
        rows["blocks.0.attn.qkv"],
        rows["blocks.0.attn"],
        rows["blocks.0.attn.proj"],
    )
    fc1, fc2, head = rows["blocks.0.mlp.fc1"], rows["blocks.0.mlp.fc2"], rows["head"]
    # float32 MACs: tokens x in x out
    assert (pe.f32_macs, qkv.f32_macs, proj.f32_macs) == (4 * 48 * 4, 5 * 4 * 12, 5 * 4 * 4)
    assert (fc1.f32_macs, fc2.f32_macs, head.f32_macs) == (5 * 4 * 8, 5 * 8 * 4, 1 * 4 * 2)
    # ternary additions/subtractions: tokens x non-zero weights
    assert (pe.tern_addsub, qkv.tern_addsub, proj.tern_addsub) == (4 * 144, 5 * 48, 5 * 4)
    assert (fc1.tern_addsub, fc2.tern_addsub, head.tern_addsub) == (5 * 16, 5 * 16, 0)
    assert pe.zero_fraction == 0.25 and proj.zero_fraction == 0.75 and fc1.zero_fraction == 0.5
    # remaining multiplications: one per input (quantize), two per output (dequantize)
    assert pe.tern_mults == 4 * 48 + 2 * 4 * 4
    assert qkv.tern_mults == 5 * 4 + 2 * 5 * 12
    # attention: q k^T and p v, each T x T x hd MACs; softmax T x T exps, 2 multiplies each
    assert att.f32_macs == 2 * 5 * 5 * 4 and att.transcendentals == 25
    assert att.tern_mults == 2 * 5 * 5 * 4 + 2 * 25
    # bytes: float32 4 per weight; ternary2 ceil(K/4) per row + a float32 scale per row
    assert pe.bytes_f32 == 4 * 4 * 48 and pe.bytes_ternary2 == 4 * 12 + 16 and pe.bytes_ternary3 == 4 * 10 + 16
    assert head.bytes_ternary2 == head.bytes_f32 == 4 * 2 * 4  # the float head stays float
    # energy: 4.6 pJ a float MAC; 0.1 pJ an integer add plus 3.7 pJ per remaining multiply
    assert qkv.energy_f32_pj == pytest.approx(240 * (PJ_F32_ADD + PJ_F32_MULT))
    assert qkv.energy_ternary_pj == pytest.approx(240 * PJ_I32_ADD + 140 * PJ_F32_MULT)


def test_totals_and_table(model):
    rows = count(model)
    t = totals(rows)
    assert t["f32_macs"] == 768 + 240 + 200 + 80 + 160 + 160 + 8
    assert t["tern_addsub_int"] == 576 + 240 + 20 + 80 + 80
    assert t["energy_ternary_uj"] < t["energy_f32_uj"]
    text = format_ledger(rows)
    assert "total" in text and "Horowitz" in text


def test_recorded_run_skips_zero_activations(model):
    from tinyvit158.engine import Engine

    engine = Engine(model)
    engine.record = {}
    engine(np.zeros((1, 3, 8, 8), np.float32))  # all-zero patches: the patch embedding sees only zeros
    rows = {r.layer: r for r in count(model, engine.record)}
    assert rows["patch_embed.proj"].tern_addsub_nonzero_x == 0
    assert rows["blocks.0.attn.qkv"].tern_addsub_nonzero_x <= rows["blocks.0.attn.qkv"].tern_addsub


def test_int8_attention_counts_its_integer_products(model):
    """With attention="int8" (T = 5, hd 4, D 4, 1 head): q k^T and P v become 100 int8 x
    int8 and 100 unsigned x int8 MACs; left in float: the q, k, v divisions (3 T D), 4 per
    score (two scales, the normalization and * L) and 2 per output (s_v, / L)."""
    from tinyvit158.ledger import PJ_I8_MAC
    from tinyvit158.weights import Checkpoint

    q = Checkpoint(CFG.replace(attention="int8"), model.tensors)
    att = {r.layer: r for r in count(q)}["blocks.0.attn"]
    assert (att.int8_macs, att.u8_macs, att.f32_macs) == (5 * 5 * 4, 5 * 5 * 4, 2 * 5 * 5 * 4)
    assert att.tern_mults == 3 * 5 * 4 + 4 * 25 + 2 * 5 * 4 and att.tern_float_adds == 25
    assert att.energy_ternary_pj == pytest.approx(200 * PJ_I8_MAC + att.tern_mults * PJ_F32_MULT + 25 * PJ_F32_ADD)
    t = totals(count(q))
    assert (t["int8_macs"], t["u8_macs"]) == (100, 100)
    assert "int8 attention: 100 int8 x int8 (q k^T) and 100 unsigned x int8 (P v)" in format_ledger(count(q))
    assert totals(count(model))["int8_macs"] == 0


def test_integer_numerics_leave_no_float_operation(model):
    """numerics="integer" (T = 5, D 4, hidden 8, 1 head): each linear layer's input codes (one
    multiplication and one division an input) and requantization (two and one an output),
    the LayerNorms (3 an element; 3 divisions and a square root a row), i-GELU (4 an element),
    the attention (codes of q, k, v; 7 and 3 a score; 1 and 1 an output); the float head
    becomes int8 x int8. Not one float multiplication or addition is left."""
    from tinyvit158.ledger import PJ_I32_MULT
    from tinyvit158.weights import Checkpoint

    q = Checkpoint(CFG.replace(attention="int8", numerics="integer"), model.tensors)
    rows = {r.layer: r for r in count(q)}
    qkv, att, norm1, act, head = (rows[k] for k in ("blocks.0.attn.qkv", "blocks.0.attn", "blocks.0.norm1",
                                                    "blocks.0.mlp.act", "head"))  # fmt: skip
    assert (qkv.int_mults, qkv.int_divs) == (5 * 4 + 2 * 5 * 12, 5 * 4 + 5 * 12)
    assert (att.int_mults, att.int_divs) == (3 * 5 * 4 + 7 * 25 + 5 * 4, 3 * 5 * 4 + 3 * 25 + 5 * 4)
    assert (norm1.int_mults, norm1.int_divs, norm1.int_sqrts) == (3 * 20, 3 * 5, 5)
    assert act.int_mults == 4 * 40 and (head.kind, head.int8_macs) == ("int8 linear", 4 * 2)
    assert qkv.energy_ternary_pj == pytest.approx(240 * PJ_I32_ADD + 140 * PJ_I32_MULT)
    t = totals(count(q))
    assert t["tern_mults"] == 0 and t["tern_float_adds"] == 0
    assert "no float operation from the input codes to the logits" in format_ledger(count(q))
