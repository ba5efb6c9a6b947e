"""Ready experiment payload packages and run configs (bundled as package data)."""
