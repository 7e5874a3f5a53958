"""Porting CCA into another codebase: the kit (pieces of minicca.py, copied by docs/porting.md's
make_kit block), the generic step, the randomness switch and the step-0 self-check, the porting
document's code, the official code's semantics, and a loss that never synchronises with the host.

Oracles: minicca itself (the kit must agree with it on values, gradients and stats, run in a fresh
interpreter where only torch can be imported), the official training step as the official
scripts write it (row by row, independently of minicca), and the closed form of the loss at step 0.
"""
import ast
import builtins
import copy
import json
import math
import os
import pathlib
import re
import shutil
import subprocess
import sys
import types

import pytest
import torch
import torch.nn.functional as F

import minicca

ROOT = pathlib.Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "porting.md"
NOTEBOOK = ROOT / "notebooks" / "03_porting.ipynb"
STAT_KEYS = {"reward_acc", "margin", "gap_pos", "gap_neg"}
LOG2 = math.log(2.0)


def doc_block(first_line):
    """The python block of docs/porting.md whose first line starts with `first_line`."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(encoding="utf-8"), re.S)
    found = [b for b in blocks if b.startswith(first_line)]
    assert len(found) == 1, f"{len(found)} blocks of {DOC.name} start with {first_line!r}"
    return found[0]


@pytest.fixture(scope="module")
def kit_dir(tmp_path_factory):
    """The document's make_kit block, run next to a copy of minicca.py: returns the folder holding
    the cca_kit.py it wrote."""
    folder = tmp_path_factory.mktemp("kit")
    shutil.copy(ROOT / "minicca.py", folder / "minicca.py")
    cwd = os.getcwd()
    os.chdir(folder)
    try:
        exec(compile(doc_block("# make_kit.py"), "make_kit", "exec"), {"__name__": "make_kit"})
    finally:
        os.chdir(cwd)
    (folder / "minicca.py").unlink()
    return folder


def load_kit(kit_dir):
    namespace = {"__name__": "cca_kit"}
    exec(compile((kit_dir / "cca_kit.py").read_text(encoding="utf-8"), "cca_kit", "exec"),
         namespace)
    return types.SimpleNamespace(**namespace)


def load_checkpoint(name):
    return minicca.load_checkpoint(os.path.join(minicca.PRETRAINED, name))


def random_batch(B, num_classes, seed, vocab=256, N=49):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, vocab, (B, N), generator=g)
    return tokens, torch.randint(0, num_classes, (B,), generator=g)


def real_batch(B):
    """B test images of the shipped MNIST subset as the shipped tokenizer's grids, and labels."""
    data = minicca.load_dataset(None)
    ckpt = load_checkpoint("tokenizer.pt")
    tokenizer = minicca.VQTokenizer(minicca.VQConfig(**ckpt["vq_config"]))
    tokenizer.load_state_dict(ckpt["model"])
    tokenizer.eval()
    with torch.no_grad():
        tokens = minicca.encode_all(tokenizer, data["x_test"][:B], "cpu").long()
    return tokens, torch.from_numpy(data["y_test"][:B])


def minicca_logp(model):
    return lambda tokens, labels: minicca.sequence_logprob(model(tokens, labels), tokens)


# --------------------------------------------------------------------------------------------------
# The kit: minicca's own pieces, copied out, alone in a fresh interpreter

def test_the_kit_is_minicca_code_and_imports_only_torch(kit_dir):
    source = (kit_dir / "cca_kit.py").read_text(encoding="utf-8")
    tree = ast.parse(source)
    modules = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import)
               for alias in node.names}
    modules |= {node.module.split(".")[0] for node in ast.walk(tree)
                if isinstance(node, ast.ImportFrom)}
    assert modules <= {"contextlib", "math", "torch"}, modules
    defined = {node.name for node in tree.body if isinstance(node, ast.FunctionDef)}
    wanted = {"sequence_logprob", "adamw", "cca_loss", "dpo_loss", "unlearning_loss",
              "contrastive_labels", "paired_logps", "cca_batch_loss", "cca_step_loss",
              "no_randomness", "step0_self_check"}
    assert wanted <= defined, wanted - defined
    text = (ROOT / "minicca.py").read_text(encoding="utf-8")
    for node in tree.body:                       # every function is minicca's, to the character
        if isinstance(node, ast.FunctionDef):
            assert ast.get_source_segment(source, node) in text, node.name
    # the pieces need no other name of minicca.py: every global they read is defined in the kit
    assigned = {t.id for node in tree.body if isinstance(node, ast.Assign) for t in node.targets
                if isinstance(t, ast.Name)}
    imported = {(a.asname or a.name).split(".")[0] for node in tree.body
                if isinstance(node, (ast.Import, ast.ImportFrom)) for a in node.names}
    nested = {n.name for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)}
    known = nested | assigned | imported | set(dir(builtins))
    names = [n for n in ast.walk(tree) if isinstance(n, ast.Name)]
    loads = {n.id for n in names if isinstance(n.ctx, ast.Load)}
    local = {a.arg for n in ast.walk(tree) if isinstance(n, (ast.FunctionDef, ast.Lambda))
             for a in n.args.args + n.args.kwonlyargs}
    local |= {n.id for n in names if isinstance(n.ctx, ast.Store)}
    assert loads - known - local == set(), loads - known - local
    assert len(source.splitlines()) < 330                        # the four pieces, no more


