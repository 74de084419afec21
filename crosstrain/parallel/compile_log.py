"""What XLA says while it compiles a sharded program, read from its C++ log.

- The SPMD partitioner, meeting two shardings of one tensor that no collective converts between,
  replicates the tensor and slices it again: an "involuntary full rematerialization". The program
  still runs, but it moves and holds the whole tensor on every device, at any scale.
- XLA's GPU compiler does not refuse a program larger than the device's memory (the TPU compiler
  does, with RESOURCE_EXHAUSTED): its rematerialization pass says how far it got ("Can't reduce
  memory use below ...") and the program compiles anyway.

Neither reaches Python except as a warning on the process's standard error, so `watch_compiler`
reads file descriptor 2 while a compile runs (and hands everything back to the real standard
error afterwards, unless told not to).
"""

from __future__ import annotations

import os
import re
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

INVOLUNTARY = "Involuntary full rematerialization"
MEMORY = "Can't reduce memory use below"
_OPERATION = re.compile(r"for HLO operation %([\w.\-]+) = (\S+)")
_OP_NAME = re.compile(r'op_name="([^"]*)"')


@dataclass
class CompileLog:
    text: str = ""
    rematerializations: list[str] = field(default_factory=list)  # "shape op_name" of each replicated tensor
    memory: list[str] = field(default_factory=list)  # XLA's remat pass giving up on the memory limit

    def parse(self, text: str) -> None:
        self.text = text
        self.rematerializations, self.memory = [], []
        for line in text.splitlines():
            if MEMORY in line:
                self.memory.append(line[line.index(MEMORY):].strip())
            if INVOLUNTARY not in line:
                continue
            found, op = _OPERATION.search(line), _OP_NAME.search(line)
            if found:
                name, shape = found.groups()
                self.rematerializations.append(f"{shape} {op.group(1) if op else name}")
            else:
                self.rematerializations.append(line.strip()[:200])


@contextmanager
def watch_compiler(echo: bool = True) -> Iterator[CompileLog]:
    """Collect what native code writes to standard error inside the block (XLA's C++ logs);
    `echo` writes it back to the real standard error afterwards, so nothing is hidden."""
    log = CompileLog()
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as sink:
        os.dup2(sink.fileno(), 2)
        try:
            yield log
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)
            sink.seek(0)
            text = sink.read().decode("utf-8", "replace")
            log.parse(text)
            if echo and text:
                os.write(2, text.encode("utf-8", "replace"))  # back where it was going: fd 2, not sys.stderr
