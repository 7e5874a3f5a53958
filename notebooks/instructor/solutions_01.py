"""Solutions to the exercises of 01_cfg_to_cca.ipynb (instructor only; the student notebooks never
import this file). tests/test_notebooks.py checks that course.check_<name> accepts every SOLUTIONS
answer and rejects every WRONG answer, printing the named mistake."""
import numpy as np


def lam_star(s, p_x_given_c, p_x):
    # λ*_s(c) = Z_s(c)^(1/s), Z_s(c) = Σ_x p(x|c)^(1+s) p(x)^(-s): the tilted mass is then 1
    Z = (p_x_given_c ** (1 + s) * p_x[:, None] ** (-s)).sum(0)
    return Z ** (1 / s)


# Exercise 7.1, the two-image world: p(x|0) = (3/4, 1/4), p(x) = (1/2, 1/2), s = 2. By hand:
# Z_2 = (3/4)^3 (1/2)^-2 + (1/4)^3 (1/2)^-2 = 4 (27 + 1)/64 = 7/4, so λ*_2 = (7/4)^(1/2) ≈ 1.3229
TWO_IMAGES = (np.array([[0.75], [0.25]]), np.array([0.5, 0.5]))


def r_star_mask(p_x_given_c, p_x, p_c, lam):
    # a row (x, c; c⁻) is dropped with probability p(c) on its positive side (the rolled label
    # equals c) and, as a negative pair (x, c), whenever the true label of x is c: positives
    # a = p(x, c)(1 - p(c)), negatives b = p(x)p(c)(1 - p(c|x)), both over the same kept share
    # 1 - Σ p(c)², which cancels. r* = log a/(λb):
    p_c_given_x = p_x_given_c * p_c / p_x[:, None]
    return (np.log(p_x_given_c / p_x[:, None]) - np.log(lam) + np.log(1 - p_c)
            - np.log(1 - p_c_given_x))


def _positive_rule(p_x_given_c, p_x, p_c, lam):
    p_c_given_x = p_x_given_c * p_c / p_x[:, None]
    return (np.log(p_x_given_c / p_x[:, None]) - np.log(lam) + np.log(1 + p_c)
            - np.log(1 - p_c_given_x))


def _no_shift(p_x_given_c, p_x, p_c, lam):
    return np.log(p_x_given_c / p_x[:, None]) - np.log(lam)


def _not_written(*args):
    raise NotImplementedError


SOLUTIONS = {"check_lam_star": float(lam_star(2.0, *TWO_IMAGES)[0]),
             "check_r_star_mask": r_star_mask}

WRONG = {
    "check_lam_star": [("that is Z_s(c) itself", 1.75),
                       ("that is log λ*", float(np.log(lam_star(2.0, *TWO_IMAGES)[0]))),
                       ("that is λ*_1", float(lam_star(1.0, *TWO_IMAGES)[0])),
                       ("not answered yet", None)],
    "check_r_star_mask": [("the positive rule's shift", _positive_rule),
                          ("no shift", _no_shift),
                          ("not answered yet", _not_written)],
}
