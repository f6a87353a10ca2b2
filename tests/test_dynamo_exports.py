"""Recognition that does not depend on the exporter: tiny BERT-like and LLaMA-like models (transformers'
sdpa attention, whose softmax is followed by Where(IsNaN)) exported by torch.onnx's TorchScript and
dynamo exporters, and optimized by onnxscript and ONNX Runtime, give the same structure, the same
recipe choice, the same sites to every pass, exact passes that stay exact, and W8A8 outputs close to FP32."""

import numpy as np
import onnx_ir as ir
import onnxruntime as ort
import onnxscript.optimizer
import pytest

from conftest import rel_change
from onnxq.analysis import structure
from onnxq.api import quantize
from onnxq.ir.modelio import load_model
from onnxq.pipeline import PassContext, load_recipe, run_pipeline
from onnxq.pipeline.choice import choose_recipe
from onnxq.runtime.session import session
from onnxq.stats.calib_data import load_calibration
from transformer_builders import export, feeds_for, tiny_bert, tiny_llama

KINDS = {"bert": tiny_bert, "llama": tiny_llama}
EXPORTERS = ("torchscript", "dynamo")


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
    d = tmp_path_factory.mktemp("dynamo_exports")
    return {(kind, exporter): export(build(attention="sdpa"), d / f"{kind}_{exporter}.onnx", kind,
                                     dynamo=exporter == "dynamo")
            for kind, build in KINDS.items() for exporter in EXPORTERS}


def recognised(model: ir.Model) -> dict:
    """What the passes read of a structure, without the exporter's node names and op forms."""
    s = structure.analyse(model)
    a = s.attentions[0] if s.attentions else None
    return {"linears": len(s.linears), "attentions": len(s.attentions), "norms": sorted(n.kind for n in s.norms),
            "norms_with_scale": sum(n.scale is not None for n in s.norms),
            "mlps": sorted(m.kind for m in s.mlps), "gelu_divisors": sum(m.gelu_divisor is not None for m in s.mlps),
            "heads": a and (a.num_heads, a.num_kv_heads, a.head_dim, a.rope, a.o is not None, a.v_path_plain),
            "stream": s.stream and (s.stream.pre_norm, len(s.stream.adds), len(s.stream.writers), len(s.stream.norms),
                                    s.stream.final_norm is not None, s.stream.rotatable),
            "lm_head": s.lm_head is not None, "rejected": [str(r) for r in s.rejected]}


EXPECTED = {
    "bert": {"linears": 12, "attentions": 2, "norms": ["layer"] * 5, "norms_with_scale": 5, "mlps": ["gelu"] * 2,
             "gelu_divisors": 2, "heads": (4, 4, 16, False, True, True), "stream": (False, 6, 4, 5, True, False),
             "lm_head": False, "rejected": []},
    "llama": {"linears": 15, "attentions": 2, "norms": ["rms"] * 5, "norms_with_scale": 5, "mlps": ["swiglu"] * 2,
              "gelu_divisors": 0, "heads": (4, 2, 16, True, True, True), "stream": (True, 4, 4, 5, True, True),
              "lm_head": True, "rejected": []},
}


@pytest.mark.parametrize("kind", list(KINDS))
def test_both_exports_give_the_same_structure(exports, kind):
    for exporter in EXPORTERS:
        model = load_model(exports[kind, exporter])
        assert any(n.op_type == "IsNaN" for n in model.graph)  # the sdpa NaN guard is there to be crossed
        assert recognised(model) == EXPECTED[kind], exporter


def _onnxscript_optimized(path) -> ir.Model:
    model = load_model(path)
    onnxscript.optimizer.optimize(model)
    return model


def _ort_optimized(path, tmp_path) -> ir.Model:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    options.optimized_model_filepath = str(tmp_path / "ort_basic.onnx")
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return load_model(tmp_path / "ort_basic.onnx")


@pytest.mark.parametrize("kind", list(KINDS))
@pytest.mark.parametrize("exporter", EXPORTERS)
def test_optimized_variants_give_the_same_structure(exports, kind, exporter, tmp_path):
    assert recognised(_onnxscript_optimized(exports[kind, exporter])) == EXPECTED[kind]
    assert recognised(_ort_optimized(exports[kind, exporter], tmp_path)) == EXPECTED[kind]


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_automatic_choice_is_the_transformer_recipe_for_both(exports, kind):
    for exporter in EXPORTERS:
        choice = choose_recipe(load_model(exports[kind, exporter]), feeds_for(kind, 1))
        assert choice.recipe == "transformer-w8a8", (exporter, choice.reason)
        assert "2 attention block(s), 2 MLP(s)" in choice.reason


def outputs(model: ir.Model, feed) -> np.ndarray:
    sess = session(model)
    return sess.run(None, {i.name: feed[i.name] for i in sess.get_inputs()})[0]


def _canonical(path) -> ir.Model:
    model = load_model(path)
    _, passes = load_recipe(["lift_constants", "fold_constants", {"upgrade_opset": {"opset": 19}}])
    run_pipeline(model, passes, PassContext(show_progress=False), verify_exact=False)
    return model


