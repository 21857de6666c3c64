"""The one error type of the data pipeline.

Every problem found in user data is reported as a :class:`DataError` whose message is a
single line ``file:line: what is wrong`` (or ``file: what is wrong`` for problems of the
whole file), so that the entrypoint can print it and exit with status 2.
"""

from __future__ import annotations


class DataError(ValueError):
  """Bad input data (or a bad data setting), located in a file and record.

  Attributes:
    path: The file the problem is in (or another subject such as a glob), or None.
    line: 1-based record number (line for JSON Lines, row for Parquet / ArrayRecord),
      or None for a problem of the whole file.
    field: The record field at fault, or None.
    reason: What is wrong, without the location.
  """

  def __init__(
      self,
      path: str | None,
      line: int | None,
      reason: str,
      field: str | None = None,
  ):
    self.path = path
    self.line = line
    self.field = field
    self.reason = reason
    super().__init__(self._format())

  def _format(self) -> str:
    what = f"{self.field}: {self.reason}" if self.field else self.reason
    what = " ".join(str(what).split())  # Always one line.
    if self.path is None:
      return what
    if self.line is None:
      return f"{self.path}: {what}"
    return f"{self.path}:{self.line}: {what}"

  def __reduce__(self):
    return (type(self), (self.path, self.line, self.reason, self.field))