CHILD = r"""
import importlib.util
import sys

import torch

sys.path.insert(0, ".")  # python -I leaves the script's folder out
assert importlib.util.find_spec("minicca") is None, "minicca is importable: the kit is not alone"
torch.set_num_threads(1)
import cca_kit as kit

job = torch.load("job.pt", weights_only=True)
out = {"cases": []}
for case in job["cases"]:
    pp, pn = case["pp"].clone().requires_grad_(), case["pn"].clone().requires_grad_()
    loss, stats = kit.LOSSES[case["loss"]](pp, pn, case["rp"], case["rn"], beta=case["beta"],
                                           lam=case["lam"], neg_as_pos=case["flags"],
                                           normalize=case["normalize"])
    loss.backward()
    out["cases"].append({"loss": loss.detach(), "pp_grad": pp.grad, "pn_grad": pn.grad,
                         "stats": stats, "stats_grad": [v.requires_grad for v in stats.values()]})


def loaded(state):  # the shipped GPT as an exported graph: no minicca code needed to run it
    model = torch.export.load("gpt.pt2").module()
    model.load_state_dict(state)
    return model


def logp_of(model):
    return lambda tokens, labels: kit.sequence_logprob(model(tokens, labels), tokens)


policy, reference = loaded(job["policy"]), loaded(job["reference"])
reference.requires_grad_(False)
loss, stats = kit.cca_batch_loss(logp_of(policy), logp_of(reference), job["tokens"],
                                 job["labels"], 10, beta=job["beta"], lam=job["lam"],
                                 generator=torch.Generator().manual_seed(job["seed"]))
loss.backward()
out["step"] = {"loss": loss.detach(), "stats": stats,
               "grads": {name: p.grad for name, p in policy.named_parameters()}}
twin = loaded(job["reference"])
out["self_check"] = kit.step0_self_check(logp_of(twin), logp_of(reference), job["tokens"],
                                         job["labels"], 10, lam=job["lam"])
torch.save(out, "out.pt")
"""


def loss_cases():
    """Values, gradients and statistics to compare, flagged rows with ±inf gaps and all-flagged
    batches among them."""
    settings = [("cca", torch.float32, None, 0.1, 10.0, True),
                ("cca", torch.float64, "some", 0.02, 300.0, True),
                ("cca", torch.float32, "some", 0.3, 0.5, False),
                ("cca", torch.float64, "all", 0.1, 10.0, True),
                ("cca", torch.float32, "some", 1.0, 0.0, True),
                ("cca", torch.float32, "inf", 0.1, 10.0, True),
                ("cca", torch.float32, "all-inf", 0.1, 10.0, True),
                ("dpo", torch.float32, "inf", 0.1, 10.0, True),
                ("unlearning", torch.float64, "some", 0.1, 3.0, True)]
    cases = []
    for i, (loss, dtype, flags, beta, lam, normalize) in enumerate(settings):
        g = torch.Generator().manual_seed(i)
        pp, pn, rp, rn = (-60 + 8 * torch.randn(24, generator=g, dtype=dtype) for _ in range(4))
        mask = {None: None, "some": torch.rand(24, generator=g) < 0.3,
                "inf": torch.arange(24) % 5 == 0, "all": torch.ones(24, dtype=torch.bool),
                "all-inf": torch.ones(24, dtype=torch.bool)}[flags]
        if flags == "inf":           # flagged rows with infinite gaps: left out of the statistics
            pn = torch.where(mask, torch.where(torch.arange(24) % 2 == 0, math.inf, -math.inf), pn)
            pp = torch.where(mask & (torch.arange(24) % 3 == 0), -math.inf, pp)
        if flags == "all-inf":       # every row flagged: statistics over all rows, infinite too
            pn = pn.clone()
            pn[0] = math.inf
        cases.append(dict(loss=loss, pp=pp, pn=pn, rp=rp, rn=rn, flags=mask, beta=beta, lam=lam,
                          normalize=normalize))
    return cases


@pytest.fixture(scope="module")
def kit_run(kit_dir):
    """Run the kit in `python -I` from its folder, PYTHONPATH unset; return its outputs and job."""
    (kit_dir / "child.py").write_text(CHILD, encoding="utf-8")
    base = minicca.load_gpt(load_checkpoint("gpt.pt"), torch.device("cpu"))
    tokens, labels = real_batch(16)
    both = (torch.cat([tokens, tokens]), torch.cat([labels, labels]))   # the step's 2B rows
    torch.export.save(torch.export.export(base, both), str(kit_dir / "gpt.pt2"))
    job = {"cases": loss_cases(), "tokens": tokens, "labels": labels, "beta": 0.1, "lam": 10.0,
           "seed": 7,
           # policy: the shipped CCA model, reference: the base model, so that gaps are not zero
           "policy": load_checkpoint("cca_cca_b0.1_l10_e1.pt")["model"],
           "reference": load_checkpoint("gpt.pt")["model"]}
    torch.save(job, kit_dir / "job.pt")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env["OMP_NUM_THREADS"] = "1"
    done = subprocess.run([sys.executable, "-I", "child.py"], cwd=kit_dir, env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return torch.load(kit_dir / "out.pt", weights_only=True), job


def same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)


