"""The store: configuration, SQLite records, transactions and locks, and where objects, layers and
images live on disk. Operations (pull, flatten, mount, ...) take a store; the store never imports them."""
