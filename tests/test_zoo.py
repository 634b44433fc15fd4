"""qlinear.zoo: valid, runnable models of realistic scale, and their input generators."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import helper, numpy_helper

import qlinear
from qlinear import zoo

NAMES = sorted(zoo.MODELS)
# Ops whose outputs are the network's activations; each must stay O(1) through depth.
ACTIVATION_OPS = {"Conv", "BatchNormalization", "Relu", "Clip", "Add", "LayerNormalization",
                  "MatMul", "Gemm"}  # fmt: skip
MASKED = -1e30  # entries at/below this are the additive attention mask (float32 lowest)

_small: dict[str, onnx.ModelProto] = {}


def small(name: str) -> onnx.ModelProto:
    if name not in _small:
        _small[name] = zoo.build(name, "small")
    return _small[name]


def ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = 1
    sess = ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds), strict=True))


def declared_shape(value: onnx.ValueInfoProto, **symbols: int) -> tuple[int | None, ...]:
    """The value's declared shape, symbolic dims replaced from ``symbols`` (else None)."""
    dims = value.type.tensor_type.shape.dim
    return tuple(d.dim_value if d.HasField("dim_value") else symbols.get(d.dim_param) for d in dims)


@pytest.mark.parametrize("name", NAMES)
def test_small_model_is_valid_and_runs_in_onnxruntime(name: str) -> None:
    model = small(name)
    onnx.checker.check_model(model, full_check=True)
    assert [(o.domain, o.version) for o in model.opset_import] == [("", 17)]
    assert model.ir_version == 8
    feeds = zoo.example_inputs(name, model, batch=3)
    assert list(feeds) == [i.name for i in model.graph.input]
    outs = ort_run(model, feeds)
    for out in model.graph.output:
        y = outs[out.name]
        assert y.dtype == np.float32
        seq = feeds["input_ids"].shape[1] if name == "bert" else -1
        assert y.shape == declared_shape(out, N=3, S=seq)
        assert np.isfinite(y).all()
    assert 1e-2 < outs["logits"].std() < 1e2


@pytest.mark.parametrize("name", NAMES)
def test_activations_stay_order_one_through_depth(name: str) -> None:
    """Every activation keeps 1e-2 < std < 1e2 (no blow-up, no collapse), and BN
    running variances match the variance the layer really sees within 4x."""
    model = onnx.ModelProto()
    model.CopyFrom(small(name))
    graph = model.graph
    declared = {o.name for o in graph.output}
    for node in graph.node:
        if node.output[0] not in declared:
            graph.output.append(helper.make_empty_tensor_value_info(node.output[0]))
    feeds = zoo.example_inputs(name, model, batch=4)
    values = {**feeds, **ort_run(model, feeds)}
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    checked = 0
    for node in graph.node:
        y = values[node.output[0]]
        if y.dtype == np.float32:
            assert np.isfinite(y).all(), node.name
        if node.op_type not in ACTIVATION_OPS:
            continue
        live = y[y > MASKED]
        assert 1e-2 < live.std() < 1e2 and np.abs(live).max() < 1e3, (node.name, live.std())
        checked += 1
        if node.op_type == "BatchNormalization":
            seen = values[node.input[0]].var(axis=(0, 2, 3))
            ratio = np.median(seen / inits[node.input[4]])
            assert 0.25 < ratio < 4, (node.name, ratio)
    assert checked >= 10


