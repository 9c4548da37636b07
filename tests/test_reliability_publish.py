"""Issue 24 (publishing, cache and registry): messages, the method registry, ``methods --count``, what a
sweep writes into the leaderboard folder, board names, cache file modes and VTAB list files.

Commands run the way a user runs them: from a temporary working folder with relative paths and the
README's defaults (``monkeypatch.chdir``)."""

from __future__ import annotations

import json
import os
import stat
import textwrap
import time
import warnings
from pathlib import Path

import pandas as pd
import pytest
import yaml

from harness.errors import ConfigError

ROOT = Path(__file__).resolve().parents[1]


# --- item 3: messages, Setting declarations, the method registry --------------------------------------

def test_choices_message_puts_the_head_noun_in_the_plural(tmp_path, monkeypatch, capsys):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    doc = {"name": "s", "track": "vision", "benchmark": "builtin", "tasks": ["textrues"], "methods": {"linear": {}}}
    Path("bad.yaml").write_text(yaml.safe_dump(doc))
    assert main(["sweep", "bad.yaml"]) == 2
    err = capsys.readouterr().err
    assert "valid tasks of builtin: " in err and "task of builtins" not in err, err
    assert "did you mean 'textures'" in err


@pytest.mark.parametrize("setting, words", [
    ("Setting(8.5, 'rank', kind=int)", ["'r'", "8.5", "int"]),
    ("Setting('4', 'rank', kind=int)", ["'r'", "'4'", "int"]),
    ("Setting(True, 'rank', kind=int)", ["'r'", "True", "int"]),
    ("Setting(None, 'rank', kind=int)", ["'r'", "None", "int"]),
    ("Setting('xavier', 'init', choices=('kaiming', 'zeros'))", ["'r'", "'xavier'", "kaiming"]),
    ("Setting(0, 'rank', kind=int, ge=1)", ["'r'", "0", ">= 1"]),
])
def test_a_setting_whose_default_does_not_fit_is_refused_where_the_method_is_defined(setting, words):
    from harness.methods.base import Method, Setting  # noqa: F401 - used by the declaration below

    with pytest.raises(ConfigError) as e:
        exec(textwrap.dedent(f"""
            class Toy(Method):
                name = "toy"
                settings = {{"r": {setting}}}
        """), {"Method": Method, "Setting": Setting})
    msg = str(e.value)
    assert "method 'toy'" in msg and all(w in msg for w in words), msg


def test_settings_that_fit_are_accepted():
    from harness.methods.base import Method, Setting

    class Fine(Method):
        name = "fine"
        settings = {"r": Setting(8, "rank", kind=int, ge=1), "alpha": Setting(16, "scale", kind=(float, int)),
                    "lr2": Setting(1, "a float written as an int", kind=float, gt=0),
                    "init": Setting("zeros", "init", choices=("zeros", "kaiming")),
                    "cap": Setting(None, "optional", kind=(int, type(None)))}

    assert Fine().resolve_settings({})["lr2"] == 1.0


def _bad_registry(monkeypatch, name: str, target: str) -> None:
    from harness import methods

    monkeypatch.setitem(methods.REGISTRY, name, target)
    monkeypatch.setattr(methods, "_cache", {})


@pytest.mark.parametrize("target, words", [
    ("harness.methods.peft_methods:LoRa", ["'lora'", "no class 'LoRa'", "did you mean 'LoRA'"]),
    ("harness.methods.peft_method:LoRA", ["'lora'", "no module 'harness.methods.peft_method'"]),
    ("harness.methods.peft_methods.LoRA", ["'lora'", "package.module:ClassName"]),
    ("harness.methods.peft_methods:DoRA", ["'lora'", "name is 'dora'"]),
])
def test_a_broken_registry_entry_is_a_clear_error_from_the_methods_command(monkeypatch, capsys, target, words):
    from harness.cli import main

    _bad_registry(monkeypatch, "lora", target)
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert "method registry entry" in err and all(w in err for w in words), err
    assert "Traceback" not in err


