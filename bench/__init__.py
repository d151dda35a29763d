"""pyvmm's benchmarks: vsock against its ceilings and against QEMU (bench/README.md)."""
