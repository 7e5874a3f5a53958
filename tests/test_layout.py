"""The shape of minicca.py, read from its source: sections 1-7 (data to evaluation) take plain values
(a settings dict, the seed, the device) and never the command line or the pipeline object, which meet
them in section 8; and the file stays one sitting (the teaching core above the Plumbing banner at most
1,000 lines, the whole file at most 1,900)."""
import ast
import os

import pytest
import torch

import minicca

SOURCE = open(minicca.__file__, encoding="utf-8").read()
LINES = SOURCE.splitlines()
FORBIDDEN = {"args", "run", "r", "pipeline"}  # the parsed command line and the pipeline object


def header_line(prefix):
    return next(i + 1 for i, line in enumerate(LINES) if line.startswith(prefix))


def functions_in(first, last):
    return [node for node in ast.walk(ast.parse(SOURCE))
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and first < node.lineno < last]


def test_sections_1_to_7_take_no_command_line_nor_pipeline():
    first, last = header_line("# 1. Data"), header_line("# 8. The pipeline")
    functions = functions_in(first, last)
    names = {f.name for f in functions}
    assert {"load_dataset", "train_loop", "train_tokenizer", "train_gpt", "finetune_cca",
            "evaluate"} <= names  # the range holds the teaching path
    assert "setup" not in names and "stage_eval" not in names
    broken = []
    for f in functions:
        params = f.args.posonlyargs + f.args.args + f.args.kwonlyargs
        params += [a for a in (f.args.vararg, f.args.kwarg) if a is not None]
        broken += [f"{f.name}: parameter {a.arg}" for a in params if a.arg in FORBIDDEN]
        for node in ast.walk(f):
            if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) \
                    and node.value.id in FORBIDDEN:
                broken.append(f"{f.name} (line {node.lineno}): {node.value.id}.{node.attr}")
            if isinstance(node, ast.Name) and node.id in FORBIDDEN:
                broken.append(f"{f.name} (line {node.lineno}): uses {node.id}")
    assert not broken, broken


def test_the_pipeline_stages_share_one_signature():
    stages = [node for node in ast.parse(SOURCE).body
              if isinstance(node, ast.FunctionDef) and node.name.startswith("stage_")]
    assert len(stages) >= 8
    for stage in stages:
        assert [a.arg for a in stage.args.args] == ["pipeline"], stage.name


def test_the_teaching_core_is_one_sitting():
    banner = header_line("# Plumbing")
    print(f"\nteaching core: {banner - 2} lines above the Plumbing banner; whole file: {len(LINES)}")
    assert banner - 2 <= 1000


def test_the_whole_file_is_at_most_1900_lines():
    assert len(LINES) <= 1900


def test_tools_import_minicca_and_ship_nothing_of_it():
    tools = os.path.join(os.path.dirname(minicca.__file__), "tools")
    for name in ["make_judge.py", "export_pretrained.py", "bench.py"]:
        text = open(os.path.join(tools, name), encoding="utf-8").read()
        assert "import minicca" in text
    for gone in ["make_judge", "judge_accuracy", "machine", "bf16_is_fast", "export_pretrained",
                 "Classifier", "train_classifier", "TOKENIZER_KEYS_ADDED", "precision_key", "bench",
                 "timed", "peak_memory", "report_bench"]:
        assert not hasattr(minicca, gone), gone


def test_a_folder_from_an_older_version_stops_with_the_retrain_line(tmp_path, capsys):
    """No shims for older run folders: a tokenizer.pt whose recorded settings lack a key that this
    version records (older versions left out precision and vq_lr_floor at their defaults) is a
    checkpoint made with other settings, and the run stops with that line."""
    out = tmp_path / "run"
    minicca.main(["--preset", "micro", "--out", str(out), "--no-cca", "--no-eval"])
    ckpt = torch.load(out / "tokenizer.pt", weights_only=True)
    del ckpt["config"]["precision"], ckpt["config"]["vq_lr_floor"]
    torch.save(ckpt, out / "tokenizer.pt")
    capsys.readouterr()
    with pytest.raises(SystemExit) as stop:
        minicca.main(["--preset", "micro", "--out", str(out), "--no-cca", "--no-eval"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert "was made with other settings (precision: None -> 'fp32'; vq_lr_floor: None -> 1.0)" in err
    assert "pass --retrain tokenizer" in err
