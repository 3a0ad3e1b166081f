"""python/reproduce.py --quick end to end on tiny random checkpoints (both families), shrunk
further so it stays a few seconds of compute; checks the report, plots and the run cache."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from fair_calib_ext.models.testing import tiny_checkpoint

REPO = Path(__file__).resolve().parent.parent


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # dataclasses look their module up while the file executes
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("repro")
    tt = _load("tiny_tokenizer", REPO / "python" / "tiny_tokenizer.py")
    ids = dict(vocab_size=768, mask_token_id=2, eos_token_id=1, pad_token_id=0, bos_token_id=3,
               hidden_size=64, intermediate_size=128, head_dim=16)
    out = []
    for fam in ("llada", "dream"):
        p = tiny_checkpoint(root / f"tiny-{fam}", fam, seed=0, init_std=0.2, **ids)
        tt.save_tokenizer(p)
        out.append(str(p))
    return out


@pytest.fixture
def keep_threads():
    import torch

    n = torch.get_num_threads()
    yield
    torch.set_num_threads(n)  # reproduce --threads changes the process-wide setting


def test_quick_report(models, tmp_path, keep_threads):
    rep = _load("reproduce", REPO / "python" / "reproduce.py")
    args = ["--quick", "--models", *models, "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "REPORT.md"),
            "--no-progress", "--threads", "1", "--n-eval", "2", "--n-metrics", "3", "--n-ppl", "2", "--mc-num", "2",
            "--n-calib", "4", "--seqlen", "24", "--n-probe", "8", "--n-val", "1", "--n-val-metrics", "2",
            "--n-boot", "50"]
    assert rep.main(args) == 0
    text = (tmp_path / "REPORT.md").read_text()
    for fam in ("llada", "dream"):
        assert f"## tiny-{fam}" in text
    for row in rep.QUICK.rows:
        assert text.count(f"| {row} |") >= 2, row
    # the selection on val, then the paired differences with CIs on test
    assert "## Choosing the default prior (val split only)" in text
    for cand in rep.CANDIDATES:
        assert f"| {cand} |" in text, cand
    sel = json.loads((tmp_path / "runs" / "selection.json").read_text())
    assert sel["choice"] in rep.CANDIDATES and "val" in sel["rule"]
    assert text.count("| FAIR-Calib − FlatQuant |") == 2 and text.count("| FAIR-Calib − FAIR uniform |") == 2
    assert "Targets (FAIR-Calib vs FlatQuant)" in text
    assert (tmp_path / "report_plots" / "tiny-llada_lag_ccdf.png").is_file()
    assert (tmp_path / "report_plots" / "tiny-dream_prior.png").is_file()
    # val and test runs are cached apart, keyed by the weights' hash: tiny_llada-<sha>/<row>/seed0.json
    slug = rep._slug(rep.canonical("FAIR-Calib"))
    cached = sorted((tmp_path / "runs" / "runs").glob(f"tiny_llada-*/{slug}/seed0.json"))
    assert len(cached) == 1, cached
    assert sorted((tmp_path / "runs" / "runs-val").glob(f"tiny_llada-*/{slug}/seed0.json"))
    assert cached[0].parts[-3].endswith(rep._sha(models[0]))  # retrained weights get a fresh cache
    run = json.loads(cached[0].read_text())
    assert run["prior"]["settings"]["n_probe"] == 8 and run["calib_time_s"] > 0 and run["data"] == "aligned"
    assert run["metrics"]["flips"]["n_commits"] > 0
    assert sum(run["metrics"]["flips"]["commits_by_position"]) == run["metrics"]["flips"]["n_commits"]
    # per-prompt records (the paired bootstrap's input) add up to the totals
    pp = run["metrics"]["flips"]["per_prompt"]
    assert len(pp) == 3 and sum(c for _, c in pp) == run["metrics"]["flips"]["n_commits"]
    assert len(run["tasks"]["correct"]) == 2 * 6
    assert run["visible_kl"]["window"] >= 0 and run["visible_kl"]["outside"] >= 0
    assert (tmp_path / "report_plots" / "tiny-dream_flips_by_position.png").is_file()
    assert "Where Stage II spent its error budget" in text
    # a second call reuses every cached run and rewrites the same tables
    (tmp_path / "REPORT.md").unlink()
    assert rep.main(args) == 0
    assert (tmp_path / "REPORT.md").read_text().split("## Protocol")[1] == text.split("## Protocol")[1]


def test_selection_rule_uses_flips_then_accuracy_and_skips_flat_priors():
    rep = _load("reproduce", REPO / "python" / "reproduce.py")

    def run(flips, acc, w):
        return {"metrics": {"flips": {"rate": flips}}, "tasks": {"avg": acc}, "prior": {"weights": w}}

    steep, flat = [2.0, 1.0, 0.5], [1.1, 1.0, 0.9]
    val = {("m", "FAIR uniform", 0): run(0.001, 0.9, None),  # best flips, but no prior: not eligible
           ("m", "FAIR[balanced]", 0): run(0.002, 0.9, flat),  # flat: not eligible
           ("m", "FAIR[literal]", 0): run(0.0300, 0.50, steep),
           ("m", "FAIR[sampler]", 0): run(0.0305, 0.55, steep),  # within 0.10 flip points: accuracy decides
           ("m", "FAIR[exp]", 0): run(0.0400, 0.99, steep)}
    sel = rep.select_default(val, ["m"])
    assert sel["choice"] == "FAIR[sampler]"
    elig = {t["row"]: t["eligible"] for t in sel["table"]}
    assert elig == {"FAIR uniform": False, "FAIR[balanced]": False, "FAIR[literal]": True, "FAIR[sampler]": True,
                    "FAIR[exp]": True}
    val[("m", "FAIR[literal]", 0)] = run(0.0100, 0.50, steep)  # now clearly fewest flips
    assert rep.select_default(val, ["m"])["choice"] == "FAIR[literal]"


def test_jobs_split_models_across_workers(models, tmp_path, keep_threads):
    """--jobs 2: one worker process per model fills the cache, then the parent writes the report."""
    rep = _load("reproduce", REPO / "python" / "reproduce.py")
    args = ["--quick", "--models", *models, "--out", str(tmp_path / "runs"), "--report", str(tmp_path / "R.md"),
            "--no-progress", "--stage", "test", "--rows", "FP", "RTN", "--n-eval", "1", "--n-metrics", "2",
            "--n-ppl", "2", "--mc-num", "2", "--n-calib", "4", "--seqlen", "24", "--jobs", "2"]
    assert rep.main(args) == 0
    text = (tmp_path / "R.md").read_text()
    assert "Not run" not in text and text.count("| RTN |") == 2
    assert len(list((tmp_path / "runs" / "runs").glob("tiny_*-*/RTN/seed0.json"))) == 2


def test_unknown_row_is_rejected(tmp_path):
    rep = _load("reproduce", REPO / "python" / "reproduce.py")
    with pytest.raises(ValueError, match="unknown row"):
        rep.main(["--quick", "--rows", "FP", "Nope", "--out", str(tmp_path), "--report", str(tmp_path / "R.md")])
