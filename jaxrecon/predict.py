r"""Reconstruct your own images: ``python -m jaxrecon.predict --workdir=DIR --out=OUT IMAGE [IMAGE ...]``.

  python -m jaxrecon.predict --workdir=workdir/synthetic --out=/tmp/pred bird.jpg \
      [--mask=bird_mask.png | --bbox=x0,y0,x1,y1] [--texture_height=256] [--frames=24]

Loads the latest checkpoint of the workdir (and the config it saved), crops each image like CMR's
test-time preprocessing, predicts shape, camera and texture, and writes OUT/<image name>/:

  mesh.obj, mesh.mtl, mesh.png   the textured mesh (OBJ; mesh.png is the UV texture image)
  mesh.glb                       the same mesh as binary glTF
  turntable.gif                  a full turn about the image's vertical axis from the predicted view
  sheet.png                      input crop | predicted view | 4 novel views | UV texture (2 wide)
  input.png                      the crop the network saw

Cropping (`crop_box`): with ``--mask`` (a mask image of the same size, foreground > 50%) or
``--bbox`` (pixel corners, inclusive) the object's box is padded by 5% per side and squared about its
centre (CMR/UMR test preprocessing, NVlabs/UMR data/base.py `forward_img`; parts outside the image are filled with white as
CMR does, with a warning when the given box itself reaches outside; a box wholly outside the image is
an error); without either, the largest centred square of the whole image is used and a warning is
logged (the networks are trained on object-centred crops, so give a box for photos where the object
is small). The crop is resized to the config's image size with PIL's bilinear filter (antialiased).
Give --mask/--bbox once per image, in the images' order, or not at all.

Exported mesh: see `jaxrecon.export` (UV texture sampled by the predicted UV flow, per-vertex sphere
UVs, seam and pole handling, y-up canonical frame).
"""

from __future__ import annotations

import os
import sys

from absl import app
from absl import flags
from absl import logging
import jax
import jax.numpy as jnp
import numpy as np
from ml_collections import config_flags

from jaxrecon import cli, components, evaluation, export, ops
from jaxrecon.data import cub

FLAGS = flags.FLAGS


def define_flags():
  """The command line's flags (defined only when run as a script, so the module imports cleanly
  next to other absl programs)."""
  flags.DEFINE_string("workdir", None, "Training directory (config.json and checkpoints/).")
  flags.DEFINE_string("out", None, "Output folder (one subfolder per image).")
  flags.DEFINE_multi_string("mask", [], "Mask image per input image (same size; foreground > 50%).")
  flags.DEFINE_multi_string("bbox", [], "Object box per input image: x0,y0,x1,y1 in pixels (inclusive).")
  flags.DEFINE_integer("texture_height", 256, "Height of the exported UV texture (its width is twice that).")
  flags.DEFINE_integer("frames", 24, "Frames of the turntable GIF.")
  config_flags.DEFINE_config_file("config", None, "Optional config file instead of <workdir>/config.json.",
                                  lock_config=False)
  flags.DEFINE_string("compilation_cache", os.path.join("~", ".cache", "jaxrecon", "xla"),
                      "Persistent XLA compilation cache; '' = off.")


PADDING = 0.05     # CMR/UMR test-time bbox padding per side
NUM_NOVEL = 4


# ----------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------


