"""The live-server fixtures of the API tests, shared with the round tests."""

from tests.api.conftest import demo_model_dir, start_server  # noqa: F401
