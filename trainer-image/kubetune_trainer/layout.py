"""Where checkpoints lie under checkpoint.uri: `step-00000040/` per checkpoint, `best-step-00000040/` for the
best step's weights (output.select: best). A folder is complete once its manifest.json is there (storage.publish).

Both checkpoint.py (which writes and reads them) and identity.py (which finds other runs' checkpoints) use it.
"""

from __future__ import annotations

import re

STEP = re.compile(r"(?<![a-z-])step-(\d{8})/")  # a checkpoint's folder (not best-step-N/)
STEP_DIR = re.compile(STEP.pattern + r"manifest\.json$")  # a complete checkpoint's manifest
BEST_DIR = re.compile(r"best-step-(\d{8})/")
