"""Mixed-precision weights (allocate_bits): the solver, the grids, and the plan carried into the quantized model."""

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from conftest import assert_lint_clean, cli, rel_change, run


def mlp_model(seed: int = 0) -> onnx.ModelProto:
    """x[N, 32] → MatMul 32×64 → Relu → MatMul 64×64 → Relu → MatMul 64×8, the last (smallest) one hard to quantize."""
    rng = np.random.default_rng(seed)
    sizes = [(32, 64), (64, 64), (64, 8)]
    weights = [rng.normal(0, 0.2, s).astype(np.float32) for s in sizes]
    weights[2][:4, :] *= 40.0  # outliers in every output channel: per-channel scales cannot help at low widths
    nodes, x = [], "x"
    for i, w in enumerate(weights):
        nodes.append(helper.make_node("MatMul", [x, f"w{i}"], [f"m{i}"], name=f"layer{i}/MatMul"))
        x = f"m{i}"
        if i < len(weights) - 1:
            nodes.append(helper.make_node("Relu", [x], [f"r{i}"], name=f"layer{i}/Relu"))
            x = f"r{i}"
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 32])],
                              [helper.make_tensor_value_info(x, TensorProto.FLOAT, ["N", 8])],
                              [numpy_helper.from_array(w, f"w{i}") for i, w in enumerate(weights)])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)], ir_version=10)


@pytest.fixture
def files(tmp_path):
    onnx.save(mlp_model(), tmp_path / "mlp.onnx")
    np.savez(tmp_path / "calib.npz", x=np.random.default_rng(1).normal(size=(32, 32)).astype(np.float32))
    return tmp_path


def quantize(files, out, **options):
    import onnxq

    logs = []
    onnxq.quantize(str(files / "mlp.onnx"), str(files / "calib.npz"), output=str(out), batch_size=8,
                   show_progress=False, log=logs.append, **options)
    return logs


def test_solver_spends_bits_where_the_error_falls_most_and_keeps_the_budget():
    from onnxq.quant.bit_allocation import allocate

    sizes = {"big": 300, "small": 100, "touchy": 100}
    errors = {"big": {2: 4.0, 3: 2.0, 4: 1.0, 8: 0.0}, "small": {2: 1.0, 3: 0.5, 4: 0.2, 8: 0.0},
              "touchy": {2: 100.0, 3: 30.0, 4: 5.0, 8: 0.0}}
    plan = allocate(sizes, errors, budget=3.0, widths=(2, 3, 4, 8))
    assert plan.average <= 3.0 + 1e-9
    assert plan.bits == {"touchy": 4, "big": 3, "small": 2}  # touchy first; 8 bits for it would not fit
    assert plan.estimated_error < sum(errors[n][3] for n in sizes)  # better than everyone at 3 bits
    with pytest.raises(ValueError, match="below the narrowest"):
        allocate(sizes, errors, budget=1.5, widths=(2, 3, 4, 8))


def test_grids_of_each_width():
    from onnxq.quant.bit_allocation import weight_format

    assert (weight_format(2).qmin, weight_format(2).qmax, weight_format(2).dtype.name) == (-1, 1, "INT4")
    assert (weight_format(3).qmax, weight_format(6).qmax, weight_format(6).dtype.name) == (3, 31, "INT8")
    with pytest.raises(ValueError):
        weight_format(5)


def test_uniform_eight_bits_is_the_plain_recipe(files):
    quantize(files, files / "plain.onnx")
    quantize(files, files / "uniform8.onnx", bits_budget=8, bit_allocation="uniform")
    feed = {"x": np.random.default_rng(3).normal(size=(5, 32)).astype(np.float32)}
    assert np.array_equal(run(files / "plain.onnx", feed)[0], run(files / "uniform8.onnx", feed)[0])


