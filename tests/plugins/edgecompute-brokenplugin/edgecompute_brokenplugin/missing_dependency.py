"""Imports a package that is not installed, as a plugin with a missing dependency would."""

import edgecompute_dependency_that_does_not_exist  # noqa: F401
