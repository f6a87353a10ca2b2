"""PETR-tiny: position embeddings against their definitions, synthetic data, loss, export, checkpoints."""

import math
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from onnxq_models import petr, petr_data, petr_eval, petr_export

CHECKPOINTS = Path(__file__).resolve().parents[1] / "models" / "checkpoints"
SMALL_RIG = petr_data.CameraRig(image_hw=(64, 176))


pytestmark = pytest.mark.usefixtures("torch_one_thread")


def small_config(**overrides) -> petr.PETRConfig:
    """A PETR-tiny shrunk for fast tests: 64×176 images (4×11 features), 8 depth bins, 20 queries."""
    values = {"image_hw": (64, 176), "backbone_channels": (8, 8, 16, 16), "embed_dims": 32, "num_heads": 4, "ffn_dims": 64,
                  "num_layers": 2, "num_queries": 20, "depth_num": 8, "qfpe_anchor_dims": 8}
    values.update(overrides)
    return petr.PETRConfig(**values)


def small_model(seed=0, **overrides) -> petr.PETR:
    torch.manual_seed(seed)
    return petr.PETR(small_config(**overrides)).eval()


def img2lidar(rig=SMALL_RIG) -> torch.Tensor:
    return torch.as_tensor(rig.img2lidar(), dtype=torch.float32)[None]


# --- position embeddings ------------------------------------------------------------------------


def test_lid_depth_bins_follow_petr():
    depths = petr.lid_depth_bins(64, 1.0, 61.2)
    bin_size = 60.2 / (64 * 65)
    assert depths[0] == 1.0
    assert depths[1] == pytest.approx(1.0 + 2 * bin_size)
    assert depths[-1] == pytest.approx(1.0 + bin_size * 63 * 64)  # 59.35 m
    assert depths[-1] == pytest.approx(59.3477, abs=1e-4)


def test_inverse_sigmoid_is_clamped_at_eps():
    x = torch.tensor([-1.0, 0.0, 0.5, 1.0, 2.0])
    bound = math.log((1 - 1e-5) / 1e-5)  # 11.5129
    assert petr.inverse_sigmoid(x).tolist() == pytest.approx([-bound, -bound, 0.0, bound, bound], abs=1e-4)


def test_lid_pe_matches_a_direct_loop_over_cells_and_depths():
    """normalized_points follows PETR: frustum (u·d, v·d, d, 1) through img2lidar, normalised by the
    position range, channel d·3 + axis; the PE is the encoder of its inverse_sigmoid."""
    model = small_model()
    cfg, pe = model.cfg, model.position_embedding
    inv = img2lidar()
    points = pe.normalized_points(inv)  # (N, D·3, H, W)
    (fh, fw), (ih, iw) = cfg.feat_hw, cfg.image_hw
    depths = petr.lid_depth_bins(cfg.depth_num, cfg.depth_start, cfg.position_range[3]).numpy()
    pr = np.array(cfg.position_range)
    matrices = SMALL_RIG.img2lidar()
    for cam, row, col, d in [(0, 0, 0, 0), (3, 2, 7, 5), (5, 3, 10, 7), (1, 1, 4, 3)]:
        u, v = col * iw / fw, row * ih / fh
        xyz = (matrices[cam] @ np.array([u * depths[d], v * depths[d], depths[d], 1.0]))[:3]
        expected = (xyz - pr[:3]) / (pr[3:] - pr[:3])
        assert points[cam, d * 3:d * 3 + 3, row, col].numpy() == pytest.approx(expected, abs=1e-5)
    with torch.no_grad():
        direct = pe.encoder(petr.inverse_sigmoid(points))
        assert torch.allclose(pe(inv)[0], direct, atol=1e-6)


def test_frustum_points_project_back_to_their_pixels():
    rig = petr_data.CameraRig()
    cfg = petr.PETRConfig()
    pe = petr.LIDPositionEmbedding(cfg)
    points = torch.matmul(pe.frustum.double(), torch.as_tensor(rig.img2lidar()).transpose(-1, -2))  # (N, WHD, 4)
    back = torch.matmul(points, torch.as_tensor(rig.lidar2img()).transpose(-1, -2))
    assert torch.allclose(back, pe.frustum.double().expand_as(back), rtol=1e-6, atol=1e-6)


