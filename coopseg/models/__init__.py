"""The networks of the paper: the segmentor (Models Genesis UNet3D), the registor,
and the cooperative pair; loading Models Genesis weights."""
from .cooperative import CooperativeNet
from .genesis import load_genesis
from .norm import NORMS, BatchNormNd
from .registor import OMEGAS, POOLS, Registor
from .segmentor import WIDTH_MAX, Segmentor
from .toy_unet import CONTEXTS as UNET_CONTEXTS
from .toy_unet import LEVELS_MAX as UNET_LEVELS_MAX
from .toy_unet import ToyUNet

SEGMENTORS = ("genesis", "unet")

__all__ = ["Segmentor", "ToyUNet", "SEGMENTORS", "UNET_CONTEXTS", "UNET_LEVELS_MAX",
           "Registor", "CooperativeNet", "load_genesis", "BatchNormNd", "NORMS", "OMEGAS", "POOLS",
           "WIDTH_MAX"]
