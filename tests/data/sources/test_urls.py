"""Reading URL lists (sdflow.data.sources.urls): formats, columns, limits, and user mistakes."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from sdflow.config import SourceConfig
from sdflow.data import sources
from sdflow.errors import UserError

ROWS = [
    {"URL": "http://example.com/0.png", "TEXT": "a cat", "key": 10},
    {"URL": "http://example.com/1.png", "TEXT": "", "key": 11},
    {"URL": "http://example.com/2.png", "TEXT": "a dog, sitting", "key": 12},
]


def write_list(path, rows=ROWS) -> str:
    kind = path.suffix
    if kind == ".parquet":
        pq.write_table(pa.Table.from_pylist(rows), path)
    elif kind in (".csv", ".tsv"):
        sep = "\t" if kind == ".tsv" else ","
        lines = [sep.join(rows[0])]
        for row in rows:
            cells = [str(v) for v in row.values()]
            lines.append(sep.join(f'"{c}"' if sep in c else c for c in cells))
        path.write_text("\n".join(lines) + "\n")
    elif kind == ".jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    else:
        path.write_text("".join(r["URL"] + "\n" for r in rows))
    return str(path)


def read(path: str, **options) -> list[sources.SourceRow]:
    return list(sources.open_rows(SourceConfig(kind="urls", path=path, **options)).rows)


@pytest.mark.parametrize("suffix", [".parquet", ".csv", ".tsv", ".jsonl"])
def test_laion_style_columns_are_found_in_every_format(tmp_path, suffix):
    rows = read(write_list(tmp_path / f"list{suffix}"))
    assert [r.url for r in rows] == [r["URL"] for r in ROWS]
    assert [r.caption for r in rows] == ["a cat", None, "a dog, sitting"]
    assert [r.id for r in rows] == ["00000000", "00000001", "00000002"]
    assert [r.source for r in rows] == [r.url for r in rows]


def test_plain_text_list_has_one_url_per_line(tmp_path):
    rows = read(write_list(tmp_path / "list.txt"))
    assert [r.url for r in rows] == [r["URL"] for r in ROWS]
    assert all(r.caption is None for r in rows)


def test_id_column_and_limit(tmp_path):
    path = write_list(tmp_path / "list.parquet")
    rows = read(path, id_column="key", limit=2)
    assert [r.id for r in rows] == ["10", "11"]
    assert sources.open_rows(SourceConfig(kind="urls", path=path, limit=2)).total == 2


def test_a_directory_of_lists_is_read_in_name_order(tmp_path):
    write_list(tmp_path / "b.jsonl", ROWS[2:])
    write_list(tmp_path / "a.parquet", ROWS[:2])
    rows = read(str(tmp_path))
    assert [r.url for r in rows] == [r["URL"] for r in ROWS]
    assert [r.index for r in rows] == [0, 1, 2]


def test_large_parquet_list_streams_in_batches(tmp_path):
    rows = [{"url": f"http://example.com/{i}.jpg", "caption": f"c{i}"} for i in range(20_000)]
    path = tmp_path / "big.parquet"
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=5000)
    opened = sources.open_rows(SourceConfig(kind="urls", path=str(path)))
    assert opened.total == 20_000
    first = next(opened.rows)
    assert (first.url, first.caption) == ("http://example.com/0.jpg", "c0")
    assert sum(1 for _ in opened.rows) == 19_999


def test_missing_url_column_names_file_columns_and_setting(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("link,caption\nhttp://example.com/a.png,a\n")
    with pytest.raises(UserError) as caught:
        read(str(path))
    message = str(caught.value)
    assert str(path) in message and "link, caption" in message and "source.url_column" in message
    with pytest.raises(UserError, match="source.url_column"):
        read(str(path), url_column="href")
    assert [r.url for r in read(str(path), url_column="link")] == ["http://example.com/a.png"]


@pytest.mark.parametrize(
    ("name", "content"),
    [("list.parquet", b"PAR1 this is not parquet"), ("list.jsonl", b'{"url": "a"}\n{not json\n')],
)
def test_unreadable_list_is_a_user_error_naming_the_file(tmp_path, name, content):
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(UserError, match=str(path)):
        read(str(path))


def test_missing_or_unknown_list_files_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        read(str(tmp_path / "absent.csv"))
    (tmp_path / "list.xlsx").write_bytes(b"x")
    with pytest.raises(UserError, match="unknown extension"):
        read(str(tmp_path / "list.xlsx"))


def test_fingerprint_follows_the_list_content(tmp_path):
    path = tmp_path / "list.csv"
    write_list(path)
    config = SourceConfig(kind="urls", path=str(path))
    before = sources.fingerprint(config)
    assert sources.fingerprint(config) == before
    path.write_text(path.read_text().replace("0.png", "9.png"))
    assert sources.fingerprint(config) != before


def test_laion_metadata_columns_travel_with_each_row(tmp_path):
    rows = [
        {"URL": "http://example.com/0.jpg", "similarity": 0.31, "punsafe": 0.9, "NSFW": "NSFW"},
        {"URL": "http://example.com/1.jpg", "similarity": float("nan"), "punsafe": None},
    ]
    path = tmp_path / "laion.parquet"
    pq.write_table(pa.Table.from_pylist([{**r, "WIDTH": 640} for r in rows]), path)
    got = [json.loads(r.metadata) if r.metadata else None for r in read(str(path))]
    assert got == [{"NSFW": "NSFW", "punsafe": 0.9, "similarity": 0.31}, None]  # no WIDTH, no NaN

    chosen = read(str(path), metadata_columns=["WIDTH"])
    assert [json.loads(r.metadata) for r in chosen] == [{"WIDTH": 640}, {"WIDTH": 640}]
    with pytest.raises(UserError, match="no column 'HEIGHT'.*source.metadata_columns"):
        read(str(path), metadata_columns=["HEIGHT"])


def test_csv_metadata_numbers_are_numbers(tmp_path):
    path = tmp_path / "list.csv"
    path.write_text("url,similarity,original_width,LICENSE\nhttp://e.com/a.png,0.25,640,cc-by\n")
    (row,) = read(str(path))
    assert json.loads(row.metadata) == {
        "LICENSE": "cc-by",
        "original_width": 640,
        "similarity": 0.25,
    }


def test_metadata_columns_need_a_source_with_columns():
    from sdflow.profiles import ConfigError, load_profile

    with pytest.raises(ConfigError, match="only 'urls' and 'webdataset'"):
        load_profile("tiny-test", ["source.kind=folder", "source.metadata_columns=[a]"])
