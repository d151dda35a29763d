"""virtio-blk (virtio 1.2 §5.2, device ID 2) and the images behind it.

``backend`` is the seam between the device and the host file: the device turns the
guest's requests into :class:`~pyvmm.blk.backend.BlockRequest` batches, a backend
(a raw file, or QEMU's storage daemon over NBD for every other image format)
carries them out.
"""
