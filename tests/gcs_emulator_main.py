"""Runs `gcp-storage-emulator` with the object generations and preconditions that tensorstore needs.

The emulator stores a generation per object but does not send it on downloads
(``x-goog-generation``) and ignores ``ifGenerationMatch`` / ``ifGenerationNotMatch``. Tensorstore's
OCDBT driver (Orbax's checkpoint format) writes its manifest with a generation precondition and
reads with one, as on real GCS; without them it fails with "Malformed StorageGeneration". This
adds both to the emulator's own handlers, then starts it with the given arguments::

  python tests/gcs_emulator_main.py start --host=127.0.0.1 --port=N --in-memory --default-bucket=B
"""

from __future__ import annotations

import sys
from http import HTTPStatus

from gcp_storage_emulator import server
from gcp_storage_emulator.__main__ import main
from gcp_storage_emulator.exceptions import NotFound
from gcp_storage_emulator.handlers import objects


def _query(request, name: str) -> str | None:
  value = request.query.get(name)
  return value[0] if value else None


def _generation(storage, bucket: str, name: str | None) -> str:
  if not name:
    return "0"
  try:
    return str(storage.get_file_obj(bucket, name)["generation"])
  except NotFound:
    return "0"  # GCS: ifGenerationMatch=0 means "does not exist yet"


def _preconditions_hold(request, response, generation: str, read: bool) -> bool:
  match, not_match = _query(request, "ifGenerationMatch"), _query(request, "ifGenerationNotMatch")
  if match is not None and match != generation:
    response.status = HTTPStatus.PRECONDITION_FAILED
    return False
  if not_match is not None and not_match == generation:
    response.status = HTTPStatus.NOT_MODIFIED if read else HTTPStatus.PRECONDITION_FAILED
    if read:
      response["x-goog-generation"] = generation
    return False
  return True


def download(request, response, storage, *args, **kwargs):
  generation = _generation(storage, request.params["bucket_name"], request.params.get("object_id"))
  if generation != "0":
    response["x-goog-generation"] = generation
    response["x-goog-metageneration"] = "1"
  if not _preconditions_hold(request, response, generation, read=True):
    return None
  return _download(request, response, storage, *args, **kwargs)


def get(request, response, storage, *args, **kwargs):
  if _query(request, "alt") == "media":
    return download(request, response, storage, *args, **kwargs)
  generation = _generation(storage, request.params["bucket_name"], request.params.get("object_id"))
  if generation != "0" and not _preconditions_hold(request, response, generation, read=True):
    return None
  return _get(request, response, storage, *args, **kwargs)


def insert(request, response, storage, *args, **kwargs):
  name = _query(request, "name")
  if name is None and isinstance(request.data, dict):
    name = (request.data.get("meta") or {}).get("name")
  generation = _generation(storage, request.params["bucket_name"], name)
  if not _preconditions_hold(request, response, generation, read=False):
    return None
  return _insert(request, response, storage, *args, **kwargs)


def delete(request, response, storage, *args, **kwargs):
  generation = _generation(storage, request.params["bucket_name"], request.params.get("object_id"))
  if not _preconditions_hold(request, response, generation, read=False):
    return None
  return _delete(request, response, storage, *args, **kwargs)


_download, _get, _insert, _delete = objects.download, objects.get, objects.insert, objects.delete
_REPLACE = {_download: download, _get: get, _insert: insert, _delete: delete}


def _patch_handlers() -> None:
  server.HANDLERS = tuple((pattern, {m: _REPLACE.get(f, f) for m, f in methods.items()})
                          for pattern, methods in server.HANDLERS)
  objects.download, objects.get, objects.insert, objects.delete = download, get, insert, delete


if __name__ == "__main__":
  _patch_handlers()
  main(sys.argv[1:])
