"""
The reference stage's cache on disk: each pass keeps its results in a directory of chunk files, one per range of units,
written by the process that computed them.

A chunk file is an Arrow IPC stream (the format `datasets` memory-maps), named `chunk-START-STOP-DIGEST.arrow` by its
range of units and the BLAKE2b digest of its bytes. It is written to a temporary file, flushed to disk and renamed into
place, so a killed run leaves no partial file under a chunk's name; and a file is used only if its bytes still match its
digest and it holds the expected rows and columns, so a file damaged anyway (a file system without atomic rename, a disk
that filled up) is recomputed with a warning, never silently used. Temporary files are named after the process that
writes them (its id and machine): a run removes those of runs that are over (a process of this machine that is gone, or
a file untouched for a day), never those of a concurrent run on the same directory, on this machine or another. The main
process checks the files; the other processes get from it only which chunks are missing, and read the files themselves:
no result crosses processes.
"""

import bisect
import errno
import hashlib
import os
import re
import socket
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pyarrow as pa
from accelerate import PartialState
from accelerate.logging import get_logger
from accelerate.utils import broadcast_object_list, gather_object


logger = get_logger(__name__)

_CHUNK_FILE = re.compile(r"chunk-(\d+)-(\d+)-([0-9a-f]{32})\.arrow")
_TEMPORARY_PREFIX = ".tmp-"
# A temporary file's name says which process writes it: `.tmp-PID-UNIQUE-HOSTNAME`
_TEMPORARY_FILE = re.compile(r"\.tmp-(\d+)-[0-9a-f]{32}-(.+)")
# A leftover temporary file of a process on another machine (whose liveness cannot be checked), or of an unknown
# process, is removed once untouched for this long: a writing process writes to its file at least every batch
STALE_TEMPORARY_SECONDS = 24 * 3600


def _digest():
    return hashlib.blake2b(digest_size=16)


class _HashingFile:
    """A binary file that hashes what is written to it."""

    def __init__(self, file):
        self.file = file
        self.hash = _digest()

    def write(self, data) -> int:
        self.hash.update(data)
        return self.file.write(data)

    def flush(self) -> None:
        self.file.flush()

    @property
    def closed(self) -> bool:
        return self.file.closed


