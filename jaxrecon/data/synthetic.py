"""Procedural synthetic birds: the embedded default dataset, with 3D ground truth.

Everything a CUB example has (image, soft mask, 5-part probability map, 15 keypoints in CUB's order)
plus what no CUB benchmark can give: the true camera, the true shape as a deformation of jaxrecon's
own 642-vertex sphere (so it is in vertex correspondence with every prediction), per-face colours,
and renders of the unseen side.

Canonical frame (the same as the model's): x forward (toward the beak), **y left-right** (the mirror
plane is y = 0, `geometry.mesh`), z up. Left is +y.

Recipe, deterministic from (seed, index):

* **Shape.** A union of ellipsoids (body, neck, head, beak, tail), each mirror-symmetric, with random
  proportions and pose (head and tail pitch). Each sphere vertex is pushed along its direction to the
  outermost crossing of the union (a star-shaped hull around the body centre), so the ground truth is
  a deformation of the template sphere.
* **Parts** (0 background, 1 head, 2 neck, 3 back, 4 belly — SCOPS's CUB order): the ellipsoid a
  surface point is deepest in; the body and tail split into back (upper) and belly (lower).
* **Texture** at every texel centre (`mesh.texel_barycentrics`): per-part colours, wing stripes on the
  back, spots on the belly, and a small eye on each side of the head (dark pupil, light ring) that
  spans only a few texels — the fine detail texture learning must recover.
* **Camera.** Weak perspective ``[s, tx, ty, q]`` with CUB-like statistics: mostly side views (azimuth
  near 0° or 180° about the up axis), elevation around 10°, scale filling most of the frame.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from scipy import ndimage
from scipy.spatial.transform import Rotation

from jaxrecon import render
from jaxrecon.geometry import camera
from jaxrecon.geometry import mesh as mesh_lib

PART_NAMES = ("background", "head", "neck", "back", "belly")
KEYPOINT_NAMES = ("Back", "Beak", "Belly", "Breast", "Crown", "FHead", "LEye", "LLeg", "LWing", "Nape",
                  "REye", "RLeg", "RWing", "Tail", "Throat")
# CUB's horizontal-flip permutation of the keypoints (``kp_perm`` in NVlabs/UMR data/cub.py, 0-indexed).
KEYPOINT_FLIP = np.array([1, 2, 3, 4, 5, 6, 11, 12, 13, 10, 7, 8, 9, 14, 15]) - 1

# Ellipsoid indices in `BirdShape.ellipsoids`.
BODY, NECK, HEAD, BEAK, TAIL = range(5)


@dataclasses.dataclass(frozen=True)
class BirdShape:
  """One bird: ellipsoids (centres (5, 3), radii (5, 3), pitch angles (5,)), colours and eye position."""
  centres: np.ndarray
  radii: np.ndarray
  pitch: np.ndarray
  colours: dict
  stripe_frequency: float
  spot_density: float
  eye_centre: np.ndarray      # (3,) on the left (+y) side of the head
  eye_radius: float


def _pitch_matrix(angle: float) -> np.ndarray:
  """Rotation about the y axis (keeps the mirror plane y = 0)."""
  c, s = np.cos(angle), np.sin(angle)
  return np.array([[c, 0.0, s], [0.0, 1.0, 0.0], [-s, 0.0, c]])


def _random_colour(rng, lo=0.05, hi=0.95):
  return rng.uniform(lo, hi, size=3)


def sample_bird(rng: np.random.Generator) -> BirdShape:
  """Draw random proportions, pose and colours of one bird."""
  body = np.array([rng.uniform(0.42, 0.55), rng.uniform(0.20, 0.27), rng.uniform(0.22, 0.30)])
  head_r = rng.uniform(0.13, 0.18)
  neck_pitch = rng.uniform(-0.3, 0.5)          # head raised or lowered
  neck_len = rng.uniform(0.12, 0.22)
  neck_dir = np.array([np.cos(0.7 + neck_pitch), 0.0, np.sin(0.7 + neck_pitch)])
  neck_base = np.array([0.7 * body[0], 0.0, 0.35 * body[2]])
  head_c = neck_base + neck_dir * (neck_len + 0.6 * head_r)
  beak_len = rng.uniform(0.07, 0.16)
  beak_pitch = rng.uniform(-0.35, 0.1)
  beak_dir = np.array([np.cos(beak_pitch), 0.0, np.sin(beak_pitch)])
  beak_c = head_c + beak_dir * (0.85 * head_r + 0.5 * beak_len)
  tail_len = rng.uniform(0.22, 0.4)
  tail_pitch = rng.uniform(-0.5, 0.15)
  tail_dir = np.array([-np.cos(tail_pitch), 0.0, np.sin(tail_pitch)])
  tail_c = np.array([-0.75 * body[0], 0.0, 0.05]) + tail_dir * 0.5 * tail_len
  centres = np.stack([np.zeros(3), (neck_base + head_c) / 2, head_c, beak_c, tail_c])
  radii = np.stack([body, [0.5 * np.linalg.norm(head_c - neck_base) + 0.02, 0.75 * head_r, 0.75 * head_r],
                    [head_r] * 3, [0.5 * beak_len, 0.22 * head_r, 0.18 * head_r],
                    [0.5 * tail_len, rng.uniform(0.09, 0.14), 0.035]])
  pitch = np.array([0.0, -(0.7 + neck_pitch), 0.0, -beak_pitch, -tail_pitch])
  eye_dir = np.array([0.45, 0.78, 0.3])
  eye_dir /= np.linalg.norm(eye_dir)
  colours = {
      "head": _random_colour(rng), "back": _random_colour(rng), "belly": _random_colour(rng, 0.4, 1.0),
      "beak": np.array([rng.uniform(0.6, 1.0), rng.uniform(0.3, 0.8), rng.uniform(0.0, 0.2)]),
      "stripe": _random_colour(rng, 0.0, 0.5), "spot": _random_colour(rng, 0.0, 0.6),
  }
  return BirdShape(centres=centres, radii=radii, pitch=pitch, colours=colours,
                   stripe_frequency=rng.uniform(6.0, 14.0), spot_density=rng.uniform(0.0, 0.5),
                   eye_centre=head_c + head_r * eye_dir, eye_radius=rng.uniform(0.3, 0.4) * head_r)


def _depth_rows(bird: BirdShape, points: np.ndarray) -> np.ndarray:
  """`ellipsoid_depth` transposed, (5, N): one contiguous row per ellipsoid.

  Written out per coordinate (the pitch turns only x and z) rather than as (N, 3) @ (3, 3) matmuls:
  for tens of thousands of points this is several times faster than BLAS (whose threads only get in
  each other's way on a small shared CPU), and the rows make `_deepest`'s comparisons contiguous.
  """
  x, y, z = np.ascontiguousarray(np.asarray(points, np.float64).T)
  rows = []
  for (cx, cy, cz), (rx, ry, rz), a in zip(bird.centres, bird.radii, bird.pitch):
    c, s = np.cos(a), np.sin(a)
    dx, dz = x - cx, z - cz
    lx, ly, lz = (dx * c - dz * s) / rx, (y - cy) / ry, (dx * s + dz * c) / rz   # _pitch_matrix
    rows.append(lx * lx + ly * ly + lz * lz)
  return np.stack(rows)


def ellipsoid_depth(bird: BirdShape, points: np.ndarray) -> np.ndarray:
  """Implicit value of each ellipsoid at points: (N, 3) -> (N, 5), < 1 inside."""
  return _depth_rows(bird, points).T


def _deepest(bird: BirdShape, points: np.ndarray) -> np.ndarray:
  """Index (N,) of the ellipsoid each point (N, 3) is deepest in (np.argmin over `ellipsoid_depth`:
  the first on ties), by four comparisons of whole rows, much faster than argmin over a length-5 axis."""
  depth = _depth_rows(bird, points)
  best, index = depth[0], np.zeros(depth.shape[1], np.int64)
  for k in range(1, len(depth)):
    index[depth[k] < best] = k
    best = np.minimum(best, depth[k])
  return index


def radial_surface(bird: BirdShape, directions: np.ndarray) -> np.ndarray:
  """Distance along each unit direction (N, 3) to the outermost surface of the union: (N,).

  Closed form: the ray t·d meets ellipsoid k where a t² + b t + c = 0 in the ellipsoid's frame; the
  outermost crossing of the union is the largest far root over the ellipsoids the ray meets (the
  body contains the origin, so every ray meets at least the body).
  """
  far = np.zeros(len(directions))
  for c, r, a in zip(bird.centres, bird.radii, bird.pitch):
    rot = _pitch_matrix(a)
    d = (directions @ rot) / r              # ray direction in the unit-sphere frame
    o = (-c @ rot) / r                      # ray origin (the bird's centre) in that frame
    qa = np.sum(d * d, axis=-1)
    qb = 2.0 * (d @ o)
    qc = o @ o - 1.0
    disc = qb * qb - 4.0 * qa * qc
    root = (-qb + np.sqrt(np.maximum(disc, 0.0))) / (2.0 * qa)
    far = np.where((disc >= 0) & (root > far), root, far)
  return far


def bird_vertices(bird: BirdShape, sphere: mesh_lib.SymmetricMesh) -> np.ndarray:
  """The bird as a deformation of the template sphere: (V, 3), exactly mirror-symmetric."""
  half = sphere.half(sphere.vertices)
  radius = radial_surface(bird, half / np.linalg.norm(half, axis=1, keepdims=True))
  return sphere.symmetrize(half * radius[:, None])


# Part of the ellipsoid a point is deepest in (body, neck, head, beak, tail); 0: back or belly by height.
_PART_OF_ELLIPSOID = np.array([0, 2, 1, 1, 0])


def _part_labels(bird: BirdShape, flat: np.ndarray, deepest: np.ndarray) -> np.ndarray:
  """Part labels (N,) of points (N, 3) given the index of the ellipsoid each is deepest in (N,)."""
  upper = flat[:, 2] > 0.15 * bird.radii[BODY, 2] * (1 - np.abs(flat[:, 0]) / bird.radii[BODY, 0])
  by_ellipsoid = _PART_OF_ELLIPSOID[deepest]
  return np.where(by_ellipsoid > 0, by_ellipsoid, 4 - upper)   # body and tail: back (3) if upper


def part_labels(bird: BirdShape, points: np.ndarray) -> np.ndarray:
  """Part index (1 head, 2 neck, 3 back, 4 belly) of surface points (..., 3)."""
  flat = points.reshape(-1, 3)
  return _part_labels(bird, flat, _deepest(bird, flat)).reshape(points.shape[:-1])


def _hash_noise(points: np.ndarray, scale: float, seed: int) -> np.ndarray:
  """Cheap deterministic value noise in [0, 1] on a 3D lattice of cell size 1/scale."""
  cells = np.floor(points * scale).astype(np.int64)
  h = (cells[..., 0] * 73856093) ^ (cells[..., 1] * 19349663) ^ (cells[..., 2] * 83492791) ^ seed
  return ((h * 2654435761) % 2**32) / 2**32


_EYE_RING, _PUPIL = np.array([0.95, 0.95, 0.85]), np.array([0.03, 0.03, 0.03])


# Points per block in `surface_colour`. Blocks keep each float64 temporary under glibc's mmap
# threshold (128 KiB), so malloc reuses memory instead of mapping fresh pages for every operation: on
# a bird's 46k texels at once, the page faults cost more than the arithmetic.
_BLOCK = 8192


def surface_colour(bird: BirdShape, points: np.ndarray) -> np.ndarray:
  """RGB in [0, 1] of surface points (..., 3): parts, stripes, spots, beak and eyes."""
  flat = points.reshape(-1, 3)
  blocks = [_colour_block(bird, flat[i:i + _BLOCK]) for i in range(0, len(flat), _BLOCK)]
  return np.concatenate(blocks).reshape(points.shape)


def _colour_block(bird: BirdShape, flat: np.ndarray) -> np.ndarray:
  """`surface_colour` of points (N, 3)."""
  deepest = _deepest(bird, flat)   # once, for the parts and the beak
  labels = _part_labels(bird, flat, deepest)
  c = bird.colours
  # Every point takes one palette entry; the later rules below override the earlier ones.
  palette = np.stack([c["head"], 0.5 * (c["head"] + c["back"]), c["back"], c["belly"],
                      c["stripe"], c["spot"], c["beak"], _EYE_RING, _PUPIL])
  entry = labels - 1                                           # head, neck, back, belly: 0..3
  # Wing stripes on the back, running across the body (symmetric: they depend on x and z only).
  back = np.flatnonzero(labels == 3)
  entry[back[np.sin(flat[back, 0] * bird.stripe_frequency * np.pi) > 0.55]] = 4
  # Belly spots, mirrored by hashing |y|.
  belly = np.flatnonzero(labels == 4)
  mirrored = flat[belly]                       # a copy (fancy indexing)
  mirrored[:, 1] = np.abs(mirrored[:, 1])
  entry[belly[_hash_noise(mirrored, 18.0, 7) < bird.spot_density * 0.5]] = 5
  entry[deepest == BEAK] = 6
  # Eyes: a dark pupil in a light ring, on both sides (with |y|, the nearer eye: its y is > 0).
  x, y, z = flat.T
  eye = np.sqrt((x - bird.eye_centre[0]) ** 2 + (np.abs(y) - bird.eye_centre[1]) ** 2
                + (z - bird.eye_centre[2]) ** 2)
  entry[eye < bird.eye_radius] = 7
  entry[eye < 0.6 * bird.eye_radius] = 8
  return palette[entry]


def texel_points(vertices: np.ndarray, faces: np.ndarray, resolution: int) -> np.ndarray:
  """Texel centres on a mesh: (V, 3), (F, 3) -> (F, R*R, 3), in jaxrecon's texel layout."""
  # The same sums of products, in the same order, as einsum("tk,fkd->ftd") on vertices[faces], but
  # with the faces last, so einsum's inner loop runs along the faces, not along xyz: 20x faster. (Not
  # a BLAS matmul: its fused multiply-adds leave ±1e-19 where mirrored vertices cancel to an exact 0,
  # and the spots' hash lattice would see a different cell there.)
  corners = np.ascontiguousarray(vertices[faces].transpose(1, 2, 0))        # (3 corners, xyz, F)
  return np.ascontiguousarray(np.einsum("tk,kdf->ftd", mesh_lib.texel_barycentrics(resolution), corners))


def side_view_rotation() -> np.ndarray:
  """Canonical side view: bird x → image right, bird up (z) → image up (image y is down), and so
  (right-handed) bird +y → depth: the bird's right side (-y) faces the camera."""
  return np.array([[1.0, 0.0, 0.0], [0.0, 0.0, -1.0], [0.0, 1.0, 0.0]])


def camera_from_angles(azimuth_deg, elevation_deg, scale, translation) -> np.ndarray:
  """Weak-perspective camera (7,) ``[s, tx, ty, qw, qx, qy, qz]`` for a view of the bird.

  Azimuth turns the bird about its up axis (0 = its right side, -y, faces the camera, head to the
  image right; 180 = its left side); elevation raises the camera over the bird, so its back shows.
  """
  turn = Rotation.from_euler("z", azimuth_deg, degrees=True)
  tilt = Rotation.from_euler("x", elevation_deg, degrees=True)
  rotation = tilt * Rotation.from_matrix(side_view_rotation()) * turn
  qx, qy, qz, qw = rotation.as_quat()
  return np.array([scale, translation[0], translation[1], qw, qx, qy, qz])


def sample_camera(rng: np.random.Generator) -> tuple[np.ndarray, float, float]:
  """A CUB-like camera: mostly side views. Returns (camera (7,), azimuth°, elevation°)."""
  if rng.uniform() < 0.75:
    azimuth = rng.choice([0.0, 180.0]) + rng.normal(0.0, 30.0)
  else:
    azimuth = rng.uniform(-180.0, 180.0)
  elevation = float(np.clip(rng.normal(10.0, 15.0), -30.0, 60.0))
  scale = rng.uniform(0.95, 1.2)
  translation = rng.normal(0.0, 0.04, size=2)
  return camera_from_angles(azimuth, elevation, scale, translation), float(azimuth), elevation


def _keypoint_vertices(bird: BirdShape, vertices: np.ndarray) -> np.ndarray:
  """Indices (15,) of the vertices that are the 15 CUB keypoints on the bird's surface, in
  KEYPOINT_NAMES order: each is the mesh vertex nearest to an anatomical target point."""
  b, h, beak, tail = bird.centres[BODY], bird.centres[HEAD], bird.centres[BEAK], bird.centres[TAIL]
  rb, rh = bird.radii[BODY], bird.radii[HEAD, 0]
  beak_tip = beak + _pitch_matrix(bird.pitch[BEAK]) @ np.array([bird.radii[BEAK, 0], 0.0, 0.0])
  tail_tip = tail + _pitch_matrix(bird.pitch[TAIL]) @ np.array([-bird.radii[TAIL, 0], 0.0, 0.0])
  left = np.array([1.0, -1.0, 1.0])
  eye = bird.eye_centre
  targets = {
      "Back": b + [-0.1 * rb[0], 0, rb[2]], "Beak": beak_tip, "Belly": b + [0, 0, -rb[2]],
      "Breast": b + [0.6 * rb[0], 0, -0.3 * rb[2]], "Crown": h + [0, 0, rh], "FHead": h + [0.7 * rh, 0, 0.6 * rh],
      "LEye": eye, "LLeg": b + [0.1 * rb[0], 0.4 * rb[1], -rb[2]], "LWing": b + [-0.1 * rb[0], rb[1], 0.2 * rb[2]],
      "Nape": h + [-0.8 * rh, 0, 0.3 * rh], "REye": eye * left,
      "RLeg": (b + [0.1 * rb[0], 0.4 * rb[1], -rb[2]]) * left,
      "RWing": (b + [-0.1 * rb[0], rb[1], 0.2 * rb[2]]) * left, "Tail": tail_tip,
      "Throat": h + [0.2 * rh, 0, -0.9 * rh],
  }
  points = np.stack([targets[name] for name in KEYPOINT_NAMES])
  return np.argmin(np.linalg.norm(points[:, None, :] - vertices[None], axis=-1), axis=1)


def background(rng: np.random.Generator, size: int) -> np.ndarray:
  """A textured background (H, W, 3) in [0, 1]: smooth colour noise plus a few stripes and blobs."""
  coarse = rng.uniform(0.1, 0.9, size=(5, 5, 3))
  yy, xx = np.meshgrid(np.linspace(0, 4, size), np.linspace(0, 4, size), indexing="ij")
  y0, x0 = np.floor(yy).astype(int).clip(0, 3), np.floor(xx).astype(int).clip(0, 3)
  fy, fx = (yy - y0)[..., None], (xx - x0)[..., None]
  img = (coarse[y0, x0] * (1 - fy) * (1 - fx) + coarse[y0 + 1, x0] * fy * (1 - fx)
         + coarse[y0, x0 + 1] * (1 - fy) * fx + coarse[y0 + 1, x0 + 1] * fy * fx)
  angle, freq = rng.uniform(0, np.pi), rng.uniform(4, 20)
  stripes = np.sin((np.cos(angle) * xx + np.sin(angle) * yy) * freq) > 0.7
  img = np.where(stripes[..., None], img * rng.uniform(0.5, 0.9), img)
  for _ in range(rng.integers(1, 4)):  # blobs (branches, leaves)
    cy, cx, r = rng.uniform(0, 4, size=2).tolist() + [rng.uniform(0.2, 0.8)]
    blob = (yy - cy) ** 2 + (xx - cx) ** 2 < r**2
    img = np.where(blob[..., None], _random_colour(rng), img)
  return np.clip(img + rng.normal(0, 0.02, img.shape), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Rendering examples
# ---------------------------------------------------------------------------------------------

SPLIT_IDS = {"train": 0, "validation": 1, "test": 2}


@dataclasses.dataclass(frozen=True)
class RenderSettings:
  """How examples are rendered. Images are rendered at `supersample`× and box-filtered down."""
  image_size: int = 128
  texels_per_edge: int = 6
  supersample: int = 2
  num_novel_views: int = 0     # renders of the unseen side (val/test), at azimuth +90°, +180°, ...
  fill_fraction: tuple = (0.78, 0.92)   # bbox side / image side, like CMR's 5%-padded crops


def _project(points: np.ndarray, cam: np.ndarray) -> np.ndarray:
  """`camera.project`'s image coordinates (N, 2) in numpy: per-example jax calls cost more in
  dispatch than the arithmetic. The quaternion is scalar-first, scipy's scalar-last."""
  rotation = Rotation.from_quat(cam[[4, 5, 6, 3]]).as_matrix()
  return cam[0] * (points @ rotation[:2].T) + cam[1:3]


def frame_camera(vertices: np.ndarray, azimuth: float, elevation: float, fill: float,
                 jitter: np.ndarray) -> np.ndarray:
  """The camera for a view, scaled and shifted so the bird's bbox is centred and fills `fill`."""
  unit = camera_from_angles(azimuth, elevation, 1.0, (0.0, 0.0))
  xy = _project(vertices, unit)
  lo, hi = xy.min(0), xy.max(0)
  scale = 2.0 * fill / max(hi[0] - lo[0], hi[1] - lo[1])
  centre = (lo + hi) / 2
  return np.concatenate([[scale], -scale * centre + jitter, unit[3:]]).astype(np.float32)


@functools.lru_cache(maxsize=None)
def _batch_renderer(image_size: int, supersample: int, num_views: int):
  """A jitted renderer of a batch of birds (compiled once per size and batch shape).

  The returned function maps vertices (N, V, 3), textures (N, F, R*R, 3), face parts (N, F) (1-4)
  and cameras (N * num_views, 7), each bird's views in a row, the first one the input view, to: rgba
  of every view (N * num_views, S, S, 4) and, for the first views only, soft part coverage
  (N, S, S, 4), the screen depth of each vertex (N, V) and the z-buffer depth (N, S, S) (nearest
  face's depth).
  """
  faces = mesh_lib.symmetric_sphere().faces
  big = image_size * supersample
  pool = lambda x: x.reshape(x.shape[0], image_size, supersample, image_size, supersample, -1).mean((2, 4))

  @jax.jit
  def run(vertices, textures, face_parts, cams):
    vertices, textures = (jnp.repeat(x, num_views, axis=0) for x in (vertices, textures))
    screen = jax.vmap(camera.project_to_screen)(vertices, cams)
    face_vertices = mesh_lib.face_vertices(screen, faces)
    rgba, aux = render.soft_rasterize(face_vertices, textures, image_size=big, return_aux=True)
    # Parts only for the input views. They partition the surface, so one render of (head, neck,
    # back) gives belly as the rest (textures have 3 channels: the rasterizer takes RGB only).
    first = slice(None, None, num_views)
    part_textures = (face_parts[..., None, None] == jnp.arange(1, 4)).astype(jnp.float32)
    three = render.soft_rasterize(face_vertices[first], part_textures, image_size=big)[..., :3]
    belly = jnp.clip(1.0 - jnp.sum(three, -1, keepdims=True), 0.0, 1.0)
    parts = jnp.concatenate([three, belly], -1) * rgba[first, ..., 3:]
    depth = aux["depth"][first, ::supersample, ::supersample]
    return pool(rgba), pool(parts), screen[first, :, 2], depth

  return run


def _imperfect_parts(rng, parts, mask):
  """SCOPS-like part probabilities (S, S, 5) from clean coverage (S, S, 4): warped, blurred, noisy."""
  s = parts.shape[0]
  shift = ndimage.zoom(rng.normal(0.0, 0.04 * s, size=(2, 4, 4)), (1, s / 4, s / 4), order=1)
  yy, xx = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
  coords = [yy + shift[0], xx + shift[1]]
  warped = np.stack([ndimage.map_coordinates(parts[..., k], coords, order=1, mode="nearest")
                     for k in range(4)], -1)
  blurred = ndimage.gaussian_filter(warped, sigma=(1.0 + 0.01 * s, 1.0 + 0.01 * s, 0))
  blurred = np.clip(blurred + rng.normal(0.0, 0.03, blurred.shape), 0.0, None) * mask[..., None]
  full = np.concatenate([np.clip(1.0 - mask, 0.0, 1.0)[..., None] + 1e-3, blurred], -1)
  return (full / full.sum(-1, keepdims=True)).astype(np.float32)


def make_examples(seed: int, split: str, indices, settings: RenderSettings):
  """Generate examples `indices` of `split`, deterministically from (seed, split, index).

  Returns:
    A list of dicts of numpy arrays (see `jaxrecon.data.builders` for the feature spec).
  """
  sphere = mesh_lib.symmetric_sphere()
  records = []
  for index in indices:
    rng = np.random.default_rng([seed, SPLIT_IDS[split], index])
    bird = sample_bird(rng)
    vertices = bird_vertices(bird, sphere)
    points = texel_points(vertices, sphere.faces, settings.texels_per_edge)
    textures = surface_colour(bird, points)
    face_parts = part_labels(bird, vertices[sphere.faces].mean(1))
    _, azimuth, elevation = sample_camera(rng)
    fill = rng.uniform(*settings.fill_fraction)
    jitter = rng.normal(0.0, 0.03, size=2)
    views = [(azimuth, elevation, fill, jitter)]
    views += [(azimuth + 360.0 * (k + 1) / (settings.num_novel_views + 1), elevation, fill, np.zeros(2))
              for k in range(settings.num_novel_views)]
    cams = np.stack([frame_camera(vertices, *view) for view in views])
    records.append(dict(rng=rng, bird=bird, vertices=vertices, textures=textures, face_parts=face_parts,
                        cams=cams, azimuth=azimuth, elevation=elevation))

  n_views = settings.num_novel_views + 1
  stack = lambda key: np.stack([r[key] for r in records])
  # Dispatched asynchronously: the host work up to the first np.asarray below runs meanwhile.
  outputs = _batch_renderer(settings.image_size, settings.supersample, n_views)(
      stack("vertices").astype(np.float32), stack("textures").astype(np.float32), stack("face_parts"),
      np.concatenate([r["cams"] for r in records]))
  s = settings.image_size
  for r in records:
    r["background"] = background(r["rng"], s)     # each rng draws in the same order as ever
    r["keypoint_vertices"] = _keypoint_vertices(r["bird"], r["vertices"])
  rgba, parts, vertex_depth, zbuffer = (np.asarray(x) for x in outputs)

  examples = []
  for i, r in enumerate(records):
    first = i * n_views
    alpha = rgba[first, ..., 3]
    image = rgba[first, ..., :3] * alpha[..., None] + r["background"] * (1.0 - alpha[..., None])
    kp_xy = _project(r["vertices"][r["keypoint_vertices"]], r["cams"][0])
    cols = np.clip(np.round((kp_xy[:, 0] + 1) * s / 2 - 0.5), 0, s - 1).astype(int)
    rows = np.clip(np.round((kp_xy[:, 1] + 1) * s / 2 - 0.5), 0, s - 1).astype(int)
    kp_depth = vertex_depth[i][r["keypoint_vertices"]]
    visible = kp_depth <= zbuffer[i][rows, cols] + 0.03 * r["cams"][0][0]
    example = {
        "image": _to_uint8(image),
        "mask": _to_uint8(alpha[..., None]),
        "parts": _to_uint8(_imperfect_parts(r["rng"], parts[i], alpha)),
        "keypoints": np.concatenate([kp_xy, visible[:, None]], -1).astype(np.float32),
        "camera": r["cams"][0],
        "vertices": r["vertices"].astype(np.float32),
        "face_colours": _to_uint8(r["textures"].mean(1)),
        "face_parts": r["face_parts"].astype(np.int32),
        "azimuth_elevation": np.array([r["azimuth"], r["elevation"]], np.float32),
    }
    if settings.num_novel_views:
      example["novel_views"] = _to_uint8(rgba[first + 1: first + n_views])
      example["novel_cameras"] = r["cams"][1:].astype(np.float32)
    examples.append(example)
  return examples


def _to_uint8(x):
  return np.clip(np.round(np.asarray(x) * 255.0), 0, 255).astype(np.uint8)
