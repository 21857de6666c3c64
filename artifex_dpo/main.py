"""The entrypoint: ``python -m artifex_dpo.main --config=configs/tiny.py --workdir=DIR``.

Every process of a multi-host run executes the same command. ``jax.distributed`` is initialised
when a cluster is detected (TPU pod / GKE / SLURM) or when ``--coordinator_address``,
``--num_processes`` and ``--process_id`` are given (e.g. several CPU hosts).

Exit codes: 0 finished; 2 bad config, bad data, or storage errors (one line on stderr naming the
key, ``file:line`` or the path and what the errno means), a workdir in use by another live run;
3 training diverged; 75 preempted (SIGTERM; a checkpoint saved first whenever a step ran since the
last one: rerun to resume); 130 interrupted (Ctrl-C; saved the same way).
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


def _config_file_error(e: BaseException, argv: list[str]) -> str | None:
  """``file:line: Type: message`` for an exception raised while loading the --config file."""
  import traceback

  path = next((a.split("=", 1)[1] for a in argv if a.startswith("--config=")), None)
  if not path:
    return None
  path = os.path.abspath(path.split(":", 1)[0])
  found, seen = None, set()
  while e is not None and id(e) not in seen:  # the innermost exception with a frame in the file
    seen.add(id(e))
    if isinstance(e, SyntaxError) and e.filename and os.path.abspath(e.filename) == path:
      return f"{e.filename}:{e.lineno}: SyntaxError: {e.msg}"
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) == path]
    if frames:
      found = f"{frames[-1].filename}:{frames[-1].lineno}: {type(e).__name__}: {e}"
    e = e.__cause__ or e.__context__
  return found.splitlines()[0] if found else None


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's own flag errors exit 1; ours are input errors: one line, exit code 2."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    _fail(_config_file_error(e, argv) or (str(e).splitlines()[0] if str(e) else repr(e)))
  except (AttributeError, KeyError) as e:  # --config.a.b=v naming a key that does not exist
    text = " ".join(str(e).replace("\\n", " ").replace("\\'", "'").strip("'\"").split())
    bad = [a.split("=")[0] for a in argv if a.startswith("--config.")]
    named = [a for a in bad if a.rsplit(".", 1)[-1] in text] or bad
    _fail(f"config key {named[0][len('--config.'):] if named else '?'}: unknown key ({text})")
  except Exception as e:  # noqa: BLE001 - a config file that fails to load
    _fail(_config_file_error(e, argv) or f"--config: {type(e).__name__}: {e}".splitlines()[0])
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
    if "asyncio" in record.pathname and record.levelno >= 40:  # "Task exception was never retrieved" of a
      record.exc_info, record.exc_text = None, None  # failed Orbax write: main reports it once
      return True
    if "orbax" not in record.pathname:
      return True
    # Orbax logs the failure of a background save with its traceback from several threads; main
    # reports it once (e.g. a full disk: exit 2, one line), so keep only its message line.
    record.exc_info, record.exc_text = None, None
    return record.levelno >= 30


def _take_lease(c, workdir: str, sig):
  """The workdir lease (process 0 holds it for the whole job); exits 2 when another live run holds it."""
  import jax
  import numpy as np

  from artifex_dpo import faults, lease as lease_lib

  if not c.train.lease_timeout_s:
    return None
  if "://" in workdir and not workdir.startswith("gs://"):
    logging.warning("no workdir lease on %s: only local file systems and gs:// have one", workdir)
    return None
  lease, error = None, None
  if jax.process_index() == 0:
    lease = lease_lib.Lease(f"{workdir.rstrip('/')}/{lease_lib.LEASE_FILE}", c.train.lease_timeout_s,
                            log=logging.warning)
    # Registered before the lease is taken: a SIGTERM right after acquire() (before the line that
    # would register it) must still release it (release() of an untaken lease does nothing).
    sig.on_exit_now(lease.release)
    try:
      lease.acquire()
    except lease_lib.LeaseError as e:
      error = str(e)
    except OSError as e:
      error = faults.storage_error(e, where=workdir) or str(e)
  if jax.process_count() > 1:
    # Multi-host hazard: every process must learn process 0's outcome, or the others would hang
    # in their first collective while process 0 exits.
    from jax.experimental import multihost_utils

    ok = int(multihost_utils.broadcast_one_to_all(np.int32(error is None)))
    if not ok and error is None:
      error = "process 0 could not take the workdir lease (see its log)"
  if error:
    _fail(error)
  if lease is not None:
    lease.start_renewing(lambda holder: sig.exit_now(
        EXIT_BAD_INPUT, f"error: lost the workdir lease to {holder}: stopping without saving"))
  return lease


def main(argv: list[str]) -> None:
  from artifex_dpo import signals

  sig = signals.Signals().install()  # from here on SIGTERM = preempted (75), SIGINT = interrupted (130)
  logging.get_absl_handler().addFilter(_QuietLibraries())
  if len(argv) > 1:
    _fail(f"unexpected arguments: {' '.join(argv[1:])}")
  from artifex_dpo import checkpoint, config as config_lib, faults, sharding
  from artifex_dpo.data import DataError

  faults.quiet_closed_event_loops()

  try:
    c = _CONFIG.value
    c.keys()
  except Exception as e:  # noqa: BLE001 - ml_collections reports a failed config file load lazily
    _fail(_config_file_error(e, sys.argv) or f"--config: {' '.join(str(e).split())}")
  if not _WORKDIR.value:
    _fail("--workdir is required")
  try:
    config_lib.validate(c)
  except config_lib.ConfigError as e:
    _fail(str(e))
  try:
    faults.check_workdir(_WORKDIR.value)
  except OSError as e:
    _fail(faults.storage_error(e, where=_WORKDIR.value) or f"--workdir {_WORKDIR.value}: {e}")
  init_distributed()
  lease = _take_lease(c, _WORKDIR.value, sig)
  from artifex_dpo import train

  try:
    code = train.run(c, _WORKDIR.value)
  except (config_lib.ConfigError, DataError, sharding.MeshError, checkpoint.CheckpointError) as e:
    if logging.get_verbosity() >= 1:
      logging.exception("bad input")
    _fail(str(e).splitlines()[0])
  except Exception as e:  # noqa: BLE001 - a full disk, a read-only folder: one line, exit 2
    storage = faults.storage_error(e, where=f"workdir {_WORKDIR.value}")
    if storage is None:
      raise
    if logging.get_verbosity() >= 1:
      logging.exception("storage error")
    _fail(storage)
  finally:
    if lease is not None:
      lease.release()
  sys.exit(code)


if __name__ == "__main__":
  from artifex_dpo import hugepages

  hugepages.reexec_if_wanted()  # before any large allocation; a no-op where it cannot help
  app.run(main, flags_parser=_parse_flags)