def test_the_kit_alone_equals_minicca_in_values_gradients_and_stats(kit_run):
    out, job = kit_run
    assert len(out["cases"]) == len(job["cases"])
    for case, got in zip(job["cases"], out["cases"]):
        pp, pn = case["pp"].clone().requires_grad_(), case["pn"].clone().requires_grad_()
        loss, stats = minicca.LOSSES[case["loss"]](pp, pn, case["rp"], case["rn"],
                                                   beta=case["beta"], lam=case["lam"],
                                                   neg_as_pos=case["flags"],
                                                   normalize=case["normalize"])
        loss.backward()
        same(got["loss"], loss.detach())
        same(got["pp_grad"], pp.grad)
        same(got["pn_grad"], pn.grad)
        assert set(got["stats"]) == set(stats) == STAT_KEYS
        for key, value in stats.items():                       # the same formula, bit for bit
            same(got["stats"][key], value)
        assert not any(got["stats_grad"])                       # detached
        flags = case["flags"]
        if flags is not None and not flags.all():               # flagged ±inf rows are left out
            assert all(torch.isfinite(v) for v in got["stats"].values()), got["stats"]


def test_flagged_infinite_gaps_give_finite_statistics():
    """The cases above do contain infinite gaps: torch.where, not a product with a 0/1 mask (a
    product gives 0 * inf = NaN)."""
    case = loss_cases()[5]
    gaps = case["pn"] - case["rn"]
    assert torch.isinf(gaps[case["flags"]]).all() and (gaps == math.inf).any()
    _, stats = minicca.cca_loss(case["pp"], case["pn"], case["rp"], case["rn"], beta=0.1,
                                lam=10.0, neg_as_pos=case["flags"])
    product = ((case["pn"] - case["rn"]) * (~case["flags"]).float()).sum()
    assert torch.isnan(product) and all(torch.isfinite(v) for v in stats.values())


def test_the_generic_step_alone_reproduces_cca_step_loss_on_the_shipped_models(kit_run):
    out, job = kit_run
    config = load_checkpoint("gpt.pt")["gpt_config"]
    policy = minicca.load_gpt({"gpt_config": config, "model": job["policy"]}, torch.device("cpu"))
    reference = minicca.load_gpt(load_checkpoint("gpt.pt"), torch.device("cpu"))
    reference.requires_grad_(False)
    loss, stats = minicca.cca_step_loss(policy, reference, job["tokens"], job["labels"],
                                        beta=job["beta"], lam=job["lam"],
                                        generator=torch.Generator().manual_seed(job["seed"]))
    loss.backward()
    assert 0.5 < float(stats["reward_acc"]) <= 1.0      # the CCA model prefers the true pairs
    assert out["step"]["loss"].item() == pytest.approx(loss.item(), rel=1e-6)
    for key, value in stats.items():
        assert float(out["step"]["stats"][key]) == pytest.approx(float(value), rel=1e-5, abs=1e-5)
    grads = out["step"]["grads"]
    for name, p in policy.named_parameters():
        assert torch.allclose(grads[name], p.grad, rtol=1e-4, atol=1e-7), name
    max_gap, loss_minus_closed_form = out["self_check"]
    assert max_gap == 0.0 and abs(loss_minus_closed_form) < 1e-6


@pytest.mark.parametrize("loss_name", ["cca", "dpo", "unlearning"])
@pytest.mark.parametrize("collisions", ["positive", "mask", "resample"])
def test_cca_step_loss_is_the_generic_step_on_minicca_model(loss_name, collisions):
    base = minicca.load_gpt(load_checkpoint("gpt.pt"), torch.device("cpu"))
    policy = minicca.load_gpt(load_checkpoint("cca_cca_b0.1_l10_e1.pt"), torch.device("cpu"))
    tokens, labels = random_batch(24, 10, seed=4)
    results = []
    for run in ("step", "generic"):
        policy.zero_grad()
        g = torch.Generator().manual_seed(3)
        if run == "step":
            loss, stats = minicca.cca_step_loss(policy, base, tokens, labels, loss_name, 0.1, 10.0,
                                                0.2, collisions, g)
        else:
            loss, stats = minicca.cca_batch_loss(minicca_logp(policy), minicca_logp(base), tokens,
                                                 labels, 10, loss_name, 0.1, 10.0, 0.2,
                                                 collisions, g)
        loss.backward()
        results.append((loss.detach(), stats, policy.head.weight.grad.clone()))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][2], results[1][2])
    assert all(torch.equal(results[0][1][k], results[1][1][k]) for k in STAT_KEYS)


# --------------------------------------------------------------------------------------------------
# The randomness switch and the step-0 self-check, on the notebook's stand-in (LlamaGen's habits)

def closed_form(flags, lam):
    weight = torch.where(flags, 1.0, lam)
    return LOG2 * (1 + weight.mean().item()) / max(lam, 1.0)


