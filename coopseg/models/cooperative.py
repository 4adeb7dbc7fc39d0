"""The segmentor and the registor, wired as in the paper's Fig. 1."""
from __future__ import annotations

import torch
from torch import nn

from .registor import Registor
from .segmentor import Segmentor


class CooperativeNet(nn.Module):
    """forward(x1, x2) -> (logits1, logits2, coarse).

    x1, x2: (B, 1, *S) images of the pair on one grid (modality 1 = the easier one).
    The segmentor reads them as 2 channels and returns one mask logit per modality;
    the registor reads the *detached* probabilities sigmoid(logits) -- the paper's
    diodes: no loss reaches the segmentor through the registor's input. `coarse`
    is the registor's displacement grid that maps ŝ1 onto ŝ2 (coopseg_kernels.warp).
    `checkpointing` turns activation checkpointing of both networks' levels on/off.
    """

    def __init__(self, segmentor: Segmentor, registor: Registor, checkpointing: bool = False):
        super().__init__()
        if segmentor.spatial_dims != registor.spatial_dims:
            raise ValueError(f"segmentor and registor disagree on spatial_dims: "
                             f"{segmentor.spatial_dims} vs {registor.spatial_dims}")
        if segmentor.out_channels != registor.in_channels:
            raise ValueError(f"the registor reads the segmentor's {segmentor.out_channels} outputs: "
                             f"registor in_channels must be {segmentor.out_channels}, got {registor.in_channels}")
        self.segmentor = segmentor
        self.registor = registor
        self.checkpointing = checkpointing

    @property
    def checkpointing(self) -> bool:
        return self.segmentor.checkpointing

    @checkpointing.setter
    def checkpointing(self, on: bool) -> None:
        self.segmentor.checkpointing = bool(on)
        self.registor.checkpointing = bool(on)

    @property
    def spatial_dims(self) -> int:
        return self.segmentor.spatial_dims

    def forward(self, x1: torch.Tensor, x2: torch.Tensor):
        for name, x in (("x1", x1), ("x2", x2)):
            if not isinstance(x, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
            if x.dim() != self.spatial_dims + 2 or x.shape[1] != 1:
                raise ValueError(f"{name} must be (B, 1, *S) with {self.spatial_dims} spatial axes, "
                                 f"got shape {tuple(x.shape)}")
        if x1.shape != x2.shape:
            raise ValueError(f"x1 and x2 must share one grid, got shapes {tuple(x1.shape)} and {tuple(x2.shape)}")
        logits = self.segmentor(torch.cat((x1, x2), 1))
        coarse = self.registor(torch.sigmoid(logits).detach())
        return logits[:, 0:1], logits[:, 1:2], coarse
