"""The virtio-mmio v2 transport (pyvmm.virtio.mmio), driven as Linux drives it.

A tiny echo device (tests only) stands in for vsock: queue 0 is rx, queue 1
is tx; every tx chain's readable bytes are copied into the next rx chain.
The MockDriver replays the Linux 6.1 probe through the register window.
"""

from __future__ import annotations

from collections import deque

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyvmm.memory import GuestMemory
from pyvmm.virtio.device import (VIRTIO_MMIO_INT_CONFIG, VIRTIO_MMIO_INT_VRING, DeviceStatus,
                                 VirtioDevice, VirtioFeature, feature_mask)
from pyvmm.virtio.mmio import (VIRTIO_MMIO_MAGIC, VIRTIO_MMIO_VENDOR_ID, MmioReg, MmioTransport)
from pyvmm.virtio.mock import MockDriver

R = MmioReg
S = DeviceStatus
F = VirtioFeature
OFFERED = feature_mask(F.VIRTIO_F_VERSION_1, F.VIRTIO_F_INDIRECT_DESC, F.VIRTIO_F_EVENT_IDX, 0)
CONFIG = bytes(range(0x30, 0x30 + 12))


class EchoDevice(VirtioDevice):
    """rx = 0, tx = 1: each tx chain's readable bytes go to the next rx chain."""

    device_id = 42
    queue_max_sizes = (256, 256, 0)       # queue 2 is absent
    device_features = OFFERED
    config_size = len(CONFIG)
    config_writable = True

    def __init__(self) -> None:
        self.config = bytearray(CONFIG)
        self.activations: list[list] = []
        self.notifies: list[int] = []
        self.written: list[tuple[int, bytes]] = []
        self.resets = 0
        self.seen: list[bytes] = []
        self.pending: deque[bytes] = deque()
        self.queues = self.interrupt = None
        self.fail_on_notify = False

    def read_config(self, offset, size):
        return bytes(self.config[offset:offset + size])

    def write_config(self, offset, data):
        self.written.append((offset, data))

    def activate(self, memory, queues, interrupt):
        self.activations.append(queues)
        self.queues, self.interrupt = queues, interrupt

    def queue_notify(self, index):
        self.notifies.append(index)
        if self.fail_on_notify:
            raise RuntimeError("device bug")
        rx, tx = self.queues[0], self.queues[1]
        while True:                                   # the race-free loop
            tx.disable_notification()
            for chain in tx:
                data = chain.read_readable()
                self.seen.append(data)
                self.pending.append(data)
                tx.add_used(chain.head, 0)
            if not tx.enable_notification():
                break
        while self.pending and (chain := rx.pop()) is not None:
            rx.add_used(chain.head, chain.write_writable(self.pending.popleft()))
        if tx.needs_notification() | rx.needs_notification():
            self.interrupt(VIRTIO_MMIO_INT_VRING)

    def reset(self):
        self.resets += 1
        self.queues = self.interrupt = None
        self.pending.clear()


class Rig:
    def __init__(self, device: VirtioDevice | None = None) -> None:
        self.memory = GuestMemory(1 << 20)
        self.device = device or EchoDevice()
        self.irqs = 0
        self.t = MmioTransport(self.device, self.memory, self.irq)
        self.drv = MockDriver(self.memory, self.t)

    def irq(self) -> None:
        self.irqs += 1

    def reg(self, offset: int) -> int:
        return self.drv.mmio_read(offset)

    def set(self, offset: int, value: int) -> None:
        self.drv.mmio_write(offset, value)


@pytest.fixture
def rig() -> Rig:
    return Rig()


@pytest.fixture
def live() -> Rig:
    r = Rig()
    assert r.drv.probe(2)
    return r


# --- probe -------------------------------------------------------------------

