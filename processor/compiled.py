"""The worker's hot pure-Python modules compiled with mypyc, built on first use as the C kernel is.

Why: past the model, a worker step's CPU is Python run per event and per conversation (planning,
the chat template, verdicts, the engine's scheduling and bookkeeping), spread over many small
functions with no one of them worth a rewrite (bench/README.md). mypyc compiles these modules, as
they are, to C extensions: a worker step's preparation costs 8-17% less (`bench/step.py`), the
worker's CPU per event at 20,000/s ~4% less (`bench/pipeline.py`; bench/README.md, "Eleventh session").
The source stays the one code path: without mypy or a C compiler it runs interpreted.

Built by `activate()` into a cache folder keyed by the modules' sources, mypy's version, the Python
and the platform (`$GUARDSTREAM_COMPILED_CACHE`, else `~/.cache/guardstream/compiled`), and imported
from there by a finder on `sys.meta_path`: nothing is written beside the sources, so an edited module
is never shadowed by an older build. The worker calls it before importing anything it compiles
(`--compiled`, default on); tests run them interpreted unless GUARDSTREAM_COMPILED=1 (`make test`
runs the suite both ways).
"""

from __future__ import annotations

import hashlib
import importlib.abc
import importlib.machinery
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import sys
import sysconfig
import tempfile
from pathlib import Path

from processor import builds

log = logging.getLogger(__name__)

# Compiled together. What mypyc asks of them: no class with a metaclass (a pydantic model) or a builtin
# base but object and Exception; nothing replaced at run time (their classes become native, with fixed
# attributes); annotations that hold, since compiled code checks declared types at run time (values of
# the libraries in MYPY_CONFIG count as Any). Both test passes of `make test` run every one.
HOT_MODULES = (
    "processor.worker.verdicts",
    "processor.worker.conversation",
    "processor.worker.template",
    "processor.engine.engine",
    "processor.engine.scheduler",
    "processor.engine.block_manager",
    "processor.engine.sequence",
    "processor.engine.model_runner",
    "processor.worker.pipeline",
    "processor.worker.publisher",
)
PACKAGE_ROOT = Path(__file__).resolve().parent.parent  # the folder holding `processor`
# Type-checking the libraries the modules import is what made a build take minutes: they are taken as
# Any instead (the compiled code calls them as Python does).
MYPY_CONFIG = """\
[mypy]
ignore_missing_imports = True
[mypy-torch.*,transformers.*,tokenizers.*,aiokafka.*,redis.*,pydantic.*,pydantic_core.*,\
pydantic_settings.*,safetensors.*,huggingface_hub.*,numpy.*,orjson.*,prometheus_client.*]
follow_imports = skip
"""


class CompileUnavailableError(RuntimeError):
    """The modules could not be compiled here (no mypy, no C compiler, a failed build)."""


def activate(cache_dir: Path | None = None) -> bool:
    """Import HOT_MODULES from their compiled build (made first if it is not in the cache). Must run
    before any of them is imported; False, with the reason logged, where they stay interpreted."""
    imported = [name for name in HOT_MODULES if name in sys.modules]
    if imported:
        log.warning("not compiling: %s already imported interpreted", ", ".join(imported))
        return False
    try:
        folder = build(cache_dir)
    except CompileUnavailableError as error:
        log.warning("running the interpreted modules: %s", error)
        return False
    finder, before = CompiledFinder(folder), set(sys.modules)
    sys.meta_path.insert(0, finder)
    try:  # now, not at the worker's first import of them: a build that does not load is backed out
        for name in HOT_MODULES:
            importlib.import_module(name)
    except Exception as error:  # an extension that fails to load raises ImportError, or what it runs
        sys.meta_path.remove(finder)
        for name in set(sys.modules) - before:  # and whatever imported them holds no compiled object
            if name.startswith("processor.") or name in finder.files:
                del sys.modules[name]
        log.warning("running the interpreted modules: the build in %s did not load (%s)", folder, error)
        return False
    log.info("running %d modules compiled with mypyc (%s)", len(HOT_MODULES), folder)
    return True


def is_compiled(module_name: str) -> bool:
    """Whether an imported module is an extension (compiled) rather than Python source."""
    return Path(sys.modules[module_name].__file__ or "").suffix != ".py"


