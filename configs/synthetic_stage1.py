r"""Stage 1 on `synthetic_birds`: learn the template V_temp from the sphere and its part labels.

Command:
  python -m jaxrecon.main --config=configs/synthetic_stage1.py --workdir=workdir/synthetic_stage1

UMR's stage 1 (NVlabs/UMR experiments/train_s1.py) at CPU size: one camera, the sphere start,
mask 3.0, smoothness, the deformation loss only after the first template update, the
symmetry-plane regulariser only before it, texture 3.0 / 3.0 and texture cycle 0.5; no variance
branch, no FID (the paper, §4.1).
The template moves to the dataset-mean shape every `template.update_every` steps; at the end the
template folder (jaxrecon.template) is written to <workdir>/template. Stage 2 reads it with
--config.model.template_dir=<workdir>/template (configs/synthetic_pipeline.py chains the two).
Expected result: numbers in BENCHMARKS.md ("Stage 1 and the semantic template"): the learned
template's normalised chamfer to the ground-truth mean shape is well below the sphere's, and most
vertices carry the ground-truth part label.
"""

import ml_collections

from configs import synthetic


def get_config() -> ml_collections.ConfigDict:
  config = synthetic.get_config()
  config.stage = "template"
  config.num_train_steps = 200
  config.model.num_hypotheses = 1
  config.model.camera_init = "azimuths"   # one hypothesis: a side view
  config.model.template_axes = (1.0, 1.0, 1.0)   # UMR's sphere start
  config.camera_selection = "expected"           # (one hypothesis: no selection to make)
  config.variance.mode = "none"
  w = config.loss_weights
  w.mask, w.laplacian, w.flatten, w.deform = 3.0, 0.15, 0.0004, 5.0
  w.texture_l1, w.texture_dt, w.texture_cycle = 3.0, 3.0, 0.5
  w.symmetry_plane = 0.4
  w.camera_entropy = 0.0
  w.camera_flip = 0.0
  w.variance_lookahead, w.fid = 0.0, 0.0
  # UMR's stage-1 GAN judges silhouettes (weight 1.0); off on CPU like stage 2's, on in cub_stage1.py.
  config.gan_input = "silhouette"
  w.gan = 0.0
  config.template.update_every = 100
  # UMR: deformation only after the first update, the symmetry plane only in the first epochs.
  config.loss_steps.deform = (100, None)
  config.loss_steps.symmetry_plane = (0, 60)
  config.eval.splits = ("validation",)
  return config
