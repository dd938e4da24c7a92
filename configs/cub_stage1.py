r"""CUB-200-2011, stage 1: the template V_temp from the sphere, and its SCOPS part labels.

Command:
  python -m jaxrecon.main --config=configs/cub_stage1.py --workdir=workdir/cub_stage1 \
    --config.data.cub_dir=/data/CUB_200_2011 --config.data.cub_cache_dir=/data/cmr_cachedir \
    --config.data.scops_dir=/data/scops --config.weights.resnet18=weights/resnet18.npz

UMR's stage 1 (NVlabs/UMR experiments/train_s1.py): one camera, mask 3.0, laplacian 0.15,
flatten 0.0004, deformation 5.0 after the first template update, the symmetry-plane regulariser
0.4 for the first 3 epochs, texture 3.0 / 3.0, texture cycle 0.5, template update every 5 epochs
(~1,865 steps at batch 16); 100 epochs (our choice; UMR's default is 500 epochs per stage); UMR
trains it with batch 64 over 4 GPUs. Not run by jaxrecon yet. Expected result: the template
folder <workdir>/template (jaxrecon.template) for configs/cub.py's --config.model.template_dir.
The GAN judges silhouettes (novel view vs seen view), as UMR's stage 1.
"""

import ml_collections

from configs import cub, synthetic_stage1


def get_config() -> ml_collections.ConfigDict:
  config = cub.get_config()
  reference = synthetic_stage1.get_config()
  config.stage = "template"
  config.model.num_hypotheses = 1
  config.model.camera_init = "identity"
  config.variance.mode = "none"
  config.loss_weights = reference.loss_weights
  config.loss_weights.texture_perceptual = 3.0     # UMR's texture loss
  config.loss_weights.texture_l1 = 0.0
  config.loss_weights.gan = 1.0                    # UMR's silhouette GAN
  epoch = 373                                      # 5,964 training images / 16
  config.template.update_every = 5 * epoch
  config.loss_steps.deform = (5 * epoch, None)
  config.loss_steps.symmetry_plane = (0, 3 * epoch)
  config.num_train_steps = 100 * epoch
  config.template.update_images = 0
  return config
