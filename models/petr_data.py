"""Synthetic multi-view 3D detection data for the PETR reference models.

No nuScenes data can be had here, so the data set is made: a six-camera rig laid out like
nuScenes' (front, front-right, front-left, back, back-left, back-right) looks at scenes of boxes
standing on a ground plane, rendered per camera with a z-buffer. Everything is deterministic from
a seed: scene `i` of a split is drawn from its own numpy generator seeded with (seed, split, i), so
a scene does not depend on which batch it was rendered in.

Frames: the ego/"lidar" frame has x forward, y left, z up, origin on the ground under the ego
centre (PETR's lidar frame is at roof height; on a flat ground plane this only shifts z). Cameras
use the OpenCV convention (x right, y down, z forward). `lidar2img` maps homogeneous ego points to
(u·d, v·d, d, 1) with d the camera depth, exactly what PETR's frustum points invert.

Boxes are (x, y, z, w, l, h, yaw): centre in metres, l along the heading (local +x), w across it,
h vertical; yaw is counter-clockwise from the ego x axis. The front face of every object is drawn
lighter and the back face darker, so the heading is visible in the image and yaw is learnable
modulo 2π (a plain coloured box would only fix it modulo π).

The renderer is written in torch, so the same code runs on the CPU (validation split, cached under
`.cache/`) and on the GPU (training batches rendered on the fly, an endless stream of scenes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

SPLIT_IDS = {"train": 0, "val": 1, "test": 2}
MAX_OBJECTS = 16  # scenes hold 6..MAX_OBJECTS objects; batches are padded to this many
MIN_VISIBLE_PIXELS = 8  # an object seen by fewer pixels (all cameras together) is not a target
IMAGE_MEAN = 0.45  # images_to_input: (x/255 - mean) / std, the same for every channel
IMAGE_STD = 0.25


@dataclass(frozen=True)
class ObjectClass:
    """A detection class: its typical box size (w, l, h) in metres, colour and share of objects."""

    name: str
    size_wlh: tuple[float, float, float]
    colour: tuple[float, float, float]
    frequency: float


OBJECT_CLASSES: tuple[ObjectClass, ...] = (
    ObjectClass("car", (1.9, 4.6, 1.6), (0.70, 0.16, 0.14), 0.38),
    ObjectClass("truck", (2.5, 7.5, 3.0), (0.88, 0.62, 0.12), 0.12),
    ObjectClass("pedestrian", (0.7, 0.7, 1.75), (0.20, 0.42, 0.85), 0.22),
    ObjectClass("cyclist", (0.7, 1.8, 1.6), (0.18, 0.66, 0.30), 0.13),
    ObjectClass("barrier", (2.2, 0.5, 1.0), (0.92, 0.92, 0.88), 0.15),
)
CLASS_NAMES: tuple[str, ...] = tuple(c.name for c in OBJECT_CLASSES)


@dataclass(frozen=True)
class Camera:
    """One pinhole camera of the rig: heading of its optical axis, mounting point and field of view."""

    name: str
    yaw_deg: float  # optical axis heading in the ego frame, counter-clockwise from +x
    position: tuple[float, float, float]  # camera centre in the ego frame, metres
    hfov_deg: float  # horizontal field of view


# nuScenes' layout and fields of view (front 64°, sides 70°, back ~90°), cameras 1.5 m above ground.
NUSCENES_LIKE_CAMERAS: tuple[Camera, ...] = (
    Camera("CAM_FRONT", 0.0, (1.7, 0.0, 1.5), 64.0),
    Camera("CAM_FRONT_RIGHT", -55.0, (1.5, -0.5, 1.5), 70.0),
    Camera("CAM_FRONT_LEFT", 55.0, (1.5, 0.5, 1.5), 70.0),
    Camera("CAM_BACK", 180.0, (-1.0, 0.0, 1.5), 90.0),
    Camera("CAM_BACK_LEFT", 110.0, (-0.4, 0.5, 1.5), 70.0),
    Camera("CAM_BACK_RIGHT", -110.0, (-0.4, -0.5, 1.5), 70.0),
)


@dataclass(frozen=True)
class CameraRig:
    """A fixed multi-camera rig: intrinsics scaled to the image size and extrinsics to the ego frame.

    The horizon sits at `horizon_row_frac` of the image height (like PETR's crop of the lower part of
    the nuScenes images), so more ground than sky is seen.
    """

    cameras: tuple[Camera, ...] = NUSCENES_LIKE_CAMERAS
    image_hw: tuple[int, int] = (128, 352)
    horizon_row_frac: float = 0.375

    @property
    def num_cameras(self) -> int:
        return len(self.cameras)

    def intrinsics(self) -> np.ndarray:
        """(N, 3, 3) pinhole matrices, square pixels, float64."""
        h, w = self.image_hw
        ks = np.zeros((self.num_cameras, 3, 3))
        for i, cam in enumerate(self.cameras):
            focal = (w / 2) / math.tan(math.radians(cam.hfov_deg) / 2)
            ks[i] = [[focal, 0, w / 2], [0, focal, self.horizon_row_frac * h], [0, 0, 1]]
        return ks

    def cam2ego(self) -> np.ndarray:
        """(N, 4, 4) camera-to-ego transforms (columns: camera right, down, forward, position)."""
        poses = np.zeros((self.num_cameras, 4, 4))
        for i, cam in enumerate(self.cameras):
            yaw = math.radians(cam.yaw_deg)
            right = [math.sin(yaw), -math.cos(yaw), 0.0]
            down = [0.0, 0.0, -1.0]
            forward = [math.cos(yaw), math.sin(yaw), 0.0]
            poses[i, :3, :3] = np.array([right, down, forward]).T
            poses[i, :3, 3] = cam.position
            poses[i, 3, 3] = 1.0
        return poses

    def lidar2img(self) -> np.ndarray:
        """(N, 4, 4) float64: ego point (x, y, z, 1) -> (u·d, v·d, d, 1), as in PETR's img_metas."""
        k4 = np.tile(np.eye(4), (self.num_cameras, 1, 1))
        k4[:, :3, :3] = self.intrinsics()
        return k4 @ np.linalg.inv(self.cam2ego())

    def img2lidar(self) -> np.ndarray:
        """(N, 4, 4) float64 inverse of lidar2img, computed on the host as PETR does (np.linalg.inv)."""
        return np.linalg.inv(self.lidar2img())

    def pixel_rays(self) -> tuple[np.ndarray, np.ndarray]:
        """Ray origins (N, 3) and unit directions (N, H·W, 3) in the ego frame through pixel centres."""
        h, w = self.image_hw
        v, u = np.meshgrid(np.arange(h) + 0.5, np.arange(w) + 0.5, indexing="ij")
        pix = np.stack([u.ravel(), v.ravel(), np.ones(h * w)], axis=0)  # (3, H·W)
        poses = self.cam2ego()
        dirs = np.einsum("nij,njk,kp->npi", poses[:, :3, :3], np.linalg.inv(self.intrinsics()), pix)
        dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True)
        return poses[:, :3, 3].copy(), dirs


