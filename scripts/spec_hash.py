"""Print a short hash of what the virtual environment must hold (Python version + dependency spec)."""

import hashlib
import pathlib
import re
import sys

text = pathlib.Path(__file__).resolve().parent.parent.joinpath("pyproject.toml").read_text()
try:
    import tomllib

    project = tomllib.loads(text)["project"]
    spec = repr((project["dependencies"], project.get("optional-dependencies", {})))
except ImportError:  # Python 3.10: hash the dependency tables as text
    spec = "".join(re.findall(r"(?ms)^(?:dependencies|\[project\.optional-dependencies\]).*?(?=^\[|\Z)", text))
print(hashlib.sha256(f"{sys.version_info[:2]}{spec}".encode()).hexdigest()[:12])
