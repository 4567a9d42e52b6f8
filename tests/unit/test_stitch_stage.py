"""The stitch stage thread in-process: idle, it sleeps on its inbox instead of spinning."""

from __future__ import annotations

import queue
import threading
import time

from ptychostream.core.device import DeviceState
from ptychostream.core.pvdb import load_db
from ptychostream.pipeline.stitch import MosaicStage


class CountingQueue(queue.Queue):
    """A real queue that counts how often the stage asks it for a message."""

    def __init__(self, maxsize: int) -> None:
        super().__init__(maxsize)
        self.gets = 0
        self._count_lock = threading.Lock()

    def get(self, block: bool = True, timeout: float | None = None):
        with self._count_lock:
            self.gets += 1
        return super().get(block, timeout)


def test_idle_stage_waits_on_its_inbox():
    """With nothing to publish and the publish time long past, the stage polls at its 50 ms tick.

    It used to ask its inbox with a zero timeout in that state: an idle reconstructor burned
    most of a CPU core (77 % measured) on the stitch thread, holding the GIL.
    """
    stage = MosaicStage(DeviceState(load_db("reconstructor.db")), lambda text, severity: None)
    stage.inbox = CountingQueue(stage.inbox.maxsize)
    stage.start()
    try:
        time.sleep(0.1)  # past the first publish time, with a clean mosaic
        before = stage.inbox.gets
        time.sleep(1.0)  # the quiet second under test
        polls = stage.inbox.gets - before
    finally:
        stage.stop()
        stage.join(5)
    assert not stage.is_alive()
    # a 50 ms tick gives about 20 polls a second; a spinning loop gives tens of thousands
    assert 5 <= polls <= 60, polls
