"""The playground page (``GET /``, static files in ``rag/static``) and the eval runs it may open:
``GET /v1/runs`` lists run folders under ``runs_dir``; ``GET /v1/runs/file`` hands out one file
of a listed run (both names must be in the listing: no client paths)."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from rag.server.errors import HTTPError
from rag.server.protocol import RunList, RunSummary
from rag.server.state import ServerState, State

router = APIRouter()
STATIC = Path(__file__).resolve().parent.parent.parent / "static"
RUN_FILE_SUFFIXES = (".md", ".png")


def find_runs(root: Path) -> dict[str, Path]:
    """Eval run folders under ``root``: those holding a ``report.md``, up to two levels down,
    by their path relative to ``root`` (``.`` for ``root`` itself)."""
    runs, real = {}, root.resolve()
    for pattern in ("report.md", "*/report.md", "*/*/report.md"):
        for report in sorted(root.glob(pattern)):
            inside = report.resolve().is_relative_to(real)  # no folder linked in from elsewhere
            if inside and report.is_file() and not report.is_symlink():
                runs[report.parent.relative_to(root).as_posix()] = report.parent
    return runs


def run_files(folder: Path) -> list[str]:
    """The files of a run folder that the service hands out: the report and its plots."""
    real = folder.resolve()
    return sorted(f.name for f in folder.iterdir() if f.suffix in RUN_FILE_SUFFIXES and f.is_file()
                  and not f.is_symlink() and f.resolve().parent == real)


def _runs(state: ServerState) -> dict[str, Path]:
    if state.runs_dir is None:
        raise HTTPError(404, "this server shows no eval runs; start rag serve with --runs DIR", code="no_runs")
    return find_runs(state.runs_dir)


@router.get("/", include_in_schema=False)
def page() -> FileResponse:
    return FileResponse(STATIC / "index.html", headers={"Cache-Control": "no-cache"})


@router.get("/favicon.ico", include_in_schema=False)
def favicon() -> Response:
    return Response(status_code=204)


@router.get("/v1/runs")
def list_runs(state: State) -> RunList:
    data = []
    for name, folder in _runs(state).items():
        report = folder / "report.md"
        title = report.read_text(encoding="utf-8", errors="replace").partition("\n")[0].lstrip("# ")
        data.append(RunSummary(name=name, title=title, modified=int(report.stat().st_mtime),
                               files=run_files(folder)))
    return RunList(data=data)


@router.get("/v1/runs/file")
def run_file(run: str, name: str, state: State) -> FileResponse:
    folder = _runs(state).get(run)
    if folder is None:
        raise HTTPError(404, f"no run named {run!r}; GET /v1/runs lists them", param="run")
    if name not in run_files(folder):
        raise HTTPError(404, f"run {run!r} has no file {name!r}; GET /v1/runs lists its files", param="name")
    media = "text/markdown; charset=utf-8" if name.endswith(".md") else "image/png"
    return FileResponse((folder / name).resolve(), media_type=media)
