"""The hostguard test bed: real bootable guests built from host packages, and a libvirt fixture.

Shared by the integration tests and the demo. Nothing here runs at import time; the heavy work happens when
`guests.busybox_guest()` / `guests.python_guest()` or `libvirt_env.LibvirtEnv` are used.
"""
