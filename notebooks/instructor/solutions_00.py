"""Solutions to the exercises of 00_tour.ipynb (instructor only; the student notebooks never import
this file). tests/test_notebooks.py checks that course.check_<name> accepts every SOLUTIONS answer
and rejects every WRONG answer, printing the named mistake."""
import math

lam, u, K = 10.0, 0.1, 10
flagged = u + (1 - u) / K  # null rows, plus collisions among the other rows: 0.19

SOLUTIONS = {
    # CFG runs B rows with the class and the same B rows with the null class, whatever w is
    "check_cfg_cost": 2.0,
    # every gap is 0, so each -log σ(0) = log 2: the positive term log 2, the negative term
    # log 2 · (λ on unflagged rows, 1 on flagged ones), the total divided by max(λ, 1)
    "check_step0_loss": (1 + (1 - flagged) * lam + flagged) * math.log(2) / max(lam, 1),
}

WRONG = {
    "check_cfg_cost": [
        ("the null-class pass is forgotten", 1.0),
        ("the cost does not grow with w", 3.0),
    ],
    "check_step0_loss": [
        ("every row weighted by λ", (1 + lam) * math.log(2) / lam),
        ("collisions forgotten", (1 + (1 - u) * lam + u) * math.log(2) / lam),
        ("no normalisation", (1 + (1 - flagged) * lam + flagged) * math.log(2)),
    ],
}
