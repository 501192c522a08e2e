"""Opening the Iceberg catalog that ``--catalog`` names for a scan output (pyiceberg).

Empty = a SQLite catalog file ``OUT/catalog.db`` beside a local output (no service; one
machine); ``sqlite:///…``, ``postgresql://user@host/db``, ``mysql://…`` = pyiceberg's SQL
catalog; ``http(s)://…`` = a REST catalog; ``glue`` = AWS Glue; any other word = a catalog of
that name in pyiceberg's own configuration (``~/.pyiceberg.yaml`` or
``PYICEBERG_CATALOG__<NAME>__<KEY>`` variables): the place for passwords and tokens, which
``--catalog`` refuses to carry. Remote outputs' files go through the jobs' fsspec filesystem.
"""

from __future__ import annotations

import os
import re
import time

from detector_core.storage import is_remote, join

__all__ = ["CatalogError", "load_catalog", "retrying"]

_SECRET_IN_URI = re.compile(r"://[^/@:]+:[^/@]+@")


class CatalogError(ValueError):
    """The catalog setting is unusable (missing for a remote output, a secret in it, a table elsewhere)."""


def _io_properties(output: str, storage_options: dict | None) -> dict:
    props: dict[str, str] = {}
    if is_remote(output):
        # The tables' files are read and written through fsspec, the same filesystem as the jobs.
        props["py-io-impl"] = "pyiceberg.io.fsspec.FsspecFileIO"
        endpoint = ((storage_options or {}).get("client_kwargs") or {}).get("endpoint_url") or os.environ.get("AWS_ENDPOINT_URL")
        if endpoint:
            props["s3.endpoint"] = endpoint
    return props


def retrying(fn, attempts: int = 5):
    """``fn()``, tried again after a short sleep when a concurrent creator made it fail (never for a CatalogError)."""
    for attempt in range(attempts):
        try:
            return fn()
        except CatalogError:
            raise
        except Exception:  # noqa: BLE001 - a concurrent creator won: the next look finds what it made
            if attempt == attempts - 1:
                raise
            time.sleep(0.2 * (attempt + 1))


def load_catalog(spec: str, output: str, storage_options: dict | None = None):
    """The pyiceberg catalog that ``spec`` names for ``output`` (see the module docstring)."""
    from pyiceberg.catalog import load_catalog as _load

    if _SECRET_IN_URI.search(spec or ""):
        raise CatalogError("--catalog must not carry a password (it is logged and saved with the run): use a catalog named in "
                           "~/.pyiceberg.yaml or PYICEBERG_CATALOG__<NAME>__URI / __PASSWORD variables, and pass --catalog NAME")
    props = _io_properties(output, storage_options)
    if not spec:
        if is_remote(output):
            raise CatalogError(f"--output {output} is in an object store: name the catalog that tracks its tables with --catalog "
                               "(postgresql://user@host/db, https://rest-catalog, glue, a pyiceberg catalog name, or "
                               "sqlite:////path/catalog.db for a single machine)")
        os.makedirs(os.path.abspath(output), exist_ok=True)
        spec = f"sqlite:///{os.path.abspath(join(output, 'catalog.db'))}"
    if spec.startswith(("sqlite:", "postgresql", "mysql")):
        kw = {"type": "sql", "uri": spec}
    elif spec.startswith(("http://", "https://")):
        kw = {"type": "rest", "uri": spec}
    elif spec == "glue":
        kw = {"type": "glue"}
    else:
        return _load(spec, **props)
    # Openers of a fresh SQL catalog race to create its own tables.
    return retrying(lambda: _load("detector", **kw, **props))
