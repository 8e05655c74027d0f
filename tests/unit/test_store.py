from __future__ import annotations

from pathlib import Path

import pytest

from rag.errors import DuplicatePassageError
from rag.store import PassageStore
from rag.types import Passage


def test_rows_ids_meta_and_filters(tmp_path: Path) -> None:
    with PassageStore(tmp_path / "p.db") as s:
        assert s.add([Passage(id="a", text="x", meta={"lang": "en", "n": 1}),
                      Passage(id="b", title="B", text="y", meta={"lang": "de"})]) == range(0, 2)
        assert s.add([Passage(id="c", text="z", meta={"lang": "en"})]) == range(2, 3)
        assert len(s) == 3
        assert [p.id for p in s.get_rows([2, 0])] == ["c", "a"]
        assert s.get("b") == Passage(id="b", title="B", text="y", meta={"lang": "de"})
        assert s.get("nope") is None
        assert s.rows_matching({"lang": "en"}) == [0, 2]
        assert s.rows_matching({"lang": "en", "n": 1}) == [0]
        assert s.rows_matching({"title": "B"}) == [1]
        assert [p.id for p in s.iter_passages(batch_size=2)] == ["a", "b", "c"]


def test_duplicate_id_names_its_location_and_keeps_store_unchanged(tmp_path: Path) -> None:
    with PassageStore(tmp_path / "p.db") as s:
        s.add([Passage(id="a", text="x")])
        with pytest.raises(DuplicatePassageError, match=r"c\.jsonl:7: duplicate passage id 'a'"):
            s.add([Passage(id="n", text="y"), Passage(id="a", text="z")],
                  locations=["c.jsonl:6", "c.jsonl:7"])
        assert len(s) == 1  # the failed batch was rolled back as a whole


def test_state_is_committed_with_passages(tmp_path: Path) -> None:
    with PassageStore(tmp_path / "p.db") as s:
        s.add([Passage(id="a", text="x")], state={"records_done": "1"})
    with PassageStore(tmp_path / "p.db", readonly=True) as s:
        assert s.get_state("records_done") == "1"
