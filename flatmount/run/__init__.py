"""Containers on runc: the OCI runtime config, the bundle (a private mount of the image as rootfs),
network namespaces, terminals, and the runner that drives `runc`."""