class ChunkStore:
    """
    One pass's directory of chunk files; see the module's docstring. `ranges` are the pass's chunks, `(start, stop)`
    ranges of units in order, and `columns` the columns every chunk file must have.
    """

    def __init__(self, directory: str, ranges: list[tuple[int, int]], columns: list[str], state: PartialState):
        self.directory = directory
        self.ranges = ranges
        self._starts = [start for start, _ in ranges]
        self.columns = columns
        self.state = state
        self._files: dict[tuple[int, int], str] = {}
        self.written: dict[tuple[int, int], str] = {}  # by this process
        self._last_read: tuple[tuple | None, pa.Table | None] = (None, None)

    # ------------------------------------------------------------------------------------------------------------------
    # Checking what is there

    def missing(self) -> tuple[list[tuple[int, int]], list[dict]]:
        """
        The chunks still to compute, and the metadata of the valid chunk files: checked by the main process, which
        removes what is damaged or left over (temporary files of a killed run), and told to the other processes.
        """
        found = [self._check() if self.state.is_main_process else None]
        broadcast_object_list(found, from_process=0)
        self._files, metadata = found[0]
        return [chunk for chunk in self.ranges if chunk not in self._files], metadata

    def _check(self) -> tuple[dict[tuple[int, int], str], list[dict]]:
        if not os.path.isdir(self.directory):
            return {}, []
        wanted = set(self.ranges)
        files, metadata = {}, []
        for name in sorted(os.listdir(self.directory)):
            path = os.path.join(self.directory, name)
            if name.startswith(_TEMPORARY_PREFIX):
                if _is_abandoned(name, path):
                    _remove(path)  # left by a killed run: only the main process removes, before anyone writes
                continue
            match = _CHUNK_FILE.fullmatch(name)
            if match is None:
                continue
            chunk = (int(match[1]), int(match[2]))
            if chunk not in wanted or chunk in files:
                continue  # another chunking (another number of processes or chunk size), or a duplicate
            problem, chunk_metadata = self._verify(path, chunk, match[3])
            if problem is not None:
                logger.warning(
                    f"The reference stage's cache file {path} is damaged ({problem}): it is removed and its chunk "
                    "computed again."
                )
                _remove(path)
                continue
            files[chunk] = name
            metadata.append(chunk_metadata)
        return files, metadata

    def _verify(self, path: str, chunk: tuple[int, int], digest: str) -> tuple[str | None, dict]:
        """Why the file at `path` cannot be used as `chunk` (`None` if it can), and its metadata."""
        try:
            content = _digest()
            with open(path, "rb") as file:
                while block := file.read(1 << 20):
                    content.update(block)
            if content.hexdigest() != digest:
                size = os.path.getsize(path)
                return f"its {size} bytes do not match the digest in its name: truncated or overwritten", {}
            num_rows = 0
            with pa.OSFile(path) as source:  # a batch at a time: a file can be larger than memory
                reader = pa.ipc.open_stream(source)
                for batch in reader:
                    batch.validate(full=True)
                    num_rows += batch.num_rows
        except (OSError, pa.ArrowException) as error:
            return f"unreadable: {error}", {}
        if num_rows != chunk[1] - chunk[0]:
            return f"{num_rows} rows instead of {chunk[1] - chunk[0]}", {}
        if missing := [column for column in self.columns if column not in reader.schema.names]:
            return f"no column {missing}", {}
        return None, schema_metadata(reader.schema)

    # ------------------------------------------------------------------------------------------------------------------
    # Writing

    @contextmanager
    def writer(self, chunk: tuple[int, int], schema: pa.Schema) -> Iterator[pa.ipc.RecordBatchStreamWriter]:
        """
        A stream writer for `chunk`'s file, of `schema` (its metadata gets the writing process's index): the file
        appears under its name, with the digest of what was written, only when the block exits without error.
        """
        os.makedirs(self.directory, exist_ok=True)
        schema = schema.with_metadata({
            **(schema.metadata or {}), "process_index": str(self.state.process_index),
            "num_processes": str(self.state.num_processes),
        })
        temporary = temporary_path(self.directory)
        try:
            with open(temporary, "wb") as file:
                sink = _HashingFile(file)
                with pa.ipc.new_stream(pa.PythonFile(sink, mode="w"), schema) as stream:
                    yield stream
                file.flush()
                os.fsync(file.fileno())  # the data is on disk before the name says the chunk is done
            name = f"chunk-{chunk[0]:09d}-{chunk[1]:09d}-{sink.hash.hexdigest()}.arrow"
            os.replace(temporary, os.path.join(self.directory, name))
        except BaseException as error:
            _remove(temporary)
            if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
                raise OSError(
                    error.errno,
                    f"No space left to write the reference stage's cache in {self.directory} ({error}). Free some "
                    "space there, or set `reference_cache_dir` to a directory with room for it (a run started again "
                    "keeps the chunks already written).",
                ) from error
            raise
        self._files[chunk] = self.written[chunk] = name

    def write(self, chunk: tuple[int, int], table: pa.Table) -> None:
        with self.writer(chunk, table.schema) as stream:
            stream.write_table(table)

    def finish(self, failure: Exception | None, metadata: list[dict] | None = None) -> list[dict]:
        """
        Once every process is done writing (or failed: `failure`): tell every process the names of the files the
        others wrote, and raise on every process if one failed. Returns the metadata of what every process wrote.
        """
        message = None if failure is None else f"{type(failure).__name__}: {failure}"
        reports = gather_object([(message, self.written, metadata or [])])
        for _, written, _ in reports:
            self._files.update(written)
        if failure is not None:
            raise failure
        for rank, (message, _, _) in enumerate(reports):
            if message is not None:
                raise RuntimeError(f"The reference stage failed on process {rank}: {message}")
        return [entry for _, _, entries in reports for entry in entries]

    # ------------------------------------------------------------------------------------------------------------------
    # Reading

    def path(self, chunk: tuple[int, int]) -> str:
        return os.path.join(self.directory, self._files[chunk])

    def read(self, chunk: tuple[int, int], columns: list[str] | None = None) -> pa.Table:
        """A chunk's table, read into memory (a chunk at a time: memory stays bounded, and no page stays mapped)."""
        with pa.OSFile(self.path(chunk)) as file:
            table = pa.ipc.open_stream(file).read_all()
        return table.select(columns) if columns is not None else table

    def read_units(self, start: int, stop: int, columns: list[str]) -> pa.Table:
        """Units `start` to `stop` of the pass, over as many chunk files as they span."""
        pieces = []
        first = bisect.bisect_right(self._starts, start) - 1
        for chunk_start, chunk_stop in self.ranges[first:]:
            if chunk_start >= stop:
                break
            table = self._read_cached((chunk_start, chunk_stop), columns)
            pieces.append(table.slice(max(start - chunk_start, 0), min(stop, chunk_stop) - max(start, chunk_start)))
        return pa.concat_tables(pieces)

    def _read_cached(self, chunk: tuple[int, int], columns: list[str]) -> pa.Table:
        # Consecutive reads of units overlap chunk files at their ends: keep the last one read
        key = (chunk, tuple(columns))
        if self._last_read[0] != key:
            self._last_read = (key, self.read(chunk, columns))
        return self._last_read[1]

    def take(self, units: np.ndarray, column: str) -> pa.Array:
        """
        The values of `column` for `units` (in any order, repeated or not), reading each chunk file they fall in once
        (Arrow's take on a column of many chunks would first concatenate them all).
        """
        chunks = np.searchsorted(self._starts, units, side="right") - 1
        order = np.argsort(chunks, kind="stable")
        pieces = []
        for positions in np.split(order, np.flatnonzero(np.diff(chunks[order])) + 1):
            if len(positions):
                chunk = self.ranges[chunks[positions[0]]]
                values = self._read_cached(chunk, [column])[column].combine_chunks()
                pieces.append(values.take(pa.array(units[positions] - chunk[0])))
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        return pa.concat_arrays(pieces).take(pa.array(inverse))


