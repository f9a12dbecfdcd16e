"""The store: configuration, SQLite records, transactions and locks, and where objects, layers and
images live on disk. Operations (pull, flatten, mount, ...) take a store; the store never imports them.

Inside, bottom first: config, records, names, locks, paths, containers, leases < core (the lower
`Store`) < integrity, refs, batch (which take a Store).  flatmount.api.Store adds the operations."""
