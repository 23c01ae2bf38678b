"""Specification of the built wheel: installed on its own, it can migrate a database."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
import sysconfig
import venv
from collections.abc import Callable
from pathlib import Path
from zipfile import ZipFile

import pytest
from helpers import ALL_MIGRATIONS

REPO_ROOT = Path(__file__).resolve().parent.parent


def _build_wheel(outdir: Path) -> Path:
    # without isolation when the backend is installed: no network, and seconds instead of tens
    no_isolation = ["--no-isolation"] if importlib.util.find_spec("hatchling") else []
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", *no_isolation, "--outdir", str(outdir), str(REPO_ROOT)],
        check=True,
        capture_output=True,
        cwd=outdir,
    )
    (wheel,) = outdir.glob("orchestrator_engine-*.whl")
    return wheel


def _venv_python(root: Path) -> Path:
    return root / ("Scripts" if os.name == "nt" else "bin") / "python"


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _build_wheel(tmp_path_factory.mktemp("dist"))


def test_wheel_ships_migrations_and_sql_inside_the_package(wheel: Path) -> None:
    names = ZipFile(wheel).namelist()
    shipped = {f"orchestrator_engine/migrations/{p.name}" for p in (REPO_ROOT / "migrations").glob("*.sql")}
    assert "orchestrator_engine/migrations/0001_initial_schema.sql" in shipped
    assert shipped <= set(names)
    assert "orchestrator_engine/migrator.py" in names
    expected_sql = {
        f"orchestrator_engine/sql/{p.name}" for p in (REPO_ROOT / "orchestrator_engine" / "sql").glob("*.sql")
    }
    assert expected_sql <= set(names)
    assert not any(name.startswith(("tests/", "migrations/")) for name in names)


@pytest.mark.slow
def test_installed_wheel_migrates_an_empty_database(
    wheel: Path, tmp_path: Path, fresh_database: Callable[..., str]
) -> None:
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=False).create(env_dir)
    python = _venv_python(env_dir)
    site_packages = Path(
        subprocess.run(
            [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    )
    # Install only the wheel, no dependencies (this pip drives the venv's interpreter) ...
    pip = [sys.executable, "-m", "pip", "--python", str(python), "--disable-pip-version-check"]
    subprocess.run(
        [*pip, "install", "--no-deps", "--no-index", "--quiet", str(wheel)],
        check=True,
        capture_output=True,
    )
    # ... and borrow psycopg & co. from this environment rather than fetch them from PyPI. A path
    # line in a .pth does not run that directory's own .pth files, so an editable install of this
    # checkout stays invisible.
    borrowed = {sysconfig.get_paths()["purelib"], sysconfig.get_paths()["platlib"]}
    (site_packages / "_borrowed_deps.pth").write_text("\n".join(sorted(borrowed)) + "\n")

    dsn = fresh_database(template=False)
    script = "import orchestrator_engine.migrator as m; print(m.migrate(DSN)); print(m.__file__)"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    result = subprocess.run(
        [str(python), "-c", f"DSN = {dsn!r}\n{script}"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    applied, module_file = result.stdout.strip().splitlines()[-2:]
    assert applied == str(ALL_MIGRATIONS)
    assert Path(module_file).is_relative_to(site_packages)
