"""Recurrent LMs (RWKV, Mamba): the parallel forms equal the recurrences, recognition of their blocks, the
exact smooth-fused rotation, the scan kept float, RWKVQuant's codebook weights, and the recipe choice."""

import numpy as np
import onnx_ir as ir
import pytest

from conftest import assert_lint_clean, rel_change, run
from onnxq.analysis.structure import analyse
from onnxq.pipeline.choice import choose_recipe
from onnxq.stats.observers import ChannelStatistics
from onnxq.stats.service import observe

torch = pytest.importorskip("torch")
rwkv_lm = pytest.importorskip("onnxq_models.rwkv_lm")
mamba_lm = pytest.importorskip("onnxq_models.mamba_lm")
byte_lm = pytest.importorskip("onnxq_models.byte_lm")

LAYERS = 2


def _export(module, folder, name, *, perturb=True):
    if perturb:  # trained-looking parameters: every μ, decay and skip differs from its neighbours
        with torch.no_grad():
            for p in module.parameters():
                if p.ndim == 1:
                    p.add_(0.3 * torch.randn_like(p))
    return byte_lm.export_onnx(module.eval(), folder / f"{name}.onnx")


@pytest.fixture(scope="module")
def tiny_mamba(tmp_path_factory):
    torch.manual_seed(0)
    config = mamba_lm.MambaConfig(vocab=256, dim=32, layers=LAYERS, expand=2, state=4, heads=2, seq_len=24)
    path = _export(mamba_lm.build(config), tmp_path_factory.mktemp("mamba"), "mamba")
    return path, {"input_ids": np.random.default_rng(0).integers(0, 256, (8, 24))}


@pytest.fixture(scope="module")
def tiny_rwkv(tmp_path_factory):
    torch.manual_seed(0)
    config = rwkv_lm.RWKVConfig(vocab=256, dim=16, layers=LAYERS, ffn=64, seq_len=24)
    path = _export(rwkv_lm.build(config), tmp_path_factory.mktemp("rwkv"), "rwkv")
    return path, {"input_ids": np.random.default_rng(0).integers(0, 256, (8, 24))}


def test_rwkv_parallel_wkv_equals_the_recurrence():
    torch.manual_seed(1)
    time_mix = rwkv_lm.build(rwkv_lm.RWKVConfig(dim=8, layers=2, ffn=16, seq_len=10)).blocks[1].time
    with torch.no_grad():
        time_mix.decay.normal_()
        time_mix.first.normal_()
        k, v = torch.randn(2, 10, 8, dtype=torch.float64), torch.randn(2, 10, 8, dtype=torch.float64)
        parallel = time_mix.double().wkv(k, v)
        w, u = -torch.exp(time_mix.decay), time_mix.first
        num, den, outs = torch.zeros(2, 8, dtype=torch.float64), torch.zeros(2, 8, dtype=torch.float64), []
        for t in range(10):  # the RNN form: decayed sums of the past plus the bonus for the current token
            outs.append((num + torch.exp(u + k[:, t]) * v[:, t]) / (den + torch.exp(u + k[:, t])))
            num = torch.exp(w) * num + torch.exp(k[:, t]) * v[:, t]
            den = torch.exp(w) * den + torch.exp(k[:, t])
    assert torch.allclose(parallel, torch.stack(outs, 1), rtol=1e-9, atol=1e-12)


def test_mamba_parallel_scan_equals_the_recurrence():
    torch.manual_seed(1)
    mixer = mamba_lm.build(mamba_lm.MambaConfig(dim=8, layers=1, expand=2, state=3, heads=2, seq_len=10)).blocks[0].mixer
    mixer = mixer.double()
    with torch.no_grad():
        x = torch.randn(2, 10, 16, dtype=torch.float64)
        parallel = mixer.scan(x)
        dt = torch.nn.functional.softplus(mixer.dt_proj(x))
        a, b, c = -torch.exp(mixer.a_log), mixer.x_proj_b(x), mixer.x_proj_c(x)
        h, outs = torch.zeros(2, 2, 8, 3, dtype=torch.float64), []  # [batch, head, head_dim, state]
        for t in range(10):
            xt = x[:, t].view(2, 2, 8)
            h = torch.exp(dt[:, t] * a)[..., None, None] * h + dt[:, t][..., None, None] * xt[..., None] * b[:, t][:, None, None]
            outs.append((h * c[:, t][:, None, None]).sum(-1).reshape(2, 16) + x[:, t] * mixer.skip)
    assert torch.allclose(parallel, torch.stack(outs, 1), rtol=1e-9, atol=1e-12)


