"""AOTInductor: an exported program compiled to a package's files, and the PT2 archive they are
written to."""

from __future__ import annotations

from typing import Any

import torch
import torch.fx
from torch._inductor import config as inductor_config

from .gates import EXPORTED_MODULE_TAKES_CHECK_GUARDS, WRITES_PT2_ARCHIVES


def unlifted_module(program: torch.export.ExportedProgram) -> torch.fx.GraphModule:
    """The exported program as a graph module whose weights are attributes (``get_attr`` nodes),
    without the input guards AOTInductor does not compile."""
    if EXPORTED_MODULE_TAKES_CHECK_GUARDS:
        return program.module(check_guards=False)
    return program.module()


def aoti_compile(gm: torch.fx.GraphModule, args: tuple[Any, ...], kwargs: dict[str, Any], patches: dict[str, Any]) -> list[Any]:
    """AOTInductor on an unlifted exported module, as ``aoti_compile_and_package`` runs it: the
    files a package is made of."""
    # (AOTInductor writes the device's metadata into the dict of its setting: a copy, or the global
    # setting would change with the first build, and with it every later cache key.)
    options = {**patches, "aot_inductor.package": True}
    metadata = patches.get("aot_inductor.metadata", getattr(inductor_config.aot_inductor, "metadata", None))
    if metadata is not None:
        options["aot_inductor.metadata"] = dict(metadata)
    files = torch._inductor.aot_compile(gm, args, kwargs, options=options)
    if not isinstance(files, list):
        raise RuntimeError(f"AOTInductor returned {type(files).__name__}, not the list of a package's files")
    return files


def _pt2_archive() -> Any:
    if not WRITES_PT2_ARCHIVES:
        raise RuntimeError(
            f"compilefuse.export needs torch's PT2 archive format (torch.export.pt2_archive), which torch "
            f"{torch.__version__} lacks; it is tested on the newest torch of docs/compatibility.md")
    from torch.export.pt2_archive import _package, constants

    return _package, constants


def write_package(path: str, files: list[Any], extra: dict[str, str]) -> None:
    """A ``.pt2`` package of AOTInductor's files, with ``extra`` text files beside them."""
    package, _ = _pt2_archive()
    package.package_pt2(path, aoti_files=files, extra_files=extra)


def package_extra_prefix() -> str:
    """Where a package keeps its extra files, below the archive's own top-level folder."""
    return _pt2_archive()[1].EXTRA_DIR