@pytest.mark.parametrize("lam", [0.5, 10.0, 300.0])
def test_step0_self_check_formula_holds_for_minicca_model(lam):
    base = minicca.load_gpt(load_checkpoint("gpt.pt"), torch.device("cpu"))
    policy, reference = copy.deepcopy(base), copy.deepcopy(base)
    tokens, labels = random_batch(48, 10, seed=1)
    loss, stats = minicca.cca_step_loss(policy, reference, tokens, labels, beta=0.1, lam=lam,
                                        generator=torch.Generator().manual_seed(2))
    same_draw = torch.Generator().manual_seed(2)
    _, _, flags, _ = minicca.contrastive_labels(labels, 10, 0.1, "positive", same_draw)
    assert 0 < int(flags.sum()) < 48                         # both kinds of rows are in the batch
    assert loss.item() == pytest.approx(closed_form(flags, lam), rel=1e-6)
    assert all(float(v) == 0.0 for v in stats.values())
    max_gap, off_by = minicca.step0_self_check(minicca_logp(policy), minicca_logp(reference),
                                               tokens, labels, 10, lam=lam)
    assert max_gap == 0.0 and abs(off_by) < 1e-6


def standin():
    """The notebook cell that defines the stand-in model (it starts with '# port: stand-in')."""
    nb = json.loads(NOTEBOOK.read_text(encoding="utf-8"))     # plain JSON: nbformat is slow to load
    sources = ["".join(c["source"]) for c in nb["cells"] if c["cell_type"] == "code"]
    cells = [source for source in sources if source.startswith("# port: stand-in model")]
    assert len(cells) == 1, f"{NOTEBOOK.name} needs one cell starting '# port: stand-in model'"
    namespace = {"__name__": "standin"}
    exec(compile(cells[0], NOTEBOOK.name, "exec"), namespace)
    return types.SimpleNamespace(**namespace)


def llamagen_adapter(kit):
    """The document's LlamaGen adapter, run against the kit."""
    namespace = {"__name__": "adapter", "sequence_logprob": kit.sequence_logprob}
    code = doc_block("# the LlamaGen adapter").replace("from cca_kit import sequence_logprob\n", "")
    exec(compile(code, "LlamaGen adapter", "exec"), namespace)
    return types.SimpleNamespace(**namespace)


NOISE = {"p", "drop_prob", "attn_dropout_p", "dropout_prob"}


def settings(model):
    return [(path, name, value) for path, _, name, value in minicca._random_settings(model)]


def test_no_randomness_makes_the_self_check_exact_on_the_stand_in_and_restores_it(kit_dir):
    kit, model = load_kit(kit_dir), standin()
    port = llamagen_adapter(kit)
    ckpt = load_checkpoint("gpt.pt")
    tokens, labels = random_batch(32, 10, seed=3)
    policy, reference = model.build_standin(ckpt), model.build_standin(ckpt)
    before = settings(policy)
    assert {name for _, name, _ in before} == NOISE           # all four sources are on

    def check(**kw):
        return kit.step0_self_check(port.llamagen_logp(policy), port.llamagen_logp(reference),
                                    tokens, labels, 10, lam=10.0, **kw)
    torch.manual_seed(0)
    max_gap, off_by = check()
    assert max_gap > 1.0 and abs(off_by) > 1e-3               # noise: the check fails
    for source in NOISE:                                      # and each source alone fails it
        with kit.no_randomness(policy, reference) as changed:
            for model_ in (policy, reference):
                modules = dict(model_.named_modules())
                for path, name, value in changed:
                    if name == source and path in modules:
                        setattr(modules[path], name, value)
            assert check()[0] > 0.01, source
    with kit.no_randomness(policy, reference) as changed:
        assert {name for _, name, _ in changed} == NOISE
        assert settings(policy) == [] and policy.training and reference.training
        max_gap, off_by = check()
        assert max_gap == 0.0 and abs(off_by) < 1e-6
    assert settings(policy) == before and settings(reference) == before   # restored
    max_gap, off_by = check(models=(policy, reference))        # the keep-dropout recipe's check
    assert max_gap == 0.0 and abs(off_by) < 1e-6
    assert settings(policy) == before
    # the port is exact: the stand-in with minicca's weights gives minicca's log-likelihoods
    base = minicca.load_gpt(ckpt, torch.device("cpu"))
    with torch.no_grad(), kit.no_randomness(policy):
        ours = minicca.sequence_logprob(base(tokens, labels), tokens)
        theirs = port.llamagen_logp(policy)(tokens, labels)
    assert torch.equal(ours, theirs), (ours - theirs).abs().max()


def test_no_randomness_restores_after_an_error():
    model = standin().build_standin(load_checkpoint("gpt.pt"))
    before = settings(model)
    with pytest.raises(ZeroDivisionError):
        with minicca.no_randomness(model):
            1 / 0
    assert settings(model) == before


