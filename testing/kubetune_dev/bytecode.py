"""Write, once, the bytecode of what the suite's processes import, without compiling every file of the venv.

`make venv` used uv's `--compile-bytecode`: all 24,904 files of the venv, 43 s of two busy cores on a fresh clone,
for about a quarter of them that any process imports. Now the Makefile lets Python write the bytecode of what it
imports (it unexports PYTHONDONTWRITEBYTECODE, which this machine's shell sets: under it every test process, pod
and trainer subprocess compiled torch and transformers again), and `make venv` runs this: two interpreters, side
by side, import what a trainer process and what the rest of the suite import first, so that the five pytest
workers, which start together, find it compiled instead of each compiling the same files. Anything else compiles at
its first import, once. Python checks a .pyc against its source's mtime and size, and writes it atomically.

    python -m kubetune_dev.bytecode
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

GROUPS = (
    # a trainer process (every pod, the trainer's tests) and the peers its tests compare against
    ("kubetune_trainer.cli", "kubetune_trainer.pipeline", "kubetune_trainer.validation", "kubetune_trainer.launch",
     "accelerate.commands.launch", "peft", "transformers.models.llama.modeling_llama",
     "transformers.models.vit.modeling_vit", "transformers.models.resnet.modeling_resnet", "trl", "datasets"),
    # the operator, the test kit (control plane, node agent, S3 server), the search and the test runner
    ("kubetune_operator.handlers", "kubetune_dev.cluster.pytest_plugin", "kubetune_dev.cluster.agent_fixtures",
     "kubetune_dev.s3server", "kubetune_search", "sklearn.metrics", "cleanlab.filter", "pytest", "xdist"),
)
IMPORT = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)"


def main() -> None:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    start = time.monotonic()
    procs = [subprocess.Popen([sys.executable, "-c", IMPORT, *group], env=env) for group in GROUPS]
    if any(p.wait() for p in procs):
        sys.exit("kubetune_dev.bytecode: an import failed (above)")
    print(f"bytecode written for what the tests import first, in {time.monotonic() - start:.0f} s")


if __name__ == "__main__":
    main()
