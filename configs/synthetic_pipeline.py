r"""The two stages on `synthetic_birds`, chained and resumable: stage 1 → semantic template → stage 2.

Command:
  python -m jaxrecon.main --config=configs/synthetic_pipeline.py --workdir=workdir/pipeline

Stage 1 (configs/synthetic_stage1.py) trains in <workdir>/stage1 and writes <workdir>/template;
stage 2 (configs/synthetic.py) trains on that template in <workdir>/stage2. Killed at any point and
restarted with the same command, it resumes at the right stage. Override a stage's field with
--config.stage1.x=... or --config.stage2.x=...; --config.data_dir sets both stages' data folder.
Expected result: <workdir>/metrics.json with stage 2's evaluation and stage 1's template metrics;
the numbers of the measured run are in BENCHMARKS.md ("Stage 1 and the semantic template").
"""

import ml_collections

from configs import synthetic, synthetic_stage1


def get_config() -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict()
  config.job = "pipeline"
  config.data_dir = ml_collections.config_dict.placeholder(str)
  config.stage1 = synthetic_stage1.get_config()
  config.stage2 = synthetic.get_config()
  # On the learned template the shape starts close: UMR's stage-2 deformation weight.
  config.stage2.loss_weights.deform = 1.0
  # The semantic terms of the template's parts (Eq. 13-14), UMR's weights.
  config.stage2.loss_weights.part_probability = 5.0
  config.stage2.loss_weights.part_chamfer = 10.0
  return config
