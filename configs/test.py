r"""A tiny CPU configuration for tests: same code paths as `default.py`, small sizes.

Command:
  python -m jaxrecon.main --config=configs/test.py --workdir=/tmp/jaxrecon_test
Expected result: the preview job finishes in a few seconds and writes template.obj and preview.png.
"""

from configs import default


def get_config():
  config = default.get_config()
  config.mesh.subdivisions = 2
  config.mesh.texels_per_edge = 2
  config.render.image_size = 32
  config.preview.num_views = 2
  return config
