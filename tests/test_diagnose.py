"""tools/diagnose.py: the learned log-ratio against the implicit classifier, on a micro-sized GPT
and on the shipped reference checkpoints."""
import copy
import json
import math
import os
import sys

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tools"))
import diagnose  # noqa: E402
import minicca  # noqa: E402


def micro_gpt(seed=0, K=3, N=6, V=11):
    torch.manual_seed(seed)
    config = minicca.GPTConfig(vocab_size=V, num_classes=K, block_size=N, n_layer=1, n_head=2,
                               n_embd=16)
    return minicca.GPT(config).eval()


def test_shapes_and_the_exact_case_policy_equal_to_reference():
    reference = micro_gpt()
    policy = copy.deepcopy(reference)
    tokens = torch.randint(0, 11, (12, 6))
    labels = torch.arange(12) % 3
    logp = diagnose.class_logprobs(reference, tokens, 3, batch=5)
    assert logp.shape == (12, 4)
    assert torch.all(logp < 0)
    r_null, r_bayes = diagnose.implicit_ratios(logp, labels)
    assert r_null.shape == r_bayes.shape == (12,)
    assert torch.all(r_bayes <= math.log(3) + 1e-5)  # calibrated: p(c|x) <= 1
    delta = diagnose.learned_log_ratio(policy, reference, tokens, labels, batch=5)
    assert delta.shape == (12,)
    assert torch.equal(delta, torch.zeros(12))
    row = diagnose.tilt_rows(policy, reference, tokens, labels, 3)
    assert row["slope_null"] == 0.0 and row["r2_bayes"] == 0.0 and row["mean_delta"] == 0.0


def test_a_different_policy_has_a_nonzero_log_ratio():
    reference = micro_gpt(0)
    policy = micro_gpt(1)
    tokens = torch.randint(0, 11, (8, 6))
    labels = torch.arange(8) % 3
    delta = diagnose.learned_log_ratio(policy, reference, tokens, labels)
    direct = (minicca.sequence_logprob(policy(tokens, labels), tokens)
              - minicca.sequence_logprob(reference(tokens, labels), tokens))
    assert torch.allclose(delta, direct)
    assert delta.abs().min() > 0


def test_within_class_fit_recovers_a_tilt_and_ignores_class_constants():
    g = torch.Generator().manual_seed(0)
    labels = torch.arange(300) % 3
    r = torch.randn(300, generator=g)
    delta = 7.0 * r + torch.tensor([5.0, -2.0, 100.0])[labels]  # a constant per class is free
    slope, r2 = diagnose.within_class_fit(delta, r, labels)
    assert abs(slope - 7.0) < 1e-6 and abs(r2 - 1.0) < 1e-6
    noisy = delta + 7.0 * torch.randn(300, generator=g)
    slope, r2 = diagnose.within_class_fit(noisy, r, labels)
    assert 5.0 < slope < 9.0 and 0.3 < r2 < 0.7


