"""onnxq.export and `onnxq export`: tiny torch models exported by both exporters and run in ONNX Runtime
against torch, the mismatch check, quantize from a torch module, Hugging Face folders on the command
line, and bad input (one-line OnnxqError, nothing written)."""

import numpy as np
import onnx
import pytest

import onnxq
from conftest import assert_lint_clean, cli, run, sqnr_db
from onnxq.errors import OnnxqError
from onnxq.ir.modelio import load_model
from onnxq.runtime.session import session
from onnxq.torch_export import check_matches

torch = pytest.importorskip("torch")


class TinyCNN(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(3, 8, 3, padding=1)
        self.bn = torch.nn.BatchNorm2d(8)
        self.conv2 = torch.nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.fc = torch.nn.Linear(16, 10)

    def forward(self, image):
        x = torch.relu(self.bn(self.conv1(image)))
        return self.fc(torch.relu(self.conv2(x)).mean((2, 3)))


class TinyEncoder(torch.nn.Module):
    """Embedding, one pre-norm attention block and a GELU MLP; two inputs (ids, mask), two outputs."""

    def __init__(self, vocab=50, hidden=32, heads=4):
        super().__init__()
        self.embed = torch.nn.Embedding(vocab, hidden)
        self.norm1, self.norm2 = torch.nn.LayerNorm(hidden), torch.nn.LayerNorm(hidden)
        self.qkv, self.out = torch.nn.Linear(hidden, 3 * hidden), torch.nn.Linear(hidden, hidden)
        self.up, self.down = torch.nn.Linear(hidden, 2 * hidden), torch.nn.Linear(2 * hidden, hidden)
        self.heads = heads

    def forward(self, input_ids, attention_mask):
        x = self.embed(input_ids)
        b, s, h = x.shape
        q, k, v = self.qkv(self.norm1(x)).reshape(b, s, 3, self.heads, h // self.heads).permute(2, 0, 3, 1, 4)
        scores = q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5
        scores = scores + (1.0 - attention_mask[:, None, None, :].to(x.dtype)) * -1e4
        x = x + self.out((scores.softmax(-1) @ v).transpose(1, 2).reshape(b, s, h))
        x = x + self.down(torch.nn.functional.gelu(self.up(self.norm2(x))))
        return x, x.mean(1)


def _cnn():
    torch.manual_seed(0)
    model = TinyCNN()
    with torch.no_grad():  # BatchNorm statistics that are not the identity
        model.bn.running_mean.uniform_(-0.5, 0.5)
        model.bn.running_var.uniform_(0.5, 2.0)
    return model, torch.randn(2, 3, 16, 16)


def _encoder_inputs(batch=2, seq=8):
    ids = torch.randint(0, 50, (batch, seq), generator=torch.Generator().manual_seed(1))
    mask = torch.ones(batch, seq, dtype=torch.int64)
    mask[-1, -3:] = 0
    return ids, mask


def _dims(path, name):
    value = next(v for v in [*onnx.load(path).graph.input, *onnx.load(path).graph.output] if v.name == name)
    return [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_cnn_export_matches_torch_in_ort(tmp_path, torch_one_thread, exporter):
    model, image = _cnn()
    path = onnxq.export(model, image, tmp_path / "cnn.onnx", exporter=exporter, log=lambda *_: None)
    assert path == tmp_path / "cnn.onnx" and sorted(p.name for p in tmp_path.iterdir()) == ["cnn.onnx"]
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["image"] and [o.name for o in proto.graph.output] == ["output"]
    assert proto.opset_import[0].version == (18 if exporter == "dynamo" else 17)
    assert _dims(path, "image") == ["batch", 3, 16, 16] and _dims(path, "output") == ["batch", 10]
    other = torch.randn(5, 3, 16, 16)  # a batch the export never saw: the batch axis is dynamic
    with torch.no_grad():
        expected = model(other).numpy()
    (got,) = run(path, {"image": other.numpy()})
    assert np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    assert model.training is False


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_transformer_like_export_matches_torch_in_ort(tmp_path, torch_one_thread, exporter):
    torch.manual_seed(0)
    model = TinyEncoder()
    ids, mask = _encoder_inputs()
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "hidden")}
    path = onnxq.export(model, (ids, mask), tmp_path / "enc.onnx", output_names=["hidden", "pooled"],
                        dynamic_axes=axes | {"pooled": {0: "batch"}}, exporter=exporter, log=lambda *_: None)
    assert _dims(path, "input_ids") == ["batch", "sequence"] and _dims(path, "hidden") == ["batch", "sequence", 32]
    ids3, mask3 = _encoder_inputs(batch=3, seq=11)
    with torch.no_grad():
        hidden, pooled = (t.numpy() for t in model(ids3, mask3))
    got_hidden, got_pooled = run(path, {"input_ids": ids3.numpy(), "attention_mask": mask3.numpy()})
    assert got_hidden.shape == (3, 11, 32) and got_pooled.shape == (3, 32)
    assert np.abs(got_hidden - hidden).max() < 1e-4 * np.abs(hidden).max()
    assert np.abs(got_pooled - pooled).max() < 1e-4 * np.abs(pooled).max()


def test_static_export_keeps_the_example_shape(tmp_path, torch_one_thread):
    model, image = _cnn()
    path = onnxq.export(model, image, tmp_path / "cnn.onnx", dynamic_axes="none", exporter="torchscript",
                        log=lambda *_: None)
    assert _dims(path, "image") == [2, 3, 16, 16]


def test_an_axis_the_exporter_fixes_is_reported(tmp_path, torch_one_thread):
    class FixedBatch(torch.nn.Module):  # the batch size is written into the code
        def forward(self, x):
            return x.reshape(2, 12) * 3

    lines = []
    path = onnxq.export(FixedBatch(), torch.ones(2, 3, 4), tmp_path / "m.onnx", exporter="dynamo", log=lines.append)
    assert _dims(path, "output") == [2, 12]
    assert any("axis 0 of 'output' is fixed at 2" in line for line in lines), lines


def test_mismatch_names_the_output_and_writes_nothing(tmp_path, torch_one_thread):
    model, image = _cnn()
    with pytest.raises(OnnxqError, match=r"output 'output' differs .* by up to"):
        # float32 rounding between torch and ONNX Runtime exceeds a zero tolerance
        onnxq.export(model, image, tmp_path / "cnn.onnx", rtol=0.0, atol=0.0, exporter="torchscript",
                     log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []
    good = onnxq.export(model, image, tmp_path / "cnn.onnx", exporter="torchscript", log=lambda *_: None)
    with torch.no_grad():
        reference = model(image).numpy()
    feeds = {"image": image.numpy()}
    check_matches(good, feeds, {"output": reference})  # the real reference passes
    altered = reference.copy()
    altered[1, 3] += 0.05 * np.abs(reference).max()
    with pytest.raises(OnnxqError, match=r"output 'output' differs between ONNX Runtime and torch by up to 0\.0"):
        check_matches(good, feeds, {"output": altered})


def test_dynamo_failure_falls_back_to_torchscript(tmp_path, torch_one_thread):
    class DataDependent(torch.nn.Module):  # a Python branch on a tensor value: torch.export refuses it
        def forward(self, x):
            if x.sum() > 0:
                return x * 2
            return x - 1

    lines = []
    x = torch.ones(2, 4)
    path = onnxq.export(DataDependent(), x, tmp_path / "m.onnx", log=lines.append)
    assert any("dynamo exporter failed" in line and "TorchScript" in line for line in lines), lines
    assert onnx.load(path).opset_import[0].version == 17
    np.testing.assert_allclose(run(path, {"x": np.full((2, 4), 3.0, np.float32)})[0], 6.0)
    with pytest.raises(OnnxqError, match="dynamo exporter failed"):
        onnxq.export(DataDependent(), x, tmp_path / "n.onnx", exporter="dynamo", log=lambda *_: None)
    assert not (tmp_path / "n.onnx").exists()


def test_quantize_a_torch_module(tmp_path, torch_one_thread):
    model, _ = _cnn()
    calib = {"image": np.random.default_rng(0).standard_normal((32, 3, 16, 16)).astype(np.float32)}
    qmodel = onnxq.quantize(model, calib, example_inputs=torch.randn(1, 3, 16, 16), output=tmp_path / "q.onnx",
                            show_progress=False, log=lambda *_: None)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q.onnx"]
    assert any(n.op_type == "QuantizeLinear" for n in qmodel.graph.node)
    test = np.random.default_rng(1).standard_normal((8, 3, 16, 16)).astype(np.float32)
    with torch.no_grad():
        expected = model(torch.from_numpy(test)).numpy()
    (got,) = run(tmp_path / "q.onnx", {"image": test})
    assert sqnr_db(expected, got) > 25


def test_quantize_module_without_example_inputs_is_a_one_line_error(tmp_path):
    model, _ = _cnn()
    with pytest.raises(OnnxqError, match="example_inputs: a torch.nn.Module model needs example inputs"):
        onnxq.quantize(model, {"image": np.zeros((1, 3, 16, 16), np.float32)}, output=tmp_path / "q.onnx")
    with pytest.raises(OnnxqError, match="example_inputs: only used to export a torch.nn.Module"):
        onnxq.quantize(tmp_path / "m.onnx", {}, example_inputs=torch.zeros(1))
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("module", "inputs", "message"), [
    (lambda: "not a module", lambda: torch.zeros(1, 3, 16, 16), "module: expected a torch.nn.Module, not str"),
    (lambda: TinyCNN(), lambda: np.zeros((1, 3, 16, 16), np.float32),
     "example_inputs: expected a torch.Tensor or a tuple of tensors, not ndarray"),
    (lambda: TinyCNN(), lambda: (), "example_inputs: .* not an empty tuple"),
    (lambda: TinyCNN(), lambda: torch.zeros(1, 5, 16, 16), "the module fails on the example inputs: RuntimeError"),
])
def test_bad_export_arguments(tmp_path, module, inputs, message):
    with pytest.raises(OnnxqError, match=message):
        onnxq.export(module(), inputs(), tmp_path / "m.onnx", log=lambda *_: None)
    with pytest.raises(OnnxqError, match="path: .* must end in .onnx"):
        onnxq.export(TinyCNN(), torch.zeros(1, 3, 8, 8), tmp_path / "m.txt", log=lambda *_: None)
    with pytest.raises(OnnxqError, match="exporter: 'jit' is not one of"):
        onnxq.export(TinyCNN(), torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx", exporter="jit")
    with pytest.raises(OnnxqError, match="has 4 dimensions, so axis 5 does not exist"):
        onnxq.export(TinyCNN(), torch.zeros(1, 3, 8, 8), tmp_path / "m.onnx", dynamic_axes={"image": {5: "b"}},
                     log=lambda *_: None)
    with pytest.raises(OnnxqError, match="bfloat16 tensors: export the module in float32"):
        onnxq.export(TinyCNN().to(torch.bfloat16), torch.zeros(1, 3, 8, 8, dtype=torch.bfloat16), tmp_path / "m.onnx",
                     log=lambda *_: None)
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------------------------ command line


@pytest.fixture(scope="module")
def hf_folders(tmp_path_factory):
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("hf")
    torch.manual_seed(0)
    LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
                     ).save_pretrained(folder / "llama")
    BertModel(BertConfig(vocab_size=128, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder / "bert")
    return folder


def _hf_reference(folder, kind, feeds):
    from transformers import AutoModel, AutoModelForCausalLM

    loader = AutoModelForCausalLM if kind == "llama" else AutoModel
    model = loader.from_pretrained(folder / kind, attn_implementation="eager").eval()
    with torch.no_grad():
        out = model(**{k: torch.from_numpy(v) for k, v in feeds.items()})
    return (out.logits if kind == "llama" else out.last_hidden_state).numpy()


@pytest.mark.parametrize("kind", ["llama", "bert"])
def test_cli_exports_a_hugging_face_folder(hf_folders, tmp_path, capsys, torch_one_thread, kind):
    from onnxq.analysis import structure
    from onnxq.pipeline.choice import choose_recipe

    out = tmp_path / f"{kind}.onnx"
    code, stdout, stderr = cli(capsys, "export", hf_folders / kind, "-o", out, "--seq-len", 12)
    assert code == 0, stderr
    assert f"wrote {out}" in stdout
    names = ["input_ids", "attention_mask"] + (["token_type_ids"] if kind == "bert" else [])
    output = "logits" if kind == "llama" else "last_hidden_state"
    assert [i.name for i in onnx.load(out).graph.input] == names
    assert _dims(out, "input_ids") == ["batch", "sequence"]
    feeds = {"input_ids": np.random.default_rng(2).integers(0, 128, (3, 7)).astype(np.int64),
             "attention_mask": np.ones((3, 7), np.int64)}
    feeds["attention_mask"][0, 5:] = 0
    if kind == "bert":
        feeds["token_type_ids"] = np.zeros((3, 7), np.int64)
    expected = _hf_reference(hf_folders, kind, feeds)
    (got,) = run(out, feeds)
    assert got.shape == expected.shape and np.abs(got - expected).max() < 1e-4 * np.abs(expected).max()
    model = load_model(out)
    assert _dims(out, output)[:2] == ["batch", "sequence"]
    assert len(structure.analyse(model).attentions) == 2
    first = {k: v[:1] for k, v in feeds.items()}
    assert choose_recipe(model, first).recipe == "transformer-w8a8"


def test_cli_torchscript_exporter_and_opset(hf_folders, tmp_path, capsys, torch_one_thread):
    out = tmp_path / "llama.onnx"
    code, _, stderr = cli(capsys, "export", hf_folders / "llama", "-o", out, "--exporter", "torchscript",
                          "--opset", 16, "--batch", 1)
    assert code == 0, stderr
    assert onnx.load(out).opset_import[0].version == 16


def test_cli_exports_from_a_python_factory(tmp_path, capsys, torch_one_thread):
    source = tmp_path / "net.py"
    source.write_text("import torch\n\n\ndef make():\n    torch.manual_seed(0)\n"
                      "    return torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.ReLU()), torch.randn(2, 4)\n")
    code, _, stderr = cli(capsys, "export", f"{source}:make", "-o", tmp_path / "net.onnx")
    assert code == 0, stderr
    assert _dims(tmp_path / "net.onnx", "output") == ["batch", 3]


@pytest.mark.parametrize(("setup", "message"), [
    (lambda d: d.mkdir(), "no config.json"),
    (lambda d: None, "not a folder"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "llama"}')), "no vocab_size"),
    (lambda d: (d.mkdir(), (d / "config.json").write_text('{"model_type": "llama", "vocab_size": 10}')),
     "transformers cannot load the model"),
])
def test_cli_bad_source_is_one_line_and_writes_nothing(tmp_path, capsys, setup, message):
    source = tmp_path / "model"
    setup(source)
    code, _, stderr = cli(capsys, "export", source, "-o", tmp_path / "x.onnx")
    assert code == 1
    assert stderr.startswith("onnxq: error: ") and message in stderr and len(stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x.onnx").exists()


def test_cli_bad_factory_is_one_line(tmp_path, capsys):
    source = tmp_path / "net.py"
    source.write_text("def make():\n    return 3\n")
    code, _, stderr = cli(capsys, "export", f"{source}:make", "-o", tmp_path / "x.onnx")
    assert code == 1 and "must return (module, example_inputs)" in stderr
    code, _, stderr = cli(capsys, "export", f"{source}:missing", "-o", tmp_path / "x.onnx")
    assert code == 1 and "has no function 'missing'" in stderr
    assert not (tmp_path / "x.onnx").exists()


def test_import_onnxq_stays_torch_free():
    import subprocess
    import sys

    code = "import sys, onnxq; assert 'torch' not in sys.modules; assert callable(onnxq.export)"
    assert subprocess.run([sys.executable, "-c", code], check=False, capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------ real models


@pytest.mark.slow
def test_mobilenet_v2_export_matches_the_reference_export(tmp_path):
    from onnxq_models import images, mobilenet_v2

    path = onnxq.export(mobilenet_v2.load_model(), torch.zeros(1, 3, 224, 224), tmp_path / "mnv2.onnx",
                        input_names=["input"], output_names=["logits"])
    batch = images.crops("eval", 4)
    (ours,) = run(path, {"input": batch})
    (theirs,) = run(mobilenet_v2.cached_onnx(), {"input": batch})
    assert np.abs(ours - theirs).max() < 1e-3 * np.abs(theirs).max()
    assert (ours.argmax(1) == theirs.argmax(1)).all()


@pytest.mark.slow
def test_smollm2_export_matches_torch(tmp_path):
    smollm2 = pytest.importorskip("onnxq_models.smollm2")
    try:
        lm = smollm2.load_model()
    except Exception as exc:  # the weights package is optional
        pytest.skip(f"SmolLM2 does not load here: {exc}")
    wrapped = smollm2._LogitsOnly.wrap(lm)
    ids = torch.tensor([[1, 504, 3458, 314, 253, 1345, 30, 378]] * 2)
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    axes = {n: {0: "batch", 1: "sequence"} for n in ("input_ids", "attention_mask", "logits")}
    path = onnxq.export(wrapped, (ids, mask), tmp_path / "smollm2.onnx", output_names=["logits"], dynamic_axes=axes)
    from onnxq.pipeline.choice import choose_recipe

    model = load_model(path)
    assert choose_recipe(model, {"input_ids": ids[:1].numpy(), "attention_mask": mask[:1].numpy()}).recipe \
        == "transformer-w8a8"


@pytest.mark.slow
def test_quantize_mobilenet_v2_from_torch(tmp_path):
    from onnxq_models import images, mobilenet_v2

    calib = {"x": images.crops("calib", 64)}  # the ONNX input takes forward's parameter name
    qmodel = onnxq.quantize(mobilenet_v2.load_model(), calib, example_inputs=torch.zeros(1, 3, 224, 224),
                            output=tmp_path / "mnv2.int8.onnx", show_progress=False, log=lambda *_: None)
    assert_lint_clean(qmodel)
    crops = images.crops("dev", 100)
    (fp32,) = run(mobilenet_v2.cached_onnx(), {"input": crops})
    (int8,) = run(tmp_path / "mnv2.int8.onnx", {"x": crops})
    assert np.mean(fp32.argmax(1) == int8.argmax(1)) >= 0.8  # the bench's file-based rows: 0.85-0.89


@pytest.mark.slow
def test_quantize_smollm2_from_torch(tmp_path):
    smollm2 = pytest.importorskip("onnxq_models.smollm2")
    try:
        lm = smollm2._LogitsOnly.wrap(smollm2.load_model())
    except Exception as exc:  # the weights package is optional
        pytest.skip(f"SmolLM2 does not load here: {exc}")
    ids = torch.tensor(smollm2.token_windows("calib", 1))  # 256 tokens: the exported sequence length
    qmodel = onnxq.quantize(lm, smollm2.calibration_feeds(8), example_inputs=(ids, torch.ones_like(ids)),
                            output=tmp_path / "smollm2.int8.onnx", show_progress=False, log=lambda *_: None)
    assert_lint_clean(qmodel)
    windows = smollm2.eval_windows(4)
    fp32 = smollm2.perplexity(smollm2.torch_runner(lm.lm), windows)["ppl"]
    quantized = session(tmp_path / "smollm2.int8.onnx")  # its output is 'output': forward's return value
    int8 = smollm2.perplexity(lambda feeds: quantized.run(None, feeds)[0], windows)["ppl"]
    assert int8 < 1.05 * fp32, (fp32, int8)  # transformer-w8a8 from an ONNX file: about +1%
