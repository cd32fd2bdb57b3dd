"""Multi-view scene sources: a manifest of scene folders (``manifest``), the files and camera
formats inside them (``files``, ``formats``) and procedural scenes for tests and the demo."""
