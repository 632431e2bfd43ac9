"""virtio-pci transports: the register layouts (legacy I/O BAR and modern capabilities)."""
