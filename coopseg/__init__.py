"""coopseg: the thin model and training layer on top of coopseg_kernels.

  coopseg.models    Segmentor (Models Genesis UNet3D), Registor, CooperativeNet, load_genesis
  coopseg.losses    cooperative_loss: L_r, L_g, L_p with the paper's stop-gradients
  coopseg.data      build_dataset; coopseg.data.toy: the toy pairs of the paper's §3.1
  coopseg.train     Config, load_config, train (three stages, checkpoints, exact resume, DDP)
  coopseg.evaluation, coopseg.cli   paired statistics and the `coopseg` command

Submodules are imported on use (importing coopseg stays light).
"""
from .evaluation import PairedTest, paired_wilcoxon

__all__ = ["PairedTest", "paired_wilcoxon"]
