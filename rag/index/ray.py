"""Index builds with the encoding spread over a Ray cluster (``rag index build --ray``).

The driver reads and chunks the corpus exactly as a local build does (same ids, same
file:line errors, same ``--skip-bad-lines`` report) into the passage store, and writes the
passage texts in windows of ``window`` passages to ``<work>/todo/``. Ray Data then runs
an actor pool of embedders, one per worker slot (a GPU when the cluster has GPUs, else
``cpus_per_actor`` CPUs), over the windows; each actor writes ``emb/<first row>.npy`` next to
the store. Training, adding and publishing are the local build's own steps, so the manifest,
the resume rules and the published index are the same as a local build's.

Every node must see the output folder (local disk for a one-machine cluster, a shared file
system such as NFS for several machines); an actor that cannot read it fails with a message
that says so. Resuming reads on where the store stopped and encodes only the windows whose
shard is missing.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rag.corpus import Record
from rag.errors import ConfigError, RagError, missing_extra
from rag.index.checkpoints import Shards, batches_after, commit, progress_bar
from rag.store import PassageStore

log = logging.getLogger(__name__)

TODO_DIR = "todo"


@dataclass(frozen=True)
class RayOptions:
    """Where and how to encode.

    Args:
        address: ``None`` starts a local cluster for this build; ``auto`` joins the cluster
            started with ``ray start`` on this machine; ``HOST:PORT`` or ``ray://HOST:PORT``
            joins that cluster.
        actors: embedder actors (default: one per GPU, else one per ``cpus_per_actor`` CPUs).
        cpus_per_actor: CPU threads per actor on CPU-only clusters.
        window: passages per task and per checkpoint shard (default: the recipe's batch size).
    """

    address: str | None = None
    actors: int | None = None
    cpus_per_actor: int = 1
    window: int | None = None

    def __post_init__(self) -> None:
        for name in ("actors", "cpus_per_actor", "window"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ConfigError(f"RayOptions.{name} must be >= 1, got {value}")


def _import_ray() -> Any:
    try:
        import ray
        import ray.data  # noqa: F401 - fails without the data extra (pyarrow, pandas)
    except ImportError:
        raise missing_extra("ray[data]", "ray") from None
    return ray


def connect(address: str | None) -> Any:
    """``ray`` connected to the cluster (started locally when ``address`` is None)."""
    ray = _import_ray()
    if ray.is_initialized():
        return ray
    for name in ("ray", "ray.data"):  # rag reports progress and errors itself
        logging.getLogger(name).setLevel(logging.ERROR)
    kwargs: dict[str, Any] = {"logging_level": logging.ERROR, "log_to_driver": False}
    try:
        if address is None:
            ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, **kwargs)
        else:
            ray.init(address=address, **kwargs)
    except (ConnectionError, RuntimeError) as e:
        raise ConfigError(f"cannot join the Ray cluster at {address!r}: {e}. Start one with "
                          "'ray start --head' or run --ray without an address for a local one") from None
    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False
    ctx.print_on_execution_start = False
    return ray


def _pool(ray: Any, opts: RayOptions) -> tuple[int, dict[str, float], str]:
    """(actors, resources per actor, device) from the cluster's resources."""
    res = ray.cluster_resources()
    gpus, cpus = int(res.get("GPU", 0)), int(res.get("CPU", 0))
    if gpus:
        return opts.actors or gpus, {"num_gpus": 1, "num_cpus": 1}, "cuda"
    if opts.cpus_per_actor > max(cpus, 1):
        raise ConfigError(f"--ray-cpus-per-actor {opts.cpus_per_actor} is more than the cluster's "
                          f"{cpus} CPUs")
    return opts.actors or max(1, cpus // opts.cpus_per_actor), {"num_cpus": opts.cpus_per_actor}, "cpu"


class _WindowEncoder:
    """A Ray Data actor: loads the embedder once, encodes whole windows into shard files.

    Failures come back as an ``error`` column rather than as exceptions: Ray Data replaces a
    worker's exception with its own retry advice, and the driver should print the real cause.
    """

    def __init__(self, spec: dict[str, Any], emb_dir: str, threads: int):
        import ray

        self.node = ray.get_runtime_context().get_node_id()
        self.out = Path(emb_dir)
        self.error = ""
        try:
            from rag.embedding import load_embedder

            try:
                import torch

                torch.set_num_threads(threads)
            except ImportError:
                pass
            self.embedder = load_embedder(**spec)
        except Exception as e:  # reported with the first window
            self.error = _describe(e)

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        import numpy as np

        starts, counts, errors = [], [], []
        for start, path in zip(batch["start"], batch["path"], strict=True):
            starts.append(int(start))
            try:
                counts.append(self._encode(int(start), Path(path)))
                errors.append(self.error)
            except Exception as e:
                counts.append(0)
                errors.append(_describe(e))
        return {"start": np.array(starts), "n": np.array(counts), "error": np.array(errors),
                "node": np.array([self.node] * len(starts))}

    def _encode(self, start: int, path: Path) -> int:
        import numpy as np

        if self.error:
            return 0
        if not path.exists():
            raise ConfigError(f"a Ray worker on node {self.node} cannot read {path}: --ray builds "
                              "need --out on storage that every node sees (e.g. NFS)")
        texts = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        vecs = self.embedder.encode_passages(texts)
        tmp = self.out / f"{start:012d}.tmp.{os.getpid()}.npy"
        np.save(tmp, vecs)
        os.replace(tmp, self.out / f"{start:012d}.npy")
        return len(texts)


def _describe(e: BaseException) -> str:
    """One line naming a worker-side failure."""
    text = " ".join(str(e).split())
    return text if isinstance(e, RagError) else f"{type(e).__name__}: {text}"


def _write_windows(partial: Path, store: PassageStore, records: Iterator[Record], window: int,
                   key: str, bar: Any) -> None:
    """Read + chunk into the store and window files; resumes after what the store holds."""
    from rag.embedding import passage_text

    todo = partial / TODO_DIR
    todo.mkdir(exist_ok=True)
    done = int(store.get_state("records_done") or 0)
    for batch, records_done in batches_after(records, window, done):
        start = store.next_row()
        lines = "".join(json.dumps(passage_text(r.passage.title, r.passage.text), ensure_ascii=False)
                        + "\n" for r in batch)
        tmp = todo / f"{start:012d}.jsonl.tmp"
        tmp.write_text(lines, encoding="utf-8")
        os.replace(tmp, todo / f"{start:012d}.jsonl")
        commit(store, batch, records_done, key)
        bar.set_postfix_str(f"read {records_done}")


def _worker_spec(spec: dict[str, Any], device: str, batch_size: int) -> dict[str, Any]:
    if str(spec["name"]).startswith("hash:"):
        return spec
    return {**spec, "device": device, "batch_size": batch_size}


def encode_with_ray(partial: Path, store: PassageStore, records: Iterator[Record],
                    spec: dict[str, Any], batch_size: int, key: str, opts: RayOptions,
                    progress: bool) -> dict[str, int]:
    """Fill ``partial`` with the store and one embedding shard per window.

    ``spec``: `load_embedder` arguments, ``precision`` resolved on the driver (give
    ``--precision fp16`` for a GPU cluster driven from a CPU machine). Returns the number of
    windows encoded per Ray node id (empty when all were already done).
    """
    window = opts.window or batch_size
    bar = progress_bar(None, "reading (ray build)", progress)
    try:
        _write_windows(partial, store, records, window, key, bar)
    finally:
        bar.close()
    shards = Shards(partial)
    shards.drop_from(store.next_row())
    todo = sorted((partial / TODO_DIR).glob("*.jsonl"))
    pending = [p for p in todo if not (shards.dir / f"{p.name.split('.')[0]}.npy").exists()]
    if len(pending) < len(todo):
        log.warning("resuming ray build: %d of %d windows already encoded", len(todo) - len(pending), len(todo))
    if not pending:
        return {}
    ray = connect(opts.address)
    actors, resources, device = _pool(ray, opts)
    actors = min(actors, len(pending))
    log.info("encoding %d windows with %d Ray actors (%s)", len(pending), actors, device)
    ds = ray.data.from_items([{"start": int(p.name.split(".")[0]), "path": str(p.resolve())}
                              for p in pending], override_num_blocks=len(pending))
    ds = ds.map_batches(
        _WindowEncoder, batch_size=1,
        fn_constructor_kwargs={"spec": _worker_spec(spec, device, batch_size),
                               "emb_dir": str(shards.dir.resolve()),
                               "threads": int(resources["num_cpus"])},
        compute=ray.data.ActorPoolStrategy(size=actors, max_tasks_in_flight_per_actor=1),
        **resources)
    per_node: dict[str, int] = {}
    bar = progress_bar(len(pending), "encoding windows (ray)", progress)
    try:
        for row in ds.iter_rows():
            if row["error"]:
                raise ConfigError(f"ray build failed on node {row['node']} (window at row "
                                  f"{row['start']}): {row['error']}; fix it and run again to resume")
            per_node[row["node"]] = per_node.get(row["node"], 0) + 1
            bar.update(1)
    finally:
        bar.close()
    log.info("ray build: %d windows on %d nodes %s", sum(per_node.values()), len(per_node),
             sorted(per_node.values()))
    return per_node
