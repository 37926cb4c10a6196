"""The Parquet store: atomic unique files, newest-wins loading, compaction, URIs."""
import numpy as np
import pandas as pd

from harness.store import results


def _row(cell, kimg, value, status="running"):
    return {"study": "s", "cell": cell, "loss": "sid", "init": "teacher", "seed": 0, "kimg": kimg,
            "step": int(kimg * 10), "metric": "fd_digits_1k", "value": value, "status": status}


def test_resumed_rows_resolve_to_newest_and_compaction_keeps_content(tmp_path):
    root = str(tmp_path)
    results.write_rows(root, [_row("a", 0, 9.0), _row("a", 1, 5.0)])
    results.write_rows(root, [_row("a", 1, 4.0), _row("a", 2, 3.0, "done")])  # resumed cell
    results.write_samples(root, {"study": "s", "cell": "a", "kimg": 2.0}, np.zeros((2, 1, 8, 8), np.uint8))
    assert not [p for p in (tmp_path / "rows").iterdir() if p.name.startswith(".")]
    before = results.load_rows(root)
    assert before.set_index("kimg").value.to_dict() == {0: 9.0, 1: 4.0, 2: 3.0}
    assert results.cell_status(before) == {"a": "done"}
    assert results.compact(root) == (3, 2)
    after = results.load_rows(root)
    pd.testing.assert_frame_equal(before.sort_values("kimg").reset_index(drop=True),
                                  after.sort_values("kimg").reset_index(drop=True))
    assert len(list((tmp_path / "rows").iterdir())) == 1
    sample = results.load_samples(root).iloc[0]
    assert results.decode_samples(sample).shape == (2, 1, 8, 8)


def test_file_uri_root(tmp_path):
    uri = f"file://{tmp_path}/store"
    results.write_rows(uri, [_row("b", 0, 1.0, "done")])
    assert results.cell_status(results.load_rows(uri)) == {"b": "done"}