def _run(model: ir.Model, kind: str, steps: list) -> tuple[ir.Model, list]:
    work = model.clone()
    data = load_calibration(feeds_for(kind, 8, seed=1), work, batch_size=2)
    _, passes = load_recipe(steps)
    records = run_pipeline(work, passes, PassContext(calibration=data, show_progress=False, log=lambda s: None))
    return work, records


EXACT = ["fold_norm", "rotate", "smooth", "split_range"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_exact_passes_stay_exact_and_edit_the_same_sites_on_both(exports, kind):
    summaries = {}
    for exporter in EXPORTERS:
        model = _canonical(exports[kind, exporter])
        work, records = _run(model, kind, EXACT)
        feed = feeds_for(kind, 3, seed=7, seq=9)
        assert rel_change(outputs(model, feed), outputs(work, feed)) < 1e-4, exporter
        for r in records:
            assert r.kind == "exact" and r.max_rel_change is not None and r.max_rel_change < 1e-4, (exporter, r)
        summaries[exporter] = [{k: v for k, v in r.summary.items() if isinstance(v, (int, float))} for r in records]
    assert summaries["torchscript"] == summaries["dynamo"]
    assert any(v for s in summaries["dynamo"] for v in s.values())  # the passes did edit something


APPROXIMATE = [{"qans": {"attention_only": True}}, {"integer_ops": {"attention_only": True}}, "dulut"]


@pytest.mark.parametrize("kind", list(KINDS))
def test_softmax_and_function_replacements_find_the_same_sites_on_both(exports, kind):
    replaced = {}
    for exporter in EXPORTERS:
        model = _canonical(exports[kind, exporter])
        replaced[exporter] = [{k: v for k, v in _run(model, kind, [step])[1][0].summary.items() if k in ("replaced", "softmax")}
                              for step in APPROXIMATE]
    assert replaced["torchscript"] == replaced["dynamo"]
    qans, integer_ops, _ = replaced["dynamo"]
    assert qans["replaced"] == 2 and integer_ops["softmax"] == 2  # both attention softmaxes


@pytest.mark.parametrize("kind", list(KINDS))
def test_default_command_quantizes_both_exports_close_to_fp32(exports, kind):
    feed = feeds_for(kind, 2, seed=5)
    for exporter in EXPORTERS:
        fp32 = load_model(exports[kind, exporter])
        q = quantize(fp32.clone(), feeds_for(kind, 8, seed=1), batch_size=2, show_progress=False, log=lambda s: None)
        quantized = load_model(q)
        assert quantized.metadata_props["onnxq.recipe"] == "transformer-w8a8", exporter
        ref, out = outputs(fp32, feed), outputs(quantized, feed)
        cos = float(np.sum(ref * out) / np.linalg.norm(ref) / np.linalg.norm(out))
        assert cos > 0.98, (exporter, cos)
        assert _softmaxes_read_as_int8_by_a_matmul(quantized) == 2, exporter


def _softmaxes_read_as_int8_by_a_matmul(model: ir.Model) -> int:
    """Softmaxes that MatMuls read (through the NaN guard, and the outlier split of float_residual) via Q/DQ."""
    reached = set()
    for matmul in (n for n in model.graph if n.op_type == "MatMul"):
        value, crossed = matmul.inputs[0], set()
        while value.producer() is not None and value.producer().op_type in ("DequantizeLinear", "QuantizeLinear",
                                                                            "Where", "Sub", "Cast", "Identity"):
            producer = value.producer()
            crossed.add(producer.op_type)
            value = producer.inputs[2] if producer.op_type == "Where" else producer.inputs[0]
        if value.producer() is not None and value.producer().op_type == "Softmax" and "DequantizeLinear" in crossed:
            reached.add(value.producer())
    return len(reached)



# --- the real models, as torch.onnx's dynamo exporter writes them from the packaged weights -----------


@pytest.mark.slow
def test_minilm_dynamo_export_is_recognised_and_routed():
    from onnxq_models import minilm

    model = load_model(minilm.cached_onnx(dynamo=True))
    s = structure.analyse(model)
    assert (len(s.attentions), len(s.norms), sorted({m.kind for m in s.mlps}), len(s.mlps)) == (6, 13, ["gelu"], 6)
    assert choose_recipe(model, minilm.tokenize(["a sentence to embed"], 16)).recipe == "transformer-w8a8"


@pytest.mark.slow
def test_smollm2_dynamo_export_is_recognised_and_routed():
    from onnxq_models import smollm2

    model = load_model(smollm2.cached_onnx(dynamo=True, attention="sdpa"))
    s = structure.analyse(model)
    assert (len(s.attentions), len(s.norms), len(s.mlps)) == (30, 61, 30)
    assert {n.kind for n in s.norms} == {"rms"} and {m.kind for m in s.mlps} == {"swiglu"}
    assert choose_recipe(model, smollm2.calibration_feeds(1)).recipe == "transformer-w8a8"
