"""Model metrics packed into one tensor (one device sync and one all-reduce per step), and the
JSON-lines log."""
from __future__ import annotations

import json
import math
import os
from pathlib import Path

import torch

from pyvae._io import os_error, write_text_atomic
from pyvae.models import ModelOutput


class MetricLayout:
    """Names and shapes of the values of :meth:`ModelOutput.metrics`, to pack them into a flat
    tensor and back. Built from the first output; later outputs must have the same terms."""

    def __init__(self, output: ModelOutput, extra: list[str] = ()):
        """``extra``: names of scalars packed after the model's metrics (e.g. ``grad_norm``)."""
        self.terms = list(output.terms)
        self.shapes: dict[str, tuple[int, ...]] = {"loss": (), "distortion": (), "rate_bits": ()}
        for name, value in output.terms.items():
            self.shapes[name] = tuple(value.shape[1:])
        for name in extra:
            self.shapes[name] = ()

    def pack(self, output: ModelOutput, *extra: torch.Tensor) -> torch.Tensor:
        """The batch means of :meth:`ModelOutput.metrics` and the ``extra`` scalars, flattened
        into one float32 tensor on the output's device (nothing is copied to the host)."""
        if list(output.terms) != self.terms:
            raise ValueError(f"the model's loss terms changed from {self.terms} to "
                             f"{list(output.terms)}")
        parts = [output.loss.detach().float().reshape(1),
                 output.distortion.detach().float().mean().reshape(1),
                 output.rate_bits.detach().float().mean().reshape(1)]
        parts += [value.detach().float().mean(0).reshape(-1) for value in output.terms.values()]
        parts += [value.detach().float().reshape(1).to(parts[0].device) for value in extra]
        return torch.cat(parts)

    def _slices(self):
        offset = 0
        for name, shape in self.shapes.items():
            size = math.prod(shape)
            yield name, shape, slice(offset, offset + size)
            offset += size

    def unpack(self, values: list[float]) -> dict[str, float | list]:
        """Inverse of :meth:`pack` (after ``.tolist()``): floats, and nested lists for terms with
        more than one value per example (e.g. ``layer_rates_bits``)."""
        return {name: values[part][0] if shape == () else
                torch.tensor(values[part]).reshape(shape).tolist()
                for name, shape, part in self._slices()}

    def nonfinite(self, values: list[float]) -> list[str]:
        """Names of the metrics with a NaN or infinite value among the packed ``values``."""
        if all(map(math.isfinite, values)):
            return []
        return [name for name, _, part in self._slices()
                if not all(map(math.isfinite, values[part]))]


class MetricsLog:
    """``metrics.jsonl``: one JSON object per line, appended and flushed record by record. A
    failed write (e.g. a full disk) is an OSError naming the file and the cause."""

    def __init__(self, path: str | os.PathLike, *, keep_until_step: int | None = None):
        """Open ``path`` for appending; with ``keep_until_step``, first drop the records of later
        steps (those a killed run wrote after its last checkpoint) and any torn last line
        (atomically: a failure leaves the file as it was)."""
        self.path = Path(path)
        if keep_until_step is not None and self.path.exists():
            kept = []
            for line in self.path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue
                if record.get("step", 0) <= keep_until_step:
                    kept.append(line + "\n")
            write_text_atomic(self.path, "".join(kept))
        try:
            self._file = open(self.path, "a")
        except OSError as error:
            raise os_error(error, self.path, "opening") from error

    def write(self, record: dict) -> None:
        try:
            self._file.write(json.dumps(record) + "\n")
            self._file.flush()
        except OSError as error:
            raise os_error(error, self.path, "appending a record to") from error

    def close(self) -> None:
        try:
            self._file.close()
        except OSError as error:  # the last buffered record could not be written
            raise os_error(error, self.path, "closing") from error


def read_metrics(path: str | os.PathLike) -> list[dict]:
    """The records of a ``metrics.jsonl`` file (or of ``<run dir>/metrics.jsonl``)."""
    path = Path(path)
    if path.is_dir():
        path = path / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
