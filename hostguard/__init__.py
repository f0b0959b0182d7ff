"""hostguard: verify signed VM images before libvirt boots them, and guard running guests from the host."""

__version__ = "0.1.0"
