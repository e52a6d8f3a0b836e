"""Builds nerve's optional C speedups (``nerve/_speedups.c``) with the wheel.

Where no C compiler works (or ``NERVE_NO_SPEEDUPS=1`` is set), the wheel is built
without it and nerve runs its pure-Python code, which gives the same results: the
build says so and goes on. An editable install (``pip install -e .``) compiles the
module next to its source, where the editable install imports it from."""

from __future__ import annotations

import os
import shlex
import subprocess
import sysconfig
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface

SOURCE = Path("nerve") / "_speedups.c"


def compile_speedups(root: Path, target_dir: Path) -> Path:
    """Compile the module into ``target_dir``; its path (raises on failure)."""
    suffix = sysconfig.get_config_var("EXT_SUFFIX") or ".so"
    target = target_dir / f"_speedups{suffix}"
    linker = shlex.split(
        os.environ.get("LDSHARED") or sysconfig.get_config_var("LDSHARED") or "cc -shared"
    )
    include = sysconfig.get_paths()["include"]
    command = [
        *linker,
        "-O2",
        "-fPIC",
        "-Wall",
        f"-I{include}",
        str(root / SOURCE),
        "-o",
        str(target),
    ]
    # the command is the interpreter's own compiler and this file: no outside input
    done = subprocess.run(command, capture_output=True, text=True, check=False)  # noqa: S603
    if done.returncode != 0:
        raise RuntimeError(f"{shlex.join(command)} failed:\n{done.stderr.strip()}")
    return target


class SpeedupsHook(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or os.environ.get("NERVE_NO_SPEEDUPS"):
            return
        root = Path(self.root)
        try:
            if version == "editable":
                compile_speedups(root, root / SOURCE.parent)
            else:
                built = compile_speedups(root, Path(tempfile.mkdtemp(prefix="nerve-build-")))
                build_data["force_include"][str(built)] = str(SOURCE.parent / built.name)
        except (OSError, RuntimeError) as exc:
            self.app.display_warning(
                f"nerve: the C speedups were not built, nerve runs its pure-Python "
                f"code instead ({exc})"
            )
            return
        build_data["pure_python"] = False
        build_data["infer_tag"] = True
