"""A test plugin whose import fails, as a plugin with a bug or a missing dependency would."""

raise ImportError("broken_plugin: this test plugin always fails to import")
