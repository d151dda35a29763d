"""The kernel command line, built with checks (compare rust-vmm linux-loader ``Cmdline``).

A command line is a space-separated list of ``key`` or ``key=value`` words,
NUL-terminated in guest memory.  Linux parses double quotes, so a value with
spaces is written ``key="a b"``.  :meth:`Cmdline.add_virtio_mmio_device`
writes the ``virtio_mmio.device=<size>@<base>:<irq>[:<id>]`` form that
``drivers/virtio/virtio_mmio.c`` (``vm_cmdline_set``) parses when the kernel
has ``CONFIG_VIRTIO_MMIO_CMDLINE_DEVICES``.
"""

from __future__ import annotations

from ..errors import ConfigError


def _check_text(text: str, what: str) -> None:
    if not text.isascii() or not text.isprintable():
        raise ConfigError(f"kernel command line {what} {text!r} must be printable ASCII")


class Cmdline:
    def __init__(self, capacity: int) -> None:
        """``capacity`` counts the terminating NUL (the boot protocol's cmdline_size + 1)."""
        self.capacity = capacity
        self._words: list[str] = []

    def _append(self, word: str) -> None:
        new_len = len(str(self)) + (1 if self._words else 0) + len(word) + 1
        if new_len > self.capacity:
            raise ConfigError(f"kernel command line would be {new_len} bytes with its NUL; "
                              f"the limit is {self.capacity}")
        self._words.append(word)

    def insert(self, key: str, value: str | int | None = None) -> "Cmdline":
        """Add ``key`` or ``key=value``; a value with spaces is quoted."""
        _check_text(key, "key")
        if not key or any(c in key for c in ' ="'):
            raise ConfigError(f"kernel command line key {key!r} is empty or has ' ', '=' or '\"'")
        if value is None:
            self._append(key)
            return self
        value = str(value)
        _check_text(value, "value")
        if '"' in value:
            raise ConfigError(f"kernel command line value {value!r} contains '\"'")
        if " " in value:
            value = f'"{value}"'
        self._append(f"{key}={value}")
        return self

    def insert_str(self, text: str) -> "Cmdline":
        """Append free text given by the user, as it is (quotes and all)."""
        _check_text(text, "text")
        text = text.strip()
        if text:
            self._append(text)
        return self

    def add_virtio_mmio_device(self, size: int, base: int, irq: int,
                               device_id: int | None = None) -> "Cmdline":
        if size <= 0 or irq <= 0:
            raise ConfigError("a virtio-mmio device needs a size and a non-zero IRQ")
        size_text = f"{size // 1024}K" if size % 1024 == 0 else str(size)
        value = f"{size_text}@{base:#x}:{irq}"
        if device_id is not None:
            value += f":{device_id}"
        return self.insert("virtio_mmio.device", value)

    def has(self, key: str) -> bool:
        """Is ``key`` (or ``key=...``) already on the line?"""
        return any(w == key or w.startswith(key + "=") for w in str(self).split())

    def __str__(self) -> str:
        return " ".join(self._words)

    def as_bytes(self) -> bytes:
        """NUL-terminated, as the guest reads it."""
        return str(self).encode("ascii") + b"\0"
