"""Floor 1: the SoftRas-style soft rasterizer (pure JAX). See docs/render.md."""

from jaxrecon.render.rasterize import default_tile_size
from jaxrecon.render.rasterize import pixel_centres
from jaxrecon.render.rasterize import soft_rasterize
from jaxrecon.render.rasterize import threshold
from jaxrecon.render.rasterize import tile_face_counts

__all__ = ["default_tile_size", "pixel_centres", "soft_rasterize", "threshold", "tile_face_counts"]
