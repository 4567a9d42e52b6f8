"""Run a :class:`DeviceState` as a soft IOC: PVA (p4p) and optionally CA (caproto) in one process.

The thin asyncio front end: one event loop hosts the CA server and the device's
periodic tasks; p4p's server runs its own threads. SIGINT/SIGTERM stop them in order: the
device's own stop first (while everything still serves), then the tasks, CA, PVA. A CA server
that fails is restarted; the PVA server and the device never notice.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import threading
import tomllib
from pathlib import Path
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable

from ptychostream.core.device import Busy, DeviceState, PutError
from ptychostream.protocols.pva import PVAFrontEnd

if TYPE_CHECKING:
    from ptychostream.protocols.ca import CAFrontEnd

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


#: how long a start-up put that reads a file (``Busy(setpoint_later=True)``) is waited for
STARTUP_PUT_TIMEOUT_S = 30.0


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
            result = device.put(name, value)
            if isinstance(result, Busy) and result.setpoint_later:  # a file read: its outcome, in order
                result.done.result(timeout=STARTUP_PUT_TIMEOUT_S)
        except PutError as exc:
            errors.append(f"config [pvs] {name}: {exc}")
        except TimeoutError:
            errors.append(f"config [pvs] {name}: not done after {STARTUP_PUT_TIMEOUT_S:.0f} s (a slow file?); "
                          "it completes in the background")
    return errors


#: the longest a device's own stop (``serve(shutdown=...)``) may take before the servers close anyway
SHUTDOWN_TIMEOUT_S = 4.0
#: the PV that counts CA server restarts, where the db has it
CA_RESTARTS_PV = "CARestarts_RBV"
#: the wait before restarting a failed CA server; it doubles while the server keeps failing at once
CA_RESTART_DELAY_S = 0.2
CA_RESTART_DELAY_MAX_S = 5.0


async def serve(
    device: DeviceState,
    prefix: str,
    *,
    ca: bool = True,
    tasks: Iterable[Callable[[], Awaitable[None]]] = (),
    ready: Callable[[], None] | None = None,
    shutdown: Callable[[], None] | None = None,
    shutdown_timeout: float = SHUTDOWN_TIMEOUT_S,
    ca_frontend: CAFrontEnd | None = None,
) -> None:
    """Serve ``device`` under ``prefix`` until SIGINT/SIGTERM (or until cancelled).

    The order of a stop: ``shutdown()`` (the device's own stop, on a thread) runs first, while
    the loop, the ``tasks`` (the status task), CA and PVA all still run, so that what it writes
    reaches the clients; after it returns, or after ``shutdown_timeout`` s, the tasks and the CA
    server are cancelled and the PVA server closes. A CA server that fails is started again
    (with a message and a count in :data:`CA_RESTARTS_PV`) instead of stopping the IOC;
    ``ca_frontend`` is one the caller built (else one is built when ``ca``).
    """
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(sig, stop.set)
        except (NotImplementedError, RuntimeError):  # not the main thread
            pass

    logging.getLogger("caproto.ctx").addFilter(_NoRepeaterFilter())
    pva = PVAFrontEnd(device, prefix)
    running: list[asyncio.Future] = []
    with pva.server() as server:
        try:
            if ca and ca_frontend is None:
                from ptychostream.protocols.ca import CAFrontEnd

                ca_frontend = CAFrontEnd(device, prefix)
            if ca_frontend is not None:
                running.append(asyncio.ensure_future(_serve_ca(ca_frontend, device)))
            running.extend(asyncio.ensure_future(t()) for t in tasks)
            conf = server.conf()
            _log.info("PVA server on %s:%s", conf.get("EPICS_PVAS_INTF_ADDR_LIST"), conf.get("EPICS_PVAS_SERVER_PORT"))
            await asyncio.sleep(0.05)
            if ready is not None:
                ready()
            stopper = asyncio.ensure_future(stop.wait())
            running.append(stopper)
            done, _ = await asyncio.wait(running, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not stopper and task.exception() is not None:
                    _log.error("IOC task failed: %r", task.exception())
            if shutdown is not None:
                await _in_thread(shutdown, shutdown_timeout)
        finally:
            for task in running:
                task.cancel()
            await asyncio.gather(*running, return_exceptions=True)
    _log.info("IOC %s stopped", prefix)


async def _in_thread(fn: Callable[[], None], timeout: float) -> None:
    """Run ``fn`` on a daemon thread (the loop keeps serving meanwhile); give up waiting after ``timeout`` s."""
    loop = asyncio.get_running_loop()
    finished: asyncio.Future = loop.create_future()

    def report(exc: BaseException | None) -> None:
        if not finished.done():
            finished.set_result(exc)

    def run() -> None:
        exc: BaseException | None = None
        try:
            fn()
        except BaseException as err:  # reported on the loop
            exc = err
        try:
            loop.call_soon_threadsafe(report, exc)
        except RuntimeError:  # the loop closed: it stopped waiting long ago
            pass

    t0 = loop.time()
    threading.Thread(target=run, name="ptychostream-shutdown", daemon=True).start()
    try:
        exc = await asyncio.wait_for(finished, timeout)
    except asyncio.TimeoutError:
        _log.error("the device's stop did not end within %.1f s: closing the servers anyway", timeout)
        return
    if exc is not None:
        _log.error("the device's stop failed", exc_info=exc)
    _log.info("device stopped in %.2f s", loop.time() - t0)


async def _serve_ca(frontend: CAFrontEnd, device: DeviceState) -> None:
    """Run the CA server; after a failure, tell and count it, wait a little, start a new one."""
    loop = asyncio.get_running_loop()
    delay = CA_RESTART_DELAY_S / 2
    while True:
        started = loop.time()
        try:
            await frontend.run()
            return
        except Exception as exc:
            frontend.restarts += 1
            _log.error("CA server failed; restarting it (restart %d)", frontend.restarts, exc_info=exc)
            text = (f"CA server failed ({type(exc).__name__}: {exc}); restarted it (restart {frontend.restarts}); "
                    "CA clients reconnect, PVA was not affected")
            device.message(text, severity=2)
            if CA_RESTARTS_PV in device.db:
                device.set(CA_RESTARTS_PV, frontend.restarts)
        ran_long = loop.time() - started > 10 * CA_RESTART_DELAY_MAX_S
        delay = CA_RESTART_DELAY_S if ran_long else min(CA_RESTART_DELAY_MAX_S, delay * 2)
        await asyncio.sleep(delay)
