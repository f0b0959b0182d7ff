"""Owner <-> VM key exchange over a libvirt boot channel (issue 9).

Two protocols end in the same place: the owner and the VM each pin the other's public key (SHA-256 of the
SubjectPublicKeyInfo) and talk over mutually authenticated TLS 1.3.

* shared-secret: a fresh 256-bit K reaches the VM in a fw_cfg entry backed by a root-only host file and the
  owner through `hostguard bootchannel attach`; an HMAC under K over both TLS certificates proves that no
  relay terminated TLS in the middle. K is used once and shredded on the host once the guest has read it.
* no-secrets: the owner's key hash reaches the VM in an SMBIOS type 11 OEM string; the VM's key hash comes
  back through the site over a virtio-serial channel (`hostguard bootchannel show`).

Layout: `tokens`, `protocol`, `tlschannel` and `session` are the pure protocol core (stdlib + cryptography +
hostguard.errors/strictjson only), shipped into guests together with `guest_agent` as one zipapp (`bundle`).
`bootchannel`, `collector` and `relay` are the host adapters; `owner_client` is the owner's side.
Nothing here imports libvirt or lxml at import time.
"""
