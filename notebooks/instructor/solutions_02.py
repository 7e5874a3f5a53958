"""Solutions to the exercises of 02_tradeoff.ipynb (instructor only; the student notebooks never
import this file). tests/test_notebooks.py checks that course.check_<name> accepts every SOLUTIONS
answer and rejects every WRONG answer, printing the named mistake."""
import math

beta, lam, K = 0.1, 100.0, 10

SOLUTIONS = {
    # push on a wrong pair λβσ(β·gap⁻) = pull on a true pair βσ(-β·0) = β/2
    # <=> σ(β·gap⁻) = 1/(2λ) <=> β·gap⁻ = -log(2λ - 1)
    "check_balance_point": -math.log(2 * lam - 1) / beta,
    # λ*_s(c) = E_{x~p(.|c)}[(p(x|c)/p(x))^s]^(1/s) and p(x|c)/p(x) = p(c|x)/p(c) = 1/(1/K) = K on
    # every image of the class: λ* = K whatever s (below K as soon as some images are ambiguous)
    "check_separable_lambda": float(K),
}

WRONG = {
    "check_balance_point": [("the pull at gap⁺ = 0 is β·σ(0) = β/2", -math.log(lam) / beta),
                            ("β dropped", -math.log(2 * lam - 1)),
                            ("sign", math.log(2 * lam - 1) / beta)],
    "check_separable_lambda": [("that is log λ*", math.log(K)), ("that is p(c), the prior", 1 / K),
                               ("the power 1 + s without the root 1/s", float(K) ** 2)],
}
