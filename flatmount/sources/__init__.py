"""Where layers come from: tar streams, OCI layouts, containers/storage stores, directories and registries
(through skopeo's image proxy), each turned into the one tree model and the object store."""
