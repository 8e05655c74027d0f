"""Index folders: vector indexes (`vectors`), the folder's owner: its writer lock, versions and
readers' pins (`owner`), a version and its manifest (`folder`), build checkpoints
(`checkpoints`), local builds (`build`), Ray builds (`ray`), and changes after a build
(`update`: delete, upsert, sync, compact), importing FAISS indexes made elsewhere (`importing`)."""

from rag.index.build import build_index
from rag.index.folder import (
    INDEX_FILE,
    MANIFEST_FILE,
    REPORT_FILE,
    STORE_FILE,
    Manifest,
    check_embedder,
    embedder_from_manifest,
    folder_size,
    read_manifest,
    verify,
)
from rag.index.importing import import_index
from rag.index.update import ChangePlan, add_to_index, compact, delete, plan_delete, plan_sync, sync, upsert
from rag.index.vectors import FaissIndex, NumpyFlatIndex, VectorIndex, import_faiss

__all__ = [
    "INDEX_FILE", "MANIFEST_FILE", "REPORT_FILE", "STORE_FILE", "ChangePlan", "FaissIndex", "Manifest",
    "NumpyFlatIndex", "VectorIndex", "add_to_index", "build_index", "check_embedder", "compact", "delete",
    "embedder_from_manifest", "folder_size", "import_faiss", "import_index", "plan_delete", "plan_sync",
    "read_manifest", "sync", "upsert", "verify",
]
