"""The SeaweedFS S3 store of the preprocessing tests, shared (one per test directory)."""

from tests.preprocessing.conftest import seaweed  # noqa: F401
