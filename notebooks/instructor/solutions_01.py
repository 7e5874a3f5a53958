"""Solutions to the exercises of 01_cfg_to_cca.ipynb (instructor only; the student notebooks never
import this file). tests/test_notebooks.py checks that course.check_<name> accepts every SOLUTIONS
answer and rejects every WRONG answer, printing the named mistake."""
import numpy as np


def lam_star(s, p_x_given_c, p_x):
    # λ*_s(c) = Z_s(c)^(1/s), Z_s(c) = Σ_x p(x|c)^(1+s) p(x)^(-s): the tilted mass is then 1
    Z = (p_x_given_c ** (1 + s) * p_x[:, None] ** (-s)).sum(0)
    return Z ** (1 / s)


def r_star_mask(p_x_given_c, p_x, p_c, lam):
    # a row (x, c; c⁻) is dropped with probability p(c) on its positive side (the rolled label
    # equals c) and, as a negative pair (x, c), whenever the true label of x is c: positives
    # a = p(x, c)(1 - p(c)), negatives b = p(x)p(c)(1 - p(c|x)), both over the same kept share
    # 1 - Σ p(c)², which cancels. r* = log a/(λb):
    p_c_given_x = p_x_given_c * p_c / p_x[:, None]
    return (np.log(p_x_given_c / p_x[:, None]) - np.log(lam) + np.log(1 - p_c)
            - np.log(1 - p_c_given_x))


def _z_not_lambda(s, p_x_given_c, p_x):
    return (p_x_given_c ** (1 + s) * p_x[:, None] ** (-s)).sum(0)


def _renyi(s, p_x_given_c, p_x):
    return np.log(lam_star(s, p_x_given_c, p_x))


def _positive_rule(p_x_given_c, p_x, p_c, lam):
    p_c_given_x = p_x_given_c * p_c / p_x[:, None]
    return (np.log(p_x_given_c / p_x[:, None]) - np.log(lam) + np.log(1 + p_c)
            - np.log(1 - p_c_given_x))


def _no_shift(p_x_given_c, p_x, p_c, lam):
    return np.log(p_x_given_c / p_x[:, None]) - np.log(lam)


def _not_written(*args):
    raise NotImplementedError


SOLUTIONS = {"check_lam_star": lam_star, "check_r_star_mask": r_star_mask}

WRONG = {
    "check_lam_star": [("that is Z_s(c) itself", _z_not_lambda),
                       ("that is log λ*", _renyi),
                       ("not written yet", _not_written)],
    "check_r_star_mask": [("the positive rule's shift", _positive_rule),
                          ("no shift", _no_shift)],
}