def test_qfpe_interpolation_is_linear_between_adjacent_anchors():
    model = small_model(pe_type="qfpe")
    qfpe = model.position_embedding
    coords = torch.tensor([[0.0, 0.5, 1.0], [0.25, 0.8, -0.3], [1.7, 0.49, 0.51]])
    got = qfpe.anchor_embedding(coords)
    anchors, n = qfpe.anchors.detach(), qfpe.anchors.shape[1]
    for i, point in enumerate(coords):
        for axis in range(3):
            t = float(point[axis].clamp(0, 1)) * (n - 1)
            low = min(math.floor(t), n - 2)
            frac = t - low
            expected = (1 - frac) * anchors[axis, low] + frac * anchors[axis, low + 1]  # Floor/Gather/lerp form
            dims = anchors.shape[2]
            assert torch.allclose(got[i, axis * dims:(axis + 1) * dims], expected, atol=1e-6)
    # A convex combination never leaves the anchors' range.
    dense = qfpe.anchor_embedding(torch.rand(1000, 3) * 1.4 - 0.2)
    assert dense.abs().max() <= anchors.abs().max() + 1e-6


def test_qfpe_ray_points_sit_at_the_prior_depth():
    model = small_model(pe_type="qfpe")
    qfpe = model.position_embedding
    cfg = model.cfg
    pr = torch.tensor(cfg.position_range)
    points = qfpe.normalized_points(img2lidar())[0] * (pr[3:] - pr[:3]) + pr[:3]  # (N, H·W, 3) metres
    homogeneous = torch.cat([points, torch.ones_like(points[..., :1])], -1).double()
    image = torch.matmul(homogeneous, torch.as_tensor(SMALL_RIG.lidar2img()).transpose(-1, -2))
    assert torch.allclose(image[..., 2], torch.full_like(image[..., 2], cfg.qfpe_depth), atol=1e-3)


# --- model ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("pe_type,feature_guided", [("lid", False), ("qfpe", False), ("lid", True)])
def test_forward_shapes(pe_type, feature_guided):
    model = small_model(pe_type=pe_type, feature_guided_pe=feature_guided)
    cfg = model.cfg
    images = torch.randn(2, 6, 3, *cfg.image_hw)
    with torch.no_grad():
        logits, regs = model(images, img2lidar().expand(2, -1, -1, -1))
        last_logits, last_regs = model(images, img2lidar().expand(2, -1, -1, -1), all_layers=False)
        pe = model.position_embed(img2lidar())
    assert logits.shape == (cfg.num_layers, 2, cfg.num_queries, cfg.num_classes)
    assert regs.shape == (cfg.num_layers, 2, cfg.num_queries, 8)
    assert torch.allclose(last_logits, logits[-1], atol=1e-5) and torch.allclose(last_regs, regs[-1], atol=1e-5)
    assert pe.shape == (1, 6, cfg.embed_dims, *cfg.feat_hw)
    # Box centres stay inside the position range (sigmoid-bounded offsets to the reference points).
    pr = cfg.position_range
    assert (regs[..., 0].abs() <= pr[3]).all() and (regs[..., 2] >= pr[2]).all() and (regs[..., 2] <= pr[5]).all()


def test_hungarian_loss_matches_exact_predictions():
    model = small_model()
    gt_boxes = [torch.tensor([[10.0, 2.0, 0.8, 1.9, 4.6, 1.6, 0.3], [-5.0, 7.0, 0.9, 0.7, 0.7, 1.8, -1.0]])]
    gt_labels = [torch.tensor([0, 2])]
    logits = torch.full((1, 1, 20, 5), -8.0)
    regs = torch.zeros(1, 1, 20, 8)
    targets = petr.box_targets(gt_boxes[0])
    regs[0, 0, 7], regs[0, 0, 3] = targets[0], targets[1]
    logits[0, 0, 7, 0], logits[0, 0, 3, 2] = 8.0, 8.0
    criterion = petr.HungarianLoss(model.cfg.num_classes)
    (_scene, query, gt), = criterion.match(logits, regs, targets=[targets], labels=gt_labels)
    assert dict(zip(gt.tolist(), query.tolist())) == {0: 7, 1: 3}
    _loss, parts = criterion(logits, regs, gt_boxes, gt_labels)
    assert parts["box"] == pytest.approx(0.0, abs=1e-5)
    assert parts["cls"] < 1e-3


