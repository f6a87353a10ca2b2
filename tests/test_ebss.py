"""EBSS (onnxq.stats.ebss, `onnxq ebss`): expert-balanced calibration sets sampled from a tiny MoE LM.

The tiny model's router is biased so that 24 of its 32 tokens go to experts 0 and 1 and the other 8
to experts 2 and 3: text the model likes is imbalanced, and the balance term has something to fix."""

import numpy as np
import onnx
import onnx_ir as ir
import pytest

from conftest import cli
from onnxq.cli.parser import EXIT_OK, EXIT_USAGE, EXIT_USER_ERROR
from onnxq.errors import OnnxqError
from onnxq.ir.modelio import load_model
from onnxq.stats.calib_data import load_calibration
from onnxq.stats.ebss import BALANCE_WEIGHT, build_ebss, collapsed_std, expert_coverage, share_std

torch = pytest.importorskip("torch")
moe_lm = pytest.importorskip("onnxq_models.moe_lm")

SEQ_LEN, VOCAB, TOP_K = 32, 32, 2


@pytest.fixture(scope="module")
def lm(tmp_path_factory, torch_one_thread):
    """Path of the tiny MoE LM (1 layer, top-2 of 4 experts), routing biased by token (module doc)."""
    torch.manual_seed(0)
    model = moe_lm.build(moe_lm.MoEConfig(dim=16, layers=1, heads=2, experts=4, top_k=TOP_K, expert_ffn=8,
                                          seq_len=SEQ_LEN, vocab=VOCAB)).eval()
    with torch.no_grad():
        model.embed.weight[:, 0] = 4.0
        model.embed.weight[:8, 0] = -4.0  # the rare tokens
        model.blocks[0].mlp.router.weight[:, 0] = torch.tensor([3.0, 3.0, -3.0, -3.0])
    return moe_lm.export_onnx(model, tmp_path_factory.mktemp("ebss") / "moe.onnx")


def build(model, **options):
    settings = {"sequences": 4, "length": 16, "show_progress": False, **options}
    return build_ebss(model, **settings)


def test_shape_dtype_and_coverage_counts(lm):
    result = build(lm)
    assert result.ids.shape == (4, 16) and result.ids.dtype == np.int64
    assert result.ids.min() >= 0 and result.ids.max() < VOCAB
    assert result.input_name == "input_ids"
    assert result.coverage.shape == (1, 4) and result.coverage.dtype == np.int64
    assert (result.coverage.sum(1) == 4 * 16 * TOP_K).all()  # every token goes to top_k experts
    assert (expert_coverage(lm, result.ids) == result.coverage).all()  # coverage is of the kept beams
    assert len({row.tobytes() for row in result.ids}) == 4  # distinct first tokens: distinct sequences


def test_deterministic_for_a_seed(lm):
    a, b, c = build(lm, seed=3), build(lm, seed=3), build(lm, seed=4)
    assert (a.ids == b.ids).all() and (a.coverage == b.coverage).all()
    assert not (a.ids == c.ids).all()


def test_balance_term_evens_out_the_experts(lm):
    plain = build(lm, sequences=6, length=24, balance_weight=0.0)
    balanced = build(lm, sequences=6, length=24, balance_weight=BALANCE_WEIGHT)
    assert share_std(plain.coverage)[0] == pytest.approx(collapsed_std(4, 2))  # likelihood alone: collapsed
    assert share_std(balanced.coverage)[0] < 0.8 * share_std(plain.coverage)[0]
    assert balanced.coverage[0, 2:].sum() > plain.coverage[0, 2:].sum()  # the rare experts get more tokens


def test_share_std_bounds():
    assert share_std(np.array([[5, 5, 5, 5]]))[0] == 0
    assert share_std(np.array([[9, 9, 0, 0]]))[0] == pytest.approx(collapsed_std(4, 2)) == pytest.approx(0.25)


@pytest.mark.parametrize("dims", [[None, SEQ_LEN], [3, None]], ids=["fixed-sequence", "fixed-batch"])
def test_fixed_axes_give_the_same_set(lm, dims):
    """Prefixes padded to a fixed sequence axis (causal: the padding is never read), rows chunked to a
    fixed batch: the same search, the same result."""
    model = load_model(lm)
    shape = model.graph.inputs[0].shape
    model.graph.inputs[0].shape = ir.Shape([d if d is not None else shape[i] for i, d in enumerate(dims)])
    fixed, dynamic = build(model), build(lm)
    assert (fixed.ids == dynamic.ids).all() and (fixed.coverage == dynamic.coverage).all()
    assert (expert_coverage(model, dynamic.ids, batch_size=2) == dynamic.coverage).all()
    if dims[1] is not None:
        with pytest.raises(OnnxqError, match="beyond the model's fixed sequence axis of 32"):
            build(model, length=SEQ_LEN + 1)