def test_mamba_mixers_are_recognised_and_route_to_the_mamba_recipe(tiny_mamba):
    model = ir.load(str(tiny_mamba[0]))
    s = analyse(model)
    assert len(s.mamba_mixers) == LAYERS and s.recurrent_family == "mamba" and not s.attentions
    for mixer in s.mamba_mixers:
        assert mixer.conv.op_type == "Conv" and len(mixer.scan_matmuls) == 2
        assert mixer.in_x.input is mixer.in_z.input and len(mixer.inner_linears) == 3  # x_proj B, C and dt_proj
    assert {m.out_proj.node for m in s.mamba_mixers} == {w.node for w in s.stream.writers} and s.stream.rotatable
    assert choose_recipe(model).recipe == "mamba-w8a8"


def test_rwkv_blocks_are_recognised_and_route_to_the_rwkv_recipe(tiny_rwkv):
    model = ir.load(str(tiny_rwkv[0]))
    s = analyse(model)
    kinds = sorted(m.kind for m in s.rwkv_mixes)
    assert kinds == ["channel"] * LAYERS + ["time"] * LAYERS and s.recurrent_family == "rwkv"
    for mix in s.rwkv_mixes:
        assert all(len(m.muls) == 2 for m in mix.mixes)
        assert (mix.output is not None) == (mix.kind == "time")
    choice = choose_recipe(model)
    assert choice.recipe == "rwkv-w8a8" and "time-mixing" in choice.reason


def _run_passes(source, feed, names):
    from onnxq.pipeline import PassContext, load_recipe, run_pipeline
    from onnxq.stats.calib_data import load_calibration

    model = source if isinstance(source, ir.Model) else ir.load(str(source))
    _, passes = load_recipe(names)
    records = run_pipeline(model, passes, PassContext(calibration=load_calibration(feed, model, batch_size=4),
                                                      show_progress=False, log=lambda *_: None))
    return model, {r.name: r for r in records}


@pytest.mark.parametrize("options", [{}, {"basis": "hadamard"}, {"rotate": False}])
def test_smooth_fused_rotation_is_exact(tiny_mamba, options):
    path, feed = tiny_mamba
    model, records = _run_passes(path, feed, ["lift_constants", "fold_constants", "fold_norm", "klt_rotate",
                                              {"smooth_fused_rotate": options}])
    record = records["smooth_fused_rotate"]
    assert record.summary["mixers"] == LAYERS and record.max_rel_change < 1e-4  # the pipeline's own check
    other = {"input_ids": np.random.default_rng(5).integers(0, 256, (3, 17))}  # other tokens, another length
    assert rel_change(run(path, other)[0], run(ir.to_proto(model), other)[0]) < 1e-4
    # the S-SiLU: each gate's Sigmoid now reads z'·s, and out_proj reads a rotated input unless rotate is off
    ssilu = [n for n in model.graph if n.op_type == "Sigmoid" and n.inputs[0].producer() is not None
             and n.inputs[0].producer().op_type == "Mul" and n.inputs[0].producer().name.endswith(("_ssilu_Mul",))]
    assert len(ssilu) == LAYERS
    online = [n for n in model.graph if n.op_type == "MatMul" and "_sfr_" in (n.name or "")]
    assert len(online) == (0 if options.get("rotate") is False else LAYERS)


def test_smoothing_balances_the_out_proj_input(tiny_mamba):
    """After S-SiLU smoothing the out_proj input's channel ranges are closer together than before."""
    path, feed = tiny_mamba
    smoothed, records = _run_passes(path, feed, ["lift_constants", "fold_constants",
                                                 {"smooth_fused_rotate": {"rotate": False}}])
    plain, _ = _run_passes(path, feed, ["lift_constants", "fold_constants"])
    assert records["smooth_fused_rotate"].summary["mixers"] == LAYERS
    spread = []
    for model in (plain, smoothed):
        mixers = analyse(model).mamba_mixers  # the S-SiLU form is recognised too
        assert len(mixers) == LAYERS and all((m.ssilu_scale is not None) == (model is smoothed) for m in mixers)
        names = [m.gate.outputs[0].name for m in mixers]
        stats = ChannelStatistics(names, axis=-1, mean_square=False)
        observe(model, [{k: v[i:i + 4] for k, v in feed.items()} for i in (0, 4)], stats, desc="u", show_progress=False)
        spread.append(max(float(r.amax.max() / r.amax.min()) for r in stats.result.values()))
    assert spread[1] < 0.5 * spread[0]
    # run again, the pass finds the S-SiLU and leaves those mixers alone
    _, again = _run_passes(ir.from_proto(ir.to_proto(smoothed)), feed, [{"smooth_fused_rotate": {"rotate": False}}])
    assert again["smooth_fused_rotate"].summary["already_done"] == LAYERS


