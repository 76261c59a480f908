"""Registered methods. Importing this package fills ``METHODS``."""

from okd.methods import (  # noqa: F401  (each import registers its methods)
    baseline,
    cl_ilr,
    cmff,
    dml,
    ffl,
    ffsd,
    individual,
    kd,
    kdcl,
    leader_sl,
    lmcl,
    mcl,
    okddip,
    okdph,
    one,
    pcl,
    switokd,
    switokd_multi,
)
from okd.methods.base import METHODS, Method, MethodContext, ParamGroup, register_method

__all__ = ["METHODS", "Method", "MethodContext", "ParamGroup", "register_method"]
