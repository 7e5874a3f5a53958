"""Solutions to the exercises of notebooks/03_porting.ipynb, for the instructor only (no student
notebook imports this file). SOLUTIONS: the accepted answer per checker; WRONG: answers with the
mistake each checker must name."""
import contextlib
import io
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
for folder in (os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE)):  # repo, notebooks
    if folder not in sys.path:
        sys.path.insert(0, folder)

import course  # noqa: E402
import minicca  # noqa: E402


def _wire_logp(model):
    def logp(tokens, labels):
        first = model.first_logits(labels).log_softmax(-1)                   # predicts tokens[:, 0]
        rest = model(tokens, labels)["logits"][:, :-1]                    # predicts tokens[:, 1:]
        return (first.gather(1, tokens[:, :1]).squeeze(1)
                + minicca.sequence_logprob(rest, tokens[:, 1:]))
    return logp


def _off_by_one(model):
    return lambda tokens, labels: minicca.sequence_logprob(model(tokens, labels)["logits"], tokens)


def _no_first_token(model):
    return lambda tokens, labels: minicca.sequence_logprob(
        model(tokens, labels)["logits"][:, :-1], tokens[:, 1:])


def _per_token(model):
    return lambda tokens, labels: model(tokens, labels)["logits"][:, :-1].log_softmax(-1).gather(
        2, tokens[:, 1:, None]).squeeze(2)


def _not_written(*args):
    raise NotImplementedError


SOLUTIONS = {
    "check_remaining_noise": {"drop_prob", "attn_dropout_p", "dropout_prob"},
    "check_official_accuracy_bound": lambda rows, flagged: (rows - flagged) / rows,
    "check_wire_logp": _wire_logp,
}

WRONG = {
    "check_remaining_noise": [
        ("missed drop path", {"attn_dropout_p", "dropout_prob"}),
        ("missed the attention-dropout float", {"drop_prob", "dropout_prob"}),
        ("missed label dropout", {"drop_prob", "attn_dropout_p"}),
        ("listed p", {"p", "drop_prob", "attn_dropout_p", "dropout_prob"}),
        ("not answered yet", None),
    ],
    "check_official_accuracy_bound": [
        ("1.0", lambda rows, flagged: 1.0),
        ("the flagged share", lambda rows, flagged: flagged / rows),
        ("1 - uncond_ratio", lambda rows, flagged: 0.9),
        ("not answered yet", _not_written),
    ],
    "check_wire_logp": [
        ("off by one", _off_by_one),
        ("left out the first token", _no_first_token),
        ("not (B,)", _per_token),
        ("not answered yet", _not_written),
    ],
}


def check_all():
    """Every checker accepts its solution and rejects each wrong answer, naming its mistake."""
    for name, answer in SOLUTIONS.items():
        assert getattr(course, name)(answer, verbose=False), name
        for mistake, wrong in WRONG[name]:
            printed = io.StringIO()
            with contextlib.redirect_stdout(printed):
                assert not getattr(course, name)(wrong), (name, mistake)
            assert mistake in printed.getvalue(), (name, mistake, printed.getvalue())


if __name__ == "__main__":  # python notebooks/instructor/solutions_03.py
    check_all()
    print("every 03 checker accepts its solution and names each wrong answer's mistake")