def schema_metadata(schema: pa.Schema) -> dict[str, str]:
    """An Arrow schema's metadata, decoded (Arrow stores it as bytes)."""
    return {key.decode(): value.decode() for key, value in (schema.metadata or {}).items()}


def temporary_path(directory: str, pid: int | None = None, host: str | None = None) -> str:
    """A new temporary file's path in `directory`, named after the process that writes it (this one by default)."""
    pid = os.getpid() if pid is None else pid
    host = socket.gethostname() if host is None else host
    return os.path.join(directory, f"{_TEMPORARY_PREFIX}{pid}-{uuid.uuid4().hex}-{host}")


def _is_abandoned(name: str, path: str) -> bool:
    """
    Whether a temporary file was left by a run that is over: the cache directory may be shared by concurrent runs, on
    this machine or others (each writes its own files). A file of a process of this machine is abandoned when that
    process is gone; any other when it has not been written to for `STALE_TEMPORARY_SECONDS`.
    """
    match = _TEMPORARY_FILE.fullmatch(name)
    if match is not None and match[2] == socket.gethostname():
        return not _is_alive(int(match[1]))
    try:
        return time.time() - os.path.getmtime(path) > STALE_TEMPORARY_SECONDS
    except FileNotFoundError:  # renamed or removed by its writer meanwhile
        return False


def _is_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # no signal sent: only whether the process exists
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def _remove(path: str) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def check_shared(directory: str, state: PartialState) -> None:
    """
    With several processes, check that every process sees the files the main process writes in `directory`: each
    process writes its chunks there for the others to read, so with several machines it must be on storage they share.
    """
    if state.num_processes == 1:
        return
    token = [uuid.uuid4().hex if state.is_main_process else None]
    broadcast_object_list(token, from_process=0)
    marker = os.path.join(directory, f"{_TEMPORARY_PREFIX}shared-{token[0]}")  # removed by its run only: not abandoned
    if state.is_main_process:
        os.makedirs(directory, exist_ok=True)
        open(marker, "w").close()
    state.wait_for_everyone()
    deadline = time.monotonic() + 30  # a network file system may take a few seconds to show a new file
    while not os.path.exists(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    seen = [os.path.exists(marker)]
    blind = [rank for rank, sees in enumerate(gather_object(seen)) if not sees]
    if state.is_main_process:
        _remove(marker)
    if blind:
        raise RuntimeError(
            f"Processes {blind} do not see the reference stage's cache directory {directory} of the main process: "
            "each process writes its share of the results there for the others to read, so with several machines "
            "`reference_cache_dir` must be on storage that every machine mounts at the same path."
        )