def test_checkpoint_roundtrip(tmp_path):
    model = small_model(pe_type="qfpe")
    path = tmp_path / "m.pt"
    petr.save_checkpoint(model, path, {"note": "x"})
    loaded, meta = petr.load_checkpoint(path)
    images = torch.randn(1, 6, 3, *model.cfg.image_hw)
    with torch.no_grad():
        assert torch.equal(model(images, img2lidar())[0], loaded(images, img2lidar())[0])
    assert meta == {"note": "x"} and loaded.cfg == model.cfg


# --- synthetic data -----------------------------------------------------------------------------


def test_dataset_is_deterministic_and_independent_of_batching():
    data = petr_data.SyntheticDetectionSet("val", seed=3, rig=SMALL_RIG)
    pair, single, again = data.render([3, 4]), data.render([4]), data.render([3, 4])
    assert torch.equal(pair.images, again.images)
    assert torch.equal(pair.images[1], single.images[0])
    assert torch.equal(pair.gt_boxes[1], single.gt_boxes[0]) and torch.equal(pair.gt_labels[1], single.gt_labels[0])
    train = petr_data.SyntheticDetectionSet("train", seed=3, rig=SMALL_RIG).render([4])
    assert not torch.equal(train.images[0], single.images[0])
    scene = data.scenes([4])[0]
    assert 6 <= len(scene.labels) <= petr_data.MAX_OBJECTS
    assert np.all(np.hypot(scene.boxes[:, 0], scene.boxes[:, 1]) <= 50.0)
    assert np.allclose(scene.boxes[:, 2], scene.boxes[:, 5] / 2)  # standing on the ground


def test_renderer_draws_an_object_where_the_camera_projects_it():
    rig = SMALL_RIG
    car = petr_data.Scene(boxes=np.array([[15.0, 0.0, 0.8, 1.9, 4.6, 1.6, 0.0]]), labels=np.array([0]),
                          colours=np.array([[0.7, 0.16, 0.14]]), ground_tone=0.4,
                          sun=np.array([0.0, 0.0, 1.0]), noise_seed=1)
    empty = petr_data.Scene(car.boxes[:0], car.labels[:0], car.colours[:0], 0.4, car.sun, 1)
    renderer = petr_data.Renderer(rig)
    images, visible = renderer.render(petr_data.SceneBatch.stack([car], "cpu"))
    background, _ = renderer.render(petr_data.SceneBatch.stack([empty], "cpu"))
    u, v, d, _ = rig.lidar2img()[0] @ np.array([15.0, 0.0, 0.8, 1.0])  # centre seen by the front camera
    row, col = int(v / d), int(u / d)
    pixel = images[0, 0, :, row, col].float() / 255
    assert pixel[0] > 1.5 * pixel[1]  # the red body, not the grey road or blue-grey sky
    assert (pixel - background[0, 0, :, row, col].float() / 255).abs().sum() > 0.2
    assert visible[0, 0] >= petr_data.MIN_VISIBLE_PIXELS
    assert torch.equal(background[0, 3], images[0, 3])  # the back camera looks away


# --- ONNX export ----------------------------------------------------------------------------------


