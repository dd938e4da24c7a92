"""`python -m jaxrecon.predict` and `jaxrecon.export`: cropping, UV/texture-coordinate conventions,
the written files (OBJ/GLB load back with trimesh), and the errors."""

import os
import subprocess
import sys

import jax.numpy as jnp
import numpy as np
import pytest
import trimesh
from PIL import Image

from jaxrecon import export, ops, predict
from jaxrecon.geometry import mesh as mesh_lib

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_COLOUR = (200, 40, 90)


@pytest.fixture(scope="module")
def workdir(checkpointed_workdir):
  return checkpointed_workdir[0]


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
  """A 90x120 photo: a flat-coloured object on white, its mask, and an unreadable file."""
  d = tmp_path_factory.mktemp("photos")
  image = np.full((120, 90, 3), 255, np.uint8)
  image[30:90, 20:70] = _COLOUR
  mask = np.zeros((120, 90), np.uint8)
  mask[30:90, 20:70] = 255
  Image.fromarray(image).save(d / "bird.png")
  Image.fromarray(mask).save(d / "bird_mask.png")
  (d / "broken.jpg").write_text("not an image")
  return d


def test_crop_box():
  mask = np.zeros((120, 90))
  mask[30:90, 20:70] = 1.0                              # object box x 20..69, y 30..89 (50 x 60)
  box, how = predict.crop_box(mask.shape, mask=mask)
  assert how == "mask"
  side = box[2] - box[0] + 1
  assert side == box[3] - box[1] + 1 == 66            # 60 px + 5% per side, squared
  assert box[1] == 27 and box[0] <= 20 and box[2] >= 69
  np.testing.assert_array_equal(predict.crop_box(mask.shape, bbox=np.array([20, 30, 69, 89]))[0], box)
  centre, how = predict.crop_box((120, 90, 3))
  assert how == "centre" and list(centre) == [0, 15, 89, 104]
  with pytest.raises(ValueError, match="no foreground"):
    predict.crop_box(mask.shape, mask=np.zeros_like(mask))
  for bad in ("1,2,3", "a,b,c,d", "10,10,5,20"):
    with pytest.raises(ValueError, match="--bbox"):
      predict.parse_bbox(bad)


def test_bbox_outside_the_image():
  shape = (200, 300, 3)                                # a 300x200 image
  with pytest.raises(ValueError, match=r"--bbox=500,500,900,900 lies wholly outside the 300x200 image"):
    predict.crop_box(shape, bbox=np.array([500, 500, 900, 900]))
  with pytest.raises(ValueError, match="wholly outside"):
    predict.check_bbox(np.array([-50, 10, -1, 20]), shape)
  assert not predict.check_bbox(np.array([0, 0, 299, 199]), shape)
  assert predict.check_bbox(np.array([250, 150, 350, 250]), shape)
  # Partly outside: kept, and the outside of the crop is white (CMR's fill).
  image = np.zeros(shape, np.float32)
  box, _ = predict.crop_box(shape, bbox=np.array([250, 150, 350, 250]))
  crop = predict.prepare_input(image, box, 16)
  assert crop[0, 0].sum() == 0 and np.all(crop[-1, -1] == 1.0)


def test_predict_checks_boxes_before_loading_the_model(photo, tmp_path, caplog):
  image = str(photo / "bird.png")                      # 90x120
  missing = str(tmp_path / "no_workdir")
  with pytest.raises(ValueError, match=r"bird.png: --bbox=500,500,900,900 lies wholly outside the 90x120 image"):
    predict.run(missing, [image], str(tmp_path / "out"), bboxes=["500,500,900,900"])
  with caplog.at_level("WARNING"), pytest.raises(FileNotFoundError, match="no_workdir"):
    predict.run(missing, [image], str(tmp_path / "out"), bboxes=["60,80,120,140"])
  assert "--bbox=60,80,120,140 reaches outside the 90x120 image; the outside is filled white" in caplog.text


def test_texcoords_address_the_uv_texture():
  # A texture whose pixel (r, c) holds its own UV: reading it at a vertex's texture coordinate (as a
  # viewer does, origin bottom-left) gives back the vertex's sphere UV.
  h, w = 17, 33                                  # UVs below fall on pixel centres
  texture = np.asarray(export.uv_grid(h, w))
  uv = np.array([[-1.0, -1.0], [1.0, 1.0], [0.0, 0.5], [-0.5, 0.25]])
  st = export.texcoords(uv, h, w)
  cols = st[:, 0] * w - 0.5
  rows = (1.0 - st[:, 1]) * h - 0.5
  np.testing.assert_allclose(cols, (uv[:, 0] + 1) / 2 * (w - 1), atol=1e-9)
  np.testing.assert_allclose(texture[np.round(rows).astype(int), np.round(cols).astype(int)], uv, atol=1e-6)
  # The UV texture samples the flow at those UVs: a flow equal to its UV grid gives the input back.
  image = jnp.asarray(np.random.default_rng(0).uniform(size=(1, 8, 8, 3)), jnp.float32)
  flow = export.uv_grid(8, 8)[None]
  np.testing.assert_allclose(export.uv_texture_image(image, flow, 8, 8), image, atol=1e-5)
  # And agrees with the renderer's texel colours (components.face_flow, then the image) when read
  # back at the texels' UVs (bilinear: the viewer's interpolation), for a smooth image.
  sphere = mesh_lib.symmetric_sphere(3)
  texel_uv = jnp.asarray(sphere.uv_sampler(2, True))[None]          # (1, F, 4, 2)
  x = np.linspace(0, 1, 16)
  smooth = jnp.asarray(np.stack(np.broadcast_arrays(x[None, :], x[:, None], 0.5 + 0 * x[None, :]), -1)[None],
                       jnp.float32)
  flow = jnp.asarray(np.random.default_rng(1).uniform(-1, 1, size=(1, 4, 8, 2)), jnp.float32)
  colours = ops.grid_sample(smooth, ops.grid_sample(flow, texel_uv, align_corners=True), align_corners=True)
  tex = export.uv_texture_image(smooth, flow, 65, 129)
  read_back = ops.grid_sample(tex, texel_uv, align_corners=True)
  np.testing.assert_allclose(read_back, colours, atol=0.03)
  assert float(jnp.mean(jnp.abs(read_back - colours))) < 3e-3


