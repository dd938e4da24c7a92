r"""The default with UMR's camera multiplex and template: the baseline the default's levers are
measured against.

Command:
  python -m jaxrecon.main --config=configs/synthetic_umr_camera.py --workdir=workdir/umr_camera

Same data, network and length as configs/synthetic.py (300 steps), with UMR's choices restored
(NVlabs/UMR experiments/train_s2.py): the mask loss is the expectation over the hypotheses'
probabilities, an entropy term (0.05) sharpens them, no flip-consistency term, and the template is
the sphere. Expected result, measured on 2 shared cores, test split, seeds 0 / 1 (BENCHMARKS.md
"Reconstruction, judged in 3D"): camera error 100 / 79 deg after the frame fit (72 / 51 twin-aware),
chamfer_3d 0.142 / 0.129 (a sphere from the true camera: 0.101), mask IoU 0.71 / 0.72.
"""

import ml_collections

from configs import synthetic


def get_config() -> ml_collections.ConfigDict:
  config = synthetic.get_config()
  config.camera_selection = "expected"
  config.loss_weights.camera_entropy = 0.05
  config.loss_weights.camera_flip = 0.0
  config.model.template_axes = (1.0, 1.0, 1.0)
  return config
