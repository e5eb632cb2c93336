"""The trainer's exit codes: a contract between the trainer (it exits with them), the operator (its Jobs'
podFailurePolicy, and the reasons it reports) and trainer-image/README.md.

* 0  - success
* 65 - EX_DATAERR: the dataset is invalid. Permanent: retrying cannot help.
* 73 - EX_CANTCREAT: the output (or checkpoint) prefix holds another run's files. Permanent.
* 78 - EX_CONFIG: the trainer config, model or environment is invalid. Permanent.
* 75 - EX_TEMPFAIL: a transient failure (object storage, network), or stopped by SIGTERM after writing a
  checkpoint (preemption, eviction, suspend). Retryable.
* 76 - EX_PROTOCOL: a peer worker stopped or failed, so a collective could not complete. Not the failure
  itself: the operator's podFailurePolicy does not charge it to backoffLimit (the failing worker is charged).
* 1  - anything unexpected (a bug, an out-of-memory error). Retried within the backoff limit.
"""

from __future__ import annotations

from .status import Reason

EXIT_OK = 0
EXIT_UNEXPECTED = 1
EXIT_DATA_INVALID = 65
EXIT_OUTPUT_IN_USE = 73
EXIT_RETRYABLE = 75
EXIT_PEER_LOST = 76
EXIT_CONFIG_INVALID = 78
PERMANENT_EXIT_CODES = (EXIT_DATA_INVALID, EXIT_OUTPUT_IN_USE, EXIT_CONFIG_INVALID)

# The reason the operator reports for each permanent exit. The trainer's termination message begins with the same
# reason ("DatasetInvalid: ..."), because plain `accelerate launch` turns every child failure into exit 1.
PERMANENT_REASONS = {EXIT_DATA_INVALID: Reason.DatasetInvalid, EXIT_OUTPUT_IN_USE: Reason.OutputInUse,
                     EXIT_CONFIG_INVALID: Reason.ConfigInvalid}
