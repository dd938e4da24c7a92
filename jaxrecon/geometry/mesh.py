"""The category mesh: a mirror-symmetric icosphere, its topology, and the fixed sphere UV sampler.

Everything here is static topology built once in NumPy and closed over by jitted code (never
traced), plus a few small jnp functions over vertex arrays (`symmetrize`, `face_vertices`,
`laplacian_coordinates`, `sphere_uv`).

Conventions (used by every floor of jaxrecon; docs/architecture.md repeats them):

* Vertices are ordered ``[on-plane | one side (y > 0) | mirrored side (y < 0)]`` with
  ``vertices[num_center + num_side + i] == vertices[num_center + i] * (1, -1, 1)``; the mirror plane
  is y = 0, as in UMR (``make_symmetric`` in NVlabs/UMR utils/mesh.py, called with ``axis=1`` by
  experiments/train_s2.py). For the 642-vertex sphere this is 32 + 305 + 305, so a shape is
  described by 337 free ("half") vertices.
* Faces are ordered ``[plane-crossing | one side | mirrored side]`` (32 + 624 + 624) and wound
  counter-clockwise seen from outside (outward normals). The mirror of face ``(a, b, c)`` is
  ``(m(a), m(c), m(b))`` so that it stays outward.
* Texels: a face carries ``R*R`` texels in SoftRas's "surface" layout (``forward_sample_texture`` in
  ShichenLiu/SoftRas soft_renderer/cuda/soft_rasterize_cuda_kernel.cu). The triangle is cut by
  the lines ``w_k = n/R`` into ``R*R`` small triangles; texel ``j*R + i`` is the small
  triangle that SoftRas's lookup reads for barycentrics ``(w0, w1)`` (see `texel_index`), and its
  colour is sampled at that small triangle's centroid (see `texel_barycentrics`). The UV sampler, the
  texture sampler and the rasterizer all use this one layout. (UMR samples a 6x6 grid at i/5 in a
  transposed order, NVlabs/UMR utils/mesh.py ``compute_uvsampler``; we deliberately do not copy
  that quirk.)
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np
import jax.numpy as jnp

# Nodes of the icosahedron as in meshzoo 0.4.3's ``iso_sphere`` (UMR's base mesh), before
# normalisation: (0, ±1, ±t), (±1, ±t, 0), (±t, 0, ±1) with t the golden ratio.
_T = (1.0 + np.sqrt(5.0)) / 2.0
_ICOSAHEDRON_VERTICES = np.array(
    [[-1, _T, 0], [1, _T, 0], [-1, -_T, 0], [1, -_T, 0],
     [0, -1, _T], [0, 1, _T], [0, -1, -_T], [0, 1, -_T],
     [_T, 0, -1], [_T, 0, 1], [-_T, 0, -1], [-_T, 0, 1]], dtype=np.float64)
_ICOSAHEDRON_FACES = np.array(
    [[0, 11, 5], [0, 5, 1], [0, 1, 7], [0, 7, 10], [0, 10, 11],
     [1, 5, 9], [5, 11, 4], [11, 10, 2], [10, 7, 6], [7, 1, 8],
     [3, 9, 4], [3, 4, 2], [3, 2, 6], [3, 6, 8], [3, 8, 9],
     [4, 9, 5], [2, 4, 11], [6, 2, 10], [8, 6, 7], [9, 8, 1]], dtype=np.int64)

_MIRROR = np.array([1.0, -1.0, 1.0])
_PLANE_TOL = 1e-9


def icosphere(subdivisions: int = 3) -> tuple[np.ndarray, np.ndarray]:
  """The unit icosphere: the icosahedron refined `subdivisions` times by edge midpoints.

  Each refinement splits every triangle into four and projects the new midpoints onto the unit
  sphere; 3 refinements give 642 vertices and 1280 faces (UMR's base mesh). Written by hand on
  purpose: mesh libraries disagree on what a "subdivision" of an icosphere means (UMR calls
  meshzoo 0.4.3's ``iso_sphere(3)``, NVlabs/UMR utils/mesh.py ``create_sphere``; in later meshzoo
  releases the same call gives a 92-vertex sphere).

  Returns:
    vertices: (V, 3) float64 on the unit sphere. faces: (F, 3) int64, outward (CCW) winding.
  """
  vertices = _ICOSAHEDRON_VERTICES / np.linalg.norm(_ICOSAHEDRON_VERTICES, axis=1, keepdims=True)
  vertices = [tuple(v) for v in vertices]
  faces = _ICOSAHEDRON_FACES.copy()
  for _ in range(subdivisions):
    midpoint_index: dict[tuple[int, int], int] = {}

    def midpoint(a: int, b: int) -> int:
      key = (min(a, b), max(a, b))
      if key not in midpoint_index:
        m = (np.asarray(vertices[a]) + np.asarray(vertices[b])) / 2.0
        vertices.append(tuple(m / np.linalg.norm(m)))
        midpoint_index[key] = len(vertices) - 1
      return midpoint_index[key]

    new_faces = []
    for a, b, c in faces:
      ab, bc, ca = midpoint(a, b), midpoint(b, c), midpoint(c, a)
      new_faces += [[a, ab, ca], [b, bc, ab], [c, ca, bc], [ab, bc, ca]]
    faces = np.array(new_faces, dtype=np.int64)
  return np.array(vertices, dtype=np.float64), faces


def texel_barycentrics(resolution: int) -> np.ndarray:
  """Barycentric coordinates of the R*R texel centres of one face, in texel order.

  Texel ``k = j*R + i`` is the small triangle that `texel_index` maps to k: for ``i + j <= R-1`` the
  "lower" cell triangle with corner ``(i/R, j/R)``, otherwise the "upper" triangle of the cell
  ``(R-1-i, R-1-j)`` (SoftRas's fold). Every centre lies strictly inside the face.

  Args:
    resolution: R, texels per face edge (R=1 is one flat colour per face).
  Returns:
    (R*R, 3) float64, rows ``(w0, w1, w2)`` summing to 1; the point is ``w0*v0 + w1*v1 + w2*v2``.
  """
  r = resolution
  j, i = np.meshgrid(np.arange(r), np.arange(r), indexing="ij")
  i, j = i.reshape(-1), j.reshape(-1)
  lower = i + j <= r - 1
  w0 = np.where(lower, (i + 1.0 / 3.0) / r, (r - 1 - i + 2.0 / 3.0) / r)
  w1 = np.where(lower, (j + 1.0 / 3.0) / r, (r - 1 - j + 2.0 / 3.0) / r)
  return np.stack([w0, w1, 1.0 - w0 - w1], axis=-1)


def texel_index(w0, w1, resolution: int):
  """SoftRas's "surface" texel lookup for barycentrics (w0, w1), clamped to the face.

  ``i = floor(w0*R)``, ``j = floor(w1*R)``; if the point lies in the lower half of cell (i, j) the
  texel is ``j*R + i``, else the folded ``(R-1-j)*R + (R-1-i)`` (``forward_sample_texture`` in
  ShichenLiu/SoftRas soft_renderer/cuda/soft_rasterize_cuda_kernel.cu). SoftRas reads out of bounds
  at w0 == 1; like PyTorch3D we clamp i and j to R-1.

  Args:
    w0, w1: arrays of the same shape (numpy or jax), barycentrics in [0, 1].
    resolution: R.
  Returns:
    int32 array of that shape, texel indices in [0, R*R).
  """
  xp = jnp if any(isinstance(w, jnp.ndarray) for w in (w0, w1)) else np
  r = resolution
  i = xp.clip(xp.floor(w0 * r), 0, r - 1)
  j = xp.clip(xp.floor(w1 * r), 0, r - 1)
  lower = (w0 + w1) * r - i - j <= 1
  index = xp.where(lower, j * r + i, (r - 1 - j) * r + (r - 1 - i))
  return index.astype(xp.int32)


def _mirror_permutation(vertices: np.ndarray) -> np.ndarray:
  """Index of each vertex's mirror image about the plane y = 0."""
  from scipy.spatial import cKDTree  # pylint: disable=g-import-not-at-top

  distance, index = cKDTree(vertices).query(vertices * _MIRROR)
  if np.max(distance) > 1e-7:
    raise ValueError("mesh is not mirror-symmetric about y = 0")
  return index


@dataclasses.dataclass(frozen=True, eq=False)
class SymmetricMesh:
  """A mirror-symmetric mesh in jaxrecon's vertex/face order (see the module docstring).

  Attributes:
    vertices: (V, 3) float64, exactly symmetric about y = 0.
    faces: (F, 3) int32, outward winding.
    num_center, num_side: vertex counts on the plane and on each side (V = num_center + 2*num_side).
    num_center_faces, num_side_faces: face counts crossing the plane and on each side.
  """
  vertices: np.ndarray
  faces: np.ndarray
  num_center: int
  num_side: int
  num_center_faces: int
  num_side_faces: int

  @property
  def num_vertices(self) -> int:
    return self.vertices.shape[0]

  @property
  def num_faces(self) -> int:
    return self.faces.shape[0]

  @property
  def num_half_vertices(self) -> int:
    """Free vertices of a symmetric shape: on-plane plus one side (337 for the sphere)."""
    return self.num_center + self.num_side

  @functools.cached_property
  def vertex_mirror(self) -> np.ndarray:
    """(V,) int: index of each vertex's mirror image (an involution)."""
    c, s = self.num_center, self.num_side
    return np.concatenate([np.arange(c), np.arange(c + s, c + 2 * s), np.arange(c, c + s)])

  @functools.cached_property
  def face_mirror(self) -> np.ndarray:
    """(F,) int: index of each face's mirror image (an involution)."""
    lookup = {tuple(sorted(f)): k for k, f in enumerate(self.faces.tolist())}
    mirrored = self.vertex_mirror[self.faces]
    return np.array([lookup[tuple(sorted(f))] for f in mirrored.tolist()], dtype=np.int64)

  @functools.cached_property
  def edges(self) -> np.ndarray:
    """(E, 2) int32 unique undirected edges, each sorted, in lexicographic order."""
    pairs = np.concatenate([self.faces[:, [0, 1]], self.faces[:, [1, 2]], self.faces[:, [2, 0]]])
    return np.unique(np.sort(pairs, axis=1), axis=0).astype(np.int32)

  @functools.cached_property
  def edge_quads(self) -> np.ndarray:
    """(E, 4) int32: per interior edge ``(a, b, c, d)``, the edge a-b and the opposite vertices.

    c belongs to the face that contains the directed edge a→b, d to the face containing b→a; the
    flatten loss (Eq. 6) measures the dihedral angle between triangles (a, b, c) and (b, a, d).
    """
    opposite = {}
    for a, b, c in self.faces.tolist():
      for u, v, w in ((a, b, c), (b, c, a), (c, a, b)):
        opposite[(u, v)] = w
    quads = [(a, b, opposite[(a, b)], opposite[(b, a)])
             for a, b in self.edges.tolist() if (a, b) in opposite and (b, a) in opposite]
    return np.array(quads, dtype=np.int32)

  @functools.cached_property
  def adjacency(self) -> np.ndarray:
    """(V, V) float32 0/1 vertex adjacency."""
    a = np.zeros((self.num_vertices, self.num_vertices), np.float32)
    a[self.edges[:, 0], self.edges[:, 1]] = 1.0
    a[self.edges[:, 1], self.edges[:, 0]] = 1.0
    return a

  @functools.cached_property
  def laplacian(self) -> np.ndarray:
    """(V, V) float32 uniform Laplacian ``I - D^-1 A``: row v gives x_v - mean(neighbours of v)."""
    a = self.adjacency
    return (np.eye(self.num_vertices, dtype=np.float32) - a / a.sum(axis=1, keepdims=True))

  def half(self, vertices):
    """(..., V, 3) -> (..., num_half_vertices, 3): the free vertices of a symmetric shape."""
    return vertices[..., : self.num_half_vertices, :]

  def symmetrize(self, half_vertices):
    """(..., num_half_vertices, 3) -> (..., V, 3): mirror the one-side vertices (Eq. 2-3).

    The on-plane vertices are kept as given (UMR does not force y = 0 on them; stage 1's
    symmetry-plane regulariser does that softly).
    """
    return symmetrize(half_vertices, self.num_side)

  def face_vertices(self, vertices):
    """(..., V, 3) -> (..., F, 3, 3)."""
    return face_vertices(vertices, self.faces)

  def uv_sampler(self, resolution: int = 6, symmetric: bool = True) -> np.ndarray:
    """The fixed sphere UV sampler φ: (F, R*R, 2) float32 UV coordinates of every texel centre.

    Computed on the unit-sphere positions (not the learned template), as UMR does (NVlabs/UMR
    nnutils/cub_mesh.py ``MeshNet`` calls utils/mesh.py ``compute_uvsampler`` on the sphere).
    See `sphere_uv` for the two parametrisations.
    """
    bary = texel_barycentrics(resolution)                                  # (R*R, 3)
    corners = self.vertices[self.faces]                                    # (F, 3, 3)
    points = np.einsum("tk,fkd->ftd", bary, corners)                       # (F, R*R, 3)
    return np.asarray(sphere_uv(points, symmetric=symmetric, xp=np), dtype=np.float32)


def symmetrize(half_vertices, num_side: int):
  """Append the mirror image (x, -y, z) of the last `num_side` vertices (Eq. 2-3).

  Args:
    half_vertices: (..., C + S, 3) with S = num_side.
  Returns:
    (..., C + 2*S, 3).
  """
  xp = jnp if isinstance(half_vertices, jnp.ndarray) else np
  side = half_vertices[..., -num_side:, :] * xp.asarray(_MIRROR, dtype=half_vertices.dtype)
  return xp.concatenate([half_vertices, side], axis=-2)


def face_vertices(vertices, faces):
  """Gather the corners of every face: (..., V, D), (F, 3) -> (..., F, 3, D)."""
  return vertices[..., faces, :]


def laplacian_coordinates(vertices, laplacian):
  """Uniform Laplacian coordinates ``x_v - mean(neighbours)`` (Eq. 4): (..., V, 3) -> (..., V, 3)."""
  return jnp.einsum("uv,...vd->...ud", laplacian, vertices)


def sphere_uv(points, symmetric: bool = True, xp=jnp):
  """Spherical UV in [-1, 1]^2 of points (grid_sample order: u along width, v along height).

  ``v = 2*acos(z/r)/pi - 1`` (inclination from +z). For u:

  * ``symmetric=True`` (jaxrecon's default): ``u = 2*atan2(|y|, x)/pi - 1``. Mirror images share a
    UV, so a texture is symmetric by construction with no copy step, the whole UV image is used (2x
    UMR's texel density) and there is no seam: u is continuous everywhere.
  * ``symmetric=False``: UMR's ``u = (atan2(y, x) + pi)/pi - 1`` (NVlabs/UMR utils/mesh.py
    ``get_spherical_coords``), seam at y = 0, x < 0.

  Gradients are finite everywhere (poles and the origin included): the square roots and the
  ``acos``/``atan2`` singularities are guarded with the double-`where` trick.

  Args:
    points: (..., 3).
  Returns:
    (..., 2).
  """
  x, y, z = points[..., 0], points[..., 1], points[..., 2]
  if symmetric:
    y = xp.sqrt(y * y + 1e-24) if xp is jnp else xp.abs(y)
  rho2 = x * x + y * y
  r2 = rho2 + z * z
  ok = rho2 > 1e-20
  safe_x = xp.where(ok, x, 1.0)
  safe_y = xp.where(ok, y, 0.0)
  azimuth = xp.where(ok, xp.arctan2(safe_y, safe_x), 0.0)
  # acos(z/r) == atan2(rho, z): no infinite slope at the poles.
  safe_rho = xp.sqrt(xp.where(ok, rho2, 1.0))
  inclination = xp.where(ok, xp.arctan2(safe_rho, z), xp.where(z >= 0, 0.0, np.pi))
  inclination = xp.where(r2 > 0, inclination, np.pi / 2)
  if symmetric:
    u = 2.0 * azimuth / np.pi - 1.0
  else:
    u = (azimuth + np.pi) / np.pi - 1.0
  v = 2.0 * inclination / np.pi - 1.0
  return xp.stack([u, v], axis=-1)


def make_symmetric(vertices: np.ndarray, faces: np.ndarray) -> SymmetricMesh:
  """Reorder a mesh that is mirror-symmetric about y = 0 into jaxrecon's symmetric layout.

  Args:
    vertices: (V, 3); faces: (F, 3) with outward winding.
  Raises:
    ValueError: if the mesh is not symmetric.
  """
  vertices = np.asarray(vertices, np.float64)
  mirror = _mirror_permutation(vertices)
  center = np.flatnonzero(np.abs(vertices[:, 1]) <= _PLANE_TOL)
  side = np.flatnonzero(vertices[:, 1] > _PLANE_TOL)
  order = np.concatenate([center, side, mirror[side]])
  if len(order) != len(vertices):
    raise ValueError("mirror map does not pair the off-plane vertices")
  new_index = np.empty(len(order), np.int64)
  new_index[order] = np.arange(len(order))
  new_vertices = vertices[order].copy()
  new_vertices[: len(center), 1] = 0.0
  new_vertices[len(center) + len(side):] = new_vertices[len(center): len(center) + len(side)] * _MIRROR
  faces = new_index[np.asarray(faces)]

  num_center, num_side = len(center), len(side)
  side_of = np.where(np.arange(len(order)) < num_center, 0,
                     np.where(np.arange(len(order)) < num_center + num_side, 1, -1))
  face_sides = side_of[faces]
  crossing = faces[np.any(face_sides == 1, axis=1) & np.any(face_sides == -1, axis=1)]
  one_side = faces[np.all(face_sides >= 0, axis=1)]
  vertex_mirror = np.concatenate([np.arange(num_center),
                                  np.arange(num_center + num_side, num_center + 2 * num_side),
                                  np.arange(num_center, num_center + num_side)])
  other_side = vertex_mirror[one_side][:, [0, 2, 1]]  # mirrored and re-wound to stay outward
  new_faces = np.concatenate([crossing, one_side, other_side]).astype(np.int32)
  if len(new_faces) != len(faces):
    raise ValueError("faces do not split into plane-crossing / side / mirrored side")
  return SymmetricMesh(vertices=new_vertices, faces=new_faces, num_center=num_center,
                       num_side=num_side, num_center_faces=len(crossing),
                       num_side_faces=len(one_side))


@functools.lru_cache(maxsize=None)
def symmetric_sphere(subdivisions: int = 3) -> SymmetricMesh:
  """The category base mesh: the icosphere in symmetric layout (642 V / 1280 F for 3 refinements)."""
  return make_symmetric(*icosphere(subdivisions))
