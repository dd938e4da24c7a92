r"""A tiny CPU configuration for tests: every code path of `synthetic.py`, tiny sizes.

Command:
  python -m jaxrecon.main --config=configs/test.py --workdir=/tmp/jaxrecon_test
Expected result: builds synthetic_birds/tiny (40 examples at 64 px), trains 3 steps and evaluates, in
about a minute on 2 cores (most of it compilation).
"""

from configs import synthetic


def get_config():
  config = synthetic.get_config()
  config.batch_size = 8
  config.num_train_steps = 3
  config.log_every = 1
  config.log_images_every = 3
  config.checkpoint.every = 2
  config.data.synthetic_config = "tiny"
  config.data.image_size = 64
  config.mesh.texels_per_edge = 2
  config.model.feature_dim = 16
  config.model.encoder_conv_channels = 8
  config.model.resnet_widths = (4, 4, 8, 8)
  config.model.num_hypotheses = 2
  config.model.camera_width = 8
  config.model.flow_base_channels = 8
  config.model.flow_stages = 2
  config.model.variance_base_channels = 8
  config.model.variance_stages = 1
  config.model.disc_channels = 4
  config.model.disc_layers = 3
  config.optim.learning_rate = 1e-3
  config.loss_weights.gan = 0.1     # off in the CPU default; on here so the tests cover the GAN path
  config.eval.max_batches = 1
  return config