def test_the_kv_cache_left_by_sampling_breaks_training_until_dropped(kit_dir):
    model, port = standin(), llamagen_adapter(load_kit(kit_dir))
    policy = model.build_standin(load_checkpoint("gpt.pt"))
    tokens, labels = random_batch(4, 10, seed=5)
    policy.eval()
    samples = model.generate(policy, labels, tokens.shape[1])
    assert samples.shape == tokens.shape
    policy.train()
    with pytest.raises(AttributeError, match="'NoneType' object has no attribute 'shape'"):
        port.llamagen_logp(policy)(tokens, labels)
    port.drop_kv_caches(policy)
    assert port.llamagen_logp(policy)(tokens, labels).shape == (4,)


def test_the_documents_self_check_block_runs(kit_dir):
    kit, model = load_kit(kit_dir), standin()
    base = model.build_standin(load_checkpoint("gpt.pt"))
    tokens, labels = random_batch(16, 10, seed=6)
    before = settings(base)
    namespace = {"__name__": "doc", "base": base, "tokens": tokens, "labels": labels,
                 "llamagen_logp": llamagen_adapter(kit).llamagen_logp,
                 "no_randomness": kit.no_randomness, "step0_self_check": kit.step0_self_check}
    code = doc_block("# the step-0 self-check").replace(
        "from cca_kit import no_randomness, step0_self_check\n", "")
    exec(compile(code, "self-check block", "exec"), namespace)
    assert namespace["max_gap"] == 0.0 and namespace["K"] == 10
    changed = namespace["changed"]
    assert {name for _, name, _ in changed} == NOISE and len(changed) == 2 * len(before)
    # afterwards: every source restored for a keep-dropout recipe, except label dropout (off)
    no_labels = [entry for entry in before if entry[1] != "dropout_prob"]
    assert len(no_labels) < len(before)
    for model_ in (namespace["policy"], namespace["reference"]):
        assert settings(model_) == no_labels and model_.cls_embedding.dropout_prob == 0.0


def test_a_zero_output_layer_hides_dropout_from_the_self_check(kit_dir):
    """What docs/porting.md warns of: LlamaGen zero-initialises its output layer, so a freshly built
    model passes the check with every noise source on; randomising the layer exposes the noise."""
    kit, model = load_kit(kit_dir), standin()
    port = llamagen_adapter(kit)
    policy = model.build_standin(load_checkpoint("gpt.pt"))
    torch.nn.init.zeros_(policy.output.weight)
    reference = copy.deepcopy(policy)
    tokens, labels = random_batch(16, 10, seed=7)
    torch.manual_seed(0)

    def check():
        return kit.step0_self_check(port.llamagen_logp(policy), port.llamagen_logp(reference),
                                    tokens, labels, 10, lam=10.0)[0]
    assert check() == 0.0                                      # noise on, and the check passes
    torch.nn.init.normal_(policy.output.weight, std=0.02)
    reference.load_state_dict(policy.state_dict())
    assert check() > 0.01


def test_the_documents_var_adapter_splits_the_scales_and_feeds_vars_call(kit_dir):
    kit = load_kit(kit_dir)
    namespace = {"__name__": "doc", "sequence_logprob": kit.sequence_logprob}
    code = doc_block("# the VAR adapter").replace("from cca_kit import sequence_logprob\n", "")
    exec(compile(code, "VAR adapter", "exec"), namespace)
    calls = []

    class Quantize:  # records what VAR's idxBl_to_var_input receives
        def idxBl_to_var_input(self, gt_ms_idx_Bl):
            calls.append([t.shape[1] for t in gt_ms_idx_Bl])
            return torch.zeros(len(gt_ms_idx_Bl[0]), 13, 4)

    class Var:
        patch_nums = (1, 2, 3)

        def __call__(self, labels, x):
            assert x.shape == (len(labels), 13, 4)
            return torch.zeros(len(labels), 14, 5)            # uniform over V = 5: log 1/5 each
    tokens = torch.randint(0, 5, (3, 14))
    logp = namespace["var_logp"](Var(), types.SimpleNamespace(quantize=Quantize()))(
        tokens, torch.tensor([0, 1, 2]))
    assert calls == [[1, 4, 9]]
    assert torch.allclose(logp, torch.full((3,), 14 * math.log(1 / 5)))


@pytest.mark.skipif(not os.environ.get("LLAMAGEN_DIR"), reason="set LLAMAGEN_DIR to a checkout "
                    "of FoundationVision/LlamaGen to run the port on its own gpt.py")
def test_the_port_on_llamagens_own_model():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, str(ROOT / "tools" / "llamagen_check.py"),
                           os.environ["LLAMAGEN_DIR"]], capture_output=True, text=True, env=env,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    out = done.stdout
    assert "'tuple' object has no attribute 'float'" in out
    assert "training pass after generate(): AttributeError" in out
    assert "the same after dropping the KV caches: no error" in out
    assert "largest gap 0.0, loss" in out
    assert "size mismatch for cls_embedding.embedding_table.weight" in out
    assert "against train mode without randomness: largest difference 0.0" in out


# --------------------------------------------------------------------------------------------------
# The document's training step: the official accumulation semantics

