"""One run's side of a reference-stage cache directory shared by two runs (see tests/test_shared_cache.py).

`write DIR READY GO`: write a chunk file, pausing halfway (the temporary file in progress) until the file GO exists,
after creating READY. `scan DIR`: the start-up scan of a run on the same directory.
"""

import os
import sys
import time

import pyarrow as pa
from accelerate import PartialState

from qrpo_trl.reference_stage.storage import ChunkStore


def main():
    mode, directory, *paths = sys.argv[1:]
    store = ChunkStore(directory, [(0, 2)], ["x"], PartialState(cpu=True))
    if mode == "scan":
        print("missing:", store.missing()[0])
        return
    ready, go = paths
    table = pa.table({"x": [1, 2]})
    with store.writer((0, 2), table.schema) as stream:
        stream.write_table(table.slice(0, 1))
        open(ready, "w").close()
        deadline = time.monotonic() + 120
        while not os.path.exists(go) and time.monotonic() < deadline:
            time.sleep(0.1)
        stream.write_table(table.slice(1, 1))
    print("written:", store.written)


if __name__ == "__main__":
    main()
