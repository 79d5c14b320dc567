"""Running the sparse model for real: the decode runtimes (MLP in RAM, or offloaded to a file with a
RAM cache), the decode loop, `dipstream generate` and `dipstream probe`. The kernels they call live
in :mod:`dipstream.kernels`."""
