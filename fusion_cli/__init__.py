"""fusion-cli: remote-sensing image fusion with FusionMamba.

Data flow, one module each: read pair and check grids (`raster`), place the MS on the PAN grid
(`align`), cut into overlapping windows (`tiling`), fuse (`models`, `classical`), blend and write
(`tiling`, `raster`), assess (`metrics`, `wald`, `evaluate`).
"""

__version__ = "0.1.0"
