"""Test-wide settings: CPU only (libtpu, if installed for AOT compiles, must not grab the process)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