def official_micro_batch_loss(policy, reference, tokens, labels, beta, lam):
    """LlamaGen_finetune.py's CCA lines for one micro-batch with uncond_ratio = 0 is its linear
    branch; this is its uncond_ratio > 0 branch with no null row drawn: labels rolled within the
    micro-batch, collisions weight 1 with the sign flipped, / max(λ, 1)."""
    rolled = labels.roll(-1)
    with torch.no_grad():
        ref_pos = minicca.sequence_logprob(reference(tokens, labels), tokens)
        ref_neg = minicca.sequence_logprob(reference(tokens, rolled), tokens)
    gp = minicca.sequence_logprob(policy(tokens, labels), tokens) - ref_pos
    gn = minicca.sequence_logprob(policy(tokens, rolled), tokens) - ref_neg
    neg_weight = rolled == labels
    mixed = torch.where(neg_weight, 1.0, lam)
    loss = (-F.logsigmoid(gp * beta).mean()
            - (mixed * F.logsigmoid((neg_weight.float() * 2 - 1) * gn * beta)).mean())
    return loss / max(lam, 1.0)


def documents_train_step(kit_dir):
    """The document's training step, run against the extracted kit, and the shipped base and
    fine-tuned models it is tested on."""
    kit = load_kit(kit_dir)
    namespace = {"__name__": "doc", "cca_batch_loss": kit.cca_batch_loss}
    code = doc_block("# the training step").replace("from cca_kit import cca_batch_loss\n", "")
    exec(compile(code, "training step", "exec"), namespace)
    base = minicca.load_gpt(load_checkpoint("gpt.pt"), torch.device("cpu"))
    start = minicca.load_gpt(load_checkpoint("cca_cca_b0.1_l10_e1.pt"), torch.device("cpu"))
    return namespace["train_step"], base, start


def test_the_documents_train_step_sums_micro_batches_rolled_within_each(kit_dir):
    train_step, base, start = documents_train_step(kit_dir)
    labels = torch.tensor([3, 3, 1, 7, 2, 2, 5, 0])           # 4 micro-batches of 2, two collide
    tokens, _ = random_batch(8, 10, seed=8)
    beta, lam = 0.1, 10.0
    policy = copy.deepcopy(start)
    opt = torch.optim.SGD(policy.parameters(), lr=1.0)        # the update is minus the gradient
    train_step(policy, minicca_logp(policy), minicca_logp(base), opt, tokens, labels,
                            10, 2, beta=beta, lam=lam, uncond_ratio=0.0, clip=math.inf)
    oracle = copy.deepcopy(start)
    for rows in torch.arange(8).split(2):
        official_micro_batch_loss(oracle, base, tokens[rows], labels[rows], beta, lam).backward()
    for (name, p), q, p0 in zip(policy.named_parameters(), oracle.parameters(),
                                start.parameters()):
        assert torch.allclose(p0 - p, q.grad, rtol=1e-3, atol=1e-6), name
    whole = copy.deepcopy(start)                              # one pass of 8 rows differs
    official_micro_batch_loss(whole, base, tokens, labels, beta, lam).backward()
    assert not torch.allclose(whole.head.weight.grad, oracle.head.weight.grad, rtol=0.1)
    ratio = oracle.head.weight.grad.norm() / whole.head.weight.grad.norm()
    assert ratio > 2                                          # a sum of 4, not a mean


def test_the_documents_train_step_under_ddp_gives_the_same_update(kit_dir, tmp_path):
    """The no_sync path: a DDP-wrapped policy (gloo, one process) gets the plain one's update."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    train_step, base, start = documents_train_step(kit_dir)
    tokens, labels = random_batch(8, 10, seed=9)
    updated = []
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0,
                            world_size=1)
    try:
        for wrap in (False, True):
            policy = copy.deepcopy(start)
            net = DistributedDataParallel(policy) if wrap else policy
            opt = torch.optim.SGD(policy.parameters(), lr=1.0)
            train_step(net, minicca_logp(net), minicca_logp(base), opt, tokens, labels,
                                    10, 4, beta=0.1, lam=10.0, uncond_ratio=0.0, clip=1.0)
            updated.append(policy.head.weight.detach().clone())
    finally:
        dist.destroy_process_group()
    assert not torch.equal(updated[0], start.head.weight)
    assert torch.allclose(updated[0], updated[1], rtol=0, atol=1e-6)


def test_the_notebooks_checkers_accept_the_solutions_and_name_the_mistakes():
    """notebooks/instructor/solutions_03.py: every 03 checker (in notebooks/course.py) accepts its
    solution and rejects each wrong answer, printing the mistake's name."""
    folder = ROOT / "notebooks" / "instructor"
    sys.path.insert(0, str(folder))
    try:
        import solutions_03
        solutions_03.check_all()
    finally:
        sys.path.remove(str(folder))
    assert set(solutions_03.SOLUTIONS) == set(solutions_03.WRONG)
    assert all(len(wrong) >= 1 for wrong in solutions_03.WRONG.values())


