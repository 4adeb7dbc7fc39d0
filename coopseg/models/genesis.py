"""Loading Models Genesis weights (Zhou et al. 2019, `Genesis_Chest_CT.pt`) into a Segmentor.

The published file is `{"state_dict": ...}` saved from nn.DataParallel, so every key
starts with `module.`; it is read with torch.load(weights_only=True).

- Keys whose name and shape match are copied ("loaded").
- The first conv, `down_tr64.ops.0.conv1.weight`, is (32, 1, 3, 3, 3) in Genesis and
  (32, 2, 3, 3, 3) here: the pretrained kernel is copied to each of the two input
  channels and divided by 2 ("adapted"), so a pair of identical images gives exactly
  the pretrained response and each modality starts with the same filters.
- The output conv `out_tr.final_conv.*` is re-initialised (Genesis outputs 1 channel
  for its own task; we need 2 masks) and reported as skipped.
- Keys this model lacks (e.g. running statistics under norm="instance") are skipped,
  with the reason in report["reasons"].
- Anything else is a CheckpointError naming the file and what was expected: a missing
  file (MissingCheckpointError, also a FileNotFoundError), a file torch cannot load with
  weights_only=True, one that is not a state dict of tensors (e.g. a coopseg training
  checkpoint), a key whose shape differs (e.g. a segmentor of width != 1), a file that
  lacks some of the segmentor's parameters (the output conv aside).
"""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import CheckpointError, MissingCheckpointError
from .segmentor import Segmentor

FIRST_CONV = "down_tr64.ops.0.conv1.weight"
OUTPUT_PREFIX = "out_tr."


def load_genesis(segmentor: Segmentor, path) -> dict:
    """Load a Models Genesis checkpoint into `segmentor` (in place).

    Returns dict(loaded=[keys], adapted=[keys], skipped=[keys], reasons={key: why}).
    """
    if not isinstance(segmentor, Segmentor):
        raise TypeError(f"segmentor must be a coopseg.models.Segmentor, got {type(segmentor).__name__}")
    if segmentor.spatial_dims != 3:
        raise ValueError(f"Models Genesis weights are 3-D: segmentor must have spatial_dims=3, "
                         f"got {segmentor.spatial_dims}")
    path = Path(path)
    expected = "expected Models Genesis weights (Genesis_Chest_CT.pt: {'state_dict': {name: tensor}})"
    if not path.is_file():
        why = "is a folder" if path.is_dir() else "no such file"
        raise MissingCheckpointError(f"{path}: {why}; {expected}")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # text, a volume, a truncated file, a pickle of other objects: all one message
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise CheckpointError(f"{path}: not a torch weights file ({first}); {expected}") from None
    if isinstance(ckpt, dict) and {"model", "optimizer", "config"} <= set(ckpt):
        raise CheckpointError(f"{path}: a coopseg training checkpoint, not Models Genesis weights; {expected} "
                              f"(to start from a coopseg checkpoint: train(init_checkpoint=...))")
    source = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(source, dict) or not source or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in source.items()):
        raise CheckpointError(f"{path}: {expected}, got {type(ckpt).__name__} "
                              f"{'without a state_dict of tensors' if isinstance(ckpt, dict) else ''}".rstrip())
    source = {(k[len("module."):] if k.startswith("module.") else k): v for k, v in source.items()}

    own = segmentor.state_dict()
    new, loaded, adapted, skipped, reasons = {}, [], [], [], {}
    for key, value in source.items():
        if key.startswith(OUTPUT_PREFIX):
            skipped.append(key)
            reasons[key] = "output conv re-initialised (2 masks here)"
        elif key not in own:
            skipped.append(key)
            reasons[key] = "no such parameter/buffer in this segmentor"
        elif key == FIRST_CONV and value.shape[1] == 1 and own[key].shape[1] != 1 \
                and value.shape[:1] + value.shape[2:] == own[key].shape[:1] + own[key].shape[2:]:
            c = own[key].shape[1]
            new[key] = value.expand(-1, c, *value.shape[2:]) / c
            adapted.append(key)
            reasons[key] = f"1 input channel replicated to {c}, divided by {c}"
        elif value.shape != own[key].shape:
            raise CheckpointError(
                f"{path}: {key} is {tuple(value.shape)} in the file, {tuple(own[key].shape)} in this segmentor "
                f"(width {segmentor.width:g}); {expected} for a width-1 segmentor")
        else:
            new[key] = value
            loaded.append(key)
    if not new:
        raise CheckpointError(f"{path}: no key matches the segmentor (is it a Models Genesis UNet3D checkpoint?); "
                              f"{expected}")
    params = {name for name, _ in segmentor.named_parameters()}
    lacking = [k for k in own if k in params and k not in new and not k.startswith(OUTPUT_PREFIX)]
    if lacking:
        raise CheckpointError(f"{path}: lacks {len(lacking)} of the segmentor's {len(params)} parameters "
                              f"(e.g. {lacking[0]}); {expected}, all of them")
    with torch.no_grad():
        for key, value in new.items():
            own[key].copy_(value.to(own[key].dtype))
        segmentor.out_tr.final_conv.reset_parameters()
    return dict(loaded=loaded, adapted=adapted, skipped=skipped, reasons=reasons)
