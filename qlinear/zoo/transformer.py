"""BERT- and ViT-style transformers, as HF/torch export them, with BERT-init scales.

Linear and embedding weights are N(0, 0.02) (BERT's initializer_range), biases
small but non-zero and LayerNorm gamma ~ 1, so every quantized op sees non-trivial
parameters. The graphs keep the export patterns quantizers must cope with: the
HF extended attention mask ((1 - mask) * float32 lowest), Erf-form GELU, and
LayerNormalization decomposed into ReduceMean/Pow/Sqrt below opset 17.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._builder import INT64, GraphBuilder, batch_dim, pick_config

_BERT = {
    "small": {"hidden": 64, "heads": 2, "ffn": 256, "layers": 2, "seq_len": 16,
              "vocab_size": 512, "max_positions": 64, "num_labels": 2},
    "realistic": {"hidden": 768, "heads": 12, "ffn": 3072, "layers": 2, "seq_len": 128,
                  "vocab_size": 30522, "max_positions": 512, "num_labels": 2},
}  # fmt: skip

_VIT = {
    "small": {"image_size": 64, "patch": 16, "dim": 64, "heads": 2, "mlp": 256, "depth": 2,
              "num_classes": 10},
    "realistic": {"image_size": 224, "patch": 16, "dim": 384, "heads": 6, "mlp": 1536,
                  "depth": 4, "num_classes": 1000},
}  # fmt: skip

_STD = 0.02  # BERT / ViT initializer_range


def _init_std(width: int, reference: int) -> float:
    """0.02 at the reference width, scaled by 1/sqrt(width) elsewhere, so narrow
    "small" models see the same activation magnitudes as their full-size twin."""
    return _STD * (reference / width) ** 0.5


def _mlp(b: GraphBuilder, x: str, inner: int, dim: int) -> str:
    h = b.gelu(b.linear(x, inner, name="intermediate.dense"))
    return b.linear(h, dim, name="output.dense")


def bert(
    size: str = "small",
    *,
    seed: int = 0,
    opset: int = 17,
    batch: int | None = None,
    num_layers: int | None = None,
    seq_len: int | None = None,
    num_labels: int | None = None,
) -> onnx.ModelProto:
    """BERT encoder with pooler and classifier; ``"realistic"`` has BERT-base widths.

    Inputs ``input_ids`` and ``attention_mask`` (int64 [N, S]); outputs
    ``last_hidden_state`` [N, S, hidden] and ``logits`` [N, num_labels]. Realistic:
    hidden 768, 12 heads, FFN 3072, vocab 30522, 2 layers by default (pass
    ``num_layers=12`` for full BERT-base), data seq_len 128. Small: hidden 64,
    2 heads, FFN 256, 2 layers, vocab 512, seq_len 16.

    With ``batch=None`` both N and S are symbolic (``seq_len`` is then only the
    length example inputs use); an int ``batch`` fixes both dimensions.
    """
    cfg = pick_config(_BERT, size, "bert")
    layers = cfg["layers"] if num_layers is None else num_layers
    seq_len = seq_len or cfg["seq_len"]
    num_labels = num_labels or cfg["num_labels"]
    hidden, max_pos = cfg["hidden"], cfg["max_positions"]
    if not 3 <= seq_len <= max_pos:
        raise ValueError(f"seq_len must be in 3..{max_pos}, got {seq_len}")
    b = GraphBuilder("bert" if size == "realistic" else "bert_small", seed=seed, opset=opset)
    b.linear_std = _init_std(hidden, 768)
    n = batch_dim(batch)
    s = "S" if batch is None else seq_len
    ids = b.input("input_ids", (n, s), INT64)
    mask = b.input("attention_mask", (n, s), INT64)

    with b.scope("embeddings"):
        word_table = b.normal((cfg["vocab_size"], hidden), _STD)
        word_table[0] = 0.0  # padding_idx row, as BERT initialises it
        words = b.op("Gather", b.param("word_embeddings.weight", word_table), ids,
                     shape=(n, s, hidden))  # fmt: skip
        # Position / token-type ids are buffers sliced to the sequence length, as HF exports.
        seq = b.op("Gather", b.op("Shape", ids, shape=(2,)), b.const(1, np.int64), shape=())
        seq = b.op("Unsqueeze", seq, b.const([0], np.int64), shape=(1,))
        zero, one = b.const([0], np.int64), b.const([1], np.int64)

        def embed(table: str, buffer: np.ndarray) -> str:
            idx = b.op("Slice", b.const(buffer, np.int64), zero, seq, one, shape=(1, s))
            return b.op("Gather", table, idx, shape=(1, s, hidden))

        positions = embed(b.param("position_embeddings.weight", b.normal((max_pos, hidden), _STD)),
                          np.arange(max_pos)[None, :])  # fmt: skip
        types = embed(b.param("token_type_embeddings.weight", b.normal((2, hidden), _STD)),
                      np.zeros((1, max_pos)))  # fmt: skip
        x = b.op("Add", words, types, shape=(n, s, hidden))
        x = b.op("Add", x, positions, shape=(n, s, hidden))
        x = b.layernorm(x, eps=1e-12)

    # HF extended attention mask: (1 - mask[:, None, None, :]) * float32.lowest.
    m = b.op("Unsqueeze", mask, b.const([1, 2], np.int64), shape=(n, 1, 1, s))
    m = b.op("Cast", m, shape=(n, 1, 1, s), to=onnx.TensorProto.FLOAT)
    m = b.op("Sub", b.const(1.0), m, shape=(n, 1, 1, s))
    m = b.op("Mul", m, b.const(np.finfo(np.float32).min), shape=(n, 1, 1, s))

    for i in range(layers):
        with b.scope(f"encoder.layer.{i}"):
            attn = b.attention(x, cfg["heads"], mask=m)
            x = b.layernorm(b.add(attn, x), eps=1e-12, name="attention.output.LayerNorm")
            x = b.layernorm(b.add(_mlp(b, x, cfg["ffn"], hidden), x), eps=1e-12,
                            name="output.LayerNorm")  # fmt: skip
    b.output(x, "last_hidden_state")

    cls = b.op("Gather", x, b.const(0, np.int64), shape=(n, hidden), axis=1)
    pooled = b.gemm(cls, hidden, std=b.linear_std, name="pooler.dense")
    pooled = b.op("Tanh", pooled, shape=(n, hidden))
    b.output(b.gemm(pooled, num_labels, std=b.linear_std, name="classifier"), "logits")
    return b.build(
        doc=f"BERT-style encoder ({size}, {layers} layers), seeded random weights (seed={seed}).",
        metadata={"model": "bert", "size": size, "seed": seed, "seq_len": seq_len,
                  "vocab_size": cfg["vocab_size"], "num_layers": layers},
    )  # fmt: skip


def vit(
    size: str = "small",
    *,
    seed: int = 0,
    opset: int = 17,
    batch: int | None = None,
    depth: int | None = None,
    num_classes: int | None = None,
) -> onnx.ModelProto:
    """Vision Transformer; ``"realistic"`` is ViT-S/16 at 224 (dim 384, 6 heads, 197 tokens).

    Patch-embedding Conv (kernel = stride = 16), Reshape/Transpose to tokens, class
    token (Expand + Concat), position-embedding Add, pre-LN encoder blocks, final
    LayerNorm, Gather of the class token, Gemm head. Input ``pixel_values``, output
    ``logits``. Realistic depth defaults to 4 for benchmarks (``depth=12`` is the
    full 22M-parameter ViT-S/16); small: 64x64 input, dim 64, 2 heads, depth 2.
    """
    cfg = pick_config(_VIT, size, "vit")
    depth = cfg["depth"] if depth is None else depth
    num_classes = num_classes or cfg["num_classes"]
    dim, patch, image = cfg["dim"], cfg["patch"], cfg["image_size"]
    tokens = (image // patch) ** 2 + 1
    b = GraphBuilder("vit_s16" if size == "realistic" else "vit_small", seed=seed, opset=opset)
    b.linear_std = _init_std(dim, 384)
    n = batch_dim(batch)
    pixels = b.input("pixel_values", (n, 3, image, image))

    with b.scope("embeddings"):
        x = b.conv(pixels, dim, patch, patch, pad=0, bias=True, std=_STD,
                   name="patch_embeddings.projection")  # fmt: skip
        x = b.op("Reshape", x, b.const([0, dim, -1], np.int64), shape=(n, dim, tokens - 1))
        x = b.op("Transpose", x, shape=(n, tokens - 1, dim), perm=[0, 2, 1])
        # cls_token.expand(batch, -1, -1): Expand to [N, 1, 1] broadcasts over the batch.
        batch_size = b.op("Gather", b.op("Shape", pixels, shape=(4,)), b.const(0, np.int64),
                          shape=())  # fmt: skip
        batch_size = b.op("Unsqueeze", batch_size, b.const([0], np.int64), shape=(1,))
        expand_to = b.op("Concat", batch_size, b.const([1, 1], np.int64), shape=(3,), axis=0)
        cls = b.op("Expand", b.param("cls_token", b.normal((1, 1, dim), _STD)), expand_to,
                   shape=(n, 1, dim))  # fmt: skip
        x = b.op("Concat", cls, x, shape=(n, tokens, dim), axis=1)
        x = b.op("Add", x, b.param("position_embeddings", b.normal((1, tokens, dim), _STD)),
                 shape=(n, tokens, dim))  # fmt: skip

    for i in range(depth):
        with b.scope(f"encoder.layer.{i}"):
            h = b.attention(b.layernorm(x, eps=1e-6, name="layernorm_before"), cfg["heads"])
            x = b.add(h, x)
            h = _mlp(b, b.layernorm(x, eps=1e-6, name="layernorm_after"), cfg["mlp"], dim)
            x = b.add(h, x)
    x = b.layernorm(x, eps=1e-6, name="layernorm")
    cls_out = b.op("Gather", x, b.const(0, np.int64), shape=(n, dim), axis=1)
    b.output(b.gemm(cls_out, num_classes, std=b.linear_std, name="classifier"), "logits")
    return b.build(
        doc=f"ViT-style transformer ({size}, depth {depth}), seeded random weights (seed={seed}).",
        metadata={"model": "vit", "size": size, "seed": seed, "image_size": image, "depth": depth},
    )
