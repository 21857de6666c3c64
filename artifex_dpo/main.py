"""The entrypoint: ``python -m artifex_dpo.main --config=configs/tiny.py --workdir=DIR``.

Every process of a multi-host run executes the same command. ``jax.distributed`` is initialised
when a cluster is detected (TPU pod / GKE / SLURM) or when ``--coordinator_address``,
``--num_processes`` and ``--process_id`` are given (e.g. several CPU hosts).

Exit codes: 0 finished; 2 bad config or bad data (one line on stderr naming the key or
``file:line``); 3 training diverged; 75 preempted after saving a checkpoint (rerun to resume).
"""

from __future__ import annotations

import os
import sys

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", "configs/tiny.py", "Config file (a Python file with get_config()).",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run folder: checkpoints, metrics, export (local or gs://).")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0 (multi-process, manual).")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (multi-process, manual).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index (multi-process, manual).")

EXIT_BAD_INPUT = 2
# Environment variables that say a JAX cluster launcher started us (jax auto-detects the rest).
_CLUSTER_ENV = ("MEGASCALE_COORDINATOR_ADDRESS", "JAX_COORDINATOR_ADDRESS")


def _fail(message: str) -> None:
  print(f"artifex_dpo: error: {message}", file=sys.stderr, flush=True)
  sys.exit(EXIT_BAD_INPUT)


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's own flag errors exit 1; ours are input errors: one line, exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(str(e).splitlines()[0] if str(e) else repr(e))
  except (AttributeError, KeyError) as e:  # --config.a.b=v naming a key that does not exist
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'\"").split())
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [a for a in bad if a.rsplit(".", 1)[-1] in text] or bad
    _fail(f"config key {named[0][len('--config.'):] if named else '?'}: unknown key ({text})")
  except Exception as e:  # noqa: BLE001 - a config file that fails to load
    _fail(f"--config: {type(e).__name__}: {e}".splitlines()[0])
  return []


def _multi_host_tpu() -> bool:
  hosts = os.environ.get("TPU_WORKER_HOSTNAMES", "")
  return "," in hosts


def init_distributed() -> None:
  """Initialises jax.distributed where there are several processes; no-op otherwise."""
  import jax

  manual = (_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  if any(v is not None for v in manual):
    if any(v is None for v in manual):
      _fail("--coordinator_address, --num_processes and --process_id must be given together")
    # Cross-process collectives on CPU hosts go through gloo (TPU/GPU use their own fabric).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value, num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif any(k in os.environ for k in _CLUSTER_ENV) or _multi_host_tpu() or int(os.environ.get("SLURM_NTASKS", "1")) > 1:
    jax.distributed.initialize()
  if jax.process_count() > 1:
    logging.info("process %d of %d, %d local / %d global devices", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())


class _QuietLibraries:
  """Drops INFO chatter of Orbax's checkpoint internals from the log (warnings still show)."""

  def filter(self, record) -> bool:
    return record.levelno >= 30 or "orbax" not in record.pathname


def main(argv: list[str]) -> None:
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from artifex_dpo import checkpoint, config as config_lib, sharding
  from artifex_dpo.data import DataError

  try:
    c = _CONFIG.value
    c.keys()
  except Exception as e:  # noqa: BLE001 - ml_collections reports a failed config file load lazily
    _fail(f"--config: {' '.join(str(e).split())}")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  try:
    config_lib.validate(c)
  except config_lib.ConfigError as e:
    _fail(str(e))
  init_distributed()
  from artifex_dpo import train

  try:
    code = train.run(c, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, sharding.MeshError, checkpoint.CheckpointError) as e:
    if logging.get_verbosity() >= 1:
      logging.exception("bad input")
    _fail(str(e).splitlines()[0])
  sys.exit(code)


if __name__ == "__main__":
  from artifex_dpo import hugepages

  hugepages.reexec_if_wanted()  # before any large allocation; a no-op where it cannot help
  app.run(main, flags_parser=_parse_flags)
