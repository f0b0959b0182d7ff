"""Memory introspection: what really runs in a guest, read from its memory on the host (issue 7).

Entry points (import them from their modules; this package imports nothing, so loading it costs nothing):

* `hostguard.memory.inspect.inspect_domain_memory(name, manifest, kernel_path, workdir, ...)`: dump a running
  domain's memory, list its processes and kernel modules, scan it for ELF pages, compare with the manifest;
  `inspect_dump` does the same on an existing dump; `record_vdso_baseline` stores a kernel's vDSO pages
  from a trusted reference boot.
* `hostguard.memory.checkconfig.check_config(conn, name, fix=...)`: `hostguard domain check-config`.
* `hostguard.memory.diskref.disk_facts(reader, manifest)`: the disk side (inodes, first-page digests).

Layers: `acquire` (libvirt dump), `vmcoreinfo`, `vmlinux`, `kallsyms`, `btf`, `kernel` (facts of the
manifest-listed kernel file, cached), `analyze` (drgn) + `walk` (bounded walks of guest structures),
`elfscan`, `initrd`, `diskref`; `model` and `compare` are pure.
"""