def build(cache_dir: Path | None = None) -> Path:
    """The folder of HOT_MODULES' compiled build for their current sources; built when missing."""
    builds.c_compiler(CompileUnavailableError)  # mypyc's build runs it (setuptools finds $CC)
    try:
        mypy_version = importlib.metadata.version("mypy")
    except importlib.metadata.PackageNotFoundError:
        raise CompileUnavailableError("mypy (which has mypyc) is not installed") from None
    sources = [_source(name) for name in HOT_MODULES]
    cache_dir = cache_dir or builds.cache_dir("compiled", "GUARDSTREAM_COMPILED_CACHE")
    folder = cache_dir / build_key([source.read_bytes() for source in sources], mypy_version)
    if folder.is_dir():
        return folder
    try:
        _build_into(folder, sources)
    except OSError as error:  # the cache folder not writable, the disk full: run interpreted
        raise CompileUnavailableError(f"could not build in {cache_dir}: {error}") from None
    log.info("compiled %d modules with mypyc: %s", len(HOT_MODULES), folder)
    return folder


def _build_into(folder: Path, sources: list[Path]) -> None:
    cache_dir = folder.parent
    cache_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir) as scratch:
        work = Path(scratch) / "src"
        # The package's sources, copied: mypyc type-checks the modules against the rest of the package,
        # and writes its build beside the files it compiles (here, not in the checkout).
        shutil.copytree(PACKAGE_ROOT / "processor", work / "processor", ignore=_not_python)
        (work / "mypy.ini").write_text(MYPY_CONFIG)
        relative = [str(source.relative_to(PACKAGE_ROOT)) for source in sources]
        builds.run_tool([sys.executable, "-m", "mypyc", *relative], CompileUnavailableError, 600, cwd=work)
        built, suffix = Path(scratch) / "built", importlib.machinery.EXTENSION_SUFFIXES[0]
        built.mkdir()
        for library in work.glob(f"*__mypyc{suffix}"):  # the modules' shared code
            shutil.move(library, built / library.name)
        for library in (work / "processor").rglob(f"*{suffix}"):
            target = built / library.relative_to(work)
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.move(library, target)
        try:
            os.replace(built, folder)  # atomic: workers starting together never load half a build
        except OSError:
            if not folder.is_dir():  # not another worker's build landing first
                raise


def build_key(sources: list[bytes], mypy_version: str) -> str:
    """A build's cache name: anything that changes what mypyc makes of the sources changes it."""
    digest = hashlib.sha256()
    for part in (mypy_version, sys.version, sysconfig.get_platform(), MYPY_CONFIG, *HOT_MODULES):
        digest.update(part.encode() + b"\0")
    for source in sources:
        digest.update(source + b"\0")
    return digest.hexdigest()[:16]


class CompiledFinder(importlib.abc.MetaPathFinder):
    """Finds HOT_MODULES, and the library mypyc puts their shared code in, in a build folder."""

    def __init__(self, folder: Path) -> None:
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        self.files = {name: folder / _module_file(name, suffix) for name in HOT_MODULES}
        for library in folder.glob(f"*__mypyc{suffix}"):
            self.files[library.name.removesuffix(suffix)] = library

    def find_spec(
        self, fullname: str, path: object = None, target: object = None
    ) -> importlib.machinery.ModuleSpec | None:
        file = self.files.get(fullname)
        if file is None:
            return None
        loader = importlib.machinery.ExtensionFileLoader(fullname, str(file))
        return importlib.util.spec_from_file_location(fullname, file, loader=loader)


def _source(module_name: str) -> Path:
    return PACKAGE_ROOT / _module_file(module_name, ".py")


def _module_file(module_name: str, suffix: str) -> str:
    """processor.worker.verdicts -> processor/worker/verdicts<suffix>"""
    return module_name.replace(".", "/") + suffix


def _not_python(folder: str, names: list[str]) -> list[str]:
    return [name for name in names if not name.endswith(".py") and not (Path(folder) / name).is_dir()]


if __name__ == "__main__":  # `python -m processor.compiled`: build ahead (make test, make demo), say where
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        print(build())
    except CompileUnavailableError as error:
        print(f"not compiled, the worker will run these modules interpreted: {error}", file=sys.stderr)