@pytest.mark.parametrize("pe_type", ["lid", "qfpe"])
@pytest.mark.parametrize("pe_form", ["in_graph", "input"])
def test_onnx_export_runs_in_onnxruntime_and_matches_torch(tmp_path, pe_type, pe_form):
    model = small_model(pe_type=pe_type)
    path = petr_export.export_onnx(model, tmp_path / "petr.onnx", pe_form, rig=SMALL_RIG)
    images = np.random.default_rng(0).standard_normal((1, 6, 3, *model.cfg.image_hw)).astype(np.float32)
    feeds = petr_export.example_inputs(model, pe_form, images, rig=SMALL_RIG)
    graph = onnx.load(path).graph
    assert [i.name for i in graph.input] == list(feeds)
    assert [o.name for o in graph.output] == ["cls_logits", "boxes"]
    ops = {n.op_type for n in graph.node}
    # inverse_sigmoid (Log) only where the LID PE is computed in the graph; the form-B graph has no PE math.
    assert ("Log" in ops) == (pe_type == "lid" and pe_form == "in_graph")
    logits, boxes = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).run(None, feeds)
    with torch.no_grad():
        ref_logits, ref_regs = model(torch.from_numpy(images), img2lidar(), all_layers=False)
    assert np.abs(logits - ref_logits.numpy()).max() < 1e-4
    assert np.abs(boxes - petr.metric_boxes(ref_regs).numpy()).max() < 1e-3  # metres, sizes after exp
    assert model.training is False  # exporting leaves the model in eval mode


def test_pos_embed_input_equals_the_in_graph_pe():
    model = small_model()
    pos_embed = petr_export.compute_pos_embed(model, petr_export.rig_img2lidar(SMALL_RIG))
    with torch.no_grad():
        assert np.allclose(pos_embed, model.position_embed(img2lidar()).numpy())


# --- committed checkpoints ------------------------------------------------------------------------


@pytest.mark.parametrize("name,pe_type", [("petr_tiny_lid.pt", "lid"), ("petr_tiny_qfpe.pt", "qfpe"),
                                          ("petr_tiny_qfpe_qat.pt", "qfpe")])
def test_committed_checkpoints_load_and_detect(name, pe_type):
    path = CHECKPOINTS / name
    if not path.exists():
        pytest.skip(f"{path} not present")
    assert path.stat().st_size < 10e6
    model, _meta = petr.load_checkpoint(path)
    assert model.cfg.pe_type == pe_type and petr.count_parameters(model) < 2.5e6
    data = petr_data.SyntheticDetectionSet("val", seed=0).render([0, 1, 2, 3])
    with torch.no_grad():
        inv = torch.as_tensor(petr_data.CameraRig().img2lidar(), dtype=torch.float32)[None].expand(4, -1, -1, -1)
        logits, regs = model(petr_data.images_to_input(data.images), inv, all_layers=False)
    boxes = petr.metric_boxes(regs)
    dets = [petr_eval.decode_detections(logits[i].numpy(), boxes[i].numpy()) for i in range(4)]
    truths = [petr_eval.GroundTruth(b.numpy(), l.numpy()) for b, l in zip(data.gt_boxes, data.gt_labels)]
    assert petr_eval.evaluate(dets, truths, petr_data.CLASS_NAMES).mAP > 0.3  # chance is ~0


# --- quantization-aware fine-tuning (models/petr_qat.py) ------------------------------------------


def test_qat_hooks_quantize_on_a_grid_and_leave_a_plain_float_model():
    from onnxq_models import petr_qat

    model = small_model()
    layer = model.query_embedding[0]
    seen = []
    layer.register_forward_hook(lambda m, args, out: seen.append(args[0].detach().clone()))
    x = torch.randn(5, layer.in_features) * 3
    keys = set(model.state_dict())
    float_weight = layer.weight.detach().clone()

    state = petr_qat.attach(model, weights=True)
    model.train()
    y_q = layer(x)
    steps = seen[-1] / (x.abs().max() / 127)  # the hooked input lies on the INT8 grid of its own |max|
    assert torch.allclose(steps, steps.round(), atol=1e-3) and not torch.equal(seen[-1], x)
    w = layer.weight  # parametrized: per-tensor INT8 grid
    assert torch.allclose(w / (float_weight.abs().max() / 127), (w / (float_weight.abs().max() / 127)).round(), atol=1e-3)
    y_q.sum().backward()  # straight-through: gradients reach the float weight
    assert layer.parametrizations.weight.original.grad is not None

    petr_qat.detach(state)
    assert set(model.state_dict()) == keys and torch.equal(layer.weight, float_weight)
    seen.clear()
    layer(x)
    assert torch.equal(seen[-1], x)  # hooks gone
