"""A small document consumer: validate a run's documents and read its stream data back from the files.

:class:`RunDocuments` is a RunEngine subscriber (an event-model ``DocumentRouter``). It validates
every document against event-model's JSON schemas (``event_model.schema_validators``), keeps the
descriptors, events, StreamResources and StreamDatums of one run, and :meth:`RunDocuments.data`
dereferences the StreamDatums: for each data key, the rows of its HDF5 dataset that the datums'
indices point to, in event order. The convention is ophyd-async's: a data key of shape
``[k, *row]`` over a dataset of ``(rows, *row)`` gives rows ``[i*k, (i+1)*k)`` to index ``i``; the
final mosaic (shape ``[H, W]`` over a dataset ``(H, W)``, index 0) is the whole dataset.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import numpy as np
from event_model import DocumentNames, DocumentRouter, schema_validators

from ptychostream.files.errors import FileFormatError
from ptychostream.files.record import open_record

__all__ = ["RunDocuments", "uri_path", "validate_document"]


def validate_document(name: str, doc: dict[str, Any]) -> None:
    """Check ``doc`` against event-model's schema for ``name``; raises ``jsonschema.ValidationError``."""
    schema_validators[DocumentNames(name)].validate(doc)


def uri_path(uri: str) -> Path:
    """The local path of a ``file://host/path`` URI (ophyd-async's directory_uri + file name)."""
    parsed = urlparse(uri)
    if parsed.scheme != "file":
        raise ValueError(f"not a file URI: {uri!r}")
    return Path(unquote(parsed.path))


class RunDocuments(DocumentRouter):
    """Documents of one run, validated as they come: ``RE(plan, docs)``, then ``docs.data("primary")``."""

    def __init__(self, validate: bool = True) -> None:
        super().__init__()
        self.validate = validate
        self.names: list[str] = []
        self.start_doc: dict[str, Any] | None = None
        self.stop_doc: dict[str, Any] | None = None
        self.descriptors: dict[str, dict[str, Any]] = {}
        self.resources: dict[str, dict[str, Any]] = {}
        self.datums: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []

    def __call__(self, name: str, doc: dict[str, Any], validate: bool = False) -> tuple[str, Any]:
        if self.validate:
            validate_document(name, doc)
        self.names.append(name)
        return super().__call__(name, doc, validate=validate)

    def start(self, doc: Any) -> None:
        self.start_doc = doc

    def stop(self, doc: Any) -> None:
        self.stop_doc = doc

    def descriptor(self, doc: Any) -> None:
        self.descriptors[doc["uid"]] = doc

    def event(self, doc: Any) -> Any:
        self.events.append(doc)
        return doc

    def event_page(self, doc: Any) -> Any:
        for i, seq in enumerate(doc["seq_num"]):
            self.events.append({"descriptor": doc["descriptor"], "seq_num": seq, "time": doc["time"][i],
                                "data": {k: v[i] for k, v in doc["data"].items()},
                                "timestamps": {k: v[i] for k, v in doc["timestamps"].items()}})
        return doc

    def stream_resource(self, doc: Any) -> None:
        self.resources[doc["uid"]] = doc

    def stream_datum(self, doc: Any) -> None:
        self.datums.append(doc)

    # -- reading back ------------------------------------------------------------------------
    def descriptor_of(self, stream: str) -> dict[str, Any]:
        """The (one) descriptor of ``stream``; KeyError naming the streams there are."""
        found = [d for d in self.descriptors.values() if d.get("name") == stream]
        if not found:
            names = sorted({d.get("name", "?") for d in self.descriptors.values()})
            raise KeyError(f"no descriptor for stream {stream!r} (streams: {names})")
        return found[-1]

    def readings(self, stream: str = "primary") -> dict[str, list[Any]]:
        """The values carried in the events of ``stream`` (not the external ones), by data key."""
        uid = self.descriptor_of(stream)["uid"]
        out: dict[str, list[Any]] = {}
        for ev in sorted((e for e in self.events if e["descriptor"] == uid), key=lambda e: e["seq_num"]):
            for key, value in ev["data"].items():
                out.setdefault(key, []).append(value)
        return out

    def data(self, stream: str = "primary") -> dict[str, np.ndarray]:
        """Every external (``STREAM:``) data key of ``stream``, read from its file through the StreamDatums.

        Raises :class:`FileFormatError` naming the file and dataset when a datum points past the rows.
        """
        desc = self.descriptor_of(stream)
        keys = desc["data_keys"]
        out: dict[str, list[np.ndarray]] = {}
        for datum in sorted((d for d in self.datums if d["descriptor"] == desc["uid"]),
                            key=lambda d: d["seq_nums"]["start"]):
            res = self.resources[datum["stream_resource"]]
            key = res["data_key"]
            shape = keys[key]["shape"]
            path = uri_path(res["uri"])
            dataset = res["parameters"]["dataset"]
            start, stop = datum["indices"]["start"], datum["indices"]["stop"]
            with open_record(path) as fh:
                if dataset not in fh:
                    raise FileFormatError(f"{path}: no dataset {dataset} (StreamResource of {key})")
                ds = fh[dataset]
                per = int(shape[0]) if ds.ndim == len(shape) and shape else 1
                lo, hi = start * per, stop * per
                if hi > ds.shape[0]:
                    raise FileFormatError(f"{path}: {dataset} has {ds.shape[0]} rows, the datum of {key} "
                                          f"asks for rows {lo}..{hi}")
                out.setdefault(key, []).append(ds[lo:hi])
        return {k: np.concatenate(v) for k, v in out.items()}
