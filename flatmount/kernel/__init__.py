"""Kernel plumbing below the store: EROFS/overlay mounts (new mount API, loop fallback), mount namespaces,
and who still holds a lazily detached mount. Knows nothing of stores or images."""