@pytest.mark.parametrize("symmetric", [True, False])
def test_corner_uvs_have_no_seam_or_pole_jumps(symmetric):
  sphere = mesh_lib.symmetric_sphere(3)
  corners = export.corner_uvs(sphere, symmetric)
  span = corners[..., 0].max(1) - corners[..., 0].min(1)
  # u changes fast next to the poles (spans up to 0.65); a face across a seam would span ~2.
  assert span.max() < 1.0
  st = export.texcoords(corners, 64, 128)
  vertices, faces, tc, source = export.unweld(sphere.vertices, sphere.faces, st)
  np.testing.assert_array_equal(vertices[faces], sphere.vertices[sphere.faces])   # same geometry
  np.testing.assert_allclose(tc[faces], st, atol=1e-8)
  extra = len(vertices) - sphere.num_vertices
  assert 0 < extra < 60                          # only pole (and seam) corners are duplicated
  if symmetric:
    assert st[..., 0].max() <= 1.0


def test_predict_writes_loadable_meshes(workdir, photo, tmp_path):
  out = tmp_path / "out"
  results = predict.run(workdir, [str(photo / "bird.png")], str(out), bboxes=["20,30,69,89"],
                        texture_height=32, frames=4)
  files = results[0]["files"]
  assert results[0]["crop_from"] == "bbox" and results[0]["step"] == 1
  for key in ("obj", "glb", "png", "mtl", "gif", "sheet", "input"):
    assert os.path.getsize(files[key]) > 0, key
  sphere = mesh_lib.symmetric_sphere(3)
  expected_vertices = len(export.unweld(sphere.vertices, sphere.faces,
                                        export.texcoords(export.corner_uvs(sphere, True), 32, 64))[0])
  colour = np.array(_COLOUR) / 255.0
  loaded = {key: trimesh.load(files[key], force="mesh", process=False) for key in ("obj", "glb")}
  expected_tc = export.unweld(sphere.vertices, sphere.faces, export.texcoords(export.corner_uvs(sphere, True), 32, 64))[2]
  for key, mesh in loaded.items():     # same UVs as exported (glTF's flipped v converted back), same order
    np.testing.assert_allclose(mesh.visual.uv, expected_tc, atol=1e-6)
  np.testing.assert_allclose(loaded["obj"].vertices, loaded["glb"].vertices, atol=1e-6)
  np.testing.assert_array_equal(loaded["obj"].faces, loaded["glb"].faces)
  for key in ("obj", "glb"):
    mesh = loaded[key]
    assert mesh.faces.shape == (1280, 3), key
    assert mesh.vertices.shape == (expected_vertices, 3), key
    assert mesh.visual.uv.shape == (expected_vertices, 2), key
    material = mesh.visual.material
    image = material.image if key == "obj" else material.baseColorTexture
    texture = np.asarray(image.convert("RGB"), np.float32) / 255.0
    assert texture.shape == (32, 64, 3)
    # The crop holds only the object's flat colour, so the UV texture (the crop sampled by the flow)
    # is that colour everywhere: not blank, not swapped channels.
    np.testing.assert_allclose(texture, np.broadcast_to(colour, texture.shape), atol=2 / 255)
  sheet = np.asarray(Image.open(files["sheet"]))
  assert sheet.shape == (64, 8 * 64, 3)
  assert np.asarray(Image.open(files["input"])).shape == (64, 64, 3)
  with Image.open(files["gif"]) as gif:
    assert gif.n_frames == 4
  assert sheet[:, 64:128].std() > 0                 # the predicted view is not blank


def test_predict_errors(workdir, photo, tmp_path):
  out = str(tmp_path / "out")
  with pytest.raises(ValueError, match="broken.jpg"):
    predict.run(workdir, [str(photo / "broken.jpg")], out)
  with pytest.raises(FileNotFoundError, match="missing.png"):
    predict.run(workdir, [str(photo / "missing.png")], out)
  with pytest.raises(ValueError, match="1 --bbox value"):
    predict.run(workdir, [str(photo / "bird.png")] * 2, out, bboxes=["1,2,3,4"])
  with pytest.raises(ValueError, match="--mask .* is 90x120 but its image is 45x60"):
    small = tmp_path / "small.png"
    Image.open(photo / "bird.png").resize((45, 60)).save(small)
    predict.run(workdir, [str(small)], out, masks=[str(photo / "bird_mask.png")])
  empty = tmp_path / "empty"
  empty.mkdir()
  (empty / "config.json").write_text(open(os.path.join(workdir, "config.json")).read())
  with pytest.raises(FileNotFoundError, match=f"no checkpoints in --workdir={empty}"):
    predict.run(str(empty), [str(photo / "bird.png")], out)


def test_cli_names_the_unreadable_file(photo, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run([sys.executable, "-m", "jaxrecon.predict", f"--workdir={tmp_path}", f"--out={tmp_path}/o",
                           str(photo / "broken.jpg"), "--compilation_cache="], capture_output=True, text=True,
                          cwd=_REPO, env=env, timeout=300, check=False)
  assert result.returncode == 2
  assert f"error: cannot read image {photo / 'broken.jpg'}" in result.stderr