def test_npz_round_trip(lm, tmp_path):
    result = build(lm)
    path = result.save(tmp_path / "ebss.npz")
    with np.load(path) as saved:
        assert saved.files == ["input_ids"] and (saved["input_ids"] == result.ids).all()
    data = load_calibration(path, load_model(lm), batch_size=2)  # what quantize --calib reads
    assert data.num_samples == 4
    assert [p.name for p in tmp_path.iterdir()] == ["ebss.npz"]  # no temporary file left
    with pytest.raises(OnnxqError, match="must end in .npz"):
        result.save(tmp_path / "ebss.bin")


@pytest.mark.parametrize("option, value", [("sequences", 0), ("length", 0), ("width", 0), ("temperature", 0.0),
                                           ("temperature", -1.0), ("balance_weight", -1.0), ("seed", -1),
                                           ("width", 2.5), ("temperature", float("nan"))])
def test_bad_numbers(lm, option, value):
    with pytest.raises(OnnxqError, match=option):
        build(lm, **{option: value})


def _graph_model(tmp_path, nodes, inputs, outputs, initializers=()):
    graph = onnx.helper.make_graph(nodes, "g", inputs, outputs, list(initializers))
    path = tmp_path / "model.onnx"
    onnx.save(onnx.helper.make_model(graph, opset_imports=[onnx.helper.make_opsetid("", 18)]), path)
    return path


def _ids_input():
    return onnx.helper.make_tensor_value_info("ids", onnx.TensorProto.INT64, ["b", "s"])


def test_not_a_language_model(tmp_path):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["b", 4])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["b", 4])
    path = _graph_model(tmp_path, [onnx.helper.make_node("Relu", ["x"], ["y"])], [x], [y])
    with pytest.raises(OnnxqError, match="int64 token ids"):
        build(path)
    table = onnx.numpy_helper.from_array(np.ones(VOCAB, np.float32), "table")
    out = onnx.helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["b", "s"])  # no vocab axis
    nodes = [onnx.helper.make_node("Gather", ["table", "ids"], ["out"])]
    with pytest.raises(OnnxqError, match="logits"):
        build(_graph_model(tmp_path, nodes, [_ids_input()], [out], [table]))


def test_no_moe_layer(tmp_path):
    table = onnx.numpy_helper.from_array(np.ones((VOCAB, VOCAB), np.float32), "table")
    logits = onnx.helper.make_tensor_value_info("logits", onnx.TensorProto.FLOAT, ["b", "s", VOCAB])
    path = _graph_model(tmp_path, [onnx.helper.make_node("Gather", ["table", "ids"], ["logits"])], [_ids_input()],
                        [logits], [table])
    with pytest.raises(OnnxqError, match="no mixture-of-experts layer"):
        build(path)


def test_expert_coverage_checks_its_ids(lm):
    with pytest.raises(OnnxqError, match="2-D integer"):
        expert_coverage(lm, np.zeros(8, dtype=np.int64))
    with pytest.raises(OnnxqError, match="not 'tokens'"):
        expert_coverage(lm, np.zeros((2, 8), dtype=np.int64), input_name="tokens")


def test_cli(lm, tmp_path, capsys):
    text = tmp_path / "text.npz"
    np.savez(text, input_ids=np.arange(3 * 10).reshape(3, 10) % VOCAB)
    out = tmp_path / "ebss.npz"
    code, stdout, _ = cli(capsys, "ebss", lm, "-o", out, "--sequences", 3, "--length", 8, "--compare-with", text, "-q")
    assert code == EXIT_OK, stdout
    with np.load(out) as saved:
        assert saved["input_ids"].shape == (3, 8)
    assert "EBSS tokens min / median / max" in stdout and "text.npz std" in stdout
    assert "EBSS: 3 sequences x 8 tokens = 24 tokens" in stdout and "text.npz: 3 samples x 10 tokens = 30 tokens" in stdout


def test_cli_errors(lm, tmp_path, capsys):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    out = tmp_path / "ebss.npz"
    code, _, stderr = cli(capsys, "ebss", bad, "-o", out, "--sequences", 2, "--length", 8)
    assert code == EXIT_USER_ERROR and stderr.startswith("onnxq: error: ") and stderr.count("\n") == 1
    code, _, stderr = cli(capsys, "ebss", lm, "-o", tmp_path / "ebss.txt", "--sequences", 2, "--length", 8)
    assert code == EXIT_USER_ERROR and "must end in .npz" in stderr
    assert not out.exists()
    with pytest.raises(SystemExit) as caught:
        cli(capsys, "ebss", lm, "-o", out, "--sequences", 2, "--length", 8, "--temperature", 0)
    assert caught.value.code == EXIT_USAGE and "--temperature" in capsys.readouterr().err