def test_the_kits_adamw_decays_only_tensors_of_two_or_more_dimensions():
    model = minicca.load_gpt(load_checkpoint("gpt.pt"), torch.device("cpu"))
    opt = minicca.adamw(model, 1e-5, 0.05)
    decayed, plain = (group["params"] for group in opt.param_groups)
    assert opt.param_groups[0]["weight_decay"] == 0.05 and opt.param_groups[1]["weight_decay"] == 0
    assert all(p.dim() >= 2 for p in decayed) and all(p.dim() < 2 for p in plain) and plain
    assert opt.defaults["betas"] == (0.9, 0.95)


# --------------------------------------------------------------------------------------------------
# The official semantics (cca_reference.md §2), written out one row at a time

def official_cca(policy_table, ref_table, labels, uncond, num_classes, beta, lam):
    """The official training step as §2 describes it, on log-likelihood tables (B, K+1): entry
    [i, c] is log p(x_i | c). Negatives are the labels rolled by one (row i takes row i+1's
    label); rows with uncond set get the null class K on both branches; null rows and collisions
    are positives with weight 1 on the negative branch; both terms are batch means; the total is
    divided by max(λ, 1)."""
    B = len(labels)
    total = 0.0
    for i in range(B):
        true_class, wrong_class = int(labels[i]), int(labels[(i + 1) % B])
        if uncond[i]:
            true_class = wrong_class = num_classes
        gap_pos = policy_table[i, true_class] - ref_table[i, true_class]
        gap_neg = policy_table[i, wrong_class] - ref_table[i, wrong_class]
        total = total - torch.log(torch.sigmoid(beta * gap_pos)) / B
        if uncond[i] or wrong_class == true_class:
            total = total - torch.log(torch.sigmoid(beta * gap_neg)) / B
        else:
            total = total - lam * torch.log(torch.sigmoid(-beta * gap_neg)) / B
    return total / max(lam, 1.0)


@pytest.mark.parametrize("num_classes,B,uncond_ratio,seed", [
    (3, 64, 0.1, 0), (1000, 64, 0.1, 1), (3, 2, 0.0, 2), (1000, 2, 0.0, 3), (3, 2, 0.3, 4),
    (10, 40, 0.3, 5), (3, 64, 0.3, 6)])
@pytest.mark.parametrize("lam", [0.5, 50.0])
def test_minicca_matches_the_official_semantics(num_classes, B, uncond_ratio, seed, lam):
    beta, K = 0.3, num_classes
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, K, (B,), generator=g)
    if B == 2 and K == 3 and seed == 2:
        labels = torch.tensor([1, 1])                         # batch 2 with a collision
    ref_table = -20 + 5 * torch.randn(B, K + 1, generator=g, dtype=torch.float64)
    start = ref_table + 4 * torch.randn(B, K + 1, generator=g, dtype=torch.float64)
    # the official code draws the null rows as torch.rand(B) < uncond_ratio, like contrastive_labels
    uncond = torch.rand(B, generator=torch.Generator().manual_seed(100 + seed)) < uncond_ratio
    pos, neg, flags, keep = minicca.contrastive_labels(labels, K, uncond_ratio, "positive",
                                                       torch.Generator().manual_seed(100 + seed))
    assert torch.equal(pos == K, uncond) and keep.all()

    table = start.clone().requires_grad_()
    official = official_cca(table, ref_table, labels, uncond, K, beta, lam)
    official.backward()
    official_grad = table.grad.clone()

    table = start.clone().requires_grad_()
    rows = torch.arange(B)
    ours, _ = minicca.cca_loss(table[rows, pos], table[rows, neg], ref_table[rows, pos],
                               ref_table[rows, neg], beta=beta, lam=lam, neg_as_pos=flags)
    ours.backward()
    assert ours.item() == pytest.approx(official.item(), rel=1e-6)
    assert torch.allclose(table.grad, official_grad, rtol=1e-5, atol=1e-12)
    collisions = (labels.roll(-1) == labels) & ~uncond
    if K == 3 and B == 64:
        assert collisions.sum() >= 10                         # K = 3: many collisions
    if uncond_ratio == 0.3 and B >= 40:
        assert uncond.sum() >= 5
    assert torch.equal(flags, collisions | uncond)


def test_the_official_pairing_of_a_two_row_micro_batch_swaps_the_rows():
    """The official command's micro-batches hold 2 rows (256 / 8 GPUs / 16 accumulation steps)."""
    pos, neg, flags, _ = minicca.contrastive_labels(torch.tensor([4, 9]), 10, 0.0)
    assert torch.equal(neg, torch.tensor([9, 4])) and not flags.any()
    pos, neg, flags, _ = minicca.contrastive_labels(torch.tensor([4, 4]), 10, 0.0)
    assert flags.all()                                        # same class: both rows are positives


# --------------------------------------------------------------------------------------------------
# No host sync and no data-dependent shapes: torch.compile(fullgraph=True), CUDA sync debug mode

def compiled_vs_eager(fn, backend, dtype=torch.float32):
    torch._dynamo.reset()
    g = torch.Generator().manual_seed(0)
    pp, pn, rp, rn = (-30 + 5 * torch.randn(32, generator=g, dtype=dtype) for _ in range(4))
    flags = torch.rand(32, generator=g) < 0.3
    results = []
    for run in (fn, torch.compile(fn, fullgraph=True, backend=backend)):
        a, b = pp.clone().requires_grad_(), pn.clone().requires_grad_()
        loss, stats = run(a, b, rp, rn, flags)
        loss.backward()
        results.append((loss.detach(), {k: v.detach() for k, v in stats.items()}, a.grad, b.grad))
    return results