def load_image(path: str) -> np.ndarray:
  """(H, W, 3) float32 in [0, 1]; alpha is dropped, greyscale expanded. Errors name the file."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"image {path} not found")
  try:
    with Image.open(path) as im:
      return np.asarray(im.convert("RGB"), np.float32) / 255.0
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read image {path}: {e} (give a PNG/JPEG/... file PIL can open)") from e


def load_mask(path: str, shape) -> np.ndarray:
  """(H, W) float32 in [0, 1] from a mask image (alpha channel if it has one, else luminance)."""
  from PIL import Image, UnidentifiedImageError  # pylint: disable=g-import-not-at-top
  if not os.path.isfile(path):
    raise FileNotFoundError(f"--mask {path} not found")
  try:
    with Image.open(path) as im:
      mask = np.asarray(im.getchannel("A") if im.mode in ("RGBA", "LA") else im.convert("L"), np.float32) / 255.0
  except (UnidentifiedImageError, OSError) as e:
    raise ValueError(f"cannot read --mask {path}: {e}") from e
  if mask.shape != tuple(shape[:2]):
    raise ValueError(f"--mask {path} is {mask.shape[1]}x{mask.shape[0]} but its image is {shape[1]}x{shape[0]}")
  return mask


def parse_bbox(text: str) -> np.ndarray:
  """'x0,y0,x1,y1' -> (4,) float array; errors name --bbox."""
  try:
    box = np.array([float(v) for v in text.split(",")])
  except ValueError:
    box = np.zeros(0)
  if box.shape != (4,) or box[2] < box[0] or box[3] < box[1]:
    raise ValueError(f"--bbox={text!r} must be x0,y0,x1,y1 in pixels with x0 <= x1 and y0 <= y1")
  return box


def check_bbox(bbox, shape) -> bool:
  """Raises ValueError for a box wholly outside the image (its crop would be all white); returns
  whether it reaches partly outside (kept: the outside is filled white, as CMR does)."""
  h, w = shape[:2]
  x0, y0, x1, y1 = (float(v) for v in bbox)
  text = ",".join(f"{v:g}" for v in (x0, y0, x1, y1))
  if x1 < 0 or y1 < 0 or x0 > w - 1 or y0 > h - 1:
    raise ValueError(f"--bbox={text} lies wholly outside the {w}x{h} image (x in 0..{w - 1}, y in 0..{h - 1})")
  return x0 < 0 or y0 < 0 or x1 > w - 1 or y1 > h - 1


def crop_box(shape, bbox=None, mask=None, padding: float = PADDING) -> tuple[np.ndarray, str]:
  """The square crop (x0, y0, x1, y1), inclusive pixels, and how it was chosen.

  bbox or mask: the object's box (from the mask's pixels > 0.5) padded by `padding` per side and
  squared (CMR's `peturb_bbox` without jitter + `square_bbox`). Neither: the largest centred square.
  A bbox wholly outside the image raises ValueError (`check_bbox`).
  """
  h, w = shape[:2]
  if mask is not None:
    ys, xs = np.nonzero(mask > 0.5)
    if not len(xs):
      raise ValueError("the mask has no foreground pixels (> 50%)")
    bbox = np.array([xs.min(), ys.min(), xs.max(), ys.max()], np.float64)
    how = "mask"
  elif bbox is not None:
    check_bbox(bbox, shape)
    how = "bbox"
  else:
    side = min(h, w)
    x0, y0 = (w - side) // 2, (h - side) // 2
    return np.array([x0, y0, x0 + side - 1, y0 + side - 1]), "centre"
  return cub.square_bbox(cub.perturb_bbox(np.asarray(bbox, np.float64), padding, 0.0, None)), how


def prepare_input(image, box, size: int) -> np.ndarray:
  """Crop `box` (white outside the image, as CMR) and resize to size×size (PIL bilinear)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  patch = cub.crop(image, box, fill=1.0)
  resized = Image.fromarray(export.to_uint8(patch)).resize((size, size), Image.BILINEAR)
  return np.asarray(resized, np.float32) / 255.0


# ----------------------------------------------------------------------------------------------
# Prediction
# ----------------------------------------------------------------------------------------------


def make_predictor(config, model, sphere, texture_size=(256, 512), frames: int = 24, num_novel: int = NUM_NOVEL):
  """A jitted (params, batch_stats, images (B, S, S, 3)) -> dict of:

  vertices (B, V, 3), cam (B, 7) (most probable hypothesis), view (B, S, S, 4) from the predicted
  camera, novel (B, num_novel, S, S, 4) at turns of 360°·k/(num_novel+1), turntable (B, frames, S, S, 4)
  over a full turn from the predicted view, uv_texture (B, H, W, 3) (`export.uv_texture_image`).
  Renders are premultiplied RGB + alpha (black background).
  """
  uv_sampler = components.make_uv_sampler(config, sphere)
  rasterize = components.make_rasterizer(config, for_evaluation=True)
  screen_faces = components.make_screen_faces(config, sphere.faces)

  @jax.jit
  def predict(params, batch_stats, images):
    pred = model.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    b = images.shape[0]
    cam = pred.cam_hypotheses[jnp.arange(b), jnp.argmax(pred.cam_probs, axis=1)]
    colours = ops.grid_sample(images, components.face_flow(pred.uv_flow, uv_sampler), align_corners=True)

    def render(angles):   # angles (n,) -> (B, n, S, S, 4)
      n = angles.shape[0]
      cams = components.turn_cameras(jnp.repeat(cam, n, 0), jnp.tile(angles, b))
      rgba = rasterize(screen_faces(jnp.repeat(pred.vertices, n, 0), cams), jnp.repeat(colours, n, 0))
      rgba = jnp.concatenate([rgba[..., :3] * rgba[..., 3:], rgba[..., 3:]], -1)
      return rgba.reshape((b, n) + rgba.shape[1:])

    novel_angles = 2 * jnp.pi * jnp.arange(1, num_novel + 1) / (num_novel + 1)
    return {"vertices": pred.vertices, "cam": cam, "view": render(jnp.zeros(1))[:, 0],
            "novel": render(novel_angles), "turntable": render(2 * jnp.pi * jnp.arange(frames) / frames),
            "uv_texture": export.uv_texture_image(images, pred.uv_flow, *texture_size)}

  return predict


def make_sheet(image, view, novel, uv_texture) -> np.ndarray:
  """input | predicted view | novel views | UV texture resized to S×2S: (S, (2 + n + 2)·S, 3) in [0, 1]."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  s = image.shape[0]
  uv = np.asarray(Image.fromarray(export.to_uint8(uv_texture)).resize((2 * s, s), Image.BILINEAR), np.float32) / 255
  panels = [image, view[..., :3]] + [v[..., :3] for v in novel] + [uv]
  return np.clip(np.concatenate(panels, axis=1), 0.0, 1.0)


def _names(paths):
  """Output folder names: the image file stems, made unique."""
  names, seen = [], {}
  for p in paths:
    stem = os.path.splitext(os.path.basename(p))[0] or "image"
    seen[stem] = seen.get(stem, 0) + 1
    names.append(stem if seen[stem] == 1 else f"{stem}_{seen[stem]}")
  return names


def run(workdir: str, images, out: str, masks=(), bboxes=(), *, config=None, texture_height: int = 256,
        frames: int = 24) -> list[dict]:
  """Predict every image; returns, per image, the written files and the crop used."""
  images, masks, bboxes = list(images), list(masks or ()), list(bboxes or ())
  if not images:
    raise ValueError("no input images: pass IMAGE [IMAGE ...] after the flags")
  for what, given in (("--mask", masks), ("--bbox", bboxes)):
    if given and len(given) != len(images):
      raise ValueError(f"{len(given)} {what} value(s) for {len(images)} image(s): give one per image, in order")
  if masks and bboxes:
    raise ValueError("give --mask or --bbox, not both")
  if not out:
    raise ValueError("--out=DIR is required")
  bboxes = [parse_bbox(b) for b in bboxes]
  # Read every input before the (slow) model work, so a bad file fails at once.
  loaded = [load_image(p) for p in images]
  mask_arrays = [load_mask(m, im.shape) for m, im in zip(masks, loaded)]
  for path, box, image in zip(images, bboxes, loaded):
    try:
      partly_outside = check_bbox(box, image.shape)
    except ValueError as e:
      raise ValueError(f"{path}: {e}") from None
    if partly_outside:
      h, w = image.shape[:2]
      logging.warning("%s: --bbox=%s reaches outside the %dx%d image; the outside is filled white (as CMR)", path,
                      ",".join(f"{v:g}" for v in box), w, h)

  if not os.path.isdir(workdir):
    raise FileNotFoundError(f"--workdir={workdir} does not exist")
  config = evaluation.load_config(workdir) if config is None else config
  sphere, model, state = evaluation.restore_model(workdir, config)
  s = config.data.image_size
  predictor = make_predictor(config, model, sphere, (texture_height, 2 * texture_height), frames)
  results = []
  for i, (path, name, image) in enumerate(zip(images, _names(images), loaded)):
    box, how = crop_box(image.shape, bbox=bboxes[i] if bboxes else None,
                        mask=mask_arrays[i] if mask_arrays else None)
    if how == "centre":
      logging.warning("%s: no --mask or --bbox, so the largest centred square of the image is used; "
                      "give a box if the object does not fill the image", path)
    crop = prepare_input(image, box, s)
    out_dir = os.path.join(out, name)
    os.makedirs(out_dir, exist_ok=True)
    p = jax.device_get(predictor(state.params, state.batch_stats, jnp.asarray(crop[None])))
    p = {k: np.asarray(v)[0] for k, v in p.items()}
    mesh = export.textured_mesh(p["vertices"], sphere, p["uv_texture"], symmetric_uv=config.mesh.symmetric_uv)
    files = export.export_mesh(mesh, out_dir, "mesh")
    files["gif"] = export.save_gif(p["turntable"][..., :3], os.path.join(out_dir, "turntable.gif"))
    from PIL import Image  # pylint: disable=g-import-not-at-top
    files["sheet"] = os.path.join(out_dir, "sheet.png")
    Image.fromarray(export.to_uint8(make_sheet(crop, p["view"], p["novel"], p["uv_texture"]))).save(files["sheet"])
    files["input"] = os.path.join(out_dir, "input.png")
    Image.fromarray(export.to_uint8(crop)).save(files["input"])
    logging.info("%s -> %s (crop %s from the %s)", path, out_dir, box.tolist(), how)
    print(f"{path} -> {out_dir}")
    results.append({"image": path, "files": files, "crop_box": box.tolist(), "crop_from": how, "cam": p["cam"].tolist(),
                    "step": state.step})
  return results


def main(argv):
  cli.quiet_third_party_logs()
  if FLAGS.compilation_cache:
    jax.config.update("jax_compilation_cache_dir", os.path.expanduser(FLAGS.compilation_cache))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)
  try:
    run(FLAGS.workdir, argv[1:], FLAGS.out, FLAGS.mask, FLAGS.bbox, config=FLAGS.config,
        texture_height=FLAGS.texture_height, frames=FLAGS.frames)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
  define_flags()
  flags.mark_flags_as_required(["workdir", "out"])
  app.run(main, flags_parser=cli.parse_flags)
