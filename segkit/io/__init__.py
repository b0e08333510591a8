"""File IO without torch: streaming TIFF read/write (`tiff`), zarr / OME-Zarr (`zarr`), the one write
path with its checks and atomic rename (`outputs`) and pixel-size resampling (`resample`).

Nothing here imports torch; the submodules are imported where they are used (`segkit.io.tiff`, ...),
so `import segkit.io` stays light.
"""

__all__ = ["outputs", "resample", "tiff", "zarr"]