def test_tilt_on_the_shipped_checkpoints(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    for name in os.listdir(minicca.PRETRAINED):
        (run / name).write_bytes((open(os.path.join(minicca.PRETRAINED, name), "rb")).read())
    diagnose.main(["tilt", str(run), "--per-class", "4", "--cfg", "2", "4"])
    rows = json.loads((run / "tilt.json").read_text())
    assert len(rows) == 6  # CFG at two scales and one CCA checkpoint; test and train images
    for split in ("test", "train"):
        assert all(row["n"] == 40 for row in rows.values())
        # CFG tilts by about (w - 1) r_null: more with a larger scale
        mild, strong = rows[f"CFG w = 2 {split}"], rows[f"CFG w = 4 {split}"]
        assert 0 < mild["slope_null"] < strong["slope_null"]
        cca = rows[f"cca_cca_b0.1_l10_e1.pt {split}"]
        assert cca["slope_bayes"] > 0  # CCA raised the likelihood of the more typical images more


def test_the_guided_model_at_scale_one_is_the_base_model():
    base = micro_gpt()
    tokens = torch.randint(0, 11, (6, 6))
    labels = torch.arange(6) % 3
    unguided = diagnose.GuidedModel(base, 1.0)
    assert torch.equal(diagnose.learned_log_ratio(unguided, base, tokens, labels), torch.zeros(6))


def test_compare_with_sets_and_the_frontier_figure(tmp_path):
    """compare on the shipped checkpoints: two sets per row give a mean and a std; --cfg with no
    scale scores the fine-tunes alone; frontier draws the JSON files into one figure."""
    run = tmp_path / "run"
    run.mkdir()
    for name in os.listdir(minicca.PRETRAINED):
        (run / name).write_bytes((open(os.path.join(minicca.PRETRAINED, name), "rb")).read())
    diagnose.main(["compare", str(run), "--per-class", "3", "--cfg", "1", "2", "--sets", "2",
                   "--preset", "cpu"])
    rows = json.loads((run / "compare.json").read_text())
    assert list(rows) == ["base, no guidance", "base, CFG 2", "cca_cca_b0.1_l10_e1.pt, no guidance"]
    for row in rows.values():
        assert row["fid_std"] is not None and row["fid_std"] >= 0 and 0 <= row["recall"] <= 1
        assert row["intra_fid"] > 0
    diagnose.main(["compare", str(run), "--per-class", "3", "--cfg", "--json", "tuned.json",
                   "--preset", "cpu"])
    tuned = json.loads((run / "tuned.json").read_text())
    assert list(tuned) == ["cca_cca_b0.1_l10_e1.pt, no guidance"]
    assert tuned["cca_cca_b0.1_l10_e1.pt, no guidance"]["fid_std"] is None  # one set
    figure = tmp_path / "frontier.png"
    diagnose.main(["frontier", str(run / "compare.json"), str(run / "tuned.json"),
                   "--figure", str(figure)])
    assert figure.stat().st_size > 10_000
    assert diagnose.tuned_label("cca_cca_b0.1_l30_e0.5.pt") == "λ30, 0.5 ep"
    assert diagnose.tuned_label("cca_cca_b0.03_l30_e1.pt") == "λ30, 1 ep, β0.03"
    assert diagnose.tuned_label("cca_cca_b0.1_l30_e1_lr0.0003w0.05f0.1.pt") == "λ30, 1 ep, peak 0.0003"
    assert diagnose.tuned_label("cca_cca_b0.1_l30_e1_bs256.pt") == "λ30, 1 ep, batch 256"


def test_a_crowded_frontier_puts_its_labels_in_a_column(tmp_path, monkeypatch):
    """Past six fine-tunes the labels leave their points for a column, top to bottom in FID's
    order, each with a line to its point; with fewer they sit beside the points."""
    import matplotlib.axes
    rows = {f"base, CFG {w}": {"cfg": w, "fid": 20 / w, "recall": 0.3 / w} for w in (1, 2, 4)}
    for i in range(7):  # close together, as CIFAR-10's fine-tunes were
        rows[f"cca_cca_b0.1_l30_e{i + 1}.pt, no guidance"] = {"fid": 10 + i / 10, "recall": 0.2}
    (tmp_path / "rows.json").write_text(json.dumps(rows))
    calls = []
    annotate = matplotlib.axes.Axes.annotate

    def recording(self, text, *args, **kwargs):
        calls.append((text, kwargs))
        return annotate(self, text, *args, **kwargs)
    monkeypatch.setattr(matplotlib.axes.Axes, "annotate", recording)
    diagnose.main(["frontier", str(tmp_path / "rows.json"), "--figure", str(tmp_path / "f.png")])
    column = [(text, k) for text, k in calls if not text.startswith("w=")]
    assert [text for text, _ in column] == [f"λ30, {e} ep" for e in range(7, 0, -1)]
    heights = [k["xytext"][1] for _, k in column]
    assert heights == sorted(heights, reverse=True) and "arrowprops" in column[0][1]
    assert (tmp_path / "f.png").stat().st_size > 10_000


def test_seeds_averages_each_runs_rows(tmp_path, capsys):
    def run(seed, fid, w):
        rows = {"base, no guidance": {"accuracy": 0.5, "fid": fid, "is": 2.0, "precision": 0.9,
                                      "recall": 0.2},
                f"base, best CFG (w = {w})": {"accuracy": 0.8, "fid": fid / 2, "is": 2.5,
                                              "precision": 0.9, "recall": 0.1}}
        path = tmp_path / f"metrics{seed}.json"
        path.write_text(json.dumps({"rows": rows, "best_cfg": w}))
        return str(path)
    table = diagnose.seeds(
        type("Args", (), {"metrics": [run(0, 10.0, 8), run(1, 12.0, 10), run(2, 14.0, 10)]}))
    assert table["base, no guidance"]["fid"] == 12.0
    assert table["base, no guidance"]["fid_std"] == 2.0
    assert table["base, best CFG (w = 8, 10, 10)"]["fid"] == 6.0
    assert "| base, best CFG (w = 8, 10, 10) | 0.800 ± 0.000 | 6 ± 1 |" in capsys.readouterr().out