def test_mamba_recipes_keep_the_scan_float_and_lint_clean(tiny_mamba, tmp_path):
    from onnxq.api import quantize
    from onnxq.metadata import FLOAT_REASON_KEY

    path, feed = tiny_mamba
    for recipe, bound in (("mamba-w8a8", 0.03), ("mamba-w4a8", 0.25)):  # measured 0.012 and 0.12
        out = tmp_path / f"{recipe}.onnx"
        quantize(str(path), feed, output=str(out), recipe=recipe, show_progress=False, log=lambda *_: None)
        model = ir.load(str(out))
        scan = [n for n in model.graph if "selective scan" in n.metadata_props.get(FLOAT_REASON_KEY, "")]
        assert len(scan) == 2 * LAYERS
        assert all(n.inputs[i].producer() is None or n.inputs[i].producer().op_type != "DequantizeLinear"
                   for n in scan for i in (0, 1))
        linears = [n for n in model.graph if n.op_type == "MatMul" and n.inputs[1].producer() is not None
                   and n.inputs[1].producer().op_type == "DequantizeLinear"]
        assert len(linears) >= 6 * LAYERS + 1  # in_x, in_z, x_proj B/C, dt_proj, out_proj per mixer, the head
        assert rel_change(run(path, feed)[0], run(out, feed)[0]) < bound
        assert_lint_clean(model)


def test_vq_weights_codebooks_follow_the_proxy_and_stay_close(tiny_rwkv):
    from onnxq.metadata import CODEBOOK_KEY

    path, feed = tiny_rwkv
    options = {"vector_share": 0.5, "dim": 1, "entries": 256, "mix_entries": 256}
    model, records = _run_passes(path, feed, ["lift_constants", "fold_constants", {"vq_weights": options}])
    summary = records["vq_weights"].summary
    layers = 7 * LAYERS  # time mixing: key, value, receptance, output; channel mixing: key, value, receptance
    assert summary["layers"] == layers and summary["vector"] == round(layers * 0.5)
    assert summary["mixes_vq"] == 5 * 2 * LAYERS  # 3 + 2 mixes per block, μ and μ' each
    codebooks = [n for n in model.graph if n.op_type == "DequantizeLinear" and CODEBOOK_KEY in n.metadata_props]
    assert len(codebooks) == summary["vector"] + summary["mixes_vq"]
    # 8-bit indices plus the codebook (256 int8 codewords: 8 more bits per weight on a 16 x 16 weight, 2 on 16 x 64)
    assert 8 + 2 < summary["vq_bits_per_weight"] < 8 + 8 + 0.2
    # 256 levels fitted to each weight: the model barely moves (an approximate pass with a measured bound)
    assert rel_change(run(path, feed)[0], run(ir.to_proto(model), feed)[0]) < 2e-2


def test_rwkv_w4a8_quantizes_the_rest_and_lints_clean(tiny_rwkv, tmp_path):
    from onnxq.api import quantize

    path, feed = tiny_rwkv
    out = tmp_path / "rwkv.onnx"
    quantize(str(path), feed, output=str(out), recipe="rwkv-w4a8", show_progress=False, log=lambda *_: None)
    model = ir.load(str(out))
    gathers = [n for n in model.graph if n.op_type == "Gather" and n.inputs[0].dtype == ir.DataType.INT8]
    int4 = [n for n in model.graph if n.op_type == "DequantizeLinear" and n.inputs[0].dtype == ir.DataType.INT4]
    assert gathers and int4  # codebook layers and INT4 scalar layers side by side
    assert rel_change(run(path, feed)[0], run(out, feed)[0]) < 0.08  # measured 0.037
    from onnxq.analysis.inspection import inspect_model

    seen = inspect_model(model)  # a codebook is one weight: its Gather is not a float op
    assert seen.qdq["DequantizeLinear (codebook weight)"] == len(gathers) and seen.op_counts["Gather"] == 1  # embedding
    assert_lint_clean(model)


def test_vq_weights_without_rwkv_blocks_does_nothing(tiny_mamba):
    _, records = _run_passes(*tiny_mamba, ["lift_constants", {"vq_weights": {}}])
    assert records["vq_weights"].summary == {"layers": 0}


