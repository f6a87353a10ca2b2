"""PETR-tiny: a small PETR-family multi-view 3D detector, with the original and the QFPE position embedding.

The structure follows PETR (Liu et al., ECCV 2022) and its reference code layout:

* a CNN backbone to stride 16 and a 1×1 input projection give the image features ("memory");
* the 3D position embedding (PE) of every feature cell comes from frustum points at D depth bins
  (linear-increasing discretisation, LID), lifted to the lidar frame by img2lidar = inverse(lidar2img),
  normalised by the position range, passed through inverse_sigmoid and encoded by two 1×1 convs;
  optionally (PETRv2) gated by the image features (SE layer);
* a post-LN transformer decoder: object queries start at zero, their positional query comes from
  learned 3D reference points via pos2posemb3d and an MLP; the cross-attention keys are memory + PE
  in every layer, the values are the memory alone;
* class and box heads shared by all layers; boxes regress the centre as an offset to the reference
  point in inverse-sigmoid space.

QFPE (FQ-PETR) swaps the PE for one ray point per feature cell at a fixed LiDAR-prior depth, embedded
per axis by linear interpolation between 3 learned anchors (a convex combination, so bounded), the
three axis embeddings concatenated and encoded by the same kind of 1×1-conv MLP. Concatenation rather
than a sum keeps the axes apart; the first conv of the encoder can still sum them if that helps.

Omitted from PETR: the multi-view sine embedding of the padding masks (`with_multiview`): with no
padding it is one constant tensor added to the PE, and the PE encoder's output bias can absorb its mean.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from onnxq_models.petr_data import CLASS_NAMES


@dataclass
class PETRConfig:
    """Hyper-parameters of a PETR-tiny model (stored in its checkpoint)."""

    num_classes: int = len(CLASS_NAMES)
    num_cameras: int = 6
    image_hw: tuple[int, int] = (128, 352)
    stride: int = 16
    backbone_channels: tuple[int, int, int, int] = (32, 48, 96, 160)
    embed_dims: int = 128
    num_heads: int = 8
    ffn_dims: int = 512
    num_layers: int = 3
    num_queries: int = 300
    # position embedding
    pe_type: str = "lid"  # "lid" (PETR) or "qfpe" (FQ-PETR)
    depth_num: int = 64  # PETR's default; 3·64 = 192 encoder input channels
    depth_start: float = 1.0
    position_range: tuple[float, ...] = (-61.2, -61.2, -10.0, 61.2, 61.2, 10.0)
    feature_guided_pe: bool = False  # PETRv2's SE gating of the PE by the image features
    # FQ-PETR's 30 m prior suits this data too: objects lie 5-50 m away (mean 27.5 m), and at 30 m the ray
    # point of every feature cell stays inside the position range (z from -9.4 to 9.7 m).
    qfpe_depth: float = 30.0  # LiDAR-prior depth of the single ray point
    qfpe_num_anchors: int = 3
    qfpe_anchor_dims: int = 64

    @property
    def feat_hw(self) -> tuple[int, int]:
        return self.image_hw[0] // self.stride, self.image_hw[1] // self.stride

    @staticmethod
    def from_dict(values: dict) -> PETRConfig:
        return PETRConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def inverse_sigmoid(x: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """log(x / (1 - x)) with x clamped to [0, 1] and both terms to at least eps (mmdet's version)."""
    x = x.clamp(min=0, max=1)
    return torch.log(x.clamp(min=eps) / (1 - x).clamp(min=eps))


def lid_depth_bins(depth_num: int, depth_start: float, depth_max: float) -> torch.Tensor:
    """PETR's linear-increasing depth bins: d_i = start + (max - start)/(D(D+1)) · i(i+1), i = 0..D-1."""
    index = torch.arange(depth_num, dtype=torch.float64)
    bin_size = (depth_max - depth_start) / (depth_num * (1 + depth_num))
    return depth_start + bin_size * index * (index + 1)


def feature_pixel_coords(feat_hw: tuple[int, int], image_hw: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Image row and column of each feature cell: arange(H) · img_h / H (PETR's coords_h, coords_w)."""
    (fh, fw), (ih, iw) = feat_hw, image_hw
    return (torch.arange(fh, dtype=torch.float64) * ih / fh, torch.arange(fw, dtype=torch.float64) * iw / fw)


def frustum_points(feat_hw: tuple[int, int], image_hw: tuple[int, int], depths: torch.Tensor,
                   eps: float = 1e-5) -> torch.Tensor:
    """Homogeneous image points (u·d, v·d, d, 1) of every feature cell and depth, shape (W, H, D, 4)."""
    coords_h, coords_w = feature_pixel_coords(feat_hw, image_hw)
    coords = torch.stack(torch.meshgrid(coords_w, coords_h, depths, indexing="ij"), dim=-1)  # (W, H, D, 3)
    coords = torch.cat([coords, torch.ones_like(coords[..., :1])], dim=-1)
    coords[..., :2] = coords[..., :2] * coords[..., 2:3].clamp(min=eps)
    return coords


def _pe_encoder(in_channels: int, embed_dims: int) -> nn.Sequential:
    """PETR's position encoder: Conv1x1(in -> 4E) -> ReLU -> Conv1x1(4E -> E)."""
    return nn.Sequential(nn.Conv2d(in_channels, 4 * embed_dims, 1), nn.ReLU(inplace=True),
                         nn.Conv2d(4 * embed_dims, embed_dims, 1))


class LIDPositionEmbedding(nn.Module):
    """PETR's 3D position embedding (PETRHead.position_embeding), from img2lidar (B, N, 4, 4) only."""

    def __init__(self, cfg: PETRConfig):
        super().__init__()
        self.feat_hw, self.depth_num = cfg.feat_hw, cfg.depth_num
        depths = lid_depth_bins(cfg.depth_num, cfg.depth_start, cfg.position_range[3])
        frustum = frustum_points(cfg.feat_hw, cfg.image_hw, depths)  # (W, H, D, 4)
        self.register_buffer("frustum", frustum.reshape(-1, 4).float(), persistent=False)
        pr = torch.tensor(cfg.position_range, dtype=torch.float32)
        self.register_buffer("range_min", pr[:3], persistent=False)
        self.register_buffer("range_span", pr[3:] - pr[:3], persistent=False)
        self.encoder = _pe_encoder(3 * cfg.depth_num, cfg.embed_dims)

    def normalized_points(self, img2lidar: torch.Tensor) -> torch.Tensor:
        """Frustum points in the lidar frame, normalised by the position range: (B·N, D·3, H, W),
        channel d·3 + axis (PETR's permute(0, 1, 4, 5, 3, 2)); not clamped to [0, 1]."""
        b, n = img2lidar.shape[:2]
        (fh, fw), d = self.feat_hw, self.depth_num
        points = torch.matmul(self.frustum, img2lidar.transpose(-1, -2))[..., :3]  # (B, N, W·H·D, 3)
        points = (points - self.range_min) / self.range_span
        points = points.reshape(b, n, fw, fh, d, 3).permute(0, 1, 4, 5, 3, 2)  # (B, N, D, 3, H, W)
        return points.reshape(b * n, d * 3, fh, fw)

    def forward(self, img2lidar: torch.Tensor) -> torch.Tensor:
        """PE (B, N, E, H, W)."""
        b, n = img2lidar.shape[:2]
        pe = self.encoder(inverse_sigmoid(self.normalized_points(img2lidar)))
        return pe.reshape(b, n, *pe.shape[1:])


class QFPEPositionEmbedding(nn.Module):
    """FQ-PETR's quantization-friendly PE: one ray point per cell at the prior depth, anchor-interpolated.

    Per axis a, the normalised coordinate c in [0, 1] is mapped to t = c · (n_anchors - 1) and embedded
    as sum_k relu(1 - |t - k|) · anchor[a, k]: the hat weights are the linear-interpolation weights of
    the two anchors around t (they sum to 1), written without Floor/Gather so it is differentiable and
    exports as Sub/Abs/Relu/MatMul.
    """

    def __init__(self, cfg: PETRConfig):
        super().__init__()
        self.feat_hw = cfg.feat_hw
        depth = torch.tensor([cfg.qfpe_depth], dtype=torch.float64)
        rays = frustum_points(cfg.feat_hw, cfg.image_hw, depth)[:, :, 0]  # (W, H, 4)
        self.register_buffer("ray_points", rays.permute(1, 0, 2).reshape(-1, 4).float(), persistent=False)  # (H·W, 4)
        pr = torch.tensor(cfg.position_range, dtype=torch.float32)
        self.register_buffer("range_min", pr[:3], persistent=False)
        self.register_buffer("range_span", pr[3:] - pr[:3], persistent=False)
        self.register_buffer("anchor_positions", torch.arange(cfg.qfpe_num_anchors, dtype=torch.float32),
                             persistent=False)
        self.anchors = nn.Parameter(torch.empty(3, cfg.qfpe_num_anchors, cfg.qfpe_anchor_dims))
        nn.init.uniform_(self.anchors, -0.5, 0.5)
        self.encoder = _pe_encoder(3 * cfg.qfpe_anchor_dims, cfg.embed_dims)

    def normalized_points(self, img2lidar: torch.Tensor) -> torch.Tensor:
        """The ray point of every cell in the lidar frame, normalised by the position range: (B, N, H·W, 3)."""
        points = torch.matmul(self.ray_points, img2lidar.transpose(-1, -2))[..., :3]
        return (points - self.range_min) / self.range_span

    def anchor_embedding(self, coords: torch.Tensor) -> torch.Tensor:
        """(..., 3) normalised coords -> (..., 3·A) concatenated per-axis anchor interpolations."""
        t = coords.clamp(0, 1) * (self.anchors.shape[1] - 1)
        weights = F.relu(1 - (t[..., None] - self.anchor_positions).abs())  # (..., 3, n_anchors)
        return torch.cat([torch.matmul(weights[..., a, :], self.anchors[a]) for a in range(3)], dim=-1)

    def forward(self, img2lidar: torch.Tensor) -> torch.Tensor:
        """PE (B, N, E, H, W)."""
        b, n = img2lidar.shape[:2]
        fh, fw = self.feat_hw
        emb = self.anchor_embedding(self.normalized_points(img2lidar))  # (B, N, H·W, 3A)
        emb = emb.reshape(b * n, fh, fw, -1).permute(0, 3, 1, 2)
        pe = self.encoder(emb)
        return pe.reshape(b, n, *pe.shape[1:])


class FeatureGuidedPE(nn.Module):
    """PETRv2's feature-guided PE: pe · sigmoid(conv(relu(conv(features)))), an SE-style gate."""

    def __init__(self, embed_dims: int):
        super().__init__()
        self.reduce = nn.Conv2d(embed_dims, embed_dims, 1)
        self.expand = nn.Conv2d(embed_dims, embed_dims, 1)

    def forward(self, pe: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        """pe, features: (B, N, E, H, W) -> gated pe of the same shape."""
        shape = pe.shape
        gate = torch.sigmoid(self.expand(F.relu(self.reduce(features.flatten(0, 1)))))
        return (pe.flatten(0, 1) * gate).reshape(shape)


def _conv_bn_relu(cin: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True))


class ResidualBlock(nn.Module):
    """Two 3×3 conv-BN layers with an identity shortcut (ResNet basic block)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = _conv_bn_relu(channels, channels, 1)
        self.conv2 = nn.Sequential(nn.Conv2d(channels, channels, 3, 1, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(x + self.conv2(self.conv1(x)))


class TinyBackbone(nn.Module):
    """A small ResNet-like CNN to stride 16 (four stride-2 stages, a residual block in the last three)."""

    def __init__(self, channels: tuple[int, int, int, int]):
        super().__init__()
        c1, c2, c3, c4 = channels
        self.layers = nn.Sequential(
            _conv_bn_relu(3, c1, 2),
            _conv_bn_relu(c1, c2, 2), ResidualBlock(c2),
            _conv_bn_relu(c2, c3, 2), ResidualBlock(c3),
            _conv_bn_relu(c3, c4, 2), ResidualBlock(c4),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class MultiHeadAttention(nn.Module):
    """Multi-head attention with separate q/k/v projections and explicit softmax(QKᵀ/√d)·V.

    Written out (not nn.MultiheadAttention) so that the ONNX graph shows MatMul(key, W_k) directly after
    the Add(memory, pe) and a plain Softmax: the nodes the quantization passes look for. As in PETR's
    attention, key_pos is added to the key and query_pos to the query; the value gets no position.
    """

    def __init__(self, embed_dims: int, num_heads: int):
        super().__init__()
        self.num_heads, self.head_dims = num_heads, embed_dims // num_heads
        self.q_proj = nn.Linear(embed_dims, embed_dims)
        self.k_proj = nn.Linear(embed_dims, embed_dims)
        self.v_proj = nn.Linear(embed_dims, embed_dims)
        self.out_proj = nn.Linear(embed_dims, embed_dims)

    def forward(self, query, key, value, query_pos=None, key_pos=None):
        """query (B, Lq, E), key/value (B, Lk, E) -> (B, Lq, E)."""
        if query_pos is not None:
            query = query + query_pos
        if key_pos is not None:
            key = key + key_pos
        b, lq, e = query.shape
        q = self.q_proj(query).reshape(b, lq, self.num_heads, self.head_dims).transpose(1, 2)
        k = self.k_proj(key).reshape(b, -1, self.num_heads, self.head_dims).transpose(1, 2)
        v = self.v_proj(value).reshape(b, -1, self.num_heads, self.head_dims).transpose(1, 2)
        attn = torch.softmax(torch.matmul(q, k.transpose(-1, -2)) / math.sqrt(self.head_dims), dim=-1)
        return self.out_proj(torch.matmul(attn, v).transpose(1, 2).reshape(b, lq, e))


class DecoderLayer(nn.Module):
    """Post-LN decoder layer: self_attn -> norm -> cross_attn -> norm -> ffn -> norm (PETR's order)."""

    def __init__(self, embed_dims: int, num_heads: int, ffn_dims: int):
        super().__init__()
        self.self_attn = MultiHeadAttention(embed_dims, num_heads)
        self.cross_attn = MultiHeadAttention(embed_dims, num_heads)
        self.ffn = nn.Sequential(nn.Linear(embed_dims, ffn_dims), nn.ReLU(inplace=True), nn.Linear(ffn_dims, embed_dims))
        self.norm1, self.norm2, self.norm3 = (nn.LayerNorm(embed_dims) for _ in range(3))

    def forward(self, target, query_pos, memory, memory_pos):
        target = self.norm1(target + self.self_attn(target, target, target, query_pos, query_pos))
        target = self.norm2(target + self.cross_attn(target, memory, memory, query_pos, memory_pos))
        return self.norm3(target + self.ffn(target))


def pos2posemb3d(pos: torch.Tensor, num_pos_feats: int, temperature: float = 10000.0) -> torch.Tensor:
    """Sine/cosine embedding of normalised 3D points (..., 3) -> (..., 3·num_pos_feats), order y, x, z."""
    pos = pos * 2 * math.pi
    dim_t = torch.arange(num_pos_feats, dtype=torch.float32, device=pos.device)
    dim_t = temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / num_pos_feats)
    parts = []
    for axis in (1, 0, 2):
        angles = pos[..., axis, None] / dim_t
        parts.append(torch.stack([angles[..., 0::2].sin(), angles[..., 1::2].cos()], dim=-1).flatten(-2))
    return torch.cat(parts, dim=-1)


BOX_DIMS = 8  # x, y, z, w, l, h, sin(yaw), cos(yaw)


class PETR(nn.Module):
    """PETR-tiny. `forward(images, img2lidar)` -> per-layer class logits and boxes.

    Box regression space (what the L1 loss sees): (x, y, z) in metres, (log w, log l, log h), sin, cos;
    `metric_boxes` turns it into (x, y, z, w, l, h, sin, cos).
    """

    def __init__(self, cfg: PETRConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or PETRConfig()
        e = cfg.embed_dims
        self.backbone = TinyBackbone(cfg.backbone_channels)
        self.input_proj = nn.Conv2d(cfg.backbone_channels[-1], e, 1)
        self.position_embedding = LIDPositionEmbedding(cfg) if cfg.pe_type == "lid" else QFPEPositionEmbedding(cfg)
        self.feature_guided_pe = FeatureGuidedPE(e) if cfg.feature_guided_pe else None
        self.reference_points = nn.Embedding(cfg.num_queries, 3)
        nn.init.uniform_(self.reference_points.weight, 0, 1)
        self.query_embedding = nn.Sequential(nn.Linear(3 * e // 2, e), nn.ReLU(inplace=True), nn.Linear(e, e))
        self.layers = nn.ModuleList(DecoderLayer(e, cfg.num_heads, cfg.ffn_dims) for _ in range(cfg.num_layers))
        self.post_norm = nn.LayerNorm(e)
        self.cls_branch = nn.Sequential(nn.Linear(e, e), nn.LayerNorm(e), nn.ReLU(inplace=True),
                                        nn.Linear(e, e), nn.LayerNorm(e), nn.ReLU(inplace=True),
                                        nn.Linear(e, cfg.num_classes))
        self.reg_branch = nn.Sequential(nn.Linear(e, e), nn.ReLU(inplace=True), nn.Linear(e, e), nn.ReLU(inplace=True),
                                        nn.Linear(e, BOX_DIMS))
        nn.init.constant_(self.cls_branch[-1].bias, -math.log((1 - 0.01) / 0.01))  # focal-loss prior
        pr = torch.tensor(cfg.position_range, dtype=torch.float32)
        self.register_buffer("range_min", pr[:3], persistent=False)
        self.register_buffer("range_span", pr[3:] - pr[:3], persistent=False)

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Normalised images (B, N, 3, H, W) -> memory features (B, N, E, H/16, W/16)."""
        b, n = images.shape[:2]
        feats = self.input_proj(self.backbone(images.flatten(0, 1)))
        return feats.reshape(b, n, *feats.shape[1:])

    def position_embed(self, img2lidar: torch.Tensor) -> torch.Tensor:
        """The PE (B, N, E, H, W): a function of the calibration only (before any feature gating)."""
        return self.position_embedding(img2lidar)

    def forward(self, images: torch.Tensor, img2lidar: torch.Tensor, all_layers: bool = True, queries=None):
        """images (B, N, 3, H, W), img2lidar (B, N, 4, 4) -> class logits (L, B, Q, C) and regression
        outputs (L, B, Q, 8) of every decoder layer, or of the last only, (B, Q, C) and (B, Q, 8)."""
        return self.forward_with_pe(images, self.position_embed(img2lidar), all_layers, queries)

    def forward_with_pe(self, images: torch.Tensor, pos_embed: torch.Tensor, all_layers: bool = True, queries=None):
        """As forward, with the PE (B, N, E, H, W) given: the deployment form, PE computed outside."""
        feats = self.image_features(images)
        if self.feature_guided_pe is not None:
            pos_embed = self.feature_guided_pe(pos_embed, feats)
        return self.decode(feats, pos_embed, all_layers, queries)

    def query_geometry(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Positional query (1, Q, E) from the reference points (pos2posemb3d + MLP), and the reference
        points in inverse-sigmoid space (Q, 3). Both depend on weights only: an exported graph gets them
        as constants."""
        reference = self.reference_points.weight  # normalised [0, 1] coords, used as is (PETR)
        query_pos = self.query_embedding(pos2posemb3d(reference, self.cfg.embed_dims // 2))
        return query_pos.unsqueeze(0), inverse_sigmoid(reference)

    def decode(self, feats: torch.Tensor, pos_embed: torch.Tensor, all_layers: bool = True,
               queries: tuple[torch.Tensor, torch.Tensor] | None = None):
        """Decoder and heads on memory and PE, both (B, N, E, H, W); see forward for the outputs.
        `queries` is query_geometry() precomputed (the export passes it as constants)."""
        b = feats.shape[0]
        memory = feats.permute(0, 1, 3, 4, 2).flatten(1, 3)  # (B, N·H·W, E)
        memory_pos = pos_embed.permute(0, 1, 3, 4, 2).flatten(1, 3)
        query_pos, reference_logit = queries if queries is not None else self.query_geometry()
        if query_pos.shape[0] != b:
            query_pos = query_pos.expand(b, -1, -1)
        target = torch.zeros_like(query_pos)  # PETR's queries start at zero, positions come from query_pos
        logits, regs = [], []
        for i, layer in enumerate(self.layers):
            target = layer(target, query_pos, memory, memory_pos)
            if all_layers or i == len(self.layers) - 1:
                out = self.post_norm(target)
                logits.append(self.cls_branch(out))
                regs.append(self._regress(self.reg_branch(out), reference_logit))
        return (torch.stack(logits), torch.stack(regs)) if all_layers else (logits[0], regs[0])

    def _regress(self, raw: torch.Tensor, reference_logit: torch.Tensor) -> torch.Tensor:
        """Centre = sigmoid(offset + inverse_sigmoid(reference)) scaled to the position range, in metres."""
        centre = torch.sigmoid(raw[..., :3] + reference_logit) * self.range_span + self.range_min
        return torch.cat([centre, raw[..., 3:]], dim=-1)


def metric_boxes(regressed: torch.Tensor) -> torch.Tensor:
    """Regression space (x, y, z, log w, log l, log h, sin, cos) -> (x, y, z, w, l, h, sin, cos)."""
    return torch.cat([regressed[..., :3], regressed[..., 3:6].exp(), regressed[..., 6:]], dim=-1)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def save_checkpoint(model: PETR, path: str | Path, meta: dict | None = None) -> None:
    """Config, fp32 state dict and free-form metadata (training command, metrics) in one torch file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().float() if v.is_floating_point() else v.cpu() for k, v in model.state_dict().items()}
    torch.save({"config": asdict(model.cfg), "state_dict": state, "meta": meta or {}}, path)


def load_checkpoint(path: str | Path, map_location: str = "cpu") -> tuple[PETR, dict]:
    """A PETR model in eval mode (fp32) and the checkpoint's metadata."""
    data = torch.load(path, map_location=map_location, weights_only=False)
    model = PETR(PETRConfig.from_dict(data["config"]))
    model.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in data["state_dict"].items()})
    return model.eval(), data.get("meta", {})


# ---------------------------------------------------------------------------------------------
# Training loss: Hungarian matching with a focal classification cost and an L1 box cost (DETR3D/PETR).


def box_targets(gt_boxes: torch.Tensor) -> torch.Tensor:
    """Ground truth (M, 7) x, y, z, w, l, h, yaw -> regression space (M, 8) x, y, z, log w/l/h, sin, cos."""
    yaw = gt_boxes[:, 6:7]
    return torch.cat([gt_boxes[:, :3], gt_boxes[:, 3:6].log(), yaw.sin(), yaw.cos()], dim=1)


def focal_cost(logits: torch.Tensor, labels: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0,
               eps: float = 1e-12) -> torch.Tensor:
    """Matching cost (Q, M) of predicting class labels[m] with query q (mmdet's FocalLossCost)."""
    prob = logits.sigmoid()[:, labels]
    positive = -(prob + eps).log() * alpha * (1 - prob).pow(gamma)
    negative = -(1 - prob + eps).log() * (1 - alpha) * prob.pow(gamma)
    return positive - negative


def sigmoid_focal_loss(logits: torch.Tensor, targets: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Summed focal loss of logits against 0/1 targets of the same shape."""
    prob = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, targets, reduction="none")
    p_t = prob * targets + (1 - prob) * (1 - targets)
    weight = (alpha * targets + (1 - alpha) * (1 - targets)) * (1 - p_t).pow(gamma)
    return (weight * ce).sum()


class HungarianLoss(nn.Module):
    """Per decoder layer and scene, match queries to ground truth one-to-one (Hungarian algorithm on
    cls_weight · focal cost + box_weight · L1 cost), then focal loss on all queries (unmatched ones
    are background) and L1 on the matched boxes, each normalised by the number of ground-truth boxes.
    Weights as in PETR's configs (2.0 and 0.25)."""

    def __init__(self, num_classes: int, cls_weight: float = 2.0, box_weight: float = 0.25):
        super().__init__()
        self.num_classes, self.cls_weight, self.box_weight = num_classes, cls_weight, box_weight

    @torch.no_grad()
    def match(self, logits: torch.Tensor, regs: torch.Tensor, targets: list[torch.Tensor],
              labels: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Per layer, the matched (scene, query, ground-truth) index triples of the whole batch, ground
        truth indexed into the batch's concatenated boxes. One host transfer for all cost matrices."""
        from scipy.optimize import linear_sum_assignment

        num_layers, num_scenes, num_queries = logits.shape[:3]
        costs = []
        for layer in range(num_layers):
            for b in range(num_scenes):
                cost = self.cls_weight * focal_cost(logits[layer, b], labels[b])
                cost = cost + self.box_weight * torch.cdist(regs[layer, b], targets[b], p=1)
                costs.append(cost.flatten())
        flat = torch.cat(costs).float().cpu().numpy()
        sizes = [len(l) for l in labels]
        gt_offsets = np.cumsum([0] + sizes)
        result, offset = [], 0
        for layer in range(num_layers):
            scene_idx, query_idx, gt_idx = [], [], []
            for b, m in enumerate(sizes):
                rows, cols = linear_sum_assignment(flat[offset:offset + num_queries * m].reshape(num_queries, m))
                offset += num_queries * m
                scene_idx.append(np.full(len(rows), b))
                query_idx.append(rows)
                gt_idx.append(cols + gt_offsets[b])
            result.append(tuple(torch.as_tensor(np.concatenate(i), dtype=torch.int64).to(logits.device, non_blocking=True)
                                for i in (scene_idx, query_idx, gt_idx)))
        return result

    def forward(self, logits: torch.Tensor, regs: torch.Tensor, gt_boxes: list[torch.Tensor],
                gt_labels: list[torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        """logits (L, B, Q, C), regs (L, B, Q, 8) -> total loss and its parts (summed over layers)."""
        targets = [box_targets(b) for b in gt_boxes]
        matches = self.match(logits, regs, targets, gt_labels)
        all_targets, all_labels = torch.cat(targets), torch.cat(gt_labels)
        num_gt = max(len(all_labels), 1)
        cls_total, box_total = logits.new_zeros(()), logits.new_zeros(())
        for layer, (scene, query, gt) in enumerate(matches):
            onehot = torch.zeros_like(logits[layer])
            onehot[scene, query, all_labels[gt]] = 1.0
            cls_total = cls_total + sigmoid_focal_loss(logits[layer], onehot) / num_gt
            box_total = box_total + (regs[layer, scene, query] - all_targets[gt]).abs().sum() / num_gt
        total = self.cls_weight * cls_total + self.box_weight * box_total
        return total, {"cls": float(cls_total.detach()), "box": float(box_total.detach())}
