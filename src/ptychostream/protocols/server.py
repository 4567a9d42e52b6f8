"""Run a :class:`DeviceState` as a soft IOC: PVA (p4p) and optionally CA (caproto) in one process.

The thin asyncio front end: one event loop hosts the CA server and the device's
periodic tasks; p4p's server runs its own threads. SIGINT/SIGTERM stop both cleanly.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import tomllib
from pathlib import Path
from typing import Any, Awaitable, Callable, Iterable

from ptychostream.core.device import DeviceState, PutError
from ptychostream.protocols.pva import PVAFrontEnd

__all__ = ["serve", "load_config", "apply_startup_values"]

_log = logging.getLogger(__name__)


class _NoRepeaterFilter(logging.Filter):
    """caproto logs a traceback for every beacon when no CA repeater listens; say it once."""

    def __init__(self) -> None:
        super().__init__()
        self.seen = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "Failed to send beacon" not in record.getMessage():
            return True
        if self.seen:
            return False
        self.seen = True
        record.msg, record.args, record.exc_info, record.exc_text = (
            "CA beacons are not received: no CA repeater is listening (harmless)", (), None, None)
        record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


def load_config(path: str | Path | None) -> dict[str, Any]:
    """Read an IOC config (TOML): ``[ioc]`` options and ``[pvs]`` start-up setpoints."""
    if path is None:
        return {}
    path = Path(path)
    try:
        with path.open("rb") as fh:
            return tomllib.load(fh)
    except FileNotFoundError:
        raise SystemExit(f"config file not found: {path}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SystemExit(f"config file {path} is not valid TOML: {exc}") from None


def apply_startup_values(device: DeviceState, values: dict[str, Any]) -> list[str]:
    """Put ``[pvs]`` values through the normal put path (like autosave restore). Returns errors.

    String values may use ``${VAR}`` environment variables; ``${PTYCHOSTREAM_MODELS}`` is the
    folder of the models shipped with the package.
    """
    import os

    os.environ.setdefault("PTYCHOSTREAM_MODELS", str(Path(__file__).resolve().parents[1] / "models"))
    errors = []
    for name, value in values.items():
        if isinstance(value, str):
            value = os.path.expandvars(value)
        try:
            device.put(name, value)
        except PutError as exc:
            errors.append(f"config [pvs] {name}: {exc}")
    return errors


async def serve(
    device: DeviceState,
    prefix: str,
    *,
    ca: bool = True,
    tasks: Iterable[Callable[[], Awaitable[None]]] = (),
    ready: Callable[[], None] | None = None,
) -> None:
    """Serve ``device`` under ``prefix`` until SIGINT/SIGTERM."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    logging.getLogger("caproto.ctx").addFilter(_NoRepeaterFilter())
    pva = PVAFrontEnd(device, prefix)
    running: list[asyncio.Task] = []
    with pva.server() as server:
        if ca:
            from ptychostream.protocols.ca import CAFrontEnd

            running.append(asyncio.ensure_future(CAFrontEnd(device, prefix).run()))
        running.extend(asyncio.ensure_future(t()) for t in tasks)
        conf = server.conf()
        _log.info("PVA server on %s:%s", conf.get("EPICS_PVAS_INTF_ADDR_LIST"), conf.get("EPICS_PVAS_SERVER_PORT"))
        await asyncio.sleep(0.05)
        if ready is not None:
            ready()
        stopper = asyncio.ensure_future(stop.wait())
        done, _ = await asyncio.wait([stopper, *running], return_when=asyncio.FIRST_COMPLETED)
        for task in running:
            if task in done and task.exception() is not None:
                _log.error("IOC task failed: %r", task.exception())
        for task in [stopper, *running]:
            task.cancel()
        await asyncio.gather(stopper, *running, return_exceptions=True)
    _log.info("IOC %s stopped", prefix)