@pytest.mark.parametrize("opset", [13, 18, 21])
@pytest.mark.parametrize("name", NAMES)
def test_opset_override_gives_a_valid_equivalent_model(name: str, opset: int) -> None:
    model = zoo.build(name, "small", opset=opset)
    onnx.checker.check_model(model, full_check=True)
    assert model.opset_import[0].version == opset and 8 <= model.ir_version <= 10
    feeds = zoo.example_inputs(name, model, batch=2)
    got, want = ort_run(model, feeds), ort_run(small(name), feeds)
    for key in want:  # same seed, same weights; opset < 17 decomposes LayerNormalization
        np.testing.assert_allclose(got[key], want[key], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_qlinear_session_matches_onnxruntime(name: str) -> None:
    """Float models: qlinear.Session within rtol 1e-4 / atol 1e-4 of onnxruntime."""
    model = small(name)
    feeds = zoo.example_inputs(name, model, batch=2, seed=1)
    want = ort_run(model, feeds)
    got = qlinear.Session(model).run(None, feeds)
    assert len(got) == len(want)
    for out, y in zip(model.graph.output, got, strict=True):
        np.testing.assert_allclose(y, want[out.name], rtol=1e-4, atol=1e-4, err_msg=out.name)


def test_realistic_models_have_their_reference_parameter_counts() -> None:
    """Counts as torch reports them (BN running stats are buffers, not parameters)."""
    assert zoo.count_params(zoo.build("resnet", "realistic")) == 11_689_512  # ResNet-18
    assert zoo.count_params(zoo.build("mobilenet_v2", "realistic")) == 3_504_872
    assert zoo.count_params(zoo.build("vit", "realistic", depth=12)) == 22_050_664  # ViT-S/16
    one, two = (zoo.count_params(zoo.build("bert", "realistic", num_layers=n)) for n in (1, 2))
    assert two - one == 7_087_872  # one BERT-base encoder layer
    # BERT-base embeddings + pooler (HF's 109,482,240 minus 11 more layers) + 2-label classifier.
    assert one - 7_087_872 == 109_482_240 - 12 * 7_087_872 + 768 * 2 + 2
    bert = zoo.build("bert", "realistic")
    dims = [[d.dim_param or d.dim_value for d in i.type.tensor_type.shape.dim]
            for i in bert.graph.input]  # fmt: skip
    assert dims == [["N", "S"], ["N", "S"]]
    assert zoo.example_inputs("bert", bert)["input_ids"].shape == (1, 128)


def test_builds_are_deterministic_and_seeded() -> None:
    a, b = zoo.build("vit", "small"), zoo.build("vit", "small", seed=0)
    assert a.SerializeToString() == b.SerializeToString()
    c = zoo.build("vit", "small", seed=1)
    wa, wc = (numpy_helper.to_array(m.graph.initializer[0]) for m in (a, c))
    assert wa.shape == wc.shape and not np.array_equal(wa, wc)


def test_fixed_batch_makes_static_inputs_and_checks_the_feed_batch() -> None:
    model = zoo.build("bert", "small", batch=2, seq_len=12)
    onnx.checker.check_model(model, full_check=True)
    assert declared_shape(model.graph.input[0]) == (2, 12)
    assert ort_run(model, zoo.example_inputs("bert", model, batch=2))["logits"].shape == (2, 2)
    with pytest.raises(ValueError, match="fixed batch of 2"):
        zoo.example_inputs("bert", model, batch=1)


def test_image_inputs_look_like_normalised_images() -> None:
    model = small("resnet")
    x = zoo.example_inputs("resnet", model, batch=8)["pixel_values"]
    assert x.dtype == np.float32 and x.shape == (8, 3, 32, 32)
    assert abs(x.mean()) < 0.5 and 0.5 < x.std() < 1.5
    assert x.min() >= (0 - 0.485) / 0.229 - 1e-5 and x.max() <= (1 - 0.406) / 0.225 + 1e-5
    # Smooth: neighbouring pixels correlate, unlike white noise.
    assert np.corrcoef(x[..., 1:].ravel(), x[..., :-1].ravel())[0, 1] > 0.5


@pytest.mark.parametrize("size", ["small", "realistic"])
def test_token_inputs_are_padded_bert_batches(size: str) -> None:
    vocab, cls_id, sep_id = (512, 1, 2) if size == "small" else (30522, 101, 102)
    model = zoo.build("bert", size, num_layers=0)
    for batch in (1, 6):
        feeds = zoo.example_inputs("bert", model, batch=batch)
        ids, mask = feeds["input_ids"], feeds["attention_mask"]
        assert ids.dtype == mask.dtype == np.int64 and ids.shape == mask.shape
        assert ((ids >= 0) & (ids < vocab)).all() and (ids[:, 0] == cls_id).all()
        assert set(np.unique(mask)) == {0, 1} and (ids[mask == 0] == 0).all()
        lengths = mask.sum(1)
        assert (ids[np.arange(batch), lengths - 1] == sep_id).all()
        assert (mask[:, 0] == 1).all() and (np.diff(mask, axis=1) <= 0).all()
        assert (lengths < ids.shape[1]).any()  # every batch has some padding


def test_calibration_batches_are_reproducible_extendable_and_held_out() -> None:
    model = small("mobilenet_v2")
    four = zoo.calibration_batches("mobilenet_v2", model, n=4, batch=2, seed=3)
    six = zoo.calibration_batches("mobilenet_v2", model, n=6, batch=2, seed=3)
    assert len(four) == 4 and len(six) == 6
    for a, b in zip(four, six[:4], strict=False):
        np.testing.assert_array_equal(a["pixel_values"], b["pixel_values"])
    assert not np.array_equal(four[0]["pixel_values"], four[1]["pixel_values"])
    held_out = zoo.example_inputs("mobilenet_v2", model, batch=2, seed=3)["pixel_values"]
    assert all(not np.array_equal(held_out, c["pixel_values"]) for c in six)


def test_inputs_without_zoo_metadata_fall_back_to_the_graph() -> None:
    for name, kw in [("resnet", {}), ("vit", {}), ("bert", {"batch": 1})]:
        model = zoo.build(name, "small", **kw)
        del model.metadata_props[:]
        feeds = zoo.example_inputs(name, model)
        assert ort_run(model, feeds)["logits"].shape[0] == 1
    dynamic = zoo.build("bert", "small")
    del dynamic.metadata_props[:]
    with pytest.raises(ValueError, match="sequence length"):
        zoo.example_inputs("bert", dynamic)


def test_bad_requests_are_refused_clearly() -> None:
    with pytest.raises(ValueError, match="unknown zoo model 'alexnet'"):
        zoo.build("alexnet")
    with pytest.raises(ValueError, match="unknown size 'huge'"):
        zoo.build("resnet", "huge")
    with pytest.raises(ValueError, match="opset 12 not supported"):
        zoo.build("vit", opset=12)
    with pytest.raises(ValueError, match="built by zoo 'resnet', not 'vit'"):
        zoo.example_inputs("vit", small("resnet"))
