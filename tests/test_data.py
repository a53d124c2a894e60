"""Data loaders on files in the real formats (written here, or the shared samples),
the CIFAR-10 download path from a local file:// URL, partitioners and helpers."""

from __future__ import annotations

import hashlib
import io
import os
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import shared_file
from hypothesis import given, settings
from hypothesis import strategies as st

from enclavefl.data import (
    Table,
    batch_indices,
    download_cifar10,
    hash_category,
    iter_criteo,
    load_cifar10,
    load_criteo,
    load_fate_csv,
    load_sklearn,
    load_wide_deep_party,
    make_wide_deep_data,
    normalize,
    partition,
    split_columns,
    split_dirichlet,
    split_iid,
    tensor_dataset,
)
from enclavefl.data.cifar10 import CIFAR10_DIR, augment, load_label_names
from enclavefl.data.criteo import HEADER
from enclavefl.errors import FormatError, UsageError

# torch on one thread per test (conftest.one_torch_thread): the suite shares few cores.
pytestmark = pytest.mark.usefixtures("one_torch_thread")

# --- CIFAR-10 --------------------------------------------------------------------------


def write_cifar(folder: Path, per_batch: int = 3, protocol: int = 2) -> None:
    """Batches in the published layout: dicts with b"data" uint8 [N, 3072] and b"labels"."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for k, name in enumerate([f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]):
        batch = {
            b"batch_label": f"batch {k}".encode(),
            b"labels": [int(v) for v in rng.integers(0, 10, per_batch)],
            b"data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
            b"filenames": [b"img.png"] * per_batch,
        }
        (folder / name).write_bytes(pickle.dumps(batch, protocol=protocol))
    meta = {b"label_names": [b"airplane", b"automobile"], b"num_cases_per_batch": per_batch}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=protocol))


@pytest.mark.parametrize("protocol", [2, 5])
def test_cifar_loads_the_pickle_layout(tmp_path: Path, protocol: int) -> None:
    write_cifar(tmp_path / CIFAR10_DIR, protocol=protocol)
    images, labels = load_cifar10(tmp_path, train=True)
    assert images.shape == (15, 3, 32, 32) and images.dtype == np.uint8
    assert labels.shape == (15,) and labels.dtype == np.int64
    first = pickle.loads((tmp_path / CIFAR10_DIR / "data_batch_1").read_bytes())
    # Channel-major rows: values 1024..2047 are the green plane.
    assert images[0, 1, 0, 0] == first[b"data"][0, 1024]
    assert images[0, 2, 31, 31] == first[b"data"][0, 3071]
    assert labels[:3].tolist() == first[b"labels"]
    test_images, _ = load_cifar10(tmp_path / CIFAR10_DIR, train=False)
    assert test_images.shape == (3, 3, 32, 32)
    assert load_label_names(tmp_path) == ["airplane", "automobile"]


class _Exploit:
    def __reduce__(self):
        return (os.system, ("touch pwned-by-pickle",))


def test_cifar_refuses_pickles_that_call_arbitrary_code(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "data_batch_2").write_bytes(pickle.dumps({b"data": _Exploit(), b"labels": []}))
    with pytest.raises(FormatError, match="data_batch_2.*system is not allowed"):
        load_cifar10(tmp_path)
    assert not (tmp_path / "pwned-by-pickle").exists()


def test_cifar_bad_files(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found: run download_cifar10"):
        load_cifar10(tmp_path)
    write_cifar(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 100), np.uint8), b"labels": [0, 1]})
    )
    with pytest.raises(FormatError, match=r"data_batch_3: 'data' must be uint8 \[N, 3072\]"):
        load_cifar10(tmp_path)
    (tmp_path / "data_batch_3").write_bytes(b"not a pickle")
    with pytest.raises(FormatError, match="not a CIFAR-10 python batch"):
        load_cifar10(tmp_path)
    (tmp_path / "test_batch").write_bytes(
        pickle.dumps({b"data": np.zeros((2, 3072), np.uint8), b"labels": [0]})
    )
    with pytest.raises(FormatError, match="2 images but 1 labels"):
        load_cifar10(tmp_path, train=False)


def test_normalize_and_augment() -> None:
    images = torch.full((2, 3, 32, 32), 255, dtype=torch.uint8)
    x = normalize(images)
    assert x.dtype == torch.float32 and x.shape == (2, 3, 32, 32)
    assert x[0, 0, 0, 0].item() == pytest.approx((1 - 0.4914) / 0.2470, rel=1e-5)
    with pytest.raises(UsageError, match="uint8 images"):
        normalize(x)

    g = torch.Generator().manual_seed(0)
    source = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    out = augment(source, g)
    padded = torch.nn.functional.pad(source, (4, 4, 4, 4))
    for i in range(2):
        candidates = [
            crop.flip(-1) if flip else crop
            for dy in range(9)
            for dx in range(9)
            for flip in (False, True)
            for crop in [padded[i, :, dy : dy + 32, dx : dx + 32]]
        ]
        assert any(torch.equal(out[i], c) for c in candidates)


def make_archive(path: Path, members: dict[str, bytes], link: tuple[str, str] | None = None) -> str:
    with tarfile.open(path, "w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        if link:
            info = tarfile.TarInfo(link[0])
            info.type = tarfile.SYMTYPE
            info.linkname = link[1]
            tar.addfile(info)
    return hashlib.md5(path.read_bytes()).hexdigest()


def cifar_members(tmp_path: Path) -> dict[str, bytes]:
    source = tmp_path / "source"
    write_cifar(source)
    return {f"{CIFAR10_DIR}/{p.name}": p.read_bytes() for p in sorted(source.iterdir())}


def test_download_from_file_url_checks_md5_and_extracts(tmp_path: Path) -> None:
    archive = tmp_path / "cifar.tar.gz"
    md5 = make_archive(archive, cifar_members(tmp_path))
    root = tmp_path / "data"
    seen: list[tuple[int, int | None]] = []
    folder = download_cifar10(root, url=archive.as_uri(), md5=md5, on_progress=lambda d, t: seen.append((d, t)))
    assert seen and seen[-1][0] == archive.stat().st_size  # every byte reported, the last call at the end
    assert folder == root / CIFAR10_DIR
    images, labels = load_cifar10(root)
    assert images.shape == (15, 3, 32, 32)
    assert [p.name for p in root.iterdir()] == [CIFAR10_DIR]  # the temporary archive is gone
    # Already present: nothing is fetched (this URL would fail).
    assert download_cifar10(root, url=(tmp_path / "gone.tgz").as_uri()) == folder


def test_download_md5_mismatch_extracts_nothing(tmp_path: Path) -> None:
    archive = tmp_path / "cifar.tar.gz"
    make_archive(archive, cifar_members(tmp_path))
    root = tmp_path / "data"
    with pytest.raises(FormatError, match="MD5 mismatch: got [0-9a-f]{32}, expected c58f3010"):
        download_cifar10(root, url=archive.as_uri())
    assert list(root.iterdir()) == []


@pytest.mark.parametrize(
    ("members", "link", "message"),
    [
        (
            {f"{CIFAR10_DIR}/ok": b"x", f"{CIFAR10_DIR}/../../escaped.txt": b"x"},
            None,
            "outside the destination",
        ),
        ({"other/file": b"x"}, None, "is outside cifar-10-batches-py/"),
        ({}, (f"{CIFAR10_DIR}/link", "/etc/passwd"), "absolute path"),
    ],
)
def test_download_refuses_unsafe_archives(tmp_path: Path, members, link, message: str) -> None:
    archive = tmp_path / "evil.tar.gz"
    md5 = make_archive(archive, members, link)
    root = tmp_path / "data" / "inner"
    with pytest.raises(FormatError, match=message):
        download_cifar10(root, url=archive.as_uri(), md5=md5)
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "data" / "escaped.txt").exists()
    assert not (root / CIFAR10_DIR).exists()  # checked before anything is written


def test_download_without_network_is_a_usage_error(tmp_path: Path) -> None:
    missing = (tmp_path / "no-such-archive.tar.gz").as_uri()
    with pytest.raises(UsageError, match="cannot download CIFAR-10 .* download it on a machine"):
        download_cifar10(tmp_path / "data", url=missing)


# --- Criteo ----------------------------------------------------------------------------

ROWS = [
    ["1", "", "3", "260.0", "", "17668", "", "", "33", "", "", "", "0", "", "05db9164", "08d6d899"]
    + [""] * 24,
    ["0", "5", "-1", "19", "35", "30251", "247", "1", "35", "160", "", "1", "", "35", "68fd1e64", ""]
    + ["a"] * 24,
    ["0"] + ["2"] * 13 + ["x"] * 26,
]


def write_criteo(path: Path, rows: list[list[str]], tsv: bool) -> Path:
    if tsv:
        path.write_text("".join("\t".join(r) + "\n" for r in rows))
    else:
        path.write_text(",".join(HEADER) + "\r\n" + "".join(",".join(r) + "\r\n" for r in rows))
    return path


def test_criteo_both_layouts_give_the_same_arrays(tmp_path: Path) -> None:
    tsv = load_criteo(write_criteo(tmp_path / "train.txt", ROWS, tsv=True), vocab_sizes=1000)
    csv = load_criteo(write_criteo(tmp_path / "sample.csv", ROWS, tsv=False), vocab_sizes=1000)
    for a, b in ((tsv.dense, csv.dense), (tsv.sparse, csv.sparse), (tsv.label, csv.label)):
        np.testing.assert_array_equal(a, b)
    assert tsv.dense.dtype == np.float32 and tsv.sparse.dtype == np.int64 and tsv.label.dtype == np.float32
    assert tsv.label.tolist() == [1.0, 0.0, 0.0]
    assert tsv.dense[0, :3] == pytest.approx([0.0, np.log1p(3), np.log1p(260)])
    assert tsv.dense[1, 1] == 0.0  # negatives are clipped before log(1 + x)
    assert tsv.sparse[0, 0] == hash_category("05db9164", 1000) and tsv.sparse[0, 2:].tolist() == [0] * 24
    assert tsv.sparse[1, 1] == 0 and tsv.sparse[1, 2] == hash_category("a", 1000)
    dense, sparse, label = tsv.tensors()
    assert dense.shape == (3, 13) and sparse.dtype == torch.int64 and label.shape == (3,)


def test_criteo_hash_is_stable_and_in_range() -> None:
    # Pinned: a changed hash would silently remap every trained embedding row.
    assert hash_category("05db9164", 10_000) == 8469
    assert all(1 <= hash_category(f"v{i}", 7) < 7 for i in range(200))
    assert len({hash_category(f"v{i}", 7) for i in range(200)}) == 6


def test_criteo_streams_in_chunks(tmp_path: Path) -> None:
    path = write_criteo(tmp_path / "train.txt", ROWS * 3, tsv=True)
    chunks = list(iter_criteo(path, chunk_rows=4, vocab_sizes=[50] * 26))
    assert [len(c) for c in chunks] == [4, 4, 1]
    whole = load_criteo(path, vocab_sizes=[50] * 26)
    np.testing.assert_array_equal(np.concatenate([c.sparse for c in chunks]), whole.sparse)
    assert len(load_criteo(path, limit=5)) == 5


def test_criteo_shared_sample() -> None:
    data = load_criteo(shared_file("criteo", "criteo_sample.txt"), vocab_sizes=10_000)
    assert len(data) == 200
    assert data.dense.shape == (200, 13) and data.sparse.shape == (200, 26)
    assert set(np.unique(data.label)) == {0.0, 1.0}
    assert (data.dense >= 0).all() and np.isfinite(data.dense).all()
    assert data.sparse.min() >= 0 and data.sparse.max() < 10_000
    # First row: I1 missing, I2 = 3, C1 = 05db9164, C19 missing.
    assert data.dense[0, 0] == 0.0 and data.dense[0, 1] == pytest.approx(np.log1p(3))
    assert data.sparse[0, 0] == hash_category("05db9164", 10_000) and data.sparse[0, 18] == 0


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("\t".join(["1"] * 39) + "\n", r"line 3: expected 40 fields, got 39"),
        (
            "\t".join(["0", "1", "2", "3", "4", "oops"] + ["1"] * 34) + "\n",
            r"line 3, column I5: 'oops' is not a number",
        ),
        ("\t".join(["0", "inf"] + ["1"] * 38) + "\n", r"line 3, column I1: 'inf' is not finite"),
        ("\t".join(["2"] + ["1"] * 39) + "\n", r"line 3: label must be 0 or 1, got '2'"),
    ],
)
def test_criteo_bad_lines_name_the_line(tmp_path: Path, line: str, message: str) -> None:
    path = write_criteo(tmp_path / "train.txt", ROWS[:2], tsv=True)
    path.write_text(path.read_text() + line)
    with pytest.raises(FormatError, match=message):
        load_criteo(path)


def test_criteo_bad_files_and_options(tmp_path: Path) -> None:
    (tmp_path / "empty.txt").write_text("")
    with pytest.raises(FormatError, match="empty file"):
        load_criteo(tmp_path / "empty.txt")
    (tmp_path / "header.csv").write_text("label,I1,I2\n")
    with pytest.raises(FormatError, match="line 1: header must be"):
        load_criteo(tmp_path / "header.csv")
    with pytest.raises(UsageError, match="cannot read Criteo file"):
        load_criteo(tmp_path / "absent.txt")
    with pytest.raises(UsageError, match="vocab_sizes"):
        load_criteo(tmp_path / "empty.txt", vocab_sizes=[10] * 3)
    (tmp_path / "latin.txt").write_bytes(b"\xff\xfe\n")
    with pytest.raises(FormatError, match="not UTF-8"):
        load_criteo(tmp_path / "latin.txt")
    only_header = write_criteo(tmp_path / "h.csv", [], tsv=False)
    assert len(load_criteo(only_header)) == 0


# --- FATE-style CSV and scikit-learn ---------------------------------------------------


def test_fate_hetero_files(tabular_dir: Path) -> None:
    guest = load_fate_csv(tabular_dir / "breast_hetero_guest.csv")
    host = load_fate_csv(tabular_dir / "breast_hetero_host.csv")
    assert (len(guest), guest.num_features, len(host), host.num_features) == (569, 10, 569, 20)
    assert guest.y is not None and guest.y.dtype == np.int64 and set(np.unique(guest.y)) == {0, 1}
    assert host.y is None
    assert guest.feature_names[:2] == ("x0", "x1") and guest.X.dtype == np.float32
    assert set(guest.ids) == set(host.ids)
    assert guest.ids[0] == "133" and guest.X[0, 0] == pytest.approx(0.254879)


def test_fate_homo_file(tabular_dir: Path) -> None:
    table = load_fate_csv(tabular_dir / "default_credit_homo_host_1.csv")
    assert len(table) == 8000 and table.num_features == 23 and table.y is not None


@pytest.mark.parametrize(
    ("text", "refusal"),
    [
        ("key,y,x0\n1,0,0.5\n", "no id column 'id'"),
        ("id,y,x0,x1\n1,0,0.5,1\n2,1,0.25,abc\n", r"line 3, column 'x1': 'abc' is not a number"),
        ("id,y,x0\n1,0,0.5\n2,1,\n", r"line 3, column 'x0': '' is not a number"),
        ("id,y,x0\n1,0,0.5\n2,1\n", "line 3: expected 3 fields, got 2"),
        ("id,x0\n1,0.5\n1,0.7\n", r"duplicate ids, e.g. \['1'\]"),
        ("id,x0\n", "no data rows"),
    ],
)
def test_fate_csv_errors_name_row_and_column(tmp_path: Path, text: str, refusal: str) -> None:
    path = tmp_path / "t.csv"
    path.write_text(text)
    with pytest.raises(FormatError, match=refusal):
        load_fate_csv(path)


def test_fate_csv_that_cannot_be_read_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot read table"):
        load_fate_csv(tmp_path / "absent.csv")


def test_fate_csv_regression_labels_and_custom_columns(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    path.write_text("x0,uid,target\n1.5,a,0.25\n2,b,3\n")
    table = load_fate_csv(path, id_column="uid", label_column="target")
    assert table.ids.tolist() == ["a", "b"] and table.y.dtype == np.float32
    assert table.y.tolist() == [0.25, 3.0] and table.X.tolist() == [[1.5], [2.0]]
    sub = table.take([1])
    assert sub.ids.tolist() == ["b"] and sub.X.shape == (1, 1)


@pytest.mark.parametrize(
    ("name", "shape", "classes"), [("digits", (1797, 64), 10), ("breast_cancer", (569, 30), 2)]
)
def test_sklearn_bundles_are_standardized(name: str, shape: tuple[int, int], classes: int) -> None:
    table = load_sklearn(name)
    assert table.X.shape == shape and len(np.unique(table.y)) == classes
    assert np.abs(table.X.mean(axis=0)).max() < 1e-4
    std = table.X.std(axis=0)
    assert np.all((np.abs(std - 1) < 1e-3) | (std == 0))  # digits has constant pixels
    with pytest.raises(UsageError, match="unknown scikit-learn data set 'iris'"):
        load_sklearn("iris")


# --- partitioners ----------------------------------------------------------------------


def assert_partition(parts: list[np.ndarray], num_rows: int) -> None:
    joined = np.concatenate(parts)
    assert len(joined) == num_rows and np.array_equal(np.sort(joined), np.arange(num_rows))
    assert all(p.dtype == np.int64 for p in parts)


def test_iid_split() -> None:
    parts = split_iid(103, 4, seed=1)
    assert_partition(parts, 103)
    assert sorted(len(p) for p in parts) == [25, 26, 26, 26]
    assert all(np.array_equal(a, b) for a, b in zip(parts, split_iid(103, 4, seed=1), strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, split_iid(103, 4, seed=2), strict=True))


@settings(max_examples=60, deadline=None)
@given(
    labels=st.lists(st.integers(0, 4), min_size=8, max_size=200),
    num_parties=st.integers(1, 8),
    alpha=st.floats(0.01, 100.0),
    seed=st.integers(0, 2**16),
)
def test_dirichlet_split_properties(labels: list[int], num_parties: int, alpha: float, seed: int) -> None:
    y = np.asarray(labels)
    if len(y) < num_parties:
        with pytest.raises(UsageError):
            split_dirichlet(y, num_parties, alpha=alpha, seed=seed)
        return
    parts = split_dirichlet(y, num_parties, alpha=alpha, seed=seed)
    assert len(parts) == num_parties and all(len(p) >= 1 for p in parts)
    assert_partition(parts, len(y))
    again = split_dirichlet(y, num_parties, alpha=alpha, seed=seed)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))


def test_dirichlet_alpha_controls_label_skew() -> None:
    y = load_sklearn("digits").y

    def mean_classes_per_party(alpha: float) -> float:
        parts = split_dirichlet(y, 10, alpha=alpha, seed=3)
        return float(np.mean([len(np.unique(y[p])) for p in parts]))

    assert mean_classes_per_party(0.05) < 4
    assert mean_classes_per_party(1000.0) > 9.5


def test_partition_dispatch_and_errors() -> None:
    assert_partition(partition(10, 1, "file"), 10)
    assert_partition(partition(10, 3, "iid", seed=0), 10)
    assert_partition(partition(10, 2, "dirichlet", labels=np.arange(10) % 2), 10)
    with pytest.raises(UsageError, match="one party per file"):
        partition(10, 2, "file")
    with pytest.raises(UsageError, match="needs 10 labels"):
        partition(10, 2, "dirichlet")
    with pytest.raises(UsageError, match="unknown partition scheme 'shards'"):
        partition(10, 2, "shards")  # type: ignore[arg-type]
    with pytest.raises(UsageError, match="alpha must be > 0"):
        split_dirichlet(np.zeros(10), 2, alpha=0)
    with pytest.raises(UsageError, match="cannot give 11 parties"):
        split_iid(10, 11)


def test_split_columns() -> None:
    table = Table(
        np.asarray(["a", "b"]),
        np.asarray([0, 1]),
        np.arange(10, dtype=np.float32).reshape(2, 5),
        ("x0", "x1", "x2", "x3", "x4"),
    )
    leader, follower = split_columns(table, 2)
    assert leader.feature_names == ("x0", "x1", "x2") and follower.feature_names == ("x3", "x4")
    assert leader.y is not None and follower.y is None
    assert np.array_equal(follower.ids, table.ids) and follower.X.tolist() == [[3, 4], [8, 9]]
    named = split_columns(table, [["x4"], ["x0", "x2"]], label_party=1)
    assert named[0].y is None and named[1].y.tolist() == [0, 1] and named[1].X.tolist() == [[0, 2], [5, 7]]
    with pytest.raises(UsageError, match=r"unknown feature columns \['x9'\]"):
        split_columns(table, [["x9"]])
    with pytest.raises(UsageError, match="one party only"):
        split_columns(table, [["x0"], ["x0"]])
    with pytest.raises(UsageError, match="label_party 2"):
        split_columns(table, 2, label_party=2)


# --- synthetic wide&deep ---------------------------------------------------------------


def test_wide_deep_files_roundtrip(tmp_path: Path) -> None:
    files = make_wide_deep_data(tmp_path, rows=40, fields_per_party=6, vocab_size=11, num_followers=2, seed=4)
    assert files.leader == tmp_path / "leader.npz" and len(files.followers) == 2
    leader = load_wide_deep_party(files.leader)
    followers = [load_wide_deep_party(p) for p in files.followers]
    assert leader.role == "leader" and leader.y is not None and leader.y.dtype == np.int64
    assert leader.x.shape == (40, 6) and leader.x.dtype == np.int64 and leader.x.max() < 11
    for f in followers:
        assert f.role == "follower" and f.y is None and np.array_equal(f.ids, leader.ids)
    assert not np.array_equal(followers[0].x, followers[1].x)
    again = make_wide_deep_data(
        tmp_path / "again", rows=40, fields_per_party=6, vocab_size=11, num_followers=2, seed=4
    )
    assert np.array_equal(load_wide_deep_party(again.leader).x, leader.x)


def test_wide_deep_default_layout_matches_fedlearner(tmp_path: Path) -> None:
    files = make_wide_deep_data(tmp_path, rows=5)
    leader = load_wide_deep_party(files.leader)
    assert (
        leader.x.shape == (5, 512)
        and leader.vocab_size == 101
        and leader.ids.tolist() == ["0", "1", "2", "3", "4"]
    )


def test_wide_deep_partial_overlap(tmp_path: Path) -> None:
    files = make_wide_deep_data(tmp_path, rows=100, fields_per_party=3, follower_overlap=0.6, seed=1)
    leader, follower = load_wide_deep_party(files.leader), load_wide_deep_party(files.followers[0])
    assert len(follower) == 100
    assert len(np.intersect1d(leader.ids, follower.ids)) == 60
    assert len(np.unique(follower.ids)) == 100


def test_wide_deep_labels_are_learnable_unless_random(tmp_path: Path) -> None:
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import OneHotEncoder

    def holdout_auc(random_labels: bool) -> float:
        files = make_wide_deep_data(
            tmp_path / str(random_labels),
            rows=3000,
            fields_per_party=4,
            vocab_size=11,
            informative_fields=2,
            random_labels=random_labels,
            seed=0,
        )
        leader, follower = load_wide_deep_party(files.leader), load_wide_deep_party(files.followers[0])
        x = OneHotEncoder().fit_transform(np.hstack([leader.x, follower.x]))
        model = LogisticRegression(max_iter=500).fit(x[:2000], leader.y[:2000])
        return roc_auc_score(leader.y[2000:], model.predict_proba(x[2000:])[:, 1])

    assert holdout_auc(False) > 0.75
    assert holdout_auc(True) < 0.6


def test_wide_deep_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="not found"):
        load_wide_deep_party(tmp_path / "absent.npz")
    (tmp_path / "junk.npz").write_bytes(b"junk")
    with pytest.raises(FormatError, match="not a wide&deep .npz file"):
        load_wide_deep_party(tmp_path / "junk.npz")
    ids = np.asarray(["1", "2"])
    np.savez(tmp_path / "nolabel.npz", ids=ids, x=np.zeros((2, 3), np.uint8), vocab_size=5, role="leader")
    with pytest.raises(FormatError, match="role 'leader' but labels absent"):
        load_wide_deep_party(tmp_path / "nolabel.npz")
    np.savez(tmp_path / "range.npz", ids=ids, x=np.full((2, 3), 9, np.uint8), vocab_size=5, role="follower")
    with pytest.raises(FormatError, match=r"in \[0, 5\), got 9..9"):
        load_wide_deep_party(tmp_path / "range.npz")
    with pytest.raises(UsageError, match="follower_overlap"):
        make_wide_deep_data(tmp_path, rows=4, follower_overlap=0.0)


# --- tensor helpers --------------------------------------------------------------------


def test_tensor_helpers() -> None:
    data = tensor_dataset(np.zeros((4, 2), np.float32), np.arange(4))
    assert len(data) == 4 and data[3][1].item() == 3
    with pytest.raises(UsageError, match=r"same number of rows, got \[3, 4\]"):
        tensor_dataset(np.zeros(3), np.zeros(4))
    batches = list(batch_indices(10, 4, seed=5))
    assert [len(b) for b in batches] == [4, 4, 2]
    assert sorted(np.concatenate(batches).tolist()) == list(range(10))
    assert all(np.array_equal(a, b) for a, b in zip(batches, batch_indices(10, 4, seed=5), strict=True))
    assert [len(b) for b in batch_indices(10, 4, drop_last=True)] == [4, 4]
    assert np.concatenate(list(batch_indices(5, 2, shuffle=False))).tolist() == [0, 1, 2, 3, 4]


def test_criteo_arrays_feed_dlrm() -> None:
    from enclavefl.models import DLRM

    dense, sparse, label = load_criteo(
        shared_file("criteo", "criteo_sample.txt"), vocab_sizes=1000, limit=8
    ).tensors()
    torch.manual_seed(0)
    logits = DLRM(1000)(dense, sparse).squeeze(-1)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, label)
    assert logits.shape == (8,) and torch.isfinite(loss)
