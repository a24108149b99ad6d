"""Triangle meshes: the Mesh type, extraction (FlexiCubes), I/O and metrics."""
