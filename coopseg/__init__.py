"""coopseg: the thin model and training layer on top of coopseg_kernels.

  coopseg.models      Segmentor (Models Genesis UNet3D), Registor, CooperativeNet, load_genesis
  coopseg.losses      cooperative_loss: L_r, L_g, L_p with the paper's stop-gradients
  coopseg.data        build_dataset; coopseg.data.toy: the toy pairs of the paper's §3.1
  coopseg.train       Config, load_config, train (three stages, checkpoints, exact resume, DDP)
  coopseg.infer       sliding-window prediction of a T1/T2 pair
  coopseg.evaluation  the §3.2.3 evaluation and paired statistics
  coopseg.toy         the §3.1 lambda sweep
  coopseg.errors      the ValueError subclasses raised for bad input (ConfigError, VolumeError, ...)
  coopseg.cli         the `coopseg` command (the only module that knows argparse and exit codes)

Imports point one way: coopseg_kernels <- models, losses, data <- train, infer, evaluation,
toy <- cli (tests/test_layers.py checks it). Importing coopseg loads the evaluation layer
(torch, coopseg_kernels); optional dependencies (nibabel, scipy, matplotlib, ...) are imported
only by the functions that need them.
"""
from .errors import CheckpointError, ConfigError, CoopsegError, VolumeError
from .evaluation import PairedTest, paired_wilcoxon

__all__ = ["PairedTest", "paired_wilcoxon", "CoopsegError", "ConfigError", "VolumeError", "CheckpointError"]