@dataclass
class Scene:
    """One sampled scene before rendering (numpy, ego frame)."""

    boxes: np.ndarray  # (K, 7) x, y, z, w, l, h, yaw
    labels: np.ndarray  # (K,) class index
    colours: np.ndarray  # (K, 3) body colour in [0, 1]
    ground_tone: float  # grey level of the road
    sun: np.ndarray  # (3,) unit vector towards the sun
    noise_seed: int  # seeds the sensor noise of this scene's images


def scene_rng(seed: int, split: str, index: int) -> np.random.Generator:
    """The generator of scene `index` of `split`: independent of batching and of the device."""
    return np.random.default_rng([seed, SPLIT_IDS[split], index])


def sample_scene(rng: np.random.Generator, min_objects: int = 6, max_objects: int = MAX_OBJECTS,
                 max_range: float = 50.0, min_range: float = 5.0) -> Scene:
    """Draw objects of class-typical size and colour, random yaw, standing on the ground.

    Distance from the ego is uniform in [min_range, max_range] (so near objects are denser, as on a
    road), bearing uniform; objects whose bounding circles overlap are redrawn.
    """
    freqs = np.array([c.frequency for c in OBJECT_CLASSES])
    count = int(rng.integers(min_objects, max_objects + 1))
    boxes, labels, colours, circles = [], [], [], []
    for _ in range(count):
        for _attempt in range(20):
            label = int(rng.choice(len(OBJECT_CLASSES), p=freqs / freqs.sum()))
            spec = OBJECT_CLASSES[label]
            w, l, h = np.array(spec.size_wlh) * rng.uniform(0.9, 1.1, size=3)
            radius, bearing = rng.uniform(min_range, max_range), rng.uniform(-math.pi, math.pi)
            x, y = radius * math.cos(bearing), radius * math.sin(bearing)
            footprint = 0.5 * math.hypot(w, l)
            if all(math.hypot(x - cx, y - cy) > footprint + cr + 0.3 for cx, cy, cr in circles):
                break
        else:
            continue  # crowded: leave this object out
        yaw = rng.uniform(-math.pi, math.pi)
        circles.append((x, y, footprint))
        boxes.append([x, y, h / 2, w, l, h, yaw])
        labels.append(label)
        colours.append(np.clip(np.array(spec.colour) + rng.uniform(-0.08, 0.08, size=3), 0, 1))
    sun_azimuth, sun_elevation = rng.uniform(-math.pi, math.pi), rng.uniform(0.5, 1.1)
    sun = np.array([math.cos(sun_azimuth) * math.cos(sun_elevation),
                    math.sin(sun_azimuth) * math.cos(sun_elevation), math.sin(sun_elevation)])
    return Scene(
        boxes=np.array(boxes, dtype=np.float64).reshape(-1, 7),
        labels=np.array(labels, dtype=np.int64),
        colours=np.array(colours, dtype=np.float64).reshape(-1, 3),
        ground_tone=float(rng.uniform(0.30, 0.45)),
        sun=sun,
        noise_seed=int(rng.integers(2**62)),
    )