@pytest.mark.parametrize("allocation", ["luq", "sensitivity"])
def test_allocated_model_keeps_the_budget_runs_and_lints(files, allocation):
    from onnxq.analysis.inspection import inspect_model
    from onnxq.ir.modelio import load_model

    out = files / f"{allocation}.onnx"
    quantize(files, out, bits_budget=3, bit_allocation=allocation)
    assert_lint_clean(str(out))
    widths = inspect_model(load_model(str(out))).weight_widths
    total = sum(v for _, v in widths.values())
    assert total == 32 * 64 + 64 * 64 + 64 * 8 and sum(b * v for b, (_, v) in widths.items()) / total <= 3.0 + 1e-9
    feed = {"x": np.random.default_rng(4).normal(size=(6, 32)).astype(np.float32)}
    assert rel_change(run(files / "mlp.onnx", feed)[0], run(out, feed)[0]) < 0.6
    model = onnx.load(out)
    stored = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    for node in model.graph.node:  # every weight's integers lie on its width's grid
        bits = next((int(p.value) for p in node.metadata_props if p.key == "onnxq.weight_bits"), None)
        if bits is None:
            continue
        dq = next(n for n in model.graph.node if n.output[0] == node.input[1])
        q = stored[dq.input[0]].astype(np.int32)
        assert np.abs(q).max() <= 2 ** (bits - 1) - 1


def test_solver_finds_the_best_plan_of_an_exhaustive_search():
    import itertools

    from onnxq.quant.bit_allocation import allocate

    rng = np.random.default_rng(0)
    widths = (2, 3, 4, 6, 8)
    for trial in range(20):
        sizes = {f"l{i}": int(n) for i, n in enumerate(rng.choice([256, 512, 1024, 4096], size=4))}
        errors = {n: dict(zip(widths, np.sort(rng.exponential(1.0, 5))[::-1] * rng.uniform(0.1, 10))) for n in sizes}
        budget = float(rng.uniform(2.2, 7.5))
        total = sum(sizes.values())
        best = min((sum(errors[n][b] for n, b in zip(sizes, plan)), plan)
                   for plan in itertools.product(widths, repeat=4)
                   if sum(sizes[n] * b for n, b in zip(sizes, plan)) <= budget * total)
        found = allocate(sizes, errors, budget, widths)
        assert found.average <= budget + 1e-9
        assert found.estimated_error == pytest.approx(best[0], rel=1e-12), trial


def test_sensitivity_plan_is_measured_no_worse_than_uniform(files, tmp_path):
    cache = tmp_path / "sens.json"
    quantize(files, files / "s.onnx", bits_budget=3, bit_allocation="sensitivity", bits_cache=str(cache))
    measured = {name: {int(b): e for b, e in row.items()} for name, row in json.loads(cache.read_text())["errors"].items()}
    widths = {n.name: int(p.value) for n in onnx.load(files / "s.onnx").graph.node
              for p in n.metadata_props if p.key == "onnxq.weight_bits"}
    chosen = sum(measured[f"w{i}"][widths[f"layer{i}/MatMul"]] for i in range(3))
    assert chosen <= sum(measured[f"w{i}"][3] for i in range(3)) + 1e-12
    assert all(measured[w][2] > measured[w][4] > measured[w][8] for w in measured)  # fewer bits, more error


def test_sensitivity_cache_is_reused_only_for_the_same_weights(files, tmp_path):
    cache = tmp_path / "sens.json"
    first = quantize(files, files / "a.onnx", bits_budget=4, bit_allocation="sensitivity", bits_cache=str(cache))
    assert cache.exists() and not any("read from" in line for line in first)
    assert set(json.loads(cache.read_text())["errors"]) == {"w0", "w1", "w2"}
    second = quantize(files, files / "b.onnx", bits_budget=3, bit_allocation="sensitivity", bits_cache=str(cache))
    assert any("read from" in line for line in second)
    onnx.save(mlp_model(seed=9), files / "mlp.onnx")  # other weights, same names: measured again
    third = quantize(files, files / "c.onnx", bits_budget=3, bit_allocation="sensitivity", bits_cache=str(cache))
    assert not any("read from" in line for line in third)


def test_command_line_budget_and_inspect(files, capsys):
    out = files / "cli.onnx"
    code, _, _ = cli(capsys, "quantize", files / "mlp.onnx", "--calib", files / "calib.npz", "-o", out,
                     "--bits-budget", "3.5", "--batch-size", "8")
    assert code == 0
    code, text, _ = cli(capsys, "inspect", out)
    assert code == 0 and "weight widths chosen by allocate_bits" in text
    with pytest.raises(SystemExit) as stop:
        cli(capsys, "quantize", files / "mlp.onnx", "--calib", files / "calib.npz", "-o", files / "x.onnx",
            "--bits-budget", "9")
    assert stop.value.code == 2 and "between 2 and 8" in capsys.readouterr().err and not (files / "x.onnx").exists()
