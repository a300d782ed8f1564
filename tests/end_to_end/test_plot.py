"""`gpt3d plot` on metrics written by real tiny runs, its errors, and the trainer's end-of-run plot."""
from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np
import pytest

from gpt3d import cli

from tests.support import ROOT

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _train(log: Path, *flags: str) -> int:
    return cli.main(["train", "--config", str(ROOT / "configs" / "tiny.yaml"), "--num-layers", "2",
                     "--hidden-size", "32", "--seq-length", "32", "--vocab-size", "256", "--train-iters", "8",
                     "--log-interval", "1", "--eval-interval", "4", "--eval-iters", "1", "--device", "cpu",
                     "--log-file", str(log), "--no-exit-signal-handler", *flags])


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory) -> list:
    root = tmp_path_factory.mktemp("runs")
    logs = [root / "base" / "metrics.jsonl", root / "low-lr" / "metrics.jsonl"]
    assert _train(logs[0]) == 0 and _train(logs[1], "--lr", "1e-3", "--min-lr", "1e-4") == 0
    return logs


def _png_size(path: Path) -> tuple:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def _has_colour(img: np.ndarray, colour: str) -> bool:
    from matplotlib.colors import to_rgb
    rgb = np.array(to_rgb(colour))
    return bool((np.abs(img[..., :3] - rgb).max(axis=-1) < 0.02).sum() > 50)


def test_trainer_writes_its_curves_beside_the_log(two_runs):
    for log in two_runs:
        w, h = _png_size(log.with_suffix(".png"))
        assert 400 <= w <= 4000 and 300 <= h <= 4000


def test_plot_overlays_runs(two_runs, tmp_path, capsys):
    from matplotlib.image import imread
    out = tmp_path / "out" / "curves.png"
    assert cli.main(["plot", *map(str, two_runs), "--output", str(out)]) == 0
    assert str(out) in capsys.readouterr().out
    w, h = _png_size(out)
    assert 400 <= w <= 4000 and 300 <= h <= 4000 and out.stat().st_size > 10_000
    img = imread(str(out))
    assert _has_colour(img, "C0") and _has_colour(img, "C1")   # one curve colour per run
    assert not _has_colour(img, "C2")


def test_later_rows_win_and_non_finite_values_are_skipped(tmp_path):
    from gpt3d.console.plot import read_metrics
    f = tmp_path / "m.jsonl"
    f.write_text('{"iteration": 1, "tokens": 10, "loss": 5.0, "tokens_per_s": 7.0}\n'
                 '{"iteration": 2, "tokens": 20, "loss": "nan"}\n'
                 '{"iteration": 2, "tokens": 20, "val_loss": 4.5, "val_ppl": 90.0}\n'
                 '\n'
                 '{"iteration": 1, "tokens": 10, "loss": 4.0, "tokens_per_s": 8.0}\n')   # resumed run re-logs step 1
    m = read_metrics(str(f))
    assert m == {"train": [(10.0, 4.0)], "valid": [(20.0, 4.5)], "speed": [(10.0, 8.0)]}


def test_a_fresh_run_replaces_and_a_resumed_run_continues_the_curve(tmp_path):
    from gpt3d.console.plot import read_metrics
    f = tmp_path / "m.jsonl"
    old = ['{"iteration": 1, "tokens": 10, "loss": 9.0}', '{"iteration": 2, "tokens": 20, "loss": 8.0}',
           '{"iteration": 3, "tokens": 30, "loss": 7.0}', '{"iteration": 3, "tokens": 30, "val_loss": 7.5}']
    f.write_text("\n".join(old + ['{"run_start": "x", "iteration": 0, "tokens": 0, "settings": {}}',
                                  '{"iteration": 1, "tokens": 10, "loss": 5.0}']) + "\n")
    assert read_metrics(str(f)) == {"train": [(10.0, 5.0)], "valid": [], "speed": []}
    f.write_text("\n".join(['{"run_start": "x", "iteration": 0, "tokens": 0, "settings": {}}', *old,
                            '{"run_start": "y", "iteration": 2, "tokens": 20, "settings": {"load": "ck"}}',
                            '{"iteration": 3, "tokens": 30, "loss": 6.5}']) + "\n")
    assert read_metrics(str(f)) == {"train": [(10.0, 9.0), (20.0, 8.0), (30.0, 6.5)], "valid": [], "speed": []}


def test_a_reused_log_file_is_marked_per_run(tmp_path):
    """Train into one --log-file fresh, again fresh, then resume: each run starts with its marker, the plot
    follows the last run (and the history a resume continues)."""
    from gpt3d.console.plot import read_metrics
    log, ck = tmp_path / "m.jsonl", tmp_path / "ck"
    assert _train(log, "--train-iters", "3", "--lr", "1e-3", "--min-lr", "1e-4") == 0
    assert _train(log, "--train-iters", "4", "--save", str(ck), "--save-interval", "2") == 0
    alone = tmp_path / "alone.jsonl"
    assert _train(alone, "--train-iters", "4") == 0
    rows = [json.loads(x) for x in log.read_text().splitlines()]
    marks = [r for r in rows if "run_start" in r]
    assert [(m["iteration"], m["tokens"]) for m in marks] == [(0, 0), (0, 0)]
    assert (marks[0]["settings"]["lr"], marks[1]["settings"]["save"]) == (1e-3, str(ck))   # what each run set
    assert read_metrics(str(log))["train"] == read_metrics(str(alone))["train"]
    # the second run logged 4 iterations but its newest checkpoint is iteration 2 (as if it died before saving
    # 4): a resume from there keeps the curve up to 2 and replaces 3 and 4
    (ck / "latest").write_text("iter_0000002")
    assert _train(log, "--train-iters", "6", "--load", str(ck)) == 0
    marks = [r for r in map(json.loads, log.read_text().splitlines()) if "run_start" in r]
    per_iter = read_metrics(str(alone))["train"][0][0]
    assert len(marks) == 3 and (marks[-1]["iteration"], marks[-1]["tokens"]) == (2, 2 * per_iter)
    train = read_metrics(str(log))["train"]
    assert [t for t, _ in train] == [per_iter * i for i in range(1, 7)]
    assert train[:2] == read_metrics(str(alone))["train"][:2]


@pytest.mark.parametrize("content,message", [
    (None, "metrics file not found"),
    ('{"tokens": 1, "loss": 2.0}\nnot json at all\n', ":2: not a JSON line"),
    ("[1, 2]\n", ":1: expected a JSON object"),
    ('{"iteration": 1}\n', "no loss rows"),
])
def test_bad_metrics_file_is_one_error_line(two_runs, tmp_path, capsys, content, message):
    bad = tmp_path / "bad.jsonl"
    if content is not None:
        bad.write_text(content)
    out = tmp_path / "curves.png"
    out.write_bytes(b"keep me")
    rc = cli.main(["plot", str(two_runs[0]), str(bad), "--output", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and err[0].startswith("gpt3d: error:") and message in err[0], err
    assert out.read_bytes() == b"keep me"   # nothing half-drawn replaces an existing picture


def test_a_plotting_failure_only_warns(tmp_path, capsys, monkeypatch):
    import gpt3d.console.plot

    def broken(*a, **k):
        raise RuntimeError("no fonts today")
    monkeypatch.setattr(gpt3d.console.plot, "plot_runs", broken)
    log = tmp_path / "m.jsonl"
    assert _train(log, "--train-iters", "2") == 0
    err = capsys.readouterr().err
    assert "gpt3d: warning: could not plot" in err and "no fonts today" in err
    assert log.exists() and not log.with_suffix(".png").exists()