@dataclass
class SceneBatch:
    """Scenes stacked and padded to MAX_OBJECTS, as torch tensors on one device."""

    boxes: torch.Tensor  # (B, K, 7)
    labels: torch.Tensor  # (B, K), -1 for padding
    colours: torch.Tensor  # (B, K, 3)
    ground_tone: torch.Tensor  # (B,)
    sun: torch.Tensor  # (B, 3)
    noise_seeds: list[int]

    @staticmethod
    def stack(scenes: list[Scene], device: torch.device | str) -> SceneBatch:
        k = MAX_OBJECTS
        boxes = np.zeros((len(scenes), k, 7))
        boxes[..., 3:6] = 1.0  # harmless size for padding slots (they never hit: masked)
        labels = -np.ones((len(scenes), k), dtype=np.int64)
        colours = np.zeros((len(scenes), k, 3))
        for i, s in enumerate(scenes):
            n = len(s.labels)
            boxes[i, :n], labels[i, :n], colours[i, :n] = s.boxes, s.labels, s.colours

        def as_tensor(a, dtype=torch.float32):
            return torch.as_tensor(a, dtype=dtype, device=device)

        return SceneBatch(as_tensor(boxes), as_tensor(labels, torch.int64), as_tensor(colours),
                          as_tensor([s.ground_tone for s in scenes]), as_tensor(np.stack([s.sun for s in scenes])),
                          [s.noise_seed for s in scenes])