def test_rwkv_as_initialised_quantizes_with_shared_constants(tmp_path):
    """Untrained, RWKV's μ vectors repeat between mixes and the exporter shares them (one constant, several
    Muls; key and value even read one mix): every recipe must still run and write each constant once."""
    from onnxq.api import quantize

    torch.manual_seed(0)
    path = _export(rwkv_lm.build(rwkv_lm.RWKVConfig(vocab=256, dim=16, layers=LAYERS, ffn=64, seq_len=24)),
                   tmp_path, "rwkv_init", perturb=False)
    feed = {"input_ids": np.random.default_rng(1).integers(0, 256, (8, 24))}
    muls = [n for n in ir.load(str(path)).graph if n.op_type == "Mul"]
    constants = [v for n in muls for v in n.inputs if v is not None and v.const_value is not None and v.shape == [16]]
    assert len(constants) > len(set(constants))  # the sharing this test is about
    # measured 0.057 (rwkv-w8a8, which the default command picks) and 0.27 (INT4 on 16-wide untrained layers;
    # plain INT4 without codebooks gives the same)
    for recipe, bound in ((None, 0.1), ("rwkv-w4a8", 0.4)):
        out = tmp_path / f"{recipe}.onnx"
        quantize(str(path), feed, output=str(out), recipe=recipe, show_progress=False, log=lambda *_: None)
        assert rel_change(run(path, feed)[0], run(out, feed)[0]) < bound
        assert_lint_clean(ir.load(str(out)))


def _mamba_variant(tmp_path, change):
    torch.manual_seed(0)
    module = mamba_lm.build(mamba_lm.MambaConfig(vocab=256, dim=32, layers=1, expand=2, state=4, heads=2, seq_len=24))
    change(module.blocks[0].mixer)
    return _export(module, tmp_path, "variant")


def test_a_gated_conv_without_a_scan_is_not_a_mamba_mixer(tmp_path):
    import types

    def no_scan(mixer):
        mixer.scan = types.MethodType(lambda self, x: x * self.skip, mixer)

    model = ir.load(str(_mamba_variant(tmp_path, no_scan)))
    s = analyse(model)
    assert not s.mamba_mixers and any("selective scan" in r.why for r in s.rejected)
    assert choose_recipe(model).recipe != "mamba-w8a8"


def test_a_mixer_whose_z_is_read_elsewhere_is_left_alone(tmp_path):
    """Smoothing divides z by s: a mixer whose z another node reads is not recognised (it would not be exact)."""
    def leak_z(mixer):
        silu = torch.nn.functional.silu

        def leaky(h):  # the mixer's forward, plus a second reader of z
            x, z = mixer.in_x(h), mixer.in_z(h)
            x = silu(mixer.conv(x.transpose(1, 2))[..., :h.shape[1]].transpose(1, 2))
            return mixer.out_proj(mixer.scan(x) * silu(z)) + z.mean(-1, keepdim=True)
        mixer.forward = leaky

    s = analyse(ir.load(str(_mamba_variant(tmp_path, leak_z))))
    assert not s.mamba_mixers and any("readers besides" in r.why for r in s.rejected)


def test_smooth_fused_rotation_divides_an_in_z_bias_too(tmp_path):
    def biased(mixer):
        mixer.in_z = torch.nn.Linear(mixer.in_z.in_features, mixer.in_z.out_features, bias=True)
        torch.nn.init.normal_(mixer.in_z.bias, 0, 1.0)

    path = _mamba_variant(tmp_path, biased)
    feed = {"input_ids": np.random.default_rng(0).integers(0, 256, (8, 24))}
    model, records = _run_passes(path, feed, ["lift_constants", "fold_constants", "smooth_fused_rotate"])
    assert records["smooth_fused_rotate"].summary["mixers"] == 1
    assert rel_change(run(path, feed)[0], run(ir.to_proto(model), feed)[0]) < 1e-4


@pytest.mark.parametrize("family", ["mamba", "rwkv"])
def test_torchscript_exports_are_recognised_too(family, tmp_path):
    import onnxq

    torch.manual_seed(0)
    module = (mamba_lm.build(mamba_lm.MambaConfig(vocab=256, dim=32, layers=LAYERS, heads=2, state=4, seq_len=24))
              if family == "mamba" else rwkv_lm.build(rwkv_lm.RWKVConfig(vocab=256, dim=16, layers=LAYERS, ffn=64, seq_len=24)))
    axes = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    path = onnxq.export(module.eval(), torch.zeros(1, 24, dtype=torch.int64), tmp_path / "ts.onnx", input_names=["input_ids"],
                        output_names=["logits"], dynamic_axes=axes, exporter="torchscript", log=lambda *_: None)
    model = ir.load(str(path))
    s = analyse(model)
    assert len(s.mamba_mixers if family == "mamba" else s.rwkv_mixes) == LAYERS * (1 if family == "mamba" else 2)
    assert choose_recipe(model).recipe == f"{family}-w8a8"
