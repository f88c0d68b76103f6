"""imagesync: keep the newest version of named VM images on every cloud and store that needs it."""

__version__ = "0.1.0"
