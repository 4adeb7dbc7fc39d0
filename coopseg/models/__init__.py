"""The networks of the paper: the segmentor (Models Genesis UNet3D), the registor,
and the cooperative pair; loading Models Genesis weights."""
from .cooperative import CooperativeNet
from .genesis import load_genesis
from .norm import NORMS, BatchNormNd
from .registor import OMEGAS, POOLS, Registor
from .segmentor import WIDTH_MAX, Segmentor

__all__ = ["Segmentor", "Registor", "CooperativeNet", "load_genesis", "BatchNormNd", "NORMS", "OMEGAS", "POOLS",
           "WIDTH_MAX"]