class Renderer:
    """Z-buffered ray casting of boxes over a ground plane and sky, for one camera rig, in torch."""

    HORIZON_COLOUR = (0.75, 0.80, 0.86)
    ZENITH_COLOUR = (0.35, 0.52, 0.82)
    HAZE_COLOUR = (0.72, 0.76, 0.80)
    HAZE_DISTANCE = 250.0  # metres; colour fades towards haze as 1 - exp(-distance / this)

    def __init__(self, rig: CameraRig, device: torch.device | str = "cpu"):
        self.rig = rig
        self.device = torch.device(device)
        origins, dirs = rig.pixel_rays()
        self.origins = torch.as_tensor(origins, dtype=torch.float32, device=self.device)  # (N, 3)
        self.dirs = torch.as_tensor(dirs, dtype=torch.float32, device=self.device)  # (N, P, 3)
        self._backgrounds = [self._background(self.origins[c], self.dirs[c]) for c in range(rig.num_cameras)]

    def render(self, batch: SceneBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Images (B, N, 3, H, W) uint8 and the visible pixel count of every object (B, K)."""
        num_scenes, num_objects = batch.labels.shape
        h, w = self.rig.image_hw
        images, visible = [], torch.zeros(num_scenes, num_objects + 1, device=self.device)
        for cam in range(self.rig.num_cameras):
            colour, hit_index = self._render_camera(batch, cam)
            visible.scatter_add_(1, hit_index, torch.ones_like(hit_index, dtype=visible.dtype))
            images.append(colour.permute(0, 2, 1).reshape(num_scenes, 3, h, w))
        images = torch.stack(images, dim=1)
        images = images + 0.015 * self._sensor_noise(batch.noise_seeds, images.shape[1:])
        images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
        return images, visible[:, :num_objects]

    def _sensor_noise(self, seeds: list[int], shape: torch.Size) -> torch.Tensor:
        """Per-scene Gaussian noise, each scene from its own generator (batch-independent)."""
        noise = []
        for seed in seeds:
            gen = torch.Generator(device=self.device).manual_seed(seed)
            noise.append(torch.randn(shape, generator=gen, device=self.device))
        return torch.stack(noise)

    def _render_camera(self, batch: SceneBatch, cam: int):
        """Colour (B, P, 3) of one camera's pixels and the object slot each pixel sees (K where none)."""
        origin, dirs = self.origins[cam], self.dirs[cam]
        slots = self._objects_in_view(batch, cam)  # (B, Kc) indices into the K object slots
        boxes = batch.boxes.gather(1, slots[..., None].expand(-1, -1, 7))
        labels = batch.labels.gather(1, slots)
        depth, box_index, face_axis = self._cast_boxes(boxes, labels, origin, dirs)
        hit = torch.isfinite(depth)
        box_index = slots.gather(1, box_index)  # back to the scene's object slots

        # The face normal in the hit box's frame: along the entry axis, against the ray.
        yaw = batch.boxes[..., 6].gather(1, box_index)  # (B, P)
        cos, sin = yaw.cos(), yaw.sin()
        local_dir = torch.stack([cos * dirs[:, 0] + sin * dirs[:, 1], -sin * dirs[:, 0] + cos * dirs[:, 1],
                                 dirs[:, 2].expand_as(cos)])  # (3, B, P)
        face_sign = -torch.sign(local_dir.gather(0, face_axis[None]).squeeze(0))
        normal_x = face_sign * (face_axis == 0)
        normal_y = face_sign * (face_axis == 1)
        normal = torch.stack([cos * normal_x - sin * normal_y, sin * normal_x + cos * normal_y,
                              (face_axis == 2).to(cos.dtype)], dim=-1)

        # Lambert shading with ambient light; front face (+x local) lighter, back face darker.
        lambert = 0.45 + 0.55 * (normal * batch.sun[:, None, :]).sum(-1).clamp(min=0)
        body = batch.colours.gather(1, box_index[..., None].expand(-1, -1, 3))
        body = torch.where((normal_x > 0)[..., None], 0.45 * body + 0.55, body)
        body = torch.where((normal_x < 0)[..., None], 0.45 * body, body)
        obj_colour = body * lambert[..., None]

        sky, ground_hit, ground_pattern, ground_dist = self._backgrounds[cam]
        ground = (batch.ground_tone[:, None] * ground_pattern)[..., None] * dirs.new_tensor([1.0, 0.98, 0.94])
        background = torch.where(ground_hit[:, None], ground, sky)
        colour = torch.where(hit[..., None], obj_colour, background)
        # Haze with distance: a depth cue, like real atmosphere.
        dist = torch.where(hit, depth, ground_dist)
        haze = (1 - torch.exp(-dist / self.HAZE_DISTANCE))[..., None]
        colour = colour * (1 - haze) + haze * dirs.new_tensor(self.HAZE_COLOUR)
        hit_index = torch.where(hit, box_index, torch.full_like(box_index, batch.labels.shape[1]))
        return colour, hit_index

    def _objects_in_view(self, batch: SceneBatch, cam: int) -> torch.Tensor:
        """Slots (B, Kc) of the objects whose bounding sphere may reach camera `cam`'s horizontal field
        of view, the others after them; Kc is the largest such count in the batch.

        Culling before the ray casting makes it about three times cheaper. A scene with fewer objects
        in view than Kc also casts a few culled ones: wasted work, same image.
        """
        spec = self.rig.cameras[cam]
        yaw, half_fov = math.radians(spec.yaw_deg), math.radians(spec.hfov_deg) / 2
        rel = batch.boxes[..., :2] - self.origins[cam, :2]
        forward = rel[..., 0] * math.cos(yaw) + rel[..., 1] * math.sin(yaw)
        left = -rel[..., 0] * math.sin(yaw) + rel[..., 1] * math.cos(yaw)
        radius = 0.5 * batch.boxes[..., 3:6].norm(dim=-1)
        inside = (forward > -radius) & (forward * math.sin(half_fov) - left.abs() * math.cos(half_fov) > -radius)
        inside &= batch.labels >= 0
        order = torch.argsort((~inside).to(torch.int8), dim=1, stable=True)
        count = max(int(inside.sum(1).max()), 1)
        return order[:, :count]

    @staticmethod
    def _cast_boxes(boxes: torch.Tensor, labels: torch.Tensor, origin: torch.Tensor, dirs: torch.Tensor):
        """Nearest box hit along each ray: the slab test in each box's own frame.

        boxes (B, K, 7) and labels (B, K) (-1 = no object); origin (3,) and unit dirs (P, 3).
        Returns depth (B, P) (inf where no box is hit), the index of the box hit (B, P), and the local
        axis (0, 1, 2) through whose face the ray enters it.
        """
        centres, sizes, yaw = boxes[..., :3], boxes[..., 3:6], boxes[..., 6]
        half = torch.stack([sizes[..., 1], sizes[..., 0], sizes[..., 2]], dim=-1) / 2  # (l, w, h)/2 on local x, y, z
        cos, sin = yaw.cos()[..., None], yaw.sin()[..., None]  # (B, K, 1)
        rel = origin - centres  # (B, K, 3): ray origin relative to each box centre
        local_origin = [cos * rel[..., 0:1] + sin * rel[..., 1:2], -sin * rel[..., 0:1] + cos * rel[..., 1:2],
                        rel[..., 2:3]]  # each (B, K, 1)
        local_dir = [cos * dirs[:, 0] + sin * dirs[:, 1], -sin * dirs[:, 0] + cos * dirs[:, 1], dirs[:, 2]]
        entries, exits = [], []
        for axis in range(3):
            # A direction component of exactly 0 gives ±inf slab times, which the min/max handle.
            inv = 1.0 / local_dir[axis]
            t1 = (-half[..., axis:axis + 1] - local_origin[axis]) * inv
            t2 = (half[..., axis:axis + 1] - local_origin[axis]) * inv
            entries.append(torch.minimum(t1, t2))
            exits.append(torch.maximum(t1, t2))
        near, entry_axis = torch.stack(torch.broadcast_tensors(*entries)).max(dim=0)  # (B, K, P)
        far = torch.minimum(torch.minimum(exits[0], exits[1]), exits[2])
        hit = (near <= far) & (near > 0) & (labels >= 0)[..., None]
        depth, box_index = near.masked_fill(~hit, math.inf).min(dim=1)  # (B, P)
        return depth, box_index, entry_axis.gather(1, box_index[:, None]).squeeze(1)

    def _background(self, origin: torch.Tensor, dirs: torch.Tensor):
        """Per camera, scene-independent: sky colour (P, 3), ground-hit mask (P,), ground brightness
        pattern (P,) (4 m checker tiles) and the distance to what the ray meets (P,) (far for sky)."""
        up = dirs[:, 2]
        ground_hit = up < -1e-6
        t_ground = torch.where(ground_hit, -origin[2] / up.clamp(max=-1e-6), torch.full_like(up, 1e4))
        point = origin + t_ground[:, None] * dirs
        checker = (torch.floor(point[:, 0] / 4) + torch.floor(point[:, 1] / 4)) % 2
        elevation = (up * 2.5).clamp(0, 1)[:, None]
        sky = (1 - elevation) * up.new_tensor(self.HORIZON_COLOUR) + elevation * up.new_tensor(self.ZENITH_COLOUR)
        return sky, ground_hit, 0.9 + 0.18 * checker, t_ground


@dataclass
class DetectionBatch:
    """Rendered scenes with their targets: what a training or evaluation step consumes."""

    images: torch.Tensor  # (B, N, 3, H, W) uint8
    gt_boxes: list[torch.Tensor]  # per scene (M, 7) x, y, z, w, l, h, yaw (visible objects only)
    gt_labels: list[torch.Tensor]  # per scene (M,)
    indices: list[int] = field(default_factory=list)

    def to(self, device: torch.device | str) -> DetectionBatch:
        return DetectionBatch(self.images.to(device), [b.to(device) for b in self.gt_boxes],
                              [l.to(device) for l in self.gt_labels], self.indices)


def images_to_input(images: torch.Tensor) -> torch.Tensor:
    """uint8 images -> the normalised float input of the model."""
    return (images.float() / 255.0 - IMAGE_MEAN) / IMAGE_STD


class SyntheticDetectionSet:
    """A split of the synthetic data set: scenes drawn from (seed, split, index), rendered on demand."""

    def __init__(self, split: str = "train", seed: int = 0, rig: CameraRig | None = None,
                 device: torch.device | str = "cpu"):
        self.split, self.seed = split, seed
        self.rig = rig or CameraRig()
        self.renderer = Renderer(self.rig, device)

    def scenes(self, indices: list[int]) -> list[Scene]:
        return [sample_scene(scene_rng(self.seed, self.split, i)) for i in indices]

    def render(self, indices: list[int], scenes: list[Scene] | None = None) -> DetectionBatch:
        """Render scenes `indices` (sampled here unless given); targets keep the objects that at least
        MIN_VISIBLE_PIXELS pixels see."""
        batch = SceneBatch.stack(scenes if scenes is not None else self.scenes(indices), self.renderer.device)
        images, visible = self.renderer.render(batch)
        keep = (batch.labels >= 0) & (visible >= MIN_VISIBLE_PIXELS)
        return DetectionBatch(images, [batch.boxes[i][keep[i]] for i in range(len(indices))],
                              [batch.labels[i][keep[i]] for i in range(len(indices))], list(indices))


class SceneStream(torch.utils.data.Dataset):
    """Item s = the scenes of training step s (indices s·B .. s·B + B - 1), for a DataLoader whose
    workers sample scenes on the CPU while the GPU renders and trains (use batch_size=None)."""

    def __init__(self, split: str, seed: int, batch_size: int, num_steps: int):
        self.split, self.seed, self.batch_size, self.num_steps = split, seed, batch_size, num_steps

    def __len__(self) -> int:
        return self.num_steps

    def __getitem__(self, step: int) -> tuple[list[int], list[Scene]]:
        indices = list(range(step * self.batch_size, (step + 1) * self.batch_size))
        return indices, [sample_scene(scene_rng(self.seed, self.split, i)) for i in indices]


def load_split(split: str, num_scenes: int, seed: int = 0, rig: CameraRig | None = None,
               cache_dir: str | Path | None = ".cache/petr_synth", chunk: int = 8) -> DetectionBatch:
    """Render (on the CPU) or load from cache the first `num_scenes` scenes of a split.

    Rendering takes about 0.06 s a scene on two idle CPU cores (300 scenes in ~20 s); busy cores
    make it several times slower, hence the cache.

    The cache is a plain torch file keyed by split, seed, size and image size; it is never committed.
    """
    rig = rig or CameraRig()
    path = None
    if cache_dir is not None:
        h, w = rig.image_hw
        path = Path(cache_dir) / f"{split}_seed{seed}_n{num_scenes}_{h}x{w}.pt"
        if path.exists():
            data = torch.load(path)
            return DetectionBatch(data["images"], data["gt_boxes"], data["gt_labels"], data["indices"])
    dataset = SyntheticDetectionSet(split, seed, rig, "cpu")
    parts = [dataset.render(list(range(s, min(s + chunk, num_scenes)))) for s in range(0, num_scenes, chunk)]
    result = DetectionBatch(torch.cat([p.images for p in parts]), [b for p in parts for b in p.gt_boxes],
                            [l for p in parts for l in p.gt_labels], list(range(num_scenes)))
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"images": result.images, "gt_boxes": result.gt_boxes, "gt_labels": result.gt_labels,
                    "indices": result.indices}, path)
    return result
