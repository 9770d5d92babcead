"""List the requirements of the carried wheels that neither another carried wheel nor the GPU
image satisfies (by name; versions of the image's packages are not known here).

    python3 scripts/gpu/check_deps.py [--known=NAME,...] DIR IMAGE_PACKAGE...

--known: requirements known to be left out on purpose (e.g. LMCache's optional backends'): listed
apart; the exit status is 1 if any other requirement is unmet (0 without --known, as before).
"""
from __future__ import annotations

import re
import sys
import zipfile
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name, parse_wheel_filename

ENV = default_environment() | {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
                               "platform_machine": "x86_64", "platform_system": "Linux", "extra": ""}
IGNORE = {"nixl-cu12"}  # the nixl meta wheel names the cu12 build; nixl_cu13 is carried instead


def main(*argv: str) -> int:
    known = {canonicalize_name(n) for a in argv if a.startswith("--known=") for n in a[8:].split(",") if n}
    folder, *image = [a for a in argv if not a.startswith("--known=")]
    wheels = {}
    for w in sorted(Path(folder).glob("*.whl")):
        name, version, *_ = parse_wheel_filename(w.name)
        wheels[name] = (version, w)
    have = set(wheels) | {canonicalize_name(n) for n in image}
    unmet = []
    for name, (version, w) in wheels.items():
        with zipfile.ZipFile(w) as z:
            meta = next(n for n in z.namelist() if re.fullmatch(r"[^/]+\.dist-info/METADATA", n))
            for line in z.read(meta).decode().splitlines():
                if not line.startswith("Requires-Dist:"):
                    continue
                req = Requirement(line.split(":", 1)[1].strip())
                if req.marker and not req.marker.evaluate(ENV):
                    continue
                dep = canonicalize_name(req.name)
                if dep in IGNORE:
                    continue
                if dep in known and dep not in have:
                    print(f"check_deps: {name} {version} needs {req}: left out on purpose (--known)")
                elif dep not in have:
                    unmet.append(f"{name} {version} needs {req} (not carried, not in the image)")
                elif dep in wheels and req.specifier and not req.specifier.contains(wheels[dep][0], prereleases=True):
                    unmet.append(f"{name} {version} needs {req}, carried {wheels[dep][0]}")
    for line in unmet:
        print("check_deps: " + line)
    print(f"check_deps: {len(wheels)} wheels, {len(unmet)} unmet requirement(s)")
    return 1 if known and unmet else 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
