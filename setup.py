"""Everything about the package is in pyproject.toml, except this: the top-level
`migrations/` folder ships inside the package as `broker/migrations/`, so that an
installed broker can migrate its database (see broker/db/migrations.py)."""

from setuptools import find_packages, setup

MIGRATIONS = {
    "broker.migrations": "migrations",
    "broker.migrations.versions": "migrations/versions",
}

setup(
    packages=[*find_packages(include=["broker", "broker.*"]), *MIGRATIONS],
    package_dir=MIGRATIONS,
    package_data={"broker.migrations": ["script.py.mako"]},
)
