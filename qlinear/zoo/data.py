"""Seeded, realistic inputs and calibration batches for zoo models.

Calibration quality depends on input statistics, so the generators imitate real
data rather than white noise: images are smooth colour fields with edges and a
little noise, normalised with the ImageNet mean/std (values roughly in [-2, 2.6]);
token batches start with [CLS], end with [SEP], draw words from a Zipf-like
distribution and are padded to the sequence length with a matching attention mask.

The model's ``qlinear.zoo.*`` metadata says which generator and sizes to use; a
model that lost its metadata (e.g. after a rewrite) falls back to its input shapes.
"""

from __future__ import annotations

import numpy as np
import onnx

from ._builder import META_PREFIX

IMAGENET_MEAN = np.array([0.485, 0.456, 0.406], np.float32)
IMAGENET_STD = np.array([0.229, 0.224, 0.225], np.float32)

_IMAGE_MODELS = ("resnet", "mobilenet_v2", "vit")
_TEXT_MODELS = ("bert",)


def _upsample_matrix(n_out: int, n_in: int) -> np.ndarray:
    """Row i holds the bilinear weights (align_corners) of output pixel i over the inputs."""
    pos = np.linspace(0.0, n_in - 1, n_out)
    lo = np.minimum(np.floor(pos).astype(int), n_in - 2)
    frac = pos - lo
    m = np.zeros((n_out, n_in))
    m[np.arange(n_out), lo] = 1.0 - frac
    m[np.arange(n_out), lo + 1] = frac
    return m


def images(batch: int, size: int, rng: np.random.Generator) -> np.ndarray:
    """[batch, 3, size, size] float32 normalised images: smooth fields, edges, noise."""
    grid = max(2, size // 16)
    up = _upsample_matrix(size, grid)
    low = rng.uniform(0.0, 1.0, (batch, 3, grid, grid))
    img = np.einsum("ij,bcjk,lk->bcil", up, low, up)
    # A few flat rectangles give sharp edges, as objects do.
    for k in range(batch):
        for _ in range(rng.integers(1, 4)):
            y0, x0 = rng.integers(0, size - 1, 2)
            h, w = rng.integers(size // 8 + 1, size // 2 + 2, 2)
            colour = rng.uniform(0.0, 1.0, (3, 1, 1))
            img[k, :, y0 : y0 + h, x0 : x0 + w] = colour
    img += rng.normal(0.0, 0.03, img.shape)
    img = np.clip(img, 0.0, 1.0).astype(np.float32)
    return (img - IMAGENET_MEAN[:, None, None]) / IMAGENET_STD[:, None, None]


def tokens(
    batch: int, seq_len: int, vocab_size: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    """``input_ids`` and ``attention_mask`` (int64 [batch, seq_len]) with padding.

    BERT-sized vocabularies use BERT's ids (pad 0, [CLS] 101, [SEP] 102, words from
    999); small vocabularies use pad 0, [CLS] 1, [SEP] 2, words from 3. At least one
    row of every batch is padded.
    """
    if seq_len < 3:
        raise ValueError(f"seq_len must be >= 3, got {seq_len}")
    cls_id, sep_id, first_word = (101, 102, 999) if vocab_size > 1000 else (1, 2, 3)
    ranks = np.arange(1, vocab_size - first_word + 1)
    p = 1.0 / (ranks + 2.7)
    words = rng.choice(ranks, size=(batch, seq_len), p=p / p.sum()) - 1 + first_word
    shortest = max(3, seq_len // 4)
    lengths = rng.integers(shortest, seq_len + 1, batch)
    if np.all(lengths == seq_len):
        lengths[rng.integers(batch)] = rng.integers(shortest, seq_len)
    pos = np.arange(seq_len)
    mask = (pos[None, :] < lengths[:, None]).astype(np.int64)
    ids = np.where(mask == 1, words, 0)
    ids[:, 0] = cls_id
    ids[np.arange(batch), lengths - 1] = sep_id
    return {"input_ids": ids.astype(np.int64), "attention_mask": mask}


def _metadata(model: onnx.ModelProto) -> dict[str, str]:
    n = len(META_PREFIX)
    return {p.key[n:]: p.value for p in model.metadata_props if p.key.startswith(META_PREFIX)}


def _static_dim(model: onnx.ModelProto, input_name: str, axis: int) -> int | None:
    for value in model.graph.input:
        if value.name == input_name:
            dim = value.type.tensor_type.shape.dim[axis]
            return dim.dim_value if dim.HasField("dim_value") else None
    return None


def _vocab_size(model: onnx.ModelProto) -> int | None:
    """Rows of the embedding table gathered with ``input_ids``."""
    inits = {i.name: i for i in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "Gather" and node.input[1:2] == ["input_ids"] and node.input[0] in inits:
            return int(inits[node.input[0]].dims[0])
    return None


def _generate(
    name: str, model: onnx.ModelProto, batch: int, rng: np.random.Generator
) -> dict[str, np.ndarray]:
    meta = _metadata(model)
    if "model" in meta and meta["model"] != name:
        raise ValueError(f"model was built by zoo {meta['model']!r}, not {name!r}")
    first = model.graph.input[0].name
    fixed_batch = _static_dim(model, first, 0)
    if fixed_batch is not None and fixed_batch != batch:
        raise ValueError(f"model has a fixed batch of {fixed_batch}; asked for batch={batch}")
    if name in _IMAGE_MODELS:
        size = int(meta.get("image_size") or _static_dim(model, first, 2) or 0)
        if not size:
            raise ValueError(f"cannot tell the image size of this {name} model")
        return {first: images(batch, size, rng)}
    if name in _TEXT_MODELS:
        seq_len = int(meta.get("seq_len") or _static_dim(model, "input_ids", 1) or 0)
        vocab = int(meta.get("vocab_size") or _vocab_size(model) or 0)
        if not seq_len or not vocab:
            raise ValueError(f"cannot tell the sequence length / vocabulary of this {name} model")
        return tokens(batch, seq_len, vocab, rng)
    raise ValueError(f"no input generator for {name!r}; known: {_IMAGE_MODELS + _TEXT_MODELS}")


def example_inputs(
    name: str, model: onnx.ModelProto, batch: int = 1, seed: int = 0
) -> dict[str, np.ndarray]:
    """One feed dict (input name -> array) for ``model``; held out from calibration."""
    return _generate(name, model, batch, np.random.default_rng([seed, 0]))


def calibration_batches(
    name: str, model: onnx.ModelProto, n: int = 8, batch: int = 1, seed: int = 0
) -> list[dict[str, np.ndarray]]:
    """``n`` feed dicts for calibration. Batch ``i`` depends only on (seed, i), so
    asking for more batches extends the list without changing the first ones."""
    return [_generate(name, model, batch, np.random.default_rng([seed, 1, i])) for i in range(n)]


__all__ = ["calibration_batches", "example_inputs", "images", "tokens"]