def close(x, y, rtol):
    return torch.allclose(x, y, rtol=rtol, atol=1e-9)


@pytest.mark.parametrize("name", ["cca_loss", "dpo_loss", "unlearning_loss"])
def test_losses_compile_as_one_graph_with_the_same_values_and_gradients(name):
    """fullgraph=True fails on any graph break: .item(), boolean-mask indexing (a data-dependent
    shape), Python branching on tensor values. aot_eager traces forward and backward without a C++
    compiler; inductor, the default backend, is tested below on request (it compiles C++)."""
    loss_fn = getattr(minicca, name)

    def fn(pp, pn, rp, rn, flags):
        return loss_fn(pp, pn, rp, rn, beta=0.1, lam=10.0, neg_as_pos=flags)
    eager, compiled = compiled_vs_eager(fn, "aot_eager")
    assert torch.allclose(compiled[0], eager[0], rtol=1e-6, atol=0)
    assert close(compiled[2], eager[2], 1e-5) and close(compiled[3], eager[3], 1e-5)
    for key in eager[1]:
        assert torch.allclose(compiled[1][key], eager[1][key], rtol=1e-5, atol=1e-6), key


@pytest.mark.skipif(os.environ.get("MINICCA_TEST_INDUCTOR") != "1",
                    reason="inductor compiles C++ kernels (36 s with a cold cache on a 2-core "
                           "machine): too slow for every run, and the aot_eager test checks the "
                           "same one-graph capture; set MINICCA_TEST_INDUCTOR=1 to run it")
def test_cca_loss_under_the_default_inductor_backend():
    def fn(pp, pn, rp, rn, flags):
        return minicca.cca_loss(pp, pn, rp, rn, beta=0.1, lam=10.0, neg_as_pos=flags)
    try:
        eager, compiled = compiled_vs_eager(fn, "inductor")
    except Exception as e:  # no working C++ toolchain: say so rather than fail
        if "compiler" in str(e).lower() or "cpp" in str(e).lower():
            pytest.skip(f"inductor cannot compile here: {type(e).__name__}: {str(e)[:200]}")
        raise
    assert torch.allclose(compiled[0], eager[0], rtol=1e-5, atol=0)
    assert close(compiled[2], eager[2], 1e-4) and close(compiled[3], eager[3], 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device: the check needs one")
def test_the_losses_never_synchronise_with_the_host_on_cuda():
    g = torch.Generator().manual_seed(0)
    pp, pn, rp, rn = (t.cuda() for t in (-30 + 5 * torch.randn(4, 64, generator=g)))
    flags = (torch.rand(64, generator=g) < 0.3).cuda()
    pp.requires_grad_()
    for fn in (minicca.cca_loss, minicca.dpo_loss, minicca.unlearning_loss):
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")             # any host sync now raises
        try:
            loss, stats = fn(pp, pn, rp, rn, beta=0.1, lam=10.0, neg_as_pos=flags)
            loss.backward()
        finally:
            torch.cuda.set_sync_debug_mode("default")
        assert torch.isfinite(loss) and set(stats) == STAT_KEYS


# --------------------------------------------------------------------------------------------------
# The baselines keep their values and gradients (masked means instead of boolean indexing)

def test_dpo_and_unlearning_values_and_gradients_equal_the_indexed_formulas():
    beta, lam = 0.4, 3.0
    g = torch.Generator().manual_seed(0)
    pp, pn, rp, rn = (-10 + 3 * torch.randn(16, generator=g, dtype=torch.float64) for _ in range(4))
    flags = torch.arange(16) % 4 == 1

    def grads(loss_fn):
        a, b = pp.clone().requires_grad_(), pn.clone().requires_grad_()
        loss = loss_fn(a, b)
        loss.backward()
        return loss.detach(), a.grad, b.grad

    def dpo_ours(a, b):
        return minicca.dpo_loss(a, b, rp, rn, beta=beta, neg_as_pos=flags)[0]

    def dpo_indexed(a, b):
        return (-torch.nn.functional.logsigmoid(beta * ((a - rp) - (b - rn))))[~flags].mean()

    def unlearning_ours(a, b):
        return minicca.unlearning_loss(a, b, rp, rn, lam=lam, neg_as_pos=flags)[0]

    def unlearning_indexed(a, b):
        return (-(a - rp).mean() + torch.where(flags, -(b - rn), lam * (b - rn)).mean()) / lam
    for ours, written in ((dpo_ours, dpo_indexed), (unlearning_ours, unlearning_indexed)):
        for x, y in zip(grads(ours), grads(written)):
            assert torch.allclose(x, y, rtol=1e-12, atol=1e-15)
    every_row_flagged = torch.ones(16, dtype=torch.bool)
    loss, _ = minicca.dpo_loss(pp, pn, rp, rn, beta=beta, neg_as_pos=every_row_flagged)
    assert loss.item() == 0.0                            # no contrastive row: nothing to average
