"""Everything about the package is in pyproject.toml, except this: the top-level
`migrations/` folder ships inside the package as `broker/migrations/`, so that an
installed broker can migrate its database (see broker/db/migrations.py)."""

from setuptools import find_packages, setup

setup(
    packages=[*find_packages(include=["broker", "broker.*"]), "broker.migrations"],
    package_dir={"broker.migrations": "migrations"},
    package_data={"broker.migrations": ["script.py.mako", "versions/*.py"]},
)
