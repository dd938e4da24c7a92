r"""The preview job: the untrained template sphere with a UV checkerboard, rendered from 4 views.

Command:
  python -m jaxrecon.main --config=configs/preview.py --workdir=workdir/preview
Expected result: workdir/preview/preview.png (RGB above, silhouettes below), template.obj and
preview.json, in under a minute on 2 CPU cores. It shows the texel layout, the UV sampler, the camera
and the rasterizer working together.
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.job = "preview"
  config.preview = {"num_views": 4, "scale": 0.7, "elevation_degrees": 20.0}
  config.render.image_size = 128
  return config