def test_a_registered_class_with_a_bad_setting_default_names_entry_setting_default_and_kind(tmp_path, monkeypatch,
                                                                                             capsys):
    from harness.cli import main

    (tmp_path / "toy_methods_bad.py").write_text(textwrap.dedent("""
        from harness.methods.base import Method, Setting

        class Toy(Method):
            name = "toy"
            settings = {"r": Setting(2.5, "rank", kind=int)}
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    _bad_registry(monkeypatch, "toy", "toy_methods_bad:Toy")
    assert main(["methods"]) == 2
    err = capsys.readouterr().err
    assert all(w in err for w in ("method registry entry 'toy'", "setting 'r'", "2.5", "int")), err


def test_a_bad_registry_name_is_refused(monkeypatch, capsys):
    from harness.cli import main

    _bad_registry(monkeypatch, "my lora", "harness.methods.peft_methods:LoRA")
    assert main(["methods"]) == 2
    assert "method registry entry 'my lora'" in capsys.readouterr().err


# --- item 4: methods --count is quiet and leaves the thread count as it was -------------------------------

def test_methods_count_prints_no_warning_and_restores_threads(tmp_path, monkeypatch, capsys):
    import torch

    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    threads = torch.get_num_threads()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        code = main(["methods", "--count", "--backbone", "vit_tiny_patch16_224", "--methods", "randlora,lora",
                     "--set", "img_size=32", "--set", "model_kwargs={patch_size: 8, depth: 2}", "--json"])
    assert code == 0
    rows = {r["method"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["lora"]["trainable_params"] > 0 and rows["randlora"]["trainable_params"] > 0
    assert [str(w.message) for w in caught if issubclass(w.category, UserWarning)] == []
    assert torch.get_num_threads() == threads


# --- item 7: only the harness's own temporaries are ever removed from a leaderboard folder ---------------

def _aged(path: Path, seconds: float) -> Path:
    t = time.time() - seconds
    os.utime(path, (t, t))
    return path


def test_stale_cleanup_removes_only_harness_temporaries(tmp_path, monkeypatch):
    from harness import cache, leaderboard

    monkeypatch.chdir(tmp_path)
    board = Path("leaderboard")
    board.mkdir()
    users = [board / ".pre-commit-config.yaml", board / ".env.local", board / ".tiny.csv.keep",
             board / ".notes.harness-tmp.txt"]
    for p in users:
        p.write_text("mine\n")
        _aged(p, 2 * 3600)
    # a leftover of a writer killed between create and rename: named as atomic_write_bytes names them
    import tempfile

    fd, left = tempfile.mkstemp(prefix=cache.temporary_prefix(board / "tiny.csv"), dir=board)
    os.close(fd)
    left = _aged(Path(left), 2 * 3600)
    fd, fresh = tempfile.mkstemp(prefix=cache.temporary_prefix(board / "tiny.md"), dir=board)
    os.close(fd)  # a write in progress right now (another sweep): young, kept
    assert cache.is_harness_temporary(left) and not any(cache.is_harness_temporary(p) for p in users)
    leaderboard._clean_stale_temporaries(board)
    assert all(p.read_text() == "mine\n" for p in users)
    assert not left.exists() and Path(fresh).exists()


def test_atomic_writes_name_their_temporaries_unmistakably(tmp_path, monkeypatch):
    """The name a temporary has while it is written (seen from inside the write) is the one cleanup matches."""
    import tempfile

    from harness import cache

    seen = []
    real = tempfile.mkstemp

    def spy(*a, **k):
        fd, name = real(*a, **k)
        seen.append(Path(name))
        return fd, name

    monkeypatch.setattr(tempfile, "mkstemp", spy)
    cache.atomic_write_text(tmp_path / "board.csv", "a,b\n")
    assert len(seen) == 1 and cache.is_harness_temporary(seen[0]) and str(os.getpid()) in seen[0].name
    assert (tmp_path / "board.csv").read_text() == "a,b\n" and list(tmp_path.iterdir()) == [tmp_path / "board.csv"]


# --- item 14: every file of a cache entry gets the umask's permissions -------------------------------------

def test_cache_entry_files_follow_the_umask(tmp_path, monkeypatch):
    import torch

    from harness.cache import ArtifactCache
    from vision.images import Split, cached_split

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HARNESS_CACHE", "cache")  # relative, as a user may set it
    old = os.umask(0o022)
    try:
        split = Split(torch.zeros(2, 3, 4, 4, dtype=torch.uint8), torch.tensor([0, 1]), ["a.png", "b.png"])
        got = cached_split("toy", {"k": 1}, lambda: split, ArtifactCache())
    finally:
        os.umask(old)
    assert torch.equal(got.labels, split.labels)
    entries = [p for p in Path("cache").rglob("*") if p.is_file() and not p.name.endswith(".lock")]
    names = {p.name for p in entries}
    assert {"split.safetensors", "paths.json", "manifest.json"} <= names, names
    modes = {p.name: oct(stat.S_IMODE(p.stat().st_mode)) for p in entries}
    assert set(modes.values()) == {"0o644"}, modes
    folders = {oct(stat.S_IMODE(p.stat().st_mode)) for p in Path("cache").rglob("*") if p.is_dir()}
    assert folders == {"0o755"}, folders


# --- items 5, 7 and 8 through the README's command: a sweep touches only its own board --------------------

TINY_VISION = {
    "name": "tiny", "track": "vision", "benchmark": "builtin", "tasks": ["textures"], "seeds": [0],
    "methods": {"linear": {"lr": 1.0e-2}}, "budget": {"steps": 2, "batch_size": 8},
    "settings": {"backbone": "vit_tiny_patch16_224", "weights": "random", "img_size": 32,
                 "model_kwargs": {"patch_size": 8, "embed_dim": 32, "depth": 1, "num_heads": 2},
                 "drop_path": 0.0, "threads": 1},
    "resources": {"cpus_per_trial": 1, "gpus_per_trial": 0}, "leaderboard": "tiny-board"}


USER_FILES = (".pre-commit-config.yaml", ".env.local")  # a user's own files, old enough to look stale


def _snapshot(folder: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir()) if p.is_file()}


def seed_board_folder(board: Path) -> dict[str, tuple[bytes, int]]:
    """Fill ``board`` with what a sweep must leave alone (another benchmark's board, a user's files) and
    return their bytes and modification times. tests/conftest.py's ``interrupted_rl_sweep`` calls this in its
    working folder before its first command, so the test below needs no sweep of its own."""
    board.mkdir(parents=True)
    for p in (ROOT / "leaderboard").glob("quickstart-builtin*"):
        (board / p.name).write_bytes(p.read_bytes())
    for name in USER_FILES:
        (board / name).write_text("user\n")
        _aged(board / name, 2 * 3600)
    return _snapshot(board)


def test_a_sweep_leaves_other_boards_and_user_files_untouched(interrupted_rl_sweep, tmp_path, monkeypatch):
    """The README's commands in a working folder with the default --leaderboard (tests/conftest.py): a sweep
    interrupted by Ctrl-C, then resumed, into a board folder already holding another board and user files."""
    sweep = interrupted_rl_sweep
    assert sweep.resumed.returncode == 0, sweep.resumed.stdout[-4000:]
    board = sweep.folder / "leaderboard"  # the default --leaderboard, relative to where the user ran
    others = sweep.board_before
    assert set(USER_FILES) < set(others) and any(n.startswith("quickstart-builtin") for n in others)
    after = _snapshot(board)
    changed = sorted(name for name, seen in others.items() if after.get(name) != seen)
    assert changed == [], changed  # bytes and modification times of every file the sweep did not own
    assert {"tiny-cw10.csv", "tiny-cw10-summary.csv", "tiny-cw10.html", "tiny-cw10.md", "index.html"} <= set(after)
    index = (board / "index.html").read_text()
    assert 'href="tiny-cw10.html"' in index and 'href="quickstart-builtin.html"' in index
    from harness.cache import is_harness_temporary

    assert not any(is_harness_temporary(p) for p in board.iterdir())

    # every page rendered again from unchanged rows: not a byte nor a modification time changes (in a copy,
    # with the modification times kept, so the shared sweep's folder stays as the sweep left it)
    import shutil

    from harness.cli import main

    shutil.copytree(board, tmp_path / "leaderboard")
    monkeypatch.chdir(tmp_path)
    assert _snapshot(Path("leaderboard")) == after
    assert main(["leaderboard"]) == 0
    again = _snapshot(Path("leaderboard"))
    assert main(["leaderboard"]) == 0
    assert _snapshot(Path("leaderboard")) == again


@pytest.mark.parametrize("name, why", [("quickstart-builtin-summary", "-summary"), ("index", "front page"),
                                       ("Index", "front page"), ("x-SUMMARY", "-summary")])
def test_board_names_that_collide_are_refused_before_anything_runs(tmp_path, monkeypatch, capsys, name, why):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    Path("s.yaml").write_text(yaml.safe_dump({**TINY_VISION, "leaderboard": name}))
    assert main(["sweep", "s.yaml"]) == 2
    err = capsys.readouterr().err
    assert "'leaderboard'" in err and repr(name) in err and why in err, err
    assert sorted(p.name for p in Path(".").iterdir()) == ["s.yaml"]  # no results, no leaderboard folder


def test_the_leaderboard_command_does_not_let_a_board_csv_named_index_clobber_the_front_page(tmp_path,
                                                                                             monkeypatch):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    board = Path("leaderboard")
    board.mkdir()
    for p in (ROOT / "leaderboard").glob("quickstart-builtin*"):
        (board / p.name).write_bytes(p.read_bytes())
    (board / "index.csv").write_bytes((board / "quickstart-builtin.csv").read_bytes())
    (board / "index.json").write_bytes((board / "quickstart-builtin.json").read_bytes())
    with pytest.warns(UserWarning, match="index.csv: not rendered as a board"):
        assert main(["leaderboard"]) == 0
    front = (board / "index.html").read_text()
    assert "<h1>Leaderboard</h1>" in front and 'href="quickstart-builtin.html"' in front
    assert not (board / "index.md").exists() and not (board / "index-summary.csv").exists()


# --- item 15: markdown escapes hand-edited CSV text; VTAB list files stay inside their folder ---------------

def test_markdown_tables_escape_html_and_pipes_from_a_hand_edited_csv(tmp_path, monkeypatch):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    board = Path("leaderboard")
    board.mkdir()
    for p in (ROOT / "leaderboard").glob("quickstart-builtin*"):
        (board / p.name).write_bytes(p.read_bytes())
    table = pd.read_csv(board / "quickstart-builtin.csv")
    table.loc[0, "method"] = "<img src=x onerror=alert(1)>|evil"
    table.loc[0, "task"] = "<b>bold</b>"
    table.to_csv(board / "quickstart-builtin.csv", index=False)
    assert main(["leaderboard"]) == 0
    md = (board / "quickstart-builtin.md").read_text()
    assert "<img" not in md and "<b>" not in md
    assert "&lt;img src=x onerror=alert(1)&gt;\\|evil" in md and "&lt;b&gt;bold&lt;/b&gt;" in md
    for block in md.split("\n\n"):  # every row of a table has as many cell separators as its header
        rows = [r for r in block.splitlines() if r.startswith("|")]
        if rows:
            widths = {len([c for c in r.replace("\\|", "").split("|")]) for r in rows}
            assert len(widths) == 1, block


def _png(path: Path) -> Path:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (4, 4), (10, 20, 30)).save(path)
    return path


def _vtab_task(root: Path, train_lines: list[str], bom: bool = False) -> Path:
    task = root / "dtd"
    for i in range(2):
        _png(task / "images" / f"{i}.png")
    good = ["images/0.png 0", "images/1.png 1"]
    for name in ("train800", "val200", "train800val200", "test"):
        lines = train_lines if name == "train800" else good
        text = "\n".join(lines) + "\n"
        (task / f"{name}.txt").write_bytes(("\ufeff" + text).encode() if bom else text.encode())
    return task


@pytest.mark.parametrize("line, why", [("../secret.png 0", "'..'"), ("ABSOLUTE 0", "absolute"),
                                       ("images/link.png 0", "symbolic link")])
def test_vtab_list_lines_that_leave_the_task_folder_are_refused(tmp_path, monkeypatch, line, why):
    from harness.errors import DataError
    from vision import vtab

    monkeypatch.chdir(tmp_path)
    secret = _png(tmp_path / "data" / "secret.png")
    line = line.replace("ABSOLUTE", str(secret))
    task = _vtab_task(Path("data"), ["images/0.png 0", line])
    (task / "images" / "link.png").symlink_to(secret)
    with pytest.raises(DataError) as e:
        vtab.validate("data", "dtd")
    msg = str(e.value)
    assert "train800.txt line 2" in msg and line.split()[0] in msg and why in msg, msg
    with pytest.raises(DataError):
        vtab.load_split("data", "dtd", "train800", 4)


def test_a_vtab_list_file_with_a_byte_order_mark_reads_like_one_without(tmp_path, monkeypatch):
    import torch

    from harness.cache import ArtifactCache
    from vision import vtab

    monkeypatch.chdir(tmp_path)
    _vtab_task(Path("data"), ["images/0.png 0", "images/1.png 1"], bom=True)
    assert vtab.validate("data", "dtd") == {"train800": 2, "val200": 2, "train800val200": 2, "test": 2}
    split = vtab.load_split("data", "dtd", "train800", 4, ArtifactCache("cache"))
    assert split.labels.tolist() == [0, 1] and split.images.shape == (2, 3, 4, 4)
    assert all("\ufeff" not in p for p in split.paths) and torch.all(split.images[0, 0] == 10)


def test_a_sweep_over_a_list_file_that_leaves_its_folder_exits_2_before_anything_runs(tmp_path, monkeypatch,
                                                                                        capsys):
    from harness.cli import main

    monkeypatch.chdir(tmp_path)
    _png(tmp_path / "secret.png")
    _vtab_task(Path("data"), ["images/0.png 0", "../../secret.png 1"])
    doc = {**TINY_VISION, "benchmark": "vtab1k", "tasks": ["dtd"], "leaderboard": None,
           "settings": {**TINY_VISION["settings"], "data_root": "data"}}
    Path("s.yaml").write_text(yaml.safe_dump(doc))
    assert main(["sweep", "s.yaml", "--no-dashboard"]) == 2
    err = capsys.readouterr().err
    assert "train800.txt line 2" in err and "../../secret.png" in err and "'..'" in err, err
    assert sorted(p.name for p in Path(".").iterdir()) == ["data", "s.yaml", "secret.png"]
