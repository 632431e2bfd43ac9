"""PCI layer: config access (CF8/CFC, ECAM), enumeration, capabilities, BARs, MSI-X."""

from .bus import Bar, Capability, PciBus, PciError, PciFunction
from .config import Bdf, Cf8Access, ConfigAccess, EcamAccess
from .msix import Msix, MsixCapability, MsixTimeout

__all__ = [
    "Bar",
    "Bdf",
    "Capability",
    "Cf8Access",
    "ConfigAccess",
    "EcamAccess",
    "Msix",
    "MsixCapability",
    "MsixTimeout",
    "PciBus",
    "PciError",
    "PciFunction",
]
