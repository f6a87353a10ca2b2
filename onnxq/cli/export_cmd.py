"""`onnxq export SOURCE -o model.onnx`: what to export, from a Hugging Face folder or a Python factory.

SOURCE is a Hugging Face model folder (config.json and weights, as save_pretrained writes them),
loaded in FP32 with eager attention (plain MatMul / Softmax in the graph, which onnxq recognises)
and no KV cache: AutoModelForCausalLM when the config's architectures name a *ForCausalLM (output
`logits`), AutoModel otherwise (output `last_hidden_state`). The example inputs are `input_ids`
drawn at random from the vocabulary and an `attention_mask` of ones with the last quarter of the
last row padded (so the mask path is traced, not folded away); `token_type_ids` (zeros) too when
the model takes them; batch and sequence axes dynamic.

SOURCE may also be `file.py:factory`, a function taking no argument and returning
(module, example_inputs); axis 0 of every input and output is then dynamic.
"""

from __future__ import annotations

import importlib.util
import inspect
import json
import warnings
from pathlib import Path
from typing import Any

from onnxq.errors import OnnxqError
from onnxq.torch_export import export


def run_export(source: str, output: str, *, seq_len: int = 16, batch: int = 2, opset: int | None = None,
               exporter: str = "auto", log=print) -> Path:
    """Export SOURCE (see the module docstring) to `output`; OnnxqError for an unusable source."""
    if Path(output).suffix != ".onnx":
        raise OnnxqError(f"{output}: output path must end in .onnx")
    if not Path(output).parent.exists():
        raise OnnxqError(f"{Path(output).parent}: output folder does not exist")
    folder = Path(source)
    if not folder.is_dir() and ".py:" in source:
        module, inputs = _from_factory(source)
        path = export(module, inputs, output, opset=opset, exporter=exporter, log=log)
    else:
        module, inputs, names, output_name = _from_hf_folder(folder, seq_len=seq_len, batch=batch, log=log)
        axes = {n: {0: "batch", 1: "sequence"} for n in (*names, output_name)}
        path = export(module, inputs, output, input_names=names, output_names=[output_name], dynamic_axes=axes,
                      opset=opset, exporter=exporter, log=log)
    log(f"wrote {path}")
    return path


def _from_factory(source: str) -> tuple[Any, Any]:
    file, _, name = source.rpartition(":")
    if not Path(file).is_file():
        raise OnnxqError(f"{file}: no such Python file (SOURCE is a model folder or file.py:factory)")
    spec = importlib.util.spec_from_file_location(Path(file).stem, file)
    module_code = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module_code)
    except Exception as exc:
        raise OnnxqError(f"{file}: cannot import ({type(exc).__name__}: {exc})") from None
    factory = getattr(module_code, name, None)
    if not callable(factory):
        raise OnnxqError(f"{file}: has no function '{name}'")
    try:
        made = factory()
    except Exception as exc:  # the user's code: its failure is their error to read, not onnxq's
        raise OnnxqError(f"{source}: the factory failed ({type(exc).__name__}: {exc})") from None
    if not (isinstance(made, tuple) and len(made) == 2):
        raise OnnxqError(f"{source}: must return (module, example_inputs), not {type(made).__name__}")
    return made


def _from_hf_folder(folder: Path, *, seq_len: int, batch: int, log) -> tuple[Any, tuple, list[str], str]:
    if not folder.is_dir():
        raise OnnxqError(f"{folder}: not a folder (SOURCE is a Hugging Face model folder or file.py:factory)")
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise OnnxqError(f"{folder}: no config.json (SOURCE must be a Hugging Face model folder, as "
                         "save_pretrained writes it)")
    try:
        config = json.loads(config_file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise OnnxqError(f"{config_file}: unreadable ({exc})") from None
    causal = any(str(a).endswith("ForCausalLM") for a in config.get("architectures") or [])
    vocab = config.get("vocab_size")
    if not isinstance(vocab, int) or vocab < 1:
        raise OnnxqError(f"{config_file}: no vocab_size; only text models are exported from a folder "
                         "(export other models with file.py:factory or onnxq.export)")
    try:
        import torch
        import transformers
    except ImportError:
        raise OnnxqError("exporting a Hugging Face folder needs torch and transformers "
                         "(pip install torch transformers)") from None
    loader = transformers.AutoModelForCausalLM if causal else transformers.AutoModel
    bars = transformers.utils.logging.is_progress_bar_enabled()
    transformers.utils.logging.disable_progress_bar()  # a bar for loading a few files is noise
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = loader.from_pretrained(folder, dtype=torch.float32, attn_implementation="eager")
    except Exception as exc:
        raise OnnxqError(f"{folder}: transformers cannot load the model ({type(exc).__name__}: "
                         f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'no message'})") from None
    finally:
        if bars:
            transformers.utils.logging.enable_progress_bar()
    if getattr(model.config, "use_cache", None):
        model.config.use_cache = False
    log(f"export: {type(model).__name__} from {folder} (eager attention, FP32), example batch {batch} x {seq_len}")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (batch, seq_len), generator=generator, dtype=torch.int64)
    mask = torch.ones(batch, seq_len, dtype=torch.int64)
    if seq_len > 1:
        mask[-1, seq_len - max(1, seq_len // 4):] = 0
    names = ["input_ids", "attention_mask"]
    inputs = [ids, mask]
    if "token_type_ids" in inspect.signature(model.forward).parameters and config.get("type_vocab_size"):
        names.append("token_type_ids")
        inputs.append(torch.zeros_like(ids))
    output_name = "logits" if causal else "last_hidden_state"
    return _TextModel.wrap(model, output_name), tuple(inputs), names, output_name


class _TextModel:
    """A transformers model as a module of positional tensors returning one tensor, no cache."""

    @staticmethod
    def wrap(model, output_name: str):
        import torch

        class TextModel(torch.nn.Module):
            def __init__(self):
                super().__init__()
                self.model = model

            def forward(self, input_ids, attention_mask, token_type_ids=None):
                given = {"input_ids": input_ids, "attention_mask": attention_mask}
                if token_type_ids is not None:
                    given["token_type_ids"] = token_type_ids
                if output_name == "logits":
                    given["use_cache"] = False
                return getattr(self.model(**given), output_name)

        return TextModel().eval()
