import os
import shutil

import pytest

FIXTURES = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "fixtures", "ironwal-0.6")


def _find_fixtures() -> str:
    """shared/ sits beside the project's checkout (CI clones main with shared/ beside it)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for up in ("..", os.path.join("..", "..")):
        candidate = os.path.normpath(os.path.join(here, up, "shared", "fixtures", "ironwal-0.6"))
        if os.path.isdir(candidate):
            return candidate
    env = os.environ.get("IRONWAL_FIXTURES")
    if env and os.path.isdir(env):
        return env
    pytest.skip("ironwal 0.6 fixtures (shared/fixtures/ironwal-0.6) not found beside the checkout")


@pytest.fixture
def fixtures_dir() -> str:
    return _find_fixtures()


@pytest.fixture
def fixture_copy(tmp_path, fixtures_dir):
    """Copy a fixture subdirectory into tmp_path (the originals are read-only)."""

    def copy(*parts: str) -> str:
        src = os.path.join(fixtures_dir, *parts)
        dst = os.path.join(str(tmp_path), "fx", *parts)
        shutil.copytree(src, dst)
        for dirpath, _dirs, files in os.walk(dst):
            os.chmod(dirpath, 0o755)
            for name in files:
                os.chmod(os.path.join(dirpath, name), 0o644)
        return dst

    return copy