def test_identity_registers(rig):
    assert rig.reg(R.VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC == int.from_bytes(b"virt", "little")
    assert rig.reg(R.VIRTIO_MMIO_VERSION) == 2
    assert rig.reg(R.VIRTIO_MMIO_DEVICE_ID) == 42
    assert rig.reg(R.VIRTIO_MMIO_VENDOR_ID) == VIRTIO_MMIO_VENDOR_ID
    assert rig.t.num_queues == 3 and MmioTransport.NOTIFY_OFFSET == 0x50


def test_linux_probe_reaches_driver_ok_and_activates_with_the_queues(rig):
    assert rig.drv.negotiate()
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == S.ACKNOWLEDGE | S.DRIVER | S.FEATURES_OK == 0xB
    assert rig.drv.setup_queues(2)
    assert rig.drv.read_config(0, 8) == CONFIG[:8]      # vsock reads guest_cid here
    assert rig.device.activations == []
    rig.drv.driver_ok()
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == 0xF
    (queues,) = rig.device.activations
    assert queues[2] is None                             # QueueSizeMax 0: absent
    for q, mq in zip(queues[:2], rig.drv.queues):
        assert (q.size, q.desc_table, q.avail_ring, q.used_ring) == \
            (256, mq.desc_gpa, mq.avail_gpa, mq.used_gpa)
        assert q.event_idx and q.indirect_desc
    assert rig.device.acked_features == OFFERED
    assert rig.t.errors.total() == 0


def test_feature_windows(rig):
    rig.set(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    assert rig.reg(R.VIRTIO_MMIO_DEVICE_FEATURES) == OFFERED >> 32 == 1
    rig.set(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0)
    assert rig.reg(R.VIRTIO_MMIO_DEVICE_FEATURES) == OFFERED & 0xFFFF_FFFF
    rig.set(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 7)
    assert rig.reg(R.VIRTIO_MMIO_DEVICE_FEATURES) == 0


def test_echo_end_to_end(live):
    rx, tx = live.drv.queues
    rx_head = rx.add_chain([], [16])
    rx.kick()
    tx_head = tx.add_chain([b"hello, ", b"world"])
    assert tx.kick()
    assert live.irqs == 1 and live.drv.handle_interrupt() == VIRTIO_MMIO_INT_VRING
    assert live.t.interrupt_status == 0
    assert [(u.head, u.len) for u in tx.used()] == [(tx_head, 0)]
    assert rx.used() == [(rx_head, 12, b"hello, world")]


# --- feature negotiation -------------------------------------------------------

def test_unoffered_feature_makes_features_ok_read_back_clear(rig):
    assert not rig.drv.negotiate(OFFERED | feature_mask(F.VIRTIO_F_RING_PACKED))
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == S.ACKNOWLEDGE | S.DRIVER | S.FAILED
    assert rig.t.errors["driver acked feature bits the device did not offer"] == 1


def test_features_ok_needs_version_1(rig):
    assert not rig.drv.negotiate(feature_mask(F.VIRTIO_F_EVENT_IDX))
    assert rig.t.errors["FEATURES_OK refused: VIRTIO_F_VERSION_1 not acked"] == 1
    assert rig.device.acked_features == 0


def test_features_beyond_64_bits_are_not_offered(rig):
    rig.drv.negotiate()
    rig.drv.reset()
    rig.set(R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER)
    rig.set(R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 2)
    rig.set(R.VIRTIO_MMIO_DRIVER_FEATURES, 1)
    rig.set(R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1)
    rig.set(R.VIRTIO_MMIO_DRIVER_FEATURES, 1)
    rig.drv.add_status(S.FEATURES_OK)
    assert not rig.reg(R.VIRTIO_MMIO_STATUS) & S.FEATURES_OK


def test_driver_features_are_frozen_after_features_ok(rig):
    rig.drv.negotiate(feature_mask(F.VIRTIO_F_VERSION_1))
    rig.set(R.VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0)
    rig.set(R.VIRTIO_MMIO_DRIVER_FEATURES, 1 << F.VIRTIO_F_EVENT_IDX)
    assert rig.t.driver_features == feature_mask(F.VIRTIO_F_VERSION_1)
    assert rig.t.errors["DriverFeatures written after FEATURES_OK"] == 1


def test_subset_of_features_gives_plain_queues(rig):
    assert rig.drv.probe(2, features=feature_mask(F.VIRTIO_F_VERSION_1))
    q = rig.device.activations[0][1]
    assert not q.event_idx and not q.indirect_desc


# --- status rules ------------------------------------------------------------

def test_status_bits_out_of_order_are_not_taken(rig):
    rig.set(R.VIRTIO_MMIO_STATUS, S.DRIVER)
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == 0
    rig.set(R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DRIVER_OK)
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == S.ACKNOWLEDGE
    assert rig.device.activations == []
    assert rig.t.errors["Status bit set out of order (not taken)"] == 2


def test_status_write_clearing_bits_is_dropped(rig):
    rig.drv.negotiate()
    rig.set(R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE)
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == 0xB
    assert rig.t.errors["Status write would clear bits (dropped)"] == 1


def test_driver_cannot_set_needs_reset(rig):
    rig.set(R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE | S.DEVICE_NEEDS_RESET)
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == S.ACKNOWLEDGE


def test_reset_clears_everything(live):
    rx, tx = live.drv.queues
    old_interrupt = live.device.interrupt
    old_queues = live.device.activations[0]
    tx.add_chain([b"x"])
    tx.kick()
    live.set(R.VIRTIO_MMIO_QUEUE_SEL, 1)
    live.set(R.VIRTIO_MMIO_DEVICE_FEATURES_SEL, 1)
    assert live.t.interrupt_status
    resets = live.device.resets                         # the probe itself began with a reset
    live.drv.reset()
    assert live.device.resets == resets + 1
    assert live.reg(R.VIRTIO_MMIO_STATUS) == 0
    assert live.reg(R.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert (live.t.queue_sel, live.t.device_features_sel, live.t.driver_features) == (0, 0, 0)
    for i in range(2):
        live.set(R.VIRTIO_MMIO_QUEUE_SEL, i)
        assert live.reg(R.VIRTIO_MMIO_QUEUE_READY) == 0
    assert all(q is None or not q.ready for q in old_queues)
    irqs = live.irqs
    old_interrupt(VIRTIO_MMIO_INT_VRING)                # a straggler from before the reset
    assert live.irqs == irqs and live.t.interrupt_status == 0
    # and the device can be brought up again from scratch
    assert live.drv.probe(2)
    assert len(live.device.activations) == 2


# --- queues ------------------------------------------------------------------

def test_queue_ready_with_non_power_of_two_size_is_refused(rig):
    rig.drv.negotiate()
    rig.drv.setup_queue(0)
    rig.drv.setup_queue(1, size=100)
    assert rig.reg(R.VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.reg(R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET
    assert rig.t.errors["QueueReady=1 refused: QueueSize is not a power of two"] == 1
    irqs = rig.irqs
    rig.drv.driver_ok()
    assert rig.device.activations == []
    assert rig.irqs == irqs + 1 and rig.t.interrupt_status == VIRTIO_MMIO_INT_CONFIG


def test_queue_larger_than_max_is_refused(rig):
    rig.drv.negotiate()
    rig.drv.setup_queue(0, size=512)
    assert rig.reg(R.VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.t.errors["QueueReady=1 refused: QueueSize exceeds QueueSizeMax"] == 1


def test_queue_ready_before_features_ok_is_refused(rig):
    rig.set(R.VIRTIO_MMIO_STATUS, S.ACKNOWLEDGE)
    rig.set(R.VIRTIO_MMIO_QUEUE_NUM, 256)
    rig.set(R.VIRTIO_MMIO_QUEUE_READY, 1)
    assert rig.reg(R.VIRTIO_MMIO_QUEUE_READY) == 0
    assert rig.reg(R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET


def test_driver_ok_with_a_queue_missing_does_not_activate(rig):
    rig.drv.negotiate()
    rig.drv.setup_queue(0)
    rig.drv.driver_ok()
    assert rig.device.activations == []
    assert rig.reg(R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET


def test_queue_registers_are_frozen_while_ready(live):
    live.set(R.VIRTIO_MMIO_QUEUE_SEL, 1)
    live.set(R.VIRTIO_MMIO_QUEUE_NUM, 16)
    live.set(R.VIRTIO_MMIO_QUEUE_DESC_LOW, 0x5000)
    q = live.t.queues[1]
    assert (q.size, q.desc) == (256, live.drv.queues[1].desc_gpa)
    assert live.t.errors["queue register written while QueueReady is 1"] == 2


def test_queue_size_max_is_zero_for_absent_queues(rig):
    for sel in (2, 3, 0xFFFF_FFFF):
        rig.set(R.VIRTIO_MMIO_QUEUE_SEL, sel)
        assert rig.reg(R.VIRTIO_MMIO_QUEUE_NUM_MAX) == 0
    rig.set(R.VIRTIO_MMIO_QUEUE_NUM, 4)
    assert rig.t.errors["queue register written for an absent queue"] == 1


def test_64_bit_queue_addresses_are_assembled_from_halves(rig):
    rig.drv.negotiate()
    rig.set(R.VIRTIO_MMIO_QUEUE_SEL, 0)
    rig.set(R.VIRTIO_MMIO_QUEUE_USED_HIGH, 0x1)
    rig.set(R.VIRTIO_MMIO_QUEUE_USED_LOW, 0x2000)
    rig.set(R.VIRTIO_MMIO_QUEUE_NUM, 8)
    assert rig.t.queues[0].device == 0x1_0000_2000
    rig.set(R.VIRTIO_MMIO_QUEUE_READY, 1)                # beyond 1 MiB of RAM
    assert rig.reg(R.VIRTIO_MMIO_QUEUE_READY) == 0


def test_queue_ready_zero_stops_the_queue(live):
    live.set(R.VIRTIO_MMIO_QUEUE_SEL, 1)
    live.set(R.VIRTIO_MMIO_QUEUE_READY, 0)
    assert live.reg(R.VIRTIO_MMIO_QUEUE_READY) == 0
    assert not live.device.activations[0][1].ready
    live.drv.queues[1].add_chain([b"x"])
    live.drv.queues[1].kick()
    assert live.device.notifies == []
    assert live.t.errors["QueueNotify for an absent or stopped queue"] == 1


def test_broken_avail_ring_sets_needs_reset_and_interrupts(live):
    tx = live.drv.queues[1]
    tx.set_avail_idx(300)                                # > 256 ahead
    tx.kick(force=True)
    assert live.reg(R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET
    assert live.drv.handle_interrupt() == VIRTIO_MMIO_INT_CONFIG


# --- notifications -------------------------------------------------------------

def test_notify_before_driver_ok_is_dropped_and_counted(rig):
    rig.drv.negotiate()
    rig.drv.setup_queues(2)
    for _ in range(3):
        rig.set(R.VIRTIO_MMIO_QUEUE_NOTIFY, 1)
    assert rig.t.notifies_before_driver_ok == 3
    assert rig.t.errors["QueueNotify before DRIVER_OK (dropped)"] == 3
    assert rig.device.notifies == []


def test_ioeventfd_path_applies_the_same_gate(live):
    live.t.queue_notify(1)
    assert live.device.notifies == [1]
    live.t.queue_notify(7)
    assert live.device.notifies == [1]


def test_interrupt_status_and_ack(live):
    live.device.interrupt(VIRTIO_MMIO_INT_VRING)
    live.device.interrupt(VIRTIO_MMIO_INT_CONFIG)
    assert live.irqs == 2
    assert live.reg(R.VIRTIO_MMIO_INTERRUPT_STATUS) == 3
    live.set(R.VIRTIO_MMIO_INTERRUPT_ACK, VIRTIO_MMIO_INT_VRING)
    assert live.reg(R.VIRTIO_MMIO_INTERRUPT_STATUS) == VIRTIO_MMIO_INT_CONFIG
    live.set(R.VIRTIO_MMIO_INTERRUPT_ACK, 0xFF)
    assert live.reg(R.VIRTIO_MMIO_INTERRUPT_STATUS) == 0
    assert live.t.errors["InterruptACK with undefined bits"] == 1


def test_device_exception_does_not_escape(live):
    live.device.fail_on_notify = True
    live.set(R.VIRTIO_MMIO_QUEUE_NOTIFY, 1)
    assert live.t.device_errors == {"queue_notify": 1}
    assert live.reg(R.VIRTIO_MMIO_STATUS) & S.DEVICE_NEEDS_RESET


# --- config space ------------------------------------------------------------

@pytest.mark.parametrize("size", [1, 2, 4, 8])
def test_config_reads_of_every_size(rig, size):
    for offset in range(0, len(CONFIG) - size + 1):
        assert rig.t.read(0x100 + offset, size) == CONFIG[offset:offset + size]
    assert rig.t.errors.total() == 0


@pytest.mark.parametrize("offset,size", [(len(CONFIG) - 1, 2), (len(CONFIG), 1), (0xEFC, 4), (0, 3)])
def test_config_access_outside_is_zeros(rig, offset, size):
    assert rig.t.read(0x100 + offset, size) == bytes(size)
    rig.t.write(0x100 + offset, b"\xff" * size)
    assert rig.device.written == []
    assert rig.t.errors["config read outside config space or of an odd size"] == 1


def test_config_write_reaches_the_device(rig):
    rig.t.write(0x104, b"\x01\x02")
    assert rig.device.written == [(4, b"\x01\x02")]


def test_config_write_to_a_read_only_space_is_counted_and_dropped(rig):
    rig.device.config_writable = False
    rig.t.write(0x104, b"\x01\x02")
    assert rig.device.written == []
    assert rig.t.errors["write to read-only device config space"] == 1


def test_config_generation_makes_the_driver_retry(rig):
    dev = rig.device
    reads = []

    def changing_read(offset, size):
        reads.append(offset)
        if len(reads) == 1:                              # the config changes under the first read
            with dev.config_update():
                dev.config[0:4] = b"NEW!"
        return bytes(dev.config[offset:offset + size])

    dev.read_config = changing_read
    assert rig.drv.read_config(0, 8) == b"NEW!" + CONFIG[4:8]
    assert reads == [0, 4, 0, 4]
    assert rig.reg(R.VIRTIO_MMIO_CONFIG_GENERATION) == 2


# --- odd accesses --------------------------------------------------------------

def test_undefined_and_write_only_registers_read_zero(rig):
    for offset in (0x018, 0x028, 0x040, 0x0F8):
        assert rig.reg(offset) == 0
    assert rig.reg(R.VIRTIO_MMIO_QUEUE_NOTIFY) == 0
    assert rig.t.errors["read of an undefined register"] == 4
    assert rig.t.errors["read of a write-only register"] == 1


def test_writes_to_read_only_and_undefined_registers_are_dropped(rig):
    rig.set(R.VIRTIO_MMIO_MAGIC_VALUE, 0)
    rig.set(R.VIRTIO_MMIO_INTERRUPT_STATUS, 3)
    rig.set(0x018, 1)
    assert rig.reg(R.VIRTIO_MMIO_MAGIC_VALUE) == VIRTIO_MMIO_MAGIC
    assert rig.t.errors["write to a read-only register"] == 2
    assert rig.t.errors["write to an undefined register"] == 1


@pytest.mark.parametrize("offset,size", [(0x070, 1), (0x070, 2), (0x070, 8), (0x072, 4), (0x001, 4)])
def test_non_32_bit_control_accesses_are_ignored(rig, offset, size):
    assert rig.t.read(offset, size) == bytes(size)
    rig.t.write(offset, b"\x01" * size)
    assert rig.reg(R.VIRTIO_MMIO_STATUS) == 0
    assert rig.t.errors["control register access not 32-bit aligned"] == 2


def test_shared_memory_absent_and_no_queue_reset(rig):
    rig.set(R.VIRTIO_MMIO_SHM_SEL, 0)
    for offset in (R.VIRTIO_MMIO_SHM_LEN_LOW, R.VIRTIO_MMIO_SHM_LEN_HIGH,
                   R.VIRTIO_MMIO_SHM_BASE_LOW, R.VIRTIO_MMIO_SHM_BASE_HIGH):
        assert rig.reg(offset) == 0xFFFF_FFFF
    assert rig.reg(R.VIRTIO_MMIO_QUEUE_RESET) == 0
    rig.set(R.VIRTIO_MMIO_QUEUE_RESET, 1)
    assert rig.t.errors["QueueReset written without VIRTIO_F_RING_RESET"] == 1


def test_devices_the_transport_cannot_serve_are_rejected():
    class NoVersion1(EchoDevice):
        device_features = feature_mask(F.VIRTIO_F_EVENT_IDX)

    class Packed(EchoDevice):
        device_features = OFFERED | feature_mask(F.VIRTIO_F_RING_PACKED)

    class OddQueue(EchoDevice):
        queue_max_sizes = (100,)

    for cls in (NoVersion1, Packed, OddQueue):
        with pytest.raises(ValueError):
            MmioTransport(cls(), GuestMemory(1 << 20))


# --- property: random chain shapes through the whole stack ---------------------

message = st.lists(st.binary(min_size=0, max_size=40), min_size=1, max_size=4)   # readable pieces


@settings(max_examples=40, deadline=None)
@given(st.lists(st.tuples(message, st.booleans(), st.integers(1, 3), st.booleans()),
                min_size=1, max_size=10),
       st.sampled_from(["linux", "separate"]),
       st.sampled_from([OFFERED, feature_mask(F.VIRTIO_F_VERSION_1, F.VIRTIO_F_INDIRECT_DESC)]))
def test_echo_preserves_bytes_and_order(msgs, layout, features):
    rig = Rig()
    assert rig.drv.probe(2, features=features, layout=layout)
    rx, tx = rig.drv.queues
    got = []
    for pieces, tx_indirect, rx_parts, rx_indirect in msgs:
        total = sum(map(len, pieces))
        part = total // rx_parts + 1
        rx.add_chain([], [part] * rx_parts, indirect=rx_indirect)
        rx.kick()
        tx.add_chain(pieces, indirect=tx_indirect)
        tx.kick()
        rig.drv.handle_interrupt()
        assert all(u.len == 0 for u in tx.used())
        got += [u.data for u in rx.used()]
    sent = [b"".join(pieces) for pieces, *_ in msgs]
    assert rig.device.seen == sent
    assert got == sent
    assert rig.t.errors.total() == 0 and rig.t.device_errors == {}
